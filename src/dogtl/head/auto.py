"""`dogtl train-head --auto [--budget SECONDS]`: a strong head without tuning.

A bounded random search with the sweep machinery (`sweeps/`), scored by 3-fold
cross-validation over the cache's training split (the validation split stays unseen until
the end), over AUTO_FIRST (train-head's defaults, linear and with the recipe's hidden layer)
and then AUTO_PARAMS: the architecture (linear, one hidden layer of 512 or 1024),
optimizer, peak and base learning rates, dropout on the input and after the hidden layer,
label smoothing and weight decay. Then the best trials (at most AUTO_TOP, each within
AUTO_MARGIN of the best's cross-validated log loss) are retrained on the whole training split
and saved as one ensemble model (head.ensemble) at --out.

The budget bounds the whole command: the search runs in rounds of ROUND_TRIALS more trials
(a random search's trials are a prefix-stable sample, so round r's trials are round r-1's
and ROUND_TRIALS new ones), each round a sweep that resumes from the previous round's
finished runs, so no trial is trained twice. After each round the time it took per run
predicts the next round and the final retraining; the search stops when they would not
fit in what is left of the budget (the first round always runs). Everything is written
under `<out without .keras>.auto/`.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from dogtl.core.errors import DogtlError

AUTO_PARAMS = (
    "hidden=none,512",
    "batch_size=32,64",
    "optimizer=adam,rmsprop",
    "max_lr=log:1e-3..3e-2",
    "base_lr=log:1e-5..5e-4",
    "input_dropout=0.0..0.6",
    "dropout=0.1..0.6",
    "label_smoothing=0.0..0.15",
    "weight_decay=0,1e-4,1e-3",
)
# Tried first, before the random draws: train-head's own settings with a linear head, and the
# recipe's head. A random draw rarely lands on them, and on the measured caches they beat most
# draws (benchmarks/quality.py: the linear head at defaults was the best head on two caches).
AUTO_FIRST = ({"hidden": ()}, {})
AUTO_FOLDS = 3
AUTO_TOP = 5
# Ensemble members: the best trial and those whose cross-validated log loss is within this
# fraction of its (a trial much worse than the best pulls the average down: measured in
# benchmarks/quality.py, top-4-of-4 averaged 0.156 where the best trial alone gave 0.126).
AUTO_MARGIN = 0.10
AUTO_EPOCHS = 30
ROUND_TRIALS = 4
MAX_TRIALS = 200
DEFAULT_BUDGET = 120.0


@dataclass
class AutoResult:
    model_path: Path
    metrics: dict  # the ensemble's validation accuracy and log loss
    best_single: dict  # the best trial, retrained on the training split: its validation figures
    trials: int
    seconds: float
    budget: float
    folder: Path
    results: object  # the search's ranked results (pandas DataFrame)


def _round(cache, folder: Path, trials: int, seed: int, progress, epochs: int, folds: int,
           seeded_from: Path | None = None):
    from dogtl.sweeps.run import SweepConfig, run_sweep

    if seeded_from is not None and not (folder / "sweep.json").exists():
        (folder / "trials").mkdir(parents=True, exist_ok=True)
        for record in (seeded_from / "trials").glob("*.json"):  # finished runs: the sweep skips them
            shutil.copy2(record, folder / "trials" / record.name)
    config = SweepConfig(cache=cache, params=AUTO_PARAMS, trials=trials, folds=folds, epochs=epochs,
                         seed=seed, out=str(folder), force=seeded_from is not None, folds_in_train=True,
                         first=AUTO_FIRST)
    return run_sweep(config, progress=progress)


def auto_train(cache="cache/features.h5", out="models/head.keras", *, budget: float = DEFAULT_BUDGET,
               seed: int = 2018, force: bool = False, progress=None, round_trials: int = ROUND_TRIALS,
               epochs: int = AUTO_EPOCHS, top: int = AUTO_TOP, folds: int = AUTO_FOLDS) -> AutoResult:
    """Search within `budget` seconds, then write the ensemble of the best `top` trials at `out`."""
    from dogtl.core.artifacts import check_writable
    from dogtl.core.files import check_overwrite
    from dogtl.features.multicache import open_caches
    from dogtl.head.ensemble import ensemble_of_trials
    from dogtl.head.settings import HeadConfig

    started = time.perf_counter()
    if budget <= 0:
        raise DogtlError(f"--budget {budget:g}: give the seconds the search may take, e.g. --budget 120")
    out = Path(out)
    check_writable(out, force)
    check_overwrite(out.with_suffix(".json"), force)
    folder = out.with_suffix(".auto")
    if force and folder.exists():
        shutil.rmtree(folder)
    opened = open_caches(cache)
    result, total = None, 0
    while True:
        total = min(MAX_TRIALS, total + round_trials)
        round_started = time.perf_counter()
        result = _round(cache, folder / f"search-{total}", total, seed, progress, epochs, folds,
                        seeded_from=result.out if result is not None else None)
        # Seconds per (trial, fold) run here, from this round (or the records of a resumed one).
        per_run = ((time.perf_counter() - round_started) / result.runs if result.runs else
                   float(result.results["seconds"].sum()) / max(1, len(result.results) * folds))
        # The final retraining: `top` heads on the whole training split, each ~folds/(folds-1) of a fold run.
        final = top * per_run * folds / (folds - 1)
        next_round = round_trials * folds * per_run
        if total >= MAX_TRIALS or time.perf_counter() - started + next_round + final > budget:
            break
    frame = result.results
    finite = frame[frame["val_log_loss"].astype(float).map(math.isfinite)]
    if finite.empty:
        raise DogtlError("every trial of the search diverged: check the cache's features")
    losses = finite["val_log_loss"].astype(float)
    close = finite[losses <= float(losses.iloc[0]) * (1 + AUTO_MARGIN)]
    configs = [HeadConfig(**_settings(result.out, key)) for key in close["trial"][:top]]
    ensemble = ensemble_of_trials(opened, configs, out, force=force)
    return AutoResult(out, ensemble.metrics, ensemble.member_metrics[0], len(frame),
                      time.perf_counter() - started, budget, folder, frame)


def _settings(sweep_dir: Path, trial: str) -> dict:
    """The train-head settings of a trial, from one of its saved run records."""
    import json

    record = next((sweep_dir / "trials").glob(f"{trial}-f*.json"))
    return json.loads(record.read_text())["settings"]
