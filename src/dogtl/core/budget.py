"""Time budgets: `--budget 90s|30m|1h` parsed in one place, and the deadline that work checks.

A budget is a promise to the user, measured on the wall clock from the moment the command
started (Python and TensorFlow start-up included). Work keeps it by checking a `Deadline`
between units of work it can stop after (an epoch, a trial), never by predicting how long
the rest will take.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from dogtl.core.errors import DogtlError

_UNITS = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
_IMPORTED = time.time()  # the fallback start of this process where /proc is not there


def parse_budget(value, option: str = "--budget") -> float:
    """Seconds from 90, '90', '90s', '30m', '1.5h' or '1h30m'; DogtlError naming the value otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
        if not parts or "".join(n + u for n, u in parts) != text.replace(" ", "") \
                or any(u not in _UNITS for _, u in parts):
            raise DogtlError(f"{option} {value!r}: give a time like 90s, 30m or 1h (a bare number is seconds)")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise DogtlError(f"{option} {value!r}: must be a positive time, e.g. 90s, 30m or 1h")
    return seconds


def format_seconds(seconds: float) -> str:
    """120 -> '2m', 62 -> '1m02s', 5400 -> '1h30m', 42.3 -> '42s': budgets, elapsed times and ETAs
    alike, and what --budget reads back."""
    hours, rest = divmod(int(round(seconds)), 3600)
    parts = [(hours, "h"), *zip(divmod(rest, 60), "ms")]
    shown = [(n, unit) for n, unit in parts if n]
    return "".join(f"{n:02d}{unit}" if i else f"{n}{unit}" for i, (n, unit) in enumerate(shown)) or "0s"


def process_start() -> float:
    """The wall-clock time (time.time()) at which this process started: from /proc on Linux,
    else when dogtl was first imported (which misses only the interpreter's own start-up)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        started = boot + ticks / os.sysconf("SC_CLK_TCK")
        # btime has whole seconds: never later than now, never earlier than a second before the import
        return min(max(started, _IMPORTED - 60.0), time.time())
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


@dataclass(frozen=True)
class Deadline:
    """A wall-clock instant (time.time()) work must end by."""

    at: float

    @classmethod
    def after(cls, seconds: float, started: float | None = None) -> "Deadline":
        """`seconds` after `started` (default: now)."""
        return cls((time.time() if started is None else started) + seconds)

    def left(self) -> float:
        """Seconds until the deadline (negative once it has passed)."""
        return self.at - time.time()

    def passed(self, need: float = 0.0) -> bool:
        """True when fewer than `need` seconds are left: a unit of work that took `need` seconds
        last time would not end by the deadline."""
        return self.left() < need

    def share(self, fraction: float) -> "Deadline":
        """A deadline `fraction` of the time now left from now (a stage's share of what remains)."""
        return Deadline(time.time() + max(0.0, self.left()) * fraction)

    def earlier(self, seconds: float) -> "Deadline":
        return Deadline(self.at - seconds)
