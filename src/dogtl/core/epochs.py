"""One finished training epoch, as every epoch loop records it (train-head, the fused sweep,
fine-tuning) and as the history CSV beside each model stores it, one row per epoch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    loss: float  # mean training loss over the epoch's steps
    accuracy: float  # training accuracy over the epoch
    val_loss: float  # validation log loss
    val_accuracy: float
    lr: float  # the learning rate of the epoch's last step

    def as_row(self) -> dict:
        """The history CSV's row (HISTORY_COLUMNS, in order); also what checkpoints and sweep records store."""
        return asdict(self)


HISTORY_COLUMNS = [f.name for f in fields(EpochRecord)]


def history_frame(rows: list[dict]):
    """The history table of `rows` (EpochRecord.as_row() each), columns HISTORY_COLUMNS even when empty."""
    import pandas as pd  # local: pandas costs the CLI's start-up, and core is imported by every command

    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)
