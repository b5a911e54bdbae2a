"""Stage two on the command line: train-head and lr-find."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dogtl.cli.common import friendly_errors


# The head options train-head and lr-find share.
_HIDDEN = typer.Option("1024", help="Hidden Dense relu layers of the head, comma-separated sizes (e.g. 1024 or "
                                    "1024,512), or 'none'.")
_DROPOUT = typer.Option(0.5, help="Dropout rate after each hidden layer.")
_INPUT_DROPOUT = typer.Option(0.5, help="Dropout rate on the batch-normalised input features.")
_CLEAN_ONLY = typer.Option(False, "--clean-only", help=(
    "Train on the clean pass only. By default, every epoch each training image contributes one of its cached "
    "passes (clean or augmented), drawn at random per image and epoch."))


@friendly_errors
def train_head_cmd(
    ctx: typer.Context,
    cache: Path = typer.Option(Path("cache/features.h5"), help="Feature cache written by extract-features."),
    out: Path = typer.Option(Path("models/head.keras"), help="Model to write; its .json metadata, .history.csv and .png plot go beside it."),
    epochs: int = typer.Option(50, help="Most epochs to run (early stopping usually ends sooner)."),
    batch_size: Optional[int] = typer.Option(None, help="Feature vectors per step. Default: the recipe's 16, raised to 32, 64 or 128 while an epoch keeps at least 64 steps (128 for a Kaggle-size cache: ~4x faster per epoch than 16)."),
    schedule: str = typer.Option("exp_range", help="Learning-rate schedule: exp_range, triangular, triangular2 (cyclical, Smith 2017) or constant (--base-lr throughout)."),
    base_lr: Optional[float] = typer.Option(None, help="Lowest learning rate of the cycle, the rate of --schedule constant. Default: the recipe's 1e-4 at batch 16, times sqrt(batch size / 16)."),
    max_lr: Optional[float] = typer.Option(None, help="Peak learning rate of the cycle (`dogtl lr-find` suggests one). Default: the recipe's 1e-3 at batch 16, times sqrt(batch size / 16)."),
    step_size: Optional[int] = typer.Option(None, help="Iterations per half cycle (default: 4 epochs' worth; the recipe uses 2-8 epochs)."),
    gamma: Optional[float] = typer.Option(None, help="exp_range: the cycle's amplitude is multiplied by gamma every iteration (default: 0.99994 per 16 images, the recipe's decay per epoch at any batch size)."),
    optimizer: str = typer.Option("rmsprop", help="rmsprop (rho 0.9, the recipe's), adam, or sgd (momentum 0.9)."),
    patience: int = typer.Option(5, help="Stop after this many epochs without a better validation log loss (0: never); the best epoch's weights are kept."),
    hidden: str = _HIDDEN,
    dropout: float = _DROPOUT,
    input_dropout: float = _INPUT_DROPOUT,
    clean_only: bool = _CLEAN_ONLY,
    label_smoothing: float = typer.Option(0.0, help="Smooth the training targets: (1 - e) on the true class, e spread over all classes (0.1 is common). Validation log loss is never smoothed."),
    weight_decay: float = typer.Option(0.0, help="Decoupled weight decay on the Dense kernels: every step w -= lr * weight_decay * w (0: none)."),
    precision: str = typer.Option("auto", help="Number format of the hidden layers' matrix products: auto (bfloat16 at batches of 64 and up on CPUs that multiply it in hardware, ~1.4x faster per epoch there; float32 elsewhere), float32 or bfloat16. Weights, normalisation and softmax stay float32, and the saved model is float32."),
    seed: int = typer.Option(2018, help="Seed of initialisation, dropout and pass sampling: the same seed and cache give the same metrics."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML or JSON file of these settings, keys = option names with underscores (e.g. max_lr = 0.002); options given on the command line win over the file."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing model (and its metadata, history and plot)."),
):
    """Train the dense head on cached features with a cyclical learning rate.

    BatchNorm -> Dropout -> Dense relu -> Dropout -> softmax, seconds per epoch. Early stopping on validation log loss restores the best epoch. Writes the model, metadata binding it to the cache (fingerprint, classes, backbone, image size, settings, metrics), a per-epoch history CSV and a PNG plot, and prints validation accuracy and log loss.
    """
    from dogtl.head.settings import HeadConfig, load_config_file
    from dogtl.head.train import train_head

    values = dict(cache=str(cache), out=str(out), epochs=epochs, batch_size=batch_size, schedule=schedule,
                  base_lr=base_lr, max_lr=max_lr, step_size=step_size, gamma=gamma, optimizer=optimizer,
                  patience=patience, hidden=hidden, dropout=dropout, input_dropout=input_dropout,
                  clean_only=clean_only, label_smoothing=label_smoothing, weight_decay=weight_decay,
                  precision=precision, seed=seed, force=force)
    if config is not None:
        for key, value in load_config_file(config).items():
            source = ctx.get_parameter_source(key)
            if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):  # the command line wins
                values[key] = value
    settings = HeadConfig(**values)

    def report(row):
        typer.echo(f"epoch {row['epoch']:>3}/{row['epochs']}  loss {row['loss']:.4f}  acc {row['accuracy']:.4f}  "
                   f"val_loss {row['val_loss']:.4f}  val_acc {row['val_accuracy']:.4f}  lr {row['lr']:.2e}  "
                   f"{row['seconds']:.2f} s")

    result = train_head(settings, progress=report)
    m = result.metrics
    r = result.resolved
    typer.echo(f"trained on {result.train_images} images x {result.passes} pass(es) at batch {r.batch_size}, "
               f"lr {r.base_lr:.2g}..{r.max_lr:.2g}, {r.precision} matmuls, validated on {result.val_images}; best epoch "
               f"{m['best_epoch']} of {m['epochs_run']} ({result.seconds_per_epoch:.2f} s/epoch)")
    typer.echo(f"validation accuracy {m['val_accuracy']:.4f}  log loss {m['val_log_loss']:.4f}")
    typer.echo(f"wrote {result.model_path} (+ {result.model_path.with_suffix('.json').name}), "
               f"{result.history_path}, {result.plot_path} in {result.seconds:.0f} s")


@friendly_errors
def lr_find_cmd(
    cache: Path = typer.Option(Path("cache/features.h5"), help="Feature cache written by extract-features."),
    out: Path = typer.Option(Path("models/lr-find.png"), help="PNG plot of training loss against learning rate."),
    batch_size: Optional[int] = typer.Option(None, help="Feature vectors per step (use train-head's; default: the same automatic choice)."),
    optimizer: str = typer.Option("rmsprop", help="rmsprop, adam or sgd (use train-head's)."),
    start_lr: float = typer.Option(1e-7, help="First (tiny) learning rate of the ramp."),
    end_lr: float = typer.Option(1.0, help="Last (large) learning rate of the ramp, if the loss has not diverged before."),
    steps: int = typer.Option(300, help="Steps of the exponential ramp from --start-lr to --end-lr."),
    hidden: str = _HIDDEN,
    dropout: float = _DROPOUT,
    input_dropout: float = _INPUT_DROPOUT,
    clean_only: bool = _CLEAN_ONLY,
    seed: int = typer.Option(2018, help="Seed of initialisation, dropout and pass sampling."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing plot."),
):
    """Learning-rate range test: suggests --base-lr and --max-lr for train-head.

    One training step per rate, the rate growing exponentially from --start-lr until --end-lr or until the loss diverges; plots loss against rate and prints the suggested cyclical range (max = rate at the lowest smoothed loss / 10, base = max / 10).
    """
    from dogtl.head.lrfind import LRFindConfig, lr_find

    r = lr_find(LRFindConfig(cache=str(cache), out=str(out), batch_size=batch_size, optimizer=optimizer,
                             start_lr=start_lr, end_lr=end_lr, steps=steps, hidden=hidden, dropout=dropout,
                             input_dropout=input_dropout, clean_only=clean_only, seed=seed, force=force))
    how = "stopped when the loss diverged" if r.diverged else "the loss did not diverge"
    typer.echo(f"{len(r.losses)} steps from lr {r.lrs[0]:.1e} to {r.lrs[-1]:.1e} ({how}) in {r.seconds:.1f} s")
    typer.echo(f"lowest smoothed loss {r.smoothed.min():.4f} at lr {r.lr_at_min:.1e}")
    typer.echo(f"suggested: --base-lr {r.base_lr:.1e} --max-lr {r.max_lr:.1e}")
    typer.echo(f"wrote {r.plot_path}")
