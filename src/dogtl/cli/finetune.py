"""Stage three on the command line: finetune."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dogtl.cli.common import ImageProgress, apply_config_file, friendly_errors
from dogtl.head.settings import STEP_EPOCHS


@friendly_errors
def finetune_cmd(
    ctx: typer.Context,
    data: Path = typer.Option(Path("data"), help="Data folder the cache was extracted from (the images are read again)."),
    head: Path = typer.Option(Path("models/head.keras"), help="Trained head (from train-head); its metadata names the backbone, weights, image size and cache."),
    out: Path = typer.Option(Path("models/finetuned.keras"), help="Where to write the fine-tuned model (+ .json metadata, .history.csv, .png)."),
    cache: Optional[Path] = typer.Option(None, help="Feature cache holding the train/validation split (default: the head's)."),
    weights: Optional[str] = typer.Option(None, help="Only if the backbone came from a local weights file that has moved since extraction: that file again (default: the file recorded with the head, while its content is unchanged)."),
    trainable_blocks: int = typer.Option(2, help="Top backbone blocks to unfreeze (xception: 2 = block13 + block14, the recipe's 'freeze the first 116 layers'). BatchNorm stays frozen."),
    epochs: int = typer.Option(10, help="Most epochs to run (early stopping may end sooner)."),
    batch_size: int = typer.Option(16, help="Images per training step."),
    optimizer: str = typer.Option("sgd", help="sgd (momentum 0.9, the recipe's), rmsprop (rho 0.9) or adam."),
    schedule: str = typer.Option("constant", help="Learning-rate schedule: constant (--base-lr throughout), or triangular, triangular2, exp_range (cyclical between --base-lr and --max-lr, Smith 2017), as train-head."),
    base_lr: float = typer.Option(1e-4, help="The learning rate of --schedule constant, and the lowest of the cycle."),
    max_lr: float = typer.Option(1e-3, help="Peak learning rate of the cycle."),
    step_size: Optional[int] = typer.Option(None, help=f"Iterations per half cycle (default: {STEP_EPOCHS} epochs' worth, as train-head)."),
    gamma: Optional[float] = typer.Option(None, help="exp_range: the cycle's amplitude is multiplied by gamma every iteration (default: 0.99994 per 16 images, as train-head)."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Online augmentation, the cache's settings, fresh each epoch."),
    patience: int = typer.Option(3, help="Stop after this many epochs without a better validation log loss (0: never); the best epoch is kept."),
    seed: Optional[int] = typer.Option(None, help="Shuffling seed (default: the cache's seed)."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out; discard an unfinished run made with other settings."),
    strategy: str = typer.Option("default", help="default (one device), mirrored (every local GPU) or multi-worker (hosts in TF_CONFIG). --batch-size is the global batch: with N devices, N x the batch and (linear scaling rule) N x --base-lr keeps them busy."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML or JSON file of these settings, keys = option names with underscores (e.g. base_lr = 2e-4), optionally under [finetune]; options given on the command line win over the file."),
):
    """Fine-tune the top backbone blocks together with the trained head, on the images.

    The model is backbone -> pooling -> the trained head itself, so it starts exactly where the head stopped; validation accuracy and log loss are printed before and after. Killed or interrupted, the same command resumes after the last finished epoch. The saved model is the best epoch by validation log loss, and never worse than the head it started from.
    """
    from dogtl.finetune.settings import FinetuneConfig
    from dogtl.finetune.train import finetune

    values = dict(data=str(data), head=str(head), out=str(out), cache=str(cache) if cache else None, weights=weights,
                  trainable_blocks=trainable_blocks, epochs=epochs, batch_size=batch_size, optimizer=optimizer,
                  schedule=schedule, base_lr=base_lr, max_lr=max_lr, step_size=step_size, gamma=gamma,
                  augment=augment, patience=patience, seed=seed, force=force, strategy=strategy)
    config = FinetuneConfig(**apply_config_file(ctx, values, config, "finetune", FinetuneConfig.option_names()))
    with ImageProgress("fine-tuning") as bar:
        result = finetune(config, progress=bar.update,
                          report=lambda line: bar.progress.console.print(line, markup=False, highlight=False,
                                                                         soft_wrap=True))
    b, a = result.before, result.after
    if result.resumed_from:
        typer.echo(f"resumed after epoch {result.resumed_from}")
    typer.echo(f"trainable layers ({len(result.trainable_layers)}): {', '.join(result.trainable_layers[:6])}"
               + (" ..." if len(result.trainable_layers) > 6 else ""))
    typer.echo(f"validation before fine-tuning: accuracy {b['val_accuracy']:.4f}  log loss {b['val_log_loss']:.4f}")
    typer.echo(f"validation after fine-tuning:  accuracy {a['val_accuracy']:.4f}  log loss {a['val_log_loss']:.4f}"
               f"  ({a['val_log_loss'] - b['val_log_loss']:+.4f})")
    if result.best_epoch == 0:
        typer.echo("no epoch beat the head: the saved model is the head on its backbone, unchanged")
    else:
        typer.echo(f"best epoch {result.best_epoch} of {result.epochs_run} run")
    typer.echo(f"wrote {result.model_path} (+ {result.model_path.with_suffix('.json').name}), "
               f"{result.history_path}" + (f", {result.plot_path}" if result.plot_path else "")
               + f" in {result.seconds:.0f} s")
