"""Stage three on the command line: finetune."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dogtl import api
from dogtl.cli.common import CONFIG_OPTION, TRACK_OPTION, ImageProgress, apply_config_file, friendly_errors, show_tracking
from dogtl.core.errors import SettingError
from dogtl.core.settings import with_options
from dogtl.finetuning.settings import FINETUNE_SETTINGS, RECIPES, recipe_settings

RECIPE_OPTION = typer.Option(None, help=f"A named set of settings ({', '.join(RECIPES)}) replacing the defaults; "
                             "options given here or in --config still win. reference: the reference recipe's "
                             "fine-tuning (SGD at a constant 1e-4, the top 2 blocks, its augmentation).")


@friendly_errors
@with_options(FINETUNE_SETTINGS)
def finetune_cmd(ctx: typer.Context,
                 head_file: Optional[Path] = typer.Argument(None, metavar="HEAD", show_default=False, help=(
                     "The trained head to start from (default: models/head.keras); --head is the same.")),
                 config: Optional[Path] = CONFIG_OPTION, recipe: Optional[str] = RECIPE_OPTION,
                 track: bool = TRACK_OPTION, settings: dict = None):
    """Fine-tune backbone blocks together with the trained head, on the images (or on cut activations cached by extract-features --cut-blocks).

    The model is backbone -> pooling -> the trained head itself, so it starts exactly where the head stopped; validation accuracy and log loss are printed before and after. The defaults are the recipe measured best on domains far from the backbone's (docs/finetuning.md): the whole backbone, AdamW, an epoch of warm-up then a cosine over 5 epochs, no augmentation; --recipe reference gives the reference recipe's fine-tuning. Killed or interrupted, the same command resumes after the last finished epoch. The saved model is the best epoch by validation log loss, and never worse than the head it started from.
    """
    for key, value in recipe_settings(recipe).items():  # below --config and the command line
        source = ctx.get_parameter_source(key)
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            settings[key] = value
    settings, _ = apply_config_file(ctx, settings, config, FINETUNE_SETTINGS, "finetune")
    if head_file is not None:  # the model first, as every command takes it
        if ctx.get_parameter_source("head").name == "COMMANDLINE" and Path(settings["head"]) != head_file:
            raise SettingError(f"two heads given, {head_file} and --head {settings['head']}: pass one")
        settings["head"] = str(head_file)
    show_tracking(track)
    with ImageProgress("fine-tuning") as bar:
        result = api.finetune(progress=bar, track=track, **settings)
    b, a = result.before, result.after
    if result.resumed_from:
        typer.echo(f"resumed after epoch {result.resumed_from}")
    typer.echo(f"trainable layers ({len(result.trainable_layers)}): {', '.join(result.trainable_layers[:6])}"
               + (" ..." if len(result.trainable_layers) > 6 else ""))
    calibrated = " (calibrated)" if "temperature" in a else ""
    typer.echo(f"validation before fine-tuning: accuracy {b['val_accuracy']:.4f}  log loss {b['val_log_loss']:.4f}"
               + calibrated)
    typer.echo(f"validation after fine-tuning:  accuracy {a['val_accuracy']:.4f}  log loss {a['val_log_loss']:.4f}"
               f"  ({a['val_log_loss'] - b['val_log_loss']:+.4f}){calibrated}")
    if calibrated:
        typer.echo(f"saved with temperature {a['temperature']:.3f} folded into its last layer (its log loss "
                   f"{a['raw_val_log_loss']:.4f} without; --no-calibrate: none)")
    if result.best_epoch == 0:
        typer.echo("no epoch beat the head: the saved model is the head on its backbone"
                   + (", at that temperature" if calibrated else ", unchanged"))
    else:
        typer.echo(f"best epoch {result.best_epoch} of {result.epochs_run} run")
    typer.echo(f"wrote {result.model_path} (+ {result.model_path.with_suffix('.json').name}), "
               f"{result.history_path}" + (f", {result.plot_path}" if result.plot_path else "")
               + f" in {result.seconds:.0f} s")
