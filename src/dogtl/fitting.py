"""`dogtl fit --data DIR --budget 30m`: from a folder of images to the strongest model a time
budget allows, in one command (what fastai's `fine_tune` and AutoGluon's `time_limit` are to
those tools).

Four stages, each a plain stage function called with keyword arguments (so fit always runs
their current defaults), each within its share of the budget by a deadline it checks:

1. extract   the frozen backbone once over every image, clean + augmented passes (stage 1);
2. head      `train-head --auto`'s search (sweeps/auto.py) over linear heads, its best trial
             retrained as one head (a linear probe is the better start for fine-tuning);
3. finetune  the backbone and that head together on the images (stage 3), for as many
             epochs as the measured speed fits in the time left;
4. evaluate  the fine-tuned model on the validation images (accuracy, log loss, per class).

Everything is kept in a work folder beside --out (`models/model.fit/` for `models/model.keras`)
with `fit.json`, which records each finished stage: a killed or interrupted fit, run again,
reuses the finished stages and resumes the unfinished one (extraction, the search and
fine-tuning each resume themselves). The final model is copied to --out.

The budget is wall-clock time from the command's start. Its shares (see `plan`): the
extraction must end within EXTRACT_SHARE of it (it is kept, to resume, when it cannot); the
head search gets HEAD_SHARE of what is left (HEAD_MIN to HEAD_MAX seconds); fine-tuning gets the
rest but the evaluation's reserve. Fine-tuning's epochs are planned from the speed extraction
measured (a training step costs FINETUNE_COST times a forward pass per image), then checked
against the speed of its first PROBE_IMAGES training images, and replanned (started again) when
another number of epochs fits; a deadline checked after every batch ends it regardless: the
epochs finished are kept and the best of them (never worse than the head) is the model.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from dogtl.core.artifacts import check_writable
from dogtl.core.backbones import check_image_size, get_backbone
from dogtl.core.budget import Deadline, format_seconds
from dogtl.core.errors import DogtlError
from dogtl.core.files import check_overwrite
from dogtl.core.progress import Progress, ProgressEvent
from dogtl.data.folders import load_dataset
from dogtl.evaluation.evaluate import EvaluateConfig, evaluate
from dogtl.features.extract import ExtractConfig, extract_features
from dogtl.finetuning.checkpoints import discard_checkpoints, finished_epochs
from dogtl.finetuning.settings import FinetuneConfig
from dogtl.finetuning.train import finetune
from dogtl.fit_settings import FitConfig
from dogtl.fitstate import FitState, publish, written_model
from dogtl.sweeps.auto import auto_train

log = logging.getLogger(__name__)

# Light augmentation (the `finetune --augment light` preset's): on Fashion, the dog recipe's 45
# degree rotations hurt (docs/fit.md).
AUGMENTATION = dict(rotation=10.0, zoom=0.1, shift=0.1)
EXTRACT_SHARE = 0.5  # the extraction must end by then, or fit stops (its work kept)
# The head search: its share of what is left, in seconds. A longer search buys little once the
# model is fine-tuned: on Fashion (4 December), the head of a 51 s search (0.858 / 0.436) and that
# of a 2m30s one (0.869 / 0.388) both ended at 0.89-0.90 accuracy and 0.29-0.31 log loss; over
# linear heads, the first trial (train-head's linear preset) won both 1-minute searches (16 and 31 trials).
HEAD_SHARE, HEAD_MIN, HEAD_MAX = 0.1, 10.0, 30.0
# Seconds of a fine-tuning step per image, in units of the extraction's seconds per image
# (forward pass, decoding and augmentation alike). Measured on Fashion (96 px, 8,100 training
# images, the whole MobileNetV2 at batch 32, 2 shared cores): ~170 s an epoch with validation
# where extraction ran at 188 images/s, i.e. ~3.8x. Fewer trainable blocks cost less: an
# overestimate only plans fewer epochs (the budget holds either way).
FINETUNE_COST = 4.0
# The share of the time left that the planned epochs fill: the warm-up + cosine schedule is set for
# them, and a run the deadline cuts keeps an epoch at a high rate (on Fashion, a plan filling all
# the 22 minutes left was cut after 2 of its 4 epochs under load: 0.849 accuracy, where finetune's
# full 5-epoch schedule reached 0.892): one epoch fewer costs less than an unfinished schedule.
PLAN_SHARE = 0.85
PROBE_IMAGES = 640  # training images timed before the plan is checked: 20 steps of 32, seconds on 2 cores
# The most epochs fit plans. On Fashion (idle, the same split and head, before calibration): a
# 6-epoch schedule's best epoch reached 0.265 log loss and 0.901 accuracy (epoch 5, with the moving
# average of the weights), a 10-epoch one's 0.286 / 0.893 (epoch 4, without), a 30-epoch one's
# 0.318 (epoch 9): with the training loss near 0, the validation loss rises. Calibrated
# (finetune --calibrate), the 6th epoch is the best, and an 8-epoch plan gained nothing (0.907 /
# 0.259 against 0.908 / 0.258, 5 December).
MAX_EPOCHS = 6
EVALUATE_COST = 1.5  # evaluation: this many times one extraction pass over the validation images
STAGES = ("extract", "head", "finetune", "evaluate")


@dataclass
class FitResult:
    model_path: Path
    metrics: dict  # the final model's validation accuracy and log loss
    head_metrics: dict  # the head's, before fine-tuning
    choices: list[str]  # what fit chose and why, one line each
    stages: dict  # stage -> {"seconds", "reused", ...}
    seconds: float
    budget: float
    folder: Path


class _Stop(Exception):
    """A stage's deadline came in the middle of its work."""


