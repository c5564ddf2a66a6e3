"""The ``nil`` command line. Commands only parse options and call library functions."""

from __future__ import annotations

import logging
import sys

import click

from nil.errors import NilError

USER_ERRORS: tuple[type[Exception], ...] = (NilError,)
try:  # the index package's own user errors, when it is importable
    from faiss_index import IndexFormatError, IndexInputError

    USER_ERRORS += (IndexInputError, IndexFormatError)
except ImportError:  # pragma: no cover
    pass


class NilGroup(click.Group):
    """Turns a user error anywhere below into one clear sentence and exit code 1, no traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=NilGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="nil")
def main(verbose: int) -> None:
    """nil: distractor-aware training for medical image classifiers.

    Images of another class that look alike ("distractors") sit close together in a CNN's feature
    space. nil finds each training image's nearest other-class neighbour (exactly, or with a FAISS
    index) and adds a loss that pushes the two apart, trained together with cross-entropy.

    Start with `nil demo`; train on your data with `nil train --data PATH --out RUN_DIR`.
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)


# Command modules never import this one (no import circle); the bench and index groups take their
# subcommands from the modules that define them (bench_accuracy, bench_serve, serve_commands).
from cli import bench_accuracy, bench_serve, serve_commands  # noqa: E402,F401
from cli.bench_commands import bench  # noqa: E402
from cli.commands import audit, data, demo, eval_, report, train  # noqa: E402
from cli.index_commands import index  # noqa: E402

for _command in (demo, train, eval_, report, audit, data, index, bench):
    main.add_command(_command)
