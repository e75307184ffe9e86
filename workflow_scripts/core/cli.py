"""Running a stage from the command line: log format, and a stage error as one line and exit status 1."""

import argparse
import logging
import os
import sys
from pathlib import Path

from workflow_scripts.core.errors import StageError



def run_cli(main, argv=None):
    """Run a stage's ``main``; turn a :class:`StageError` into a one-line message and exit 1."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not sys.stderr.isatty():
        quiet_progress_bars()
    try:
        main(sys.argv[1:] if argv is None else argv)
    except StageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


def quiet_progress_bars():
    """No hub or transformers progress bars: in a job's log file each redraw is a line of noise, and the stages
    log their own progress (core/progress.py). A stage run at a terminal keeps them."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub is first imported
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def folder_of(file_name):
    """An argparse type for a folder named by a file in it: the path the rule declares (``MANIFEST.json``,
    ``tokenizer.json``), so that no rule rebuilds the folder's path by hand. A folder given instead is refused."""

    def folder(value):
        path = Path(value)
        if path.name != file_name:
            raise argparse.ArgumentTypeError(f"{value}: name the folder's {file_name}, not the folder")
        return path.parent

    folder.__name__ = file_name  # argparse names the type in its error
    return folder
