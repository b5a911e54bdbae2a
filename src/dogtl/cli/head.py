"""Stage two on the command line: train-head and lr-find."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dogtl import api
from dogtl.cli.common import (CONFIG_OPTION, TRACK_OPTION, apply_config_file, command_started, friendly_errors,
                              show_tracking)
from dogtl.core import tracking
from dogtl.core.budget import format_seconds, parse_budget
from dogtl.core.settings import with_options
from dogtl.head.settings import HEAD_SETTINGS, LRFIND_SETTINGS

CACHE_HELP = ("Feature cache written by extract-features. Repeat it (--cache a.h5 --cache b.h5) to train on the "
              "features of several caches of the same images concatenated per row (other backbones or image sizes).")


def cache_arg(paths):
    """One --cache as a path, several as a list (what the stages take)."""
    paths = list(paths) if isinstance(paths, (list, tuple)) else [paths]
    return paths[0] if len(paths) == 1 else paths


@friendly_errors
@with_options(HEAD_SETTINGS)
def train_head_cmd(
    ctx: typer.Context,
    cache: list[Path] = typer.Option([Path("cache/features.h5")], help=CACHE_HELP),
    out: Path = typer.Option(Path("models/head.keras"), help="Model to write; its .json metadata, .history.csv and .png plot go beside it."),
    config: Optional[Path] = CONFIG_OPTION,
    force: bool = typer.Option(False, "--force", help="Overwrite an existing model (and its metadata, history and plot)."),
    auto: bool = typer.Option(False, "--auto", help="No tuning needed: an Optuna search (TPE, median pruning on each epoch's validation loss, 3 folds of the training split; architecture, optimizer, rates, dropout, label smoothing, weight decay) whose best trials (at most 5), retrained, are saved as one ensemble model at --out. Killed, the same command resumes the search (kept in OUT-without-.keras.auto/). The other head options are ignored."),
    budget: str = typer.Option("2m", help="With --auto: wall-clock time the whole command may take, start-up included (90s, 5m, 1h; a bare number is seconds). Kept by deadlines checked after every epoch."),
    trials: Optional[int] = typer.Option(None, help="With --auto: stop the search once the study holds this many finished trials (by any process sharing it), if the budget has not ended it first."),
    storage: Optional[str] = typer.Option(None, help="With --auto: an Optuna database URL to share one search between processes or hosts (e.g. sqlite:////shared/auto.db, postgresql://host/db); each writes its own ensemble of the best trials all have found. Default: SQLite in the auto folder."),
    track: bool = TRACK_OPTION,
    settings: dict = None,
):
    """Train the dense head on cached features with a cyclical learning rate.

    BatchNorm -> Dropout -> Dense relu -> Dropout -> softmax, seconds per epoch. Early stopping on validation log loss restores the best epoch. Writes the model, metadata binding it to the cache (fingerprint, classes, backbone, image size, settings, metrics), a per-epoch history CSV and a PNG plot, and prints validation accuracy and log loss.
    """
    settings, io = apply_config_file(ctx, settings, config, HEAD_SETTINGS, "train_head",
                                     {"cache": cache_arg(cache), "out": out})
    show_tracking(track)
    if auto:
        return _auto(io, budget, trials, storage, force, track)
    result = api.train_head(**io, force=force, progress=lambda event: typer.echo(event.line()), track=track,
                            **settings)
    m = result.metrics
    r = result.resolved
    typer.echo(f"trained on {result.train_images} images x {result.passes} pass(es) at batch {r.batch_size}, "
               f"lr {r.base_lr:.2g}..{r.max_lr:.2g}, {r.precision} matmuls, validated on {result.val_images}; best epoch "
               f"{m['best_epoch']} of {m['epochs_run']} ({result.seconds_per_epoch:.2f} s/epoch)")
    typer.echo(f"validation accuracy {m['val_accuracy']:.4f}  log loss {m['val_log_loss']:.4f}")
    typer.echo(f"wrote {result.model_path} (+ {result.model_path.with_suffix('.json').name}), "
               f"{result.history_path}, {result.plot_path} in {result.seconds:.0f} s")


@friendly_errors
@with_options(LRFIND_SETTINGS)
def lr_find_cmd(
    ctx: typer.Context,
    cache: list[Path] = typer.Option([Path("cache/features.h5")], help=CACHE_HELP),
    out: Path = typer.Option(Path("models/lr-find.png"), help="PNG plot of training loss against learning rate."),
    config: Optional[Path] = CONFIG_OPTION,
    force: bool = typer.Option(False, "--force", help="Overwrite an existing plot."),
    settings: dict = None,
):
    """Learning-rate range test: suggests --base-lr and --max-lr for train-head.

    One training step per rate, the rate growing exponentially from --start-lr until --end-lr or until the loss diverges; plots loss against rate and prints the suggested cyclical range (max = rate at the lowest smoothed loss / 10, base = max / 10).
    """
    settings, io = apply_config_file(ctx, settings, config, LRFIND_SETTINGS, "lr_find",
                                     {"cache": cache_arg(cache), "out": out})
    r = api.lr_find(**io, force=force, **settings)
    how = "stopped when the loss diverged" if r.diverged else "the loss did not diverge"
    typer.echo(f"{len(r.losses)} steps from lr {r.lrs[0]:.1e} to {r.lrs[-1]:.1e} ({how}) in {r.seconds:.1f} s")
    typer.echo(f"lowest smoothed loss {r.smoothed.min():.4f} at lr {r.lr_at_min:.1e}")
    typer.echo(f"suggested: --base-lr {r.base_lr:.1e} --max-lr {r.max_lr:.1e}")
    typer.echo(f"wrote {r.plot_path}")


def _auto(io: dict, budget: str, trials: int | None, storage: str | None, force: bool, track: bool) -> None:
    from dogtl.sweeps.auto import auto_train  # local: the search's modules load only with --auto

    seconds = parse_budget(budget)

    def show(event):
        if event.line():
            typer.echo(event.line())

    name = f"train-head --auto {Path(io['out']).name}"
    params = {**io, "budget": seconds, "trials": trials, "storage": storage}
    with tracking.start("train-head --auto", name, track, params) as tracked:
        r = auto_train(io["cache"], io["out"], budget=seconds, force=force, storage=storage, trials=trials,
                       started=command_started(), progress=tracking.tee(show, tracking.fold_observer(tracked)))
        tracked.result({**r.metrics, "trials": r.trials, "seconds": r.seconds}, tracking.model_files(r.model_path)[:2])
    typer.echo(f"searched {r.trials} trials ({r.complete} complete, {r.pruned} pruned; {r.ran_now} by this process) "
               f"in {r.folder}")
    typer.echo(f"best single trial, retrained: validation accuracy {r.best_single['val_accuracy']:.4f}  "
               f"log loss {r.best_single['val_log_loss']:.4f}")
    typer.echo(f"ensemble of {r.members} trial(s):      validation accuracy {r.metrics['val_accuracy']:.4f}  "
               f"log loss {r.metrics['val_log_loss']:.4f}")
    typer.echo(f"wrote {r.model_path} (+ {r.model_path.with_suffix('.json').name}) in {format_seconds(r.seconds)} "
               f"of a {format_seconds(r.budget)} budget")


