"""``python -m cli`` (and ``torchrun -m cli``) runs the same application as the ``nil`` script."""

from cli.main import main

if __name__ == "__main__":
    main()
