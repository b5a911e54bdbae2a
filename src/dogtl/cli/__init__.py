"""The `dogtl` command line: parses options, shows progress, prints, picks exit codes.

Everything heavy is imported inside the commands so `dogtl --help` stays instant.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    help="Transfer learning in three stages: extract-features (frozen backbone, once) -> "
         "train-head (seconds per epoch on cached features) -> finetune.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _quiet_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    # TensorFlow's C++ start-up lines (oneDNN, CUDA probing) ignore TF_CPP_MIN_LOG_LEVEL:
    # silence stderr while it loads and looks for devices; Python errors still surface.
    if "tensorflow" not in sys.modules and not os.environ.get("DOGTL_TF_VERBOSE"):
        saved = os.dup(2)
        try:
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 2)
                import tensorflow as tf

                tf.config.list_physical_devices()
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def fail(message: str, code: int = 2):
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def friendly_errors(command):
    """Known problems become one line on stderr and exit code 2; Ctrl-C keeps work."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        _quiet_tensorflow()
        try:
            return command(*args, **kwargs)
        except (ValueError, FileNotFoundError, FileExistsError) as e:
            fail(str(e))
        except KeyboardInterrupt:
            typer.secho("interrupted: finished work is kept; rerun the same command to resume",
                        err=True, fg=typer.colors.YELLOW)
            raise typer.Exit(130)
    return wrapper


@app.callback()
def _main():
    """Transfer learning in three stages, with a feature cache between them."""


@app.command("extract-features")
@friendly_errors
def extract_features_cmd(
    data: Path = typer.Option(Path("data"), help="Data folder: Kaggle layout (labels.csv, train/, test/) or one sub-folder per class."),
    cache: Path = typer.Option(Path("cache/features.h5"), help="HDF5 file to write the features to."),
    backbone: str = typer.Option("xception", help="xception, inception_v3, resnet50, mobilenet_v2 or efficientnet_b0."),
    weights: str = typer.Option("imagenet", help="'imagenet' (downloaded by Keras), 'none' (random, for smoke tests) or PATH to a local no-top weights file."),
    image_size: Optional[int] = typer.Option(None, help="Square input size in pixels (default: the backbone's own, 299 for xception)."),
    passes: int = typer.Option(5, help="Augmented passes over every labelled image, on top of the clean pass."),
    tta_passes: int = typer.Option(0, help="Augmented passes over test images, for test-time augmentation."),
    batch_size: int = typer.Option(32, help="Images per backbone call."),
    val_fraction: float = typer.Option(0.1, help="Stratified validation fraction, stored in the cache for every later stage."),
    seed: int = typer.Option(2018, help="Seed of the split and of every augmentation."),
    on_bad_image: str = typer.Option("skip", help="'skip' unreadable images (listed in the summary and the cache) or 'fail' on the first."),
    dtype: str = typer.Option("float16", help="Stored feature precision: float16 (half the disk) or float32."),
    rotation: float = typer.Option(45.0, help="Augmentation: max rotation in degrees."),
    zoom: float = typer.Option(0.25, help="Augmentation: max zoom in or out, as a fraction."),
    shift: float = typer.Option(0.2, help="Augmentation: max shift, as a fraction of width/height."),
    hflip: bool = typer.Option(True, "--hflip/--no-hflip", help="Augmentation: random horizontal flips."),
    force: bool = typer.Option(False, "--force", help="Replace a cache (or unfinished extraction) made with other settings."),
    shard: Optional[str] = typer.Option(None, help="I/N: extract only the I-th of N disjoint shards (one per machine) into CACHE-STEM.shard-I-of-N.h5; join them with `dogtl merge-cache`."),
    strategy: str = typer.Option("default", help="default (one device), mirrored (every local GPU) or multi-worker (hosts in TF_CONFIG). --batch-size is then the global batch, split over all replicas."),
):
    """Run the frozen backbone once over every image (plus augmented passes) and cache pooled features.

    Killed or interrupted, the same command resumes where it stopped. A cache made with other
    settings is refused, naming the difference, unless --force.
    """
    from dogtl.data.augment import AugmentConfig
    from dogtl.features.extract import ExtractConfig, extract_features

    config = ExtractConfig(
        data=str(data), cache=str(cache), backbone=backbone, weights=weights, image_size=image_size,
        passes=passes, tta_passes=tta_passes, batch_size=batch_size, val_fraction=val_fraction,
        seed=seed, on_bad_image=on_bad_image, dtype=dtype,
        augmentation=AugmentConfig(rotation=rotation, zoom=zoom, shift=shift, hflip=hflip), force=force,
        shard=shard, strategy=strategy,
    )
    with ImageProgress("extracting") as bar:
        summary = extract_features(config, progress=bar.update)
    _print_extract_summary(summary)


