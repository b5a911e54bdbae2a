"""Progress events: what a running stage reports, in one shape for every stage.

The stages call their `progress` callback with a `ProgressEvent`: images processed
(extraction, fine-tuning steps, inference), a finished epoch with its `EpochRecord`, a
sweep's finished run, an event of `--auto`'s search, or a line of text. The library only emits them. The command line draws
them (cli/common.py: a rich bar in a terminal or notebook, plain lines in logs);
`dogtl.<stage>(progress=True)` prints them as plain lines (`PlainRenderer`); a callable passed
as `progress` gets the events themselves.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

from dogtl.core.budget import format_seconds
from dogtl.core.epochs import EpochRecord

# What each stage's plain lines call it.
VERBS = {"extract": "extracting", "train-head": "training the head", "finetune": "fine-tuning",
         "evaluate": "evaluating", "predict": "predicting", "sweep": "sweep"}


@dataclass(frozen=True)
class ProgressEvent:
    stage: str  # the command reporting: a key of VERBS, "auto" (train-head --auto's search) or "fit" (fit's lines)
    done: int = 0  # units finished so far (of the whole run, resumed work included)
    total: int = 0  # units in all
    unit: str = "images"  # "images", "epochs" (with `record`), "runs" (a sweep's), "" (a message alone)
    record: EpochRecord | None = None  # the epoch just finished
    seconds: float | None = None  # that epoch's seconds
    best: bool = False  # that epoch is the best so far
    message: str | None = None  # a line to show
    detail: dict | None = None  # a sweep's run: record (None before the first), skipped, best, label; a
    # search's event: "event" (fold, pruned, diverged, trial, member) and its figures (sweeps/autosearch.py)

    def line(self) -> str | None:
        """The line shown for this event (an epoch's figures or the message); None for events
        that only move a bar."""
        if self.message is not None:
            return self.message
        r = self.record
        if r is None:
            return None
        if self.stage == "train-head":
            return (f"epoch {r.epoch:>3}/{self.total}  loss {r.loss:.4f}  acc {r.accuracy:.4f}  "
                    f"val_loss {r.val_loss:.4f}  val_acc {r.val_accuracy:.4f}  lr {r.lr:.2e}  {self.seconds:.2f} s")
        return (f"epoch {r.epoch}/{self.total}: loss {r.loss:.4f} acc {r.accuracy:.3f}"
                f"  val log loss {r.val_loss:.4f} val acc {r.val_accuracy:.3f}  lr {r.lr:.2e}{' *' if self.best else ''}")


Progress = Callable[[ProgressEvent], None]


def counting(progress: Progress | None, stage: str, unit: str = "images"):
    """A (done, total) callback for the loops that count images (extraction, inference), emitting
    `stage`'s events to `progress`; None when `progress` is None."""
    if progress is None:
        return None
    return lambda done, total: progress(ProgressEvent(stage, done, total, unit))


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class PlainProgress:
    """Progress for logs, where a bar cannot be drawn (nohup, CI, a notebook's `!dogtl`): one line
    on stderr when the work starts and then every DOGTL_PROGRESS_SECONDS (default 30) seconds,
    with what is done, the rate and the time left, and one when it ends."""

    def __init__(self, description: str, unit: str = "images", every: float | None = None, clock=None):
        self.description, self.unit = description, unit
        self.every = every if every is not None else float(os.environ.get("DOGTL_PROGRESS_SECONDS", 30))
        self.clock = clock or time.monotonic
        self.started = self.last = None
        self.ended = False
        self.first = 0  # done at the first line (work resumed or done before it counts in no rate)

    def update(self, done: int, total: int):
        now = self.clock()
        if self.started is None:
            self.started, self.last, self.first = now, now, done
            self._line(done, total, now)
        elif done >= total and not self.ended:
            self.ended = True
            self._line(done, total, now)
        elif done < total and now - self.last >= self.every:
            self.last = now
            self._line(done, total, now)

    def _line(self, done: int, total: int, now: float):
        share = f" ({done / total:.0%})" if total else ""
        text = f"{self.description}: {done}/{total} {self.unit}{share}"
        elapsed = now - self.started
        if elapsed > 0 and done > self.first:
            rate = (done - self.first) / elapsed
            text += f", {rate:.1f} {self.unit}/s, {format_seconds(elapsed)} elapsed"
            text += f", ETA {format_seconds((total - done) / rate)}" if done < total else ""
        _err(text)


class PlainRenderer:
    """`progress=True` in the Python API: every event as plain lines on stderr, the lines of
    `ProgressEvent.line` as they come and counts as PlainProgress lines (the bars are the CLI's)."""

    def __init__(self):
        self.counters: dict[tuple[str, str], PlainProgress] = {}

    def __call__(self, event: ProgressEvent) -> None:
        line = event.line()
        if line is not None:
            _err(line)
        elif event.unit and event.total:
            key = (event.stage, event.unit)
            if key not in self.counters:
                self.counters[key] = PlainProgress(VERBS.get(event.stage, event.stage), event.unit)
            self.counters[key].update(event.done, event.total)
