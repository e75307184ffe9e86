"""Running a stage from the command line: logging set up once, and a stage error as one line and exit status 1."""

import argparse
import logging
import os
import sys
from pathlib import Path

from workflow_scripts.core.errors import StageError
from workflow_scripts.core.files import disk_full, full_reason

# Loggers that say INFO for every HTTP request (huggingface_hub's and openai's transport): a line per request
# would bury a stage's own progress lines, so they say only warnings.
CHATTY_LOGGERS = ("httpx2",)


def run_cli(main, argv=None):
    """Run a stage's (or a tool's) ``main``; turn a :class:`StageError`, or an error that says the disk is full,
    into a one-line message and exit 1.

    Logging is set up here and nowhere else: every record goes to stderr (a job's log) as ``time level logger:
    message``, from INFO up; the chatty HTTP loggers from WARNING up. The libraries log through their module's
    logger and configure nothing; the server hands uvicorn's loggers to this set-up too (serve.py)."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if not sys.stderr.isatty():
        quiet_progress_bars()
    try:
        main(sys.argv[1:] if argv is None else argv)
    except StageError as error:  # DiskFull among them: a full disk met where the stage writes its outputs
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except Exception as error:
        message = full_disk_message(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


def full_disk_message(error):
    """The one line for a full disk met outside the output helpers (files.py), which name the path themselves: the
    file the error names, or, where it names none, the error itself (its traceback goes to the log). None for
    any other error."""
    reason = full_reason(error)
    if reason is None:
        return None
    named = getattr(error, "filename", None)
    if named is not None and not isinstance(named, int):
        return str(disk_full(error, os.fsdecode(named)))
    logging.getLogger(__name__).error("%s", reason, exc_info=error)
    said = (str(error).splitlines() or [""])[0]
    return f"{reason} while writing a file the stage does not name ({type(error).__name__}: {said})"


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


MANIFEST_FOLDER = folder_of("MANIFEST.json")
TOKENIZER_FOLDER = folder_of("tokenizer.json")


def add_variant_arguments(parser, checkpoint_help):
    """The model, the variant, and the checkpoints it runs from: the patched one and its own."""
    parser.add_argument("--model", required=True)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--patched", required=True, type=MANIFEST_FOLDER, help="the patched checkpoint's MANIFEST.json")
    parser.add_argument("--checkpoint", required=True, type=MANIFEST_FOLDER, help=checkpoint_help)


def add_tokenizer_arguments(parser, files_help):
    """A fetched dataset's files and the stored tokenizer that tokenizes them, by its fingerprint."""
    parser.add_argument("--files", required=True, type=MANIFEST_FOLDER, help=files_help)
    parser.add_argument("--tokenizer", required=True, type=TOKENIZER_FOLDER, help="the stored tokenizer.json")
    parser.add_argument("--fingerprint", required=True, help="the tokenizer's fingerprint, recorded in the outputs")
