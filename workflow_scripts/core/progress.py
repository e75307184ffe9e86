"""Progress of long work in the job's log: done out of total, the rate and the time left."""

import logging
import time

LOG = logging.getLogger(__name__)


def _figure(value):
    return f"{value:,.1f}" if abs(value) < 100 else f"{value:,.0f}"


class Progress:
    """Logs ``what``'s progress at most every ``every`` seconds, and once when it completes.

    Amounts are counted in ``unit`` after dividing by ``scale`` (``Progress("hashing", n, " GB", 1e9)``).
    """

    def __init__(self, what, total, unit="", scale=1, every=10.0):
        self.what, self.total, self.unit, self.scale, self.every = what, total, unit, scale, every
        self.done = 0
        self.start = self.last = time.monotonic()

    def advance(self, amount=1, note=""):
        self.reach(self.done + amount, note)

    def reach(self, done, note=""):
        """Set the amount done; ``note`` adds figures of the caller's own (", 120 records")."""
        self.done = done
        now = time.monotonic()
        if now - self.last < self.every and done < self.total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        left = (self.total - done) / rate if rate else float("inf")
        LOG.info(
            "%s: %s of %s%s (%.0f%%)%s, %s%s/s, about %.0f s left",
            self.what,
            _figure(done / self.scale),
            _figure(self.total / self.scale),
            self.unit,
            100 * done / max(self.total, 1e-9),
            note,
            _figure(rate / self.scale),
            self.unit,
            left,
        )
