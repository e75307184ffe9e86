"""The errors a stage reports as one clear line, without a traceback."""


class StageError(Exception):
    """A failure reported as one clear line without a traceback."""


class InputError(StageError):
    """Bad input a user can fix: the message names the model, the key or the file."""


class CheckFailed(StageError):
    """A verification whose figures are outside their bounds."""


class DiskFull(StageError):
    """A write that found no space left (or the quota spent) on its file system, or was refused before it began.

    The message names the path (the output's own, never a staging or temporary name), the bytes the write
    needed where they are known, and the bytes free on its file system when it failed. ``needed`` is exact or a
    lower bound (``at_least``: what a file held when its file system filled); ``early`` marks a refusal before
    anything was written (a free-space check); ``elsewhere``, an error that named no file while the output's
    file system reported room: another file system the stage writes to may be the full one.
    """

    def __init__(
        self, path, free, needed=None, at_least=False, early=False, elsewhere=False, reason="no space left on device"
    ):
        self.path, self.free, self.needed = path, free, needed
        self.at_least, self.early, self.elsewhere, self.reason = at_least, early, elsewhere, reason
        super().__init__(str(self))

    def __str__(self):
        free = f"{self.free} bytes free on its file system" if self.free is not None else "its file system is full"
        if self.elsewhere:
            return (
                f"{self.reason} while writing {self.path} (its file system reports {self.free} bytes free, so the "
                "full one may be another the stage writes to: a cache, the temporary folder)"
            )
        if self.needed is None:
            needed = ""
        elif self.at_least:
            needed = f"more than {self.needed} bytes needed, "
        else:
            needed = f"{self.needed} bytes needed, "
        if self.early:
            return f"not enough space on device to write {self.path}: {needed}{free}; nothing was written"
        return f"{self.reason} writing {self.path}: {needed}{free}"

    def but(self, **changes):
        """The same failure with ``changes`` (``path``, ``needed``, ...)."""
        fields = ("path", "free", "needed", "at_least", "early", "elsewhere", "reason")
        return DiskFull(**{field: changes.get(field, getattr(self, field)) for field in fields})