class _RichBar:
    """Context-manager plumbing shared by the progress bars below (they set self.progress)."""

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)


class ImageProgress(_RichBar):
    """A rich progress bar with images/s and ETA, fed by (done, total) callbacks."""

    def __init__(self, description: str):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} img/s"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), transient=False, disable=not sys.stderr.isatty(),
        )
        self.description = description
        self.task = None


    def update(self, done: int, total: int):
        if self.task is None:
            self.task = self.progress.add_task(self.description, total=total, rate="  -", completed=done)
            self._start = done
            return
        self.progress.update(self.task, completed=done, total=total)
        speed = self.progress.tasks[0].speed
        self.progress.update(self.task, rate=f"{speed:5.1f}" if speed else "  -")


def _print_extract_summary(s):
    if s.status == "up to date":
        typer.echo(f"{s.path} is already up to date ({s.images} images, {s.passes} augmented passes); nothing to do")
        return
    typer.echo(
        f"wrote {s.path}: {s.images} labelled images x (1 clean + {s.passes} augmented passes), "
        f"{s.test_images} test images x {1 + s.tta_passes} passes, {len(s.skipped)} skipped, "
        f"{s.seconds:.1f} s, {s.file_bytes / 1e6:.1f} MB"
    )
    for line in s.skipped:
        path, _, reason = line.partition("\t")
        typer.echo(f"  skipped {path}: {reason}")


@app.command("finetune")
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


