"""`dogtl ensemble`: several trained models averaged into one."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dogtl.cli.common import friendly_errors


@friendly_errors
def ensemble_cmd(
    models: Optional[list[Path]] = typer.Argument(None, metavar="MODEL...", show_default=False, help="Two or more models (.keras with their .json): heads trained on the same cache(s), or fine-tuned models on the same backbone and image size."),
    model_opt: Optional[list[Path]] = typer.Option(None, "--model", show_default=False, help="The same as MODEL, spelled as an option (repeat it)."),
    out: Path = typer.Option(Path("models/ensemble.keras"), help="Ensemble model to write (+ its .json metadata)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing model at --out."),
):
    """Average the class probabilities of several models into one model.

    The ensemble is an ordinary Keras model with metadata like its members', so evaluate and predict take it unchanged (fine-tune the members instead). Averaging a few heads of different settings (e.g. the top trials of `dogtl sweep`, or use `sweep --ensemble K`) usually lowers validation log loss below the best single head's. Prints the ensemble's and each member's validation figures for heads.
    """
    from dogtl.head.ensemble import combine_models  # local: the stage's modules load only when it runs

    r = combine_models([*(models or []), *(model_opt or [])], out, force=force)
    for path, m in zip(r.members, r.member_metrics):
        if m:
            typer.echo(f"  member {path}: validation accuracy {m['val_accuracy']:.4f}  log loss {m['val_log_loss']:.4f}")
    if r.metrics:
        typer.echo(f"ensemble of {len(r.members)}: validation accuracy {r.metrics['val_accuracy']:.4f}  "
                   f"log loss {r.metrics['val_log_loss']:.4f}")
    typer.echo(f"wrote {r.model_path} (+ {r.model_path.with_suffix('.json').name})")
