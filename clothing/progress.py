"""Progress of a long pass over images, as a user's terminal or log file wants it.

On a terminal a tqdm bar redraws itself in place. Anywhere else (a log file, CI, a pipe) a bar would
write hundreds of carriage-return updates into the file, so it prints one line when the pass ends
instead: what was done, in how long, at what rate.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

from tqdm import tqdm


class _Count:
    """What a pass reports when no bar is drawn: the count, for the closing line."""

    def __init__(self) -> None:
        self.n = 0

    def update(self, count: int) -> None:
        self.n += count


@contextlib.contextmanager
def progress(total: int, desc: str, enabled: bool = True, unit: str = "img") -> Iterator[tqdm | _Count]:
    """A tqdm bar on stderr when it is a terminal; else a counter and one `desc: N img in S s (R img/s)`
    line at the end (nothing when `enabled` is False). Either way the caller calls `.update(count)`."""
    if enabled and sys.stderr.isatty():
        with tqdm(total=total, unit=unit, desc=desc, file=sys.stderr) as bar:
            yield bar
        return
    count, start = _Count(), time.perf_counter()
    yield count
    if enabled:
        seconds = time.perf_counter() - start
        rate = f" ({count.n / seconds:.1f} {unit}/s)" if seconds > 0 else ""
        print(f"{desc}: {count.n} {unit} in {seconds:.1f} s{rate}", file=sys.stderr)