@app.command("predict")
@friendly_errors
def predict_cmd(
    images: Optional[list[Path]] = typer.Argument(None, help="Image files: print their top classes instead of writing a submission."),
    data: Path = typer.Option(Path("data"), help="Data folder whose test/ images get a submission row each (columns as its sample_submission.csv)."),
    model: Optional[Path] = typer.Option(None, help="Model file (default: models/finetuned.keras, else models/head.keras)."),
    cache: Optional[Path] = typer.Option(None, help="Head models: feature cache with the test features (default: the head's own)."),
    use_cache: bool = typer.Option(True, "--use-cache/--no-cache", help="Head models: use cached test features when they fit; --no-cache runs the backbone on the images."),
    out: Path = typer.Option(Path("submission.csv"), help="Submission CSV to write."),
    tta: bool = typer.Option(False, "--tta", help="Average over the clean and augmented passes (the cache's, or computed with the cache's augmentation)."),
    tta_passes: int = typer.Option(4, help="Augmented passes to compute when they are not cached."),
    top_k: int = typer.Option(5, help="Classes to print per image (with IMAGES)."),
    batch_size: int = typer.Option(32, help="Images per model call."),
    weights: Optional[str] = typer.Option(None, help="Only if the backbone came from a local weights file: that file again."),
    on_bad_image: str = typer.Option("skip", help="Unreadable test images: 'skip' (listed; the submission has a row for every readable image and none for them), 'uniform' (listed; their row gets 1/classes for every class, so Kaggle accepts the file) or 'fail' (error, nothing written)."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out."),
):
    """Write a Kaggle submission for the test images, or print the top classes of IMAGES.

    With a fine-tuned model the test images are read; with a head model the cache's test features are used when they are there (seconds). Columns are 'id' then the classes in the order of sample_submission.csv (sorted names when there is none); every row is clipped to [1e-15, 1] and renormalised to sum to 1. Unreadable test images are listed on stderr and, by default, skipped: the submission is complete for every other image (see --on-bad-image).
    """
    from dogtl.evaluation.predict import PredictConfig, predict_submission, predict_top_k

    config = PredictConfig(
        model=str(model) if model else None, data=str(data), images=tuple(str(p) for p in images or ()),
        cache=str(cache) if cache else None, use_cache=use_cache, out=str(out), tta=tta, tta_passes=tta_passes, top_k=top_k,
        batch_size=batch_size, weights=weights, on_bad_image=on_bad_image, force=force,
    )
    if config.images:
        with ImageProgress("predicting") as bar:
            results = predict_top_k(config, progress=bar.update)
        for r in results:
            if r.error:
                typer.secho(f"{r.path}: cannot read image ({r.error})", err=True, fg=typer.colors.YELLOW)
                continue
            typer.echo(r.path)
            for name, p in zip(r.classes, r.probabilities):
                typer.echo(f"  {p:7.2%}  {name}")
        if any(r.error for r in results):
            raise typer.Exit(1)
        return
    with ImageProgress("predicting") as bar:
        s = predict_submission(config, progress=bar.update)
    for line in s.skipped:
        path, _, reason = line.partition("\t")
        typer.secho(f"  {'uniform row for' if s.filled else 'skipped'} {path}: {reason}", err=True,
                    fg=typer.colors.YELLOW)
    typer.echo(f"wrote {s.path}: {s.rows} rows x {len(s.columns)} classes from {s.model} "
               f"({s.source}, {s.passes} pass{'es' if s.passes > 1 else ''})"
               + (f"; {len(s.skipped)} unreadable test image(s) {'filled uniformly' if s.filled else 'left out'}"
                  if s.skipped else ""))


@app.command("evaluate")
@friendly_errors
def evaluate_cmd(
    model: Path = typer.Option(Path("models/finetuned.keras"), help="Head or fine-tuned model to evaluate on the validation split."),
    data: Optional[Path] = typer.Option(None, help="Data folder: evaluate on the validation images (default for fine-tuned models: data/; head models use cached features unless given)."),
    cache: Optional[Path] = typer.Option(None, help="Feature cache holding the validation split (default: the model's)."),
    out: Optional[Path] = typer.Option(None, help="Report prefix: writes PREFIX.eval.json, .eval.csv, .eval.png (default: next to the model)."),
    top_k: int = typer.Option(5, help="k of the top-k accuracy."),
    confused: int = typer.Option(10, help="How many most confused class pairs to list."),
    batch_size: int = typer.Option(32, help="Images per model call."),
    weights: Optional[str] = typer.Option(None, help="Only if the backbone came from a local weights file: that file again."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing reports."),
):
    """Report accuracy, log loss, top-k accuracy, per-class accuracy and the most confused pairs.

    On the validation split stored in the cache. Writes a JSON report, a per-class CSV and a PNG of the confusion among the most confused classes.
    """
    from dogtl.evaluation.evaluate import EvaluateConfig, evaluate

    config = EvaluateConfig(model=str(model), data=str(data) if data else None, cache=str(cache) if cache else None,
                            out=str(out) if out else None, top_k=top_k, confused=confused,
                            batch_size=batch_size, weights=weights, force=force)
    with ImageProgress("evaluating") as bar:
        r = evaluate(config, progress=bar.update)
    typer.echo(f"{r.model} on {r.images} validation images ({r.source}):")
    typer.echo(f"  accuracy {r.accuracy:.4f}   log loss {r.log_loss:.4f}   top-{r.top_k} accuracy {r.top_k_accuracy:.4f}")
    worst = r.per_class.dropna().sort_values("accuracy").head(5)
    typer.echo("  lowest per-class accuracy: " + ", ".join(
        f"{row['class']} {row['accuracy']:.2f} ({row['correct']}/{row['images']})" for _, row in worst.iterrows()))
    if r.confused:
        typer.echo("  most confused (true -> predicted):")
        for pair in r.confused:
            typer.echo(f"    {pair['true']} -> {pair['predicted']}: {pair['count']} ({pair['fraction']:.0%} of {pair['true']})")
    typer.echo(f"wrote {r.json_path}, {r.csv_path}, {r.png_path}")


@app.command("demo")
@friendly_errors
def demo_cmd(
    dir: Path = typer.Option(Path("demo"), "--dir", help="Folder for the demo's data, cache, models, reports and submission."),
    backbone: str = typer.Option("xception", help="Backbone to demonstrate."),
    image_size: int = typer.Option(71, help="Small input size so the demo runs in minutes on a CPU."),
    weights: str = typer.Option("auto", help="'auto' (ImageNet if it can be downloaded, else random initialisation), 'imagenet', 'none' or PATH."),
    force: bool = typer.Option(False, "--force", help="Redo a demo already in --dir (replaces its data, cache, models, reports)."),
):
    """Run the whole pipeline on a small generated, clearly SYNTHETIC data set, in a few minutes.

    Writes procedurally drawn images in the Kaggle layout, then runs extract-features, train-head, finetune, evaluate and predict on them, printing where each artifact went.
    """
    from dogtl.demo import DemoConfig, run_demo

    result = run_demo(DemoConfig(dir=str(dir), backbone=backbone, image_size=image_size, weights=weights,
                                 force=force), note=typer.echo)
    typer.echo(f"demo finished in {result.seconds:.0f} s ({Path(result.weights).name} weights). Artifacts:")
    for what, path in result.artifacts.items():
        typer.echo(f"  {what:22s} {path}")


# The head options train-head and lr-find share.
_HIDDEN = typer.Option("1024", help="Hidden Dense relu layers of the head, comma-separated sizes (e.g. 1024 or "
                                    "1024,512), or 'none'.")
_DROPOUT = typer.Option(0.5, help="Dropout rate after each hidden layer.")
_INPUT_DROPOUT = typer.Option(0.5, help="Dropout rate on the batch-normalised input features.")
_CLEAN_ONLY = typer.Option(False, "--clean-only", help=(
    "Train on the clean pass only. By default, every epoch each training image contributes one of its cached "
    "passes (clean or augmented), drawn at random per image and epoch."))


@app.command("train-head")
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


@app.command("lr-find")
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


class TrialProgress(_RichBar):
    """A rich progress bar across a sweep's trials (fed by run_sweep's progress callback), with
    one line per finished trial above it."""

    def __init__(self, unit: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn(f"sweep ({unit})"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("best {task.fields[best]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), disable=not sys.stderr.isatty())
        self.task = None


    def update(self, event: dict):
        best = f"{event['best']:.4f}" if event["best"] != float("inf") else "-"
        if self.task is None:
            self.task = self.progress.add_task("sweep", total=event["total"], completed=event["done"], best=best)
            if event["skipped"]:
                self.echo(f"resuming: {event['skipped']} of {event['total']} runs already finished")
        self.progress.update(self.task, completed=event["done"], best=best)
        r = event["record"]
        if r is not None:
            m = r["metrics"]
            fold = f" fold {r['fold'] + 1}" if event.get("folds", 1) > 1 else ""
            result = (f"error: {r['error']}" if r.get("error") else
                      f"val log loss {m['val_log_loss']:.4f}  acc {m['val_accuracy']:.4f}  "
                      f"{m['epochs_run']} epochs")
            self.echo(f"[{event['done']}/{event['total']}] {event['label']}{fold}: {result}  {r['seconds']:.1f} s")

    def echo(self, line: str):
        if self.progress.disable:
            typer.echo(line)
        else:
            self.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)


@app.command("sweep")
@friendly_errors
def sweep_cmd(
    cache: Path = typer.Option(Path("cache/features.h5"), help="Feature cache written by extract-features."),
    space: Optional[Path] = typer.Option(None, help="TOML or JSON file: train-head setting = list of candidates, e.g. max_lr = [1e-3, 3e-3]; {low = 0.2, high = 0.6, log = false} is a range (random search); a single value is fixed."),
    param: Optional[list[str]] = typer.Option(None, "--param", help="name=v1,v2,... (repeatable; replaces the file's entry): any train-head setting (hidden=512,1024x512,none; max_lr=1e-3,3e-3; optimizer=adam,rmsprop; ...) or layers=1,2; name=low..high or name=log:low..high is a range."),
    trials: Optional[int] = typer.Option(None, help="Random search: this many trials, drawn with --seed (default: every combination of the grid)."),
    folds: Optional[int] = typer.Option(None, help="Stratified K-fold cross-validation over all labelled images, reporting mean and spread (default: the cache's validation split)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs per trial unless the space sets them (default: train-head's 50; early stopping usually ends sooner)."),
    jobs: int = typer.Option(1, help="Parallel workers; each gets cores/N TensorFlow threads. -1: one per core."),
    backend: Optional[str] = typer.Option(None, help="joblib backend for the workers: loky (default with --jobs > 1), multiprocessing, threading, or dask (with --scheduler; pip install 'dogtl[dask]')."),
    scheduler: Optional[str] = typer.Option(None, help="Dask scheduler address for --backend dask, e.g. tcp://10.0.0.5:8786 (the cache must be at the same path on every machine). Without it, a local Dask cluster."),
    fuse: int = typer.Option(8, help="Most trials trained side by side in one graph (those with the same hidden layers, batch size and optimizer); 1 trains each trial alone."),
    seed: int = typer.Option(2018, help="Seed of the random search and of the folds."),
    out: Optional[Path] = typer.Option(None, help="Sweep folder (default: sweeps/sweep-<hash of these settings>). Rerunning the same command resumes an interrupted sweep."),
    force: bool = typer.Option(False, "--force", help="Start over in --out, discarding its finished trials (also if it holds another sweep)."),
):
    """Train many heads on the cached features and rank their settings by validation log loss.

    Grid search over every combination, or random search with --trials N. Writes OUT/results.csv (best first: settings, validation log loss and accuracy with their spread over folds, epochs run, seconds), OUT/best.toml (use it: dogtl train-head --config OUT/best.toml), OUT/sweep.png (each parameter against validation log loss). Every finished trial is saved as it ends: interrupted, the same command resumes.
    """
    from dogtl.sweep.run import SweepConfig, run_sweep

    config = SweepConfig(cache=str(cache), out=str(out) if out else None, space=str(space) if space else None,
                         params=tuple(param or ()), trials=trials, folds=folds, epochs=epochs, jobs=jobs,
                         backend=backend, scheduler=scheduler, seed=seed, fuse=fuse, force=force)
    with TrialProgress("trials" if not folds else "trial folds") as bar:
        result = run_sweep(config, progress=lambda event: bar.update({**event, "folds": folds or 1}))
    frame = result.results
    typer.echo(f"{result.trials} trials ({result.runs} runs now, {result.skipped} finished before) "
               f"in {result.seconds:.0f} s" + (f"; {len(result.dropped)} combinations skipped (train-head refuses "
                                               f"them, e.g. {result.dropped[0]})" if result.dropped else ""))
    shown = [c for c in frame.columns if c not in ("trial", "folds", "error", "best_epoch")
             and not (c.endswith("_std") and not folds)]
    typer.echo(frame[shown].head(10).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if result.best_path is None:
        typer.echo("every trial diverged: lower the learning rates")
        raise typer.Exit(1)
    typer.echo(f"wrote {result.results_path}, {result.best_path}, {result.plot_path}")
    typer.echo(f"train the best: dogtl train-head --config {result.best_path}")


@app.command("merge-cache")
@friendly_errors
def merge_cache_cmd(
    shards: list[Path] = typer.Argument(..., metavar="SHARD...", help="Every shard file of one extraction (extract-features --shard I/N), e.g. cache/features.shard-*-of-4.h5."),
    out: Optional[Path] = typer.Option(None, help="Merged cache to write (default: the shards' name without .shard-I-of-N, e.g. cache/features.h5)."),
    copy: bool = typer.Option(False, "--copy", help="Copy the features into one self-contained file (default: an HDF5 virtual dataset reading the shards in place; keep them beside it)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
):
    """Join the shards of a sharded extraction into one cache, equal to a single machine's.

    Refuses missing, duplicate or foreign shards (another extraction's), naming them.
    """
    from dogtl.features.shards import merge_caches

    s = merge_caches(shards, out, mode="copy" if copy else "virtual", force=force)
    typer.echo(f"wrote {s.path}: {s.shards} shards, {s.images} labelled and {s.test_images} test images, "
               f"{s.skipped} skipped, {s.file_bytes / 1e6:.1f} MB"
               + ("" if s.mode == "copy" else " (reads the shards in place: keep them beside it, or use --copy)"))


def main():
    app()


if __name__ == "__main__":
    main()
