"""Stage three on the command line: finetune."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dogtl.cli.common import ImageProgress, friendly_errors


@friendly_errors
def finetune_cmd(
    data: Path = typer.Option(Path("data"), help="Data folder the cache was extracted from (the images are read again)."),
    head: Path = typer.Option(Path("models/head.keras"), help="Trained head (from train-head); its metadata names the backbone, weights, image size and cache."),
    out: Path = typer.Option(Path("models/finetuned.keras"), help="Where to write the fine-tuned model (+ .json metadata, .history.csv, .png)."),
    cache: Optional[Path] = typer.Option(None, help="Feature cache holding the train/validation split (default: the head's)."),
    weights: Optional[str] = typer.Option(None, help="Only if the backbone came from a local weights file: that file again."),
    trainable_blocks: int = typer.Option(2, help="Top backbone blocks to unfreeze (xception: 2 = block13 + block14, the recipe's 'freeze the first 116 layers'). BatchNorm stays frozen."),
    epochs: int = typer.Option(10, help="Most epochs to run (early stopping may end sooner)."),
    batch_size: int = typer.Option(16, help="Images per training step."),
    lr: float = typer.Option(1e-4, help="Learning rate (the cyclical schedule's base)."),
    optimizer: str = typer.Option("sgd", help="sgd (momentum 0.9), rmsprop or adam."),
    schedule: str = typer.Option("constant", help="'constant' or 'cyclic' (between --lr and --max-lr)."),
    max_lr: float = typer.Option(1e-3, help="Cyclical schedule: peak learning rate."),
    step_size: Optional[int] = typer.Option(None, help="Cyclical schedule: steps per half cycle (default: 2 epochs)."),
    cyclic_mode: str = typer.Option("triangular", help="Cyclical schedule: triangular, triangular2 or exp_range."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Online augmentation, the cache's settings, fresh each epoch."),
    patience: int = typer.Option(3, help="Stop after this many epochs without a better validation log loss."),
    seed: Optional[int] = typer.Option(None, help="Shuffling seed (default: the cache's seed)."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out; discard an unfinished run made with other settings."),
    strategy: str = typer.Option("default", help="default (one device), mirrored (every local GPU) or multi-worker (hosts in TF_CONFIG). --batch-size is the global batch: with N devices, N x the batch and (linear scaling rule) N x --lr keeps them busy."),
):
    """Fine-tune the top backbone blocks together with the trained head, on the images.

    The model is backbone -> pooling -> the trained head itself, so it starts exactly where the head stopped; validation accuracy and log loss are printed before and after. Killed or interrupted, the same command resumes after the last finished epoch. The saved model is the best epoch by validation log loss, and never worse than the head it started from.
    """
    from dogtl.finetune.train import FinetuneConfig, finetune

    config = FinetuneConfig(
        data=str(data), head=str(head), out=str(out), cache=str(cache) if cache else None, weights=weights,
        trainable_blocks=trainable_blocks, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
        schedule=schedule, max_lr=max_lr, step_size=step_size, cyclic_mode=cyclic_mode, augment=augment,
        patience=patience, seed=seed, force=force, strategy=strategy,
    )
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
