"""Progress bars whose time left ignores the warm-up.

The first video of an extraction pays for things the others do not: starting the decode worker, the first
decoder and flow calls, the CNN's first batch (kernel selection, memory allocation). Counted into the rate, that
one video made the first time left printed on the demo 2 h 11 min, for an extraction that took 14 minutes. ``WarmEta`` measures the rate from the end of the first item on; until a second item is done it says
it is still warming up rather than guessing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["WarmEta", "format_seconds", "warm_bar"]


def format_seconds(seconds: float) -> str:
    """``42s``, ``3:07`` (minutes:seconds) or ``1:02:03`` (hours:minutes:seconds)."""
    s = round(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class WarmEta:
    """Time left for ``total`` items, at the rate measured after the first item finished.

    ``update(n)`` records ``n`` more items done. ``seconds_left()`` is ``None`` until two items are done (one
    interval after the warm-up is the least a rate can be read from), then ``(total - done) * mean seconds per item
    since the first finished``.
    """

    def __init__(self, total: int, clock: Callable[[], float] = time.perf_counter):
        self.total, self.done, self._clock = total, 0, clock
        self.start = clock()
        self.first_done: float | None = None  # when the first item (the warm-up) finished

    def update(self, n: int = 1) -> None:
        if n <= 0:
            return
        if self.first_done is None:
            self.first_done = self._clock()
        self.done += n

    @property
    def warmup_seconds(self) -> float | None:
        return None if self.first_done is None else self.first_done - self.start

    def rate(self) -> float | None:
        """Items per second after the warm-up, or ``None`` before the second item."""
        if self.first_done is None or self.done < 2:
            return None
        elapsed = self._clock() - self.first_done
        return (self.done - 1) / elapsed if elapsed > 0 else None

    def seconds_left(self) -> float | None:
        rate = self.rate()
        if self.done >= self.total:
            return 0.0
        return None if rate is None else (self.total - self.done) / rate

    def text(self) -> str:
        left = self.seconds_left()
        if left is not None:
            return format_seconds(left)
        return "? (warm-up)" if self.done < 2 else "?"


def warm_bar(total: int, disable: bool, desc: str | None = None, unit: str = "video"):
    """A tqdm bar without tqdm's own time left (its rate includes the warm-up); ``WarmEta`` fills the ``left``
    field of the postfix instead. Returns (bar, eta)."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit=unit, desc=desc, disable=disable, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
    return bar, WarmEta(total)
