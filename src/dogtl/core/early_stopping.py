"""Keeping the best epoch and stopping when validation stops improving: one tracker for
train-head, every sweep trial and fine-tuning, so `--patience` means the same everywhere."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class EarlyStopping:
    """Tracks the lowest validation log loss seen and says when to stop.

    `patience`: epochs in a row without a lower loss before stopping; 0 never stops early
    (the best epoch is still the one kept). A non-finite loss (diverged training) stops at
    once and is never the best. Plain fields, so a resumable run can save and restore it
    (`dataclasses.asdict`, `EarlyStopping(**saved)`).
    """

    patience: int
    best_loss: float = math.inf
    best_epoch: int = 0
    waited: int = 0
    stopped: bool = False

    def update(self, epoch: int, loss: float) -> bool:
        """Record epoch `epoch`'s validation loss; True when it is the new best."""
        if not math.isfinite(loss):
            self.stopped = True
            return False
        if loss < self.best_loss:
            self.best_loss, self.best_epoch, self.waited = float(loss), int(epoch), 0
            return True
        self.waited += 1
        if self.patience and self.waited >= self.patience:
            self.stopped = True
        return False
