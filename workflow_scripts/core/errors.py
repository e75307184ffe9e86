"""The errors a stage reports as one clear line, without a traceback."""


class StageError(Exception):
    """A failure reported as one clear line without a traceback."""


class InputError(StageError):
    """Bad input a user can fix: the message names the model, the key or the file."""


class CheckFailed(StageError):
    """A verification whose figures are outside their bounds."""
