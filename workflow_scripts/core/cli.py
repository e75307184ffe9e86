"""Running a stage from the command line: log format, and a stage error as one line and exit status 1."""

import logging
import sys

from workflow_scripts.core.errors import StageError

LOG = logging.getLogger("workflow_scripts")


def run_cli(main, argv=None):
    """Run a stage's ``main``; turn a :class:`StageError` into a one-line message and exit 1."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        main(sys.argv[1:] if argv is None else argv)
    except StageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
