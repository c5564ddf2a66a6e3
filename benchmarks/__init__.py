"""Benchmarks of nil: mining cost and recall, training-step cost, accuracy on real data.

Results (JSON, markdown, PNG) are written under ``benchmarks/results/`` by the ``nil bench``
commands; each result file records the command and the machine that made it.
"""