def choose_image_size(data: str, backbone: str, requested: int | None) -> tuple[int, str]:
    """(image size, why): the requested size, else the images' own median size rounded to 32 px,
    within [96, the backbone's own size]. Upscaling small images costs time and (Fashion, 96 px
    photos: a 160 px cache gained 1.8 points for the head at 4x the extraction and ~2.8x the
    fine-tuning time per epoch) bought less than spending that time on more epochs."""
    spec = get_backbone(backbone)
    if requested is not None:
        return check_image_size(spec, requested), "as requested"
    paths = load_dataset(data).paths
    step = max(1, len(paths) // 50)
    sizes = []
    for path in paths[::step][:50]:
        try:
            with Image.open(path) as image:
                sizes.append(max(image.size))
        except OSError:
            continue
    native = sorted(sizes)[len(sizes) // 2] if sizes else spec.default_size
    size = int(min(spec.default_size, max(96, 32 * round(native / 32))))
    return check_image_size(spec, size), (f"the images' own size ({native} px)" if size == native else
                                          f"the images are {native} px; {backbone} takes {spec.default_size}")


def fit(config: FitConfig, progress: Progress | None = None, started: float | None = None) -> FitResult:
    """Run (or resume) the four stages within `config.budget` seconds from `started` (a
    time.time(); default now) and copy the final model to `config.out`. `progress` gets
    ProgressEvents: lines (stage "fit": what was chosen or finished), images done (stages
    "extract", "finetune", "evaluate") and the head search's own (stage "auto")."""
    started = time.time() if started is None else started
    end = Deadline.after(config.budget, started)
    out = Path(config.out)
    if out.suffix == ".keras":
        out.parent.mkdir(parents=True, exist_ok=True)
    check_writable(out, config.force)
    check_overwrite(out.with_suffix(".json"), config.force)

    def say(text: str) -> None:
        if progress:
            progress(ProgressEvent("fit", unit="", message=text))

    size, why = choose_image_size(config.data, config.backbone, config.image_size)
    identity = {"data": str(Path(config.data).resolve()), "backbone": config.backbone, "weights": config.weights,
                "image_size": size, "passes": config.passes, "hflip": config.hflip,
                "val_fraction": config.val_fraction, "seed": config.seed}
    state = FitState(config.folder, identity, config.force)
    choices = [f"backbone {config.backbone} at {size} px: {why}"]
    say(choices[-1])
    extract = _extract(config, state, size, end, started, progress, say)
    head = _head(config, state, end, progress, say, choices)
    tuned = _finetune(config, state, end, extract, head, progress, say, choices)
    final = {} if tuned.get("skipped") else _evaluate(config, state, end, tuned, progress, say)
    publish(Path(tuned["model"]), out)
    metrics = final.get("metrics") or tuned["metrics"]
    if tuned.get("skipped"):
        why = f"the head: {tuned['skipped']}"
    elif tuned["best_epoch"]:
        why = (f"fine-tuning lowered the validation log loss from {head['metrics']['val_log_loss']:.4f} to "
               f"{tuned['metrics']['val_log_loss']:.4f}")
    else:
        why = "no fine-tuning epoch beat the head: the model is the head on its backbone"
    choices.append(f"final model: {why}")
    say(choices[-1])
    stages = {name: state.stage(name) for name in STAGES}
    return FitResult(out, metrics, head["metrics"], choices, stages, time.time() - started, config.budget,
                     config.folder)


def _extract(config, state, size, end, started, progress, say) -> dict:
    done = state.stage("extract")
    if done:
        say(f"extract: reusing {done['cache']} ({done['images']} images)")
        return done
    deadline = Deadline.after(config.budget * EXTRACT_SHARE, started)
    cache = config.folder / "features.h5"
    t = time.time()

    def bar(done_, total):
        if progress:
            progress(ProgressEvent("extract", done_, total))
        if done_ < total and deadline.passed():
            raise _Stop(done_, total)

    try:
        s = extract_features(ExtractConfig(
            data=str(config.data), cache=str(cache), backbone=config.backbone, weights=config.weights,
            image_size=size, passes=config.passes, val_fraction=config.val_fraction, seed=config.seed,
            hflip=config.hflip, **AUGMENTATION), progress=bar)
    except _Stop as e:
        finished, total = e.args
        raise DogtlError(f"--budget {format_seconds(config.budget)}: extracting the features took "
                         f"{EXTRACT_SHARE:.0%} of it and is not finished ({finished:,} of {total:,} images); "
                         f"it is kept in {cache}: rerun with a larger --budget (or a smaller --image-size) "
                         "to continue") from None
    seconds = time.time() - t
    computed = (s.images * (1 + s.passes) + s.test_images * (1 + s.tta_passes)) - s.resumed
    rate = computed / seconds if computed > 0 and s.status != "up to date" else None
    record = state.done("extract", cache=str(cache), images=s.images, passes=s.passes, seconds=seconds, rate=rate)
    say(f"extract: {s.images} images x {1 + s.passes} passes in {format_seconds(seconds)}"
        + (f" ({rate:.1f} images/s)" if rate else " (found complete)"))
    return record


def _head(config, state, end, progress, say, choices) -> dict:
    done = state.stage("head")
    if done:
        say(f"head: reusing {done['model']} (val log loss {done['metrics']['val_log_loss']:.4f})")
        return done
    out = config.folder / "head.keras"
    meta = written_model(out)
    if meta:  # killed between writing the head and recording it
        return state.done("head", model=str(out), metrics=meta.metrics, seconds=None, trials=None,
                          settings=meta.settings, val_images=meta.val_images, train_images=meta.train_images)
    budget = min(HEAD_MAX, max(HEAD_MIN, HEAD_SHARE * end.left()))
    choices.append(f"head search: linear heads, {format_seconds(budget)} ({HEAD_SHARE:.0%} of the time left, at "
                   f"least {format_seconds(HEAD_MIN)}, at most {format_seconds(HEAD_MAX)}): the head only starts "
                   "fine-tuning, which gains more per minute, and from a linear head most")
    say(choices[-1])
    r = auto_train(state.stage("extract")["cache"], out, budget=budget, seed=config.seed, top=1, trials=config.trials,
                   progress=progress, linear=True)
    meta = written_model(out)
    record = state.done("head", model=str(out), metrics=r.metrics, seconds=r.seconds, trials=r.trials,
                        settings=meta.settings, val_images=meta.val_images, train_images=meta.train_images)
    say(f"head: {r.trials} trials in {format_seconds(r.seconds)}; the best, retrained: val accuracy "
        f"{r.metrics['val_accuracy']:.4f}, log loss {r.metrics['val_log_loss']:.4f}")
    return record


def plan_epochs(seconds: float, train_images: int, val_images: int, rate: float,
                most: int | None = None) -> tuple[int, float]:
    """(epochs, seconds per epoch): as many fine-tuning epochs as fit in PLAN_SHARE of `seconds`, each
    a training pass at FINETUNE_COST times the extraction's seconds per image plus a validation pass,
    at most `most` (fit's --epochs) and MAX_EPOCHS."""
    per_epoch = (train_images * FINETUNE_COST + val_images) / max(rate, 1e-9)
    return int(min(most or MAX_EPOCHS, MAX_EPOCHS, max(0, math.floor(PLAN_SHARE * seconds / per_epoch)))), per_epoch


def _finetune(config, state, end, extract, head, progress, say, choices) -> dict:
    done = state.stage("finetune")
    if done:
        say(f"finetune: reusing {done['model']} (val log loss {done['metrics']['val_log_loss']:.4f})")
        return done
    rate = extract["rate"] or _measure_rate(config, head, say)
    out = config.folder / "finetuned.keras"
    meta = written_model(out)
    if meta:  # killed between writing the model and recording it
        m = meta.metrics
        return state.done("finetune", model=str(out), metrics={k: m[k] for k in ("val_accuracy", "val_log_loss")},
                          before=m["before"], best_epoch=m["best_epoch"], epochs_run=m["epochs_run"], seconds=None)
    reserve = EVALUATE_COST * head["val_images"] / rate
    epochs, per_epoch = _plan_finetuning(config, state, end, head, rate, reserve, choices)
    say(choices[-1])
    probe = finished_epochs(out) == 0  # a run with finished epochs keeps its schedule
    while True:
        if epochs < 1:
            return _no_finetuning(head, say, f"not even one fine-tuning epoch (~{format_seconds(per_epoch)}) fits "
                                  "in what the extraction and head search left")
        try:
            r, reserve = _tune(config, end, head, out, epochs, reserve, progress, say, probe)
            break
        except _Replan as e:  # measured, not estimated: start again with the schedule that fits
            discard_checkpoints(out)
            epochs, per_epoch, probe = e.epochs, e.per_epoch, False
            state.plan(epochs=epochs)
            choices.append(f"fine-tuning: replanned to {epochs} epoch(s) of ~{format_seconds(per_epoch)}: its "
                           f"first steps trained {e.rate:.1f} images/s")
            say(choices[-1])
    if r is None:
        return _no_finetuning(head, say, "the budget ended before the first fine-tuning epoch did")
    return state.done("finetune", model=str(out), metrics=r.after, before=r.before, best_epoch=r.best_epoch,
                      epochs_run=r.epochs_run, seconds=r.seconds, evaluate_reserve=reserve)


class _Replan(Exception):
    def __init__(self, epochs: int, per_epoch: float, rate: float):
        super().__init__(epochs)
        self.epochs, self.per_epoch, self.rate = epochs, per_epoch, rate


def _tune(config, end, head, out, epochs, reserve, progress, say, probe: bool):
    """(result, the evaluation's reserve): fine-tune for `epochs` within the deadline (result None
    when not one epoch finished in time). With `probe`, the speed of its first PROBE_IMAGES
    training images replans the epochs (`_Replan`) when the planned ones would not end in time, or
    twice as many would: the plan from extraction's speed is an estimate (on Fashion, extraction
    on OpenVINO ran 1,080 images/s and planned epochs of 31 s that took 46 s in TensorFlow)."""
    called, train_images = time.time(), head["train_images"]
    setup = start = None  # seconds before the first step; (time, images done) after it

    def images(done_, total):
        nonlocal reserve, probe, setup, start
        if progress:
            progress(ProgressEvent("finetune", done_, total))
        now = time.time()
        if setup is None:  # loading, building and validating the model before its first step: the
            setup = now - called  # evaluation's model load and validation pass cost no more
            reserve = max(reserve, setup)
            start = (now, done_)  # the first step traced the model: the probe starts after it
        elif probe and done_ - start[1] >= min(PROBE_IMAGES, train_images - start[1]):
            rate = (done_ - start[1]) / max(now - start[0], 1e-9)
            left = end.left() - reserve - setup
            # a step per image costs FINETUNE_COST forward passes: the forward rate plan_epochs takes
            fits, per_epoch = plan_epochs(left, train_images, head["val_images"], rate * FINETUNE_COST, config.epochs)
            if epochs * per_epoch > left or fits >= 2 * epochs:
                raise _Replan(fits, per_epoch, rate)  # the schedule would be cut, or twice as many fit
            probe = False
        if end.passed(reserve):
            raise _Stop

    last = time.time()

    def report(line):  # with each epoch's seconds, to set against the plan
        nonlocal last
        say(f"finetune {line} ({time.time() - last:.0f} s)")
        last = time.time()

    try:
        return finetune(_finetune_config(config, head, out, epochs),
                        progress=lambda e: images(e.done, e.total) if e.unit == "images" else report(e.line())), reserve
    except _Stop:  # the finished epochs are checkpointed: finetune, asked for just those, writes the best
        done_epochs = finished_epochs(out)
        if not done_epochs:
            return None, reserve
        say(f"finetune: stopped by the budget after epoch {done_epochs} of {epochs}; writing the best epoch")
        return finetune(_finetune_config(config, head, out, done_epochs)), reserve


def _plan_finetuning(config, state, end, head, rate: float, reserve: float, choices) -> tuple[int, float]:
    """(epochs, seconds per epoch) of fine-tuning, planned once from the measured `rate` in the
    time left but the evaluation's `reserve`: a resumed fit keeps the schedule it started."""
    plan = (state.data.get("plan") or {}).get("epochs")
    epochs, per_epoch = plan_epochs(end.left() - reserve, head["train_images"], head["val_images"], rate,
                                    config.epochs)
    if plan is None:
        if epochs >= 1:
            state.plan(epochs=epochs)
        choices.append(f"fine-tuning: {epochs} epoch(s) of ~{format_seconds(per_epoch)} (planned from the measured "
                       f"{rate:.1f} images/s) in the {format_seconds(end.left() - reserve)} left")
    else:
        epochs = plan
        choices.append(f"fine-tuning: resuming the {epochs} epoch(s) planned")
    return epochs, per_epoch


def _finetune_config(config, head, out, epochs: int) -> FinetuneConfig:
    return FinetuneConfig(data=str(config.data), head=str(head["model"]), out=str(out), epochs=epochs)


def _evaluate_on_images(model, data, progress=None):
    """The validation report of `model` on the images of `data`, as `dogtl evaluate --force` writes it."""
    return evaluate(EvaluateConfig(model=str(Path(model)), data=str(data), force=True), progress=progress)


def _no_finetuning(head, say, why: str) -> dict:
    """The head as the model, when the budget leaves no fine-tuning; not recorded as finished, so
    that a rerun (with a larger --budget) fine-tunes, resuming what was started."""
    say(f"finetune: skipped: {why}; the model is the head (evaluate and predict take images with it "
        "too); rerun with a larger --budget to fine-tune")
    return {"model": head["model"], "metrics": head["metrics"], "best_epoch": 0, "epochs_run": 0, "skipped": why}


def _measure_rate(config, head, say) -> float:
    """Images/s of the backbone on this machine now, when the extraction was found finished (not
    timed): the head on the validation images, as `evaluate` runs it."""
    t = time.time()
    r = _evaluate_on_images(head["model"], config.data)
    rate = r.images / max(time.time() - t, 1e-3)
    say(f"measured {rate:.1f} images/s (the head on the {r.images} validation images: accuracy "
        f"{r.accuracy:.4f}, log loss {r.log_loss:.4f})")
    return rate


def _evaluate(config, state, end, tuned, progress, say) -> dict:
    done = state.stage("evaluate")
    if done:
        return done
    if end.passed(tuned.get("evaluate_reserve", 0.0)):
        say("evaluate: skipped, the budget is spent (fine-tuning's own validation figures stand)")
        return state.done("evaluate", metrics=None, skipped=True)

    def images(done_, total):
        if progress:
            progress(ProgressEvent("evaluate", done_, total))

    r = _evaluate_on_images(tuned["model"], config.data, images)
    metrics = {"val_accuracy": r.accuracy, "val_log_loss": r.log_loss, "top_k_accuracy": r.top_k_accuracy,
               "top_k": r.top_k}
    say(f"evaluate: accuracy {r.accuracy:.4f}, log loss {r.log_loss:.4f}, top-{r.top_k} {r.top_k_accuracy:.4f} "
        f"on {r.images} validation images (report {r.json_path})")
    return state.done("evaluate", metrics=metrics, report=str(r.json_path))
