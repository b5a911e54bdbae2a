"""A finished sweep's tables: results ranked by validation log loss, and the best settings as TOML."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dogtl.core.files import write_text_atomic
from dogtl.sweeps.space import SearchSpace, format_value


def summarise(records: list[dict], trials: list[dict], keys: list[str], space: SearchSpace):
    """One row per trial: its parameters, mean and spread over folds, time; best first."""
    import pandas as pd

    by_trial: dict = {}
    for r in records:
        by_trial.setdefault(r["trial"], []).append(r)
    rows = []
    for trial, key in zip(trials, keys):
        runs = by_trial.get(key)
        if not runs:
            continue
        loss = np.array([r["metrics"]["val_log_loss"] for r in runs], float)
        acc = np.array([r["metrics"]["val_accuracy"] for r in runs], float)
        errors = sorted({r["error"] for r in runs if r.get("error")})
        row = {"trial": key}
        row.update({name: format_value(trial.get(name)) for name in space.names})
        row.update({
            "val_log_loss": float(loss.mean()),
            "val_log_loss_std": float(loss.std(ddof=1)) if len(runs) > 1 else float("nan"),
            "val_accuracy": float(acc.mean()),
            "val_accuracy_std": float(acc.std(ddof=1)) if len(runs) > 1 else float("nan"),
            "epochs_run": float(np.mean([r["metrics"].get("epochs_run", 0) for r in runs])),
            "best_epoch": float(np.mean([r["metrics"].get("best_epoch", 0) for r in runs])),
            "seconds": float(sum(r["seconds"] for r in runs)),
            "folds": len(runs), "error": "; ".join(errors),
        })
        rows.append(row)
    columns = ["trial", *space.names, "val_log_loss", "val_log_loss_std", "val_accuracy", "val_accuracy_std",
               "epochs_run", "best_epoch", "seconds", "folds", "error"]
    frame = pd.DataFrame(rows, columns=columns)
    frame = frame.sort_values("val_log_loss", na_position="last", kind="stable").reset_index(drop=True)
    frame.insert(0, "rank", np.arange(1, len(frame) + 1))
    return frame


def write_best_config(settings: dict, path: Path, comment: str = "") -> None:
    """The best trial's settings as TOML that `dogtl train-head --config FILE` reads (None values,
    which mean train-head's default, are left out)."""
    import tomli_w

    header = "".join(f"# {line}\n" for line in comment.splitlines())
    write_text_atomic(path, header + tomli_w.dumps({k: v for k, v in settings.items() if v is not None}))
