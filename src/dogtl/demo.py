"""`dogtl demo`: the whole product end to end on a small, clearly synthetic data set.

Generates procedurally drawn images in the Kaggle layout, then runs extract-features,
train-head, finetune, evaluate and predict at a small image size, with the same library
calls the commands use. ImageNet weights are used when they can be had; offline, the
backbone is randomly initialised (deterministically, so every stage sees the same one).
"""

from __future__ import annotations

import logging
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dogtl.core.errors import DogtlError
from dogtl.core.settings import Setting, settings_class
from dogtl.features.backbones import backbone_help

log = logging.getLogger(__name__)
Note = Callable[[str], None]
WEIGHTS_HOST = ("storage.googleapis.com", 443)  # where keras.applications downloads from
GENERATED = ("data", "cache", "models", "reports", "submission.csv")


DEMO_SETTINGS = (
    Setting("dir", "path", "demo", "Folder for the demo's data, cache, models, reports and submission.",
            cli_names=("--dir",)),
    Setting("backbone", "str", "xception", "Backbone to demonstrate. " + backbone_help()),
    Setting("image_size", "int", 71, "Small input size so the demo runs in minutes on a CPU."),
    Setting("weights", "str", "auto", "'auto' (ImageNet if it can be downloaded, else random initialisation), "
            "'imagenet', 'none' or PATH."),
    Setting("classes", "int", 4, "Classes of the generated data set.", cli=False),
    Setting("per_class", "int", 16, "Generated training images per class.", cli=False),
    Setting("test_images", "int", 8, "Generated test images.", cli=False),
    Setting("source_size", "int", 96, "Pixels of the generated JPEGs.", cli=False),
    Setting("passes", "int", 2, "Augmented passes extracted.", cli=False),
    Setting("head_epochs", "int", 100, "Head epochs (seconds: the head trains on cached features).", cli=False),
    Setting("finetune_epochs", "int", 2, "Fine-tuning epochs.", cli=False),
    Setting("batch_size", "int", 16, "Images per step at every stage.", cli=False),
    Setting("force", "bool", False, "Redo a demo already in --dir (replaces its data, cache, models, reports).",
            cli_names=("--force",)),
)

DemoConfig = settings_class("DemoConfig", DEMO_SETTINGS, "The demo's settings (DEMO_SETTINGS): small, so it runs "
                            "in minutes on a CPU.", {"__module__": __name__})


@dataclass
class DemoResult:
    dir: Path
    weights: str
    artifacts: dict[str, Path] = field(default_factory=dict)  # what -> where
    metrics: dict[str, dict] = field(default_factory=dict)  # stage -> numbers
    seconds: float = 0.0


def weights_reachable(timeout: float = 3.0) -> bool:
    """Whether Keras' weight host answers within `timeout` s (DNS included, which can hang)."""
    ok = []

    def probe():
        try:
            socket.create_connection(WEIGHTS_HOST, timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)


def _cached_imagenet(module: str) -> bool:
    return any((Path.home() / ".keras" / "models").glob(f"{module}*no*top*"))


def _random_backbone(spec, image_size: int, data: Path, path: Path) -> Path:
    """A random backbone with the demo images' BatchNorm statistics, as a local weights file so
    every stage rebuilds exactly the same backbone (features/random_backbone.py)."""
    from dogtl.features.random_backbone import calibrate_random_backbone

    return calibrate_random_backbone(spec, image_size, sorted((data / "train").iterdir()), path)


def _fresh_dir(config: DemoConfig) -> Path:
    """The demo folder, emptied of an earlier demo's outputs (only with --force)."""
    root = Path(config.dir)
    existing = [name for name in GENERATED if (root / name).exists()]
    if existing and not config.force:
        raise DogtlError(f"{root} already holds a demo ({', '.join(existing)}): pass --force to overwrite it "
                         "or choose another --dir")
    for name in existing:
        (shutil.rmtree if (root / name).is_dir() else Path.unlink)(root / name)
    for sub in ("models", "reports"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


def _extract(config: DemoConfig, data: Path, root: Path, say: Note):
    """Stage one with ImageNet weights when they can be had, else a random backbone whose
    BatchNorm statistics come from the demo images: (summary, weights used)."""
    from dogtl.features.backbones import get_backbone
    from dogtl.features.extract import extract_features
    from dogtl.features.settings import ExtractConfig

    spec = get_backbone(config.backbone)
    weights = config.weights
    if weights == "auto":
        weights = "imagenet" if (_cached_imagenet(spec.module) or weights_reachable()) else "none"
    extract = dict(data=str(data), cache=str(root / "cache" / "features.h5"), backbone=config.backbone,
                   image_size=config.image_size, passes=config.passes, tta_passes=1, batch_size=config.batch_size,
                   val_fraction=0.25, dtype="float32")
    if weights == "imagenet":
        try:
            return extract_features(ExtractConfig(weights=weights, **extract)), weights
        except DogtlError:
            weights = "none"
    if weights == "none":
        weights = str(_random_backbone(spec, config.image_size, data, root / "models" / "random_backbone.weights.h5"))
        why = "as asked" if config.weights == "none" else "ImageNet weights cannot be downloaded (offline?), so"
        say(f"note: {why} the backbone is randomly initialised (BatchNorm statistics from the demo images): "
            "the numbers show the pipeline works, not what ImageNet features achieve")
    return extract_features(ExtractConfig(weights=weights, force=True, **extract)), weights


def run_demo(config: DemoConfig, note: Note | None = None) -> DemoResult:
    """Every stage on generated data in `config.dir`; `note` gets one line per finished step."""
    from dogtl.evaluation.evaluate import evaluate
    from dogtl.evaluation.settings import EvaluateConfig, PredictConfig
    from dogtl.finetuning.settings import FinetuneConfig
    from dogtl.finetuning.train import finetune
    from dogtl.head.settings import HeadConfig
    from dogtl.head.train import train_head
    from dogtl.evaluation.predict import predict_submission
    from dogtl.data.synthetic import make_kaggle_dataset

    say = note or (lambda line: None)
    started = time.perf_counter()
    root = _fresh_dir(config)
    result = DemoResult(root, config.weights)
    data = make_kaggle_dataset(root / "data", num_classes=config.classes, per_class=config.per_class,
                               test_images=config.test_images, size=config.source_size)
    result.artifacts["synthetic data set"] = data
    say(f"[1/6] wrote a SYNTHETIC data set (procedurally drawn shapes, not real photos): {config.classes} "
        f"classes x {config.per_class} images + {config.test_images} test images in {data}")

    summary, weights = _extract(config, data, root, say)
    cache = summary.path
    backbone_file = weights if weights not in ("imagenet", "none") else None
    if backbone_file:
        result.artifacts["backbone weights"] = Path(backbone_file)
    result.weights = weights
    result.artifacts["feature cache"] = summary.path
    say(f"[2/6] extracted features with {config.backbone} ({Path(weights).name} weights) at {config.image_size} px: "
        f"{summary.images} images x {1 + config.passes} passes -> {summary.path}")

    head = train_head(HeadConfig(epochs=config.head_epochs, patience=0), cache=cache,
                      out=root / "models" / "head.keras", force=True)
    result.artifacts["head model"] = Path(head.model_path)
    result.metrics["head"] = dict(head.metrics)
    say(f"[3/6] trained the head on cached features: val accuracy {head.metrics['val_accuracy']:.3f}, "
        f"val log loss {head.metrics['val_log_loss']:.4f} -> {head.model_path}")

    tuned = finetune(FinetuneConfig(data=str(data), head=str(head.model_path),
                                    out=str(root / "models" / "finetuned.keras"), epochs=config.finetune_epochs,
                                    batch_size=config.batch_size, weights=backbone_file, force=True))
    result.artifacts["fine-tuned model"] = tuned.model_path
    result.artifacts["fine-tuning history"] = tuned.history_path
    result.metrics["finetune"] = {"before": tuned.before, "after": tuned.after, "best_epoch": tuned.best_epoch}
    say(f"[4/6] fine-tuned {len(tuned.trainable_layers)} backbone layers with the head: val log loss {tuned.before['val_log_loss']:.4f} -> "
        f"{tuned.after['val_log_loss']:.4f}, val accuracy {tuned.before['val_accuracy']:.3f} -> "
        f"{tuned.after['val_accuracy']:.3f} -> {tuned.model_path}")

    report = evaluate(EvaluateConfig(model=str(tuned.model_path), data=str(data),
                                     out=str(root / "reports" / "finetuned"), force=True))
    result.artifacts["evaluation report"] = report.json_path
    result.artifacts["confusion plot"] = report.png_path
    result.metrics["evaluate"] = {"accuracy": report.accuracy, "log_loss": report.log_loss,
                                  f"top{report.top_k}_accuracy": report.top_k_accuracy}
    say(f"[5/6] evaluated on {report.images} validation images: accuracy {report.accuracy:.3f}, "
        f"log loss {report.log_loss:.4f}, top-{report.top_k} {report.top_k_accuracy:.3f} -> {report.json_path}")

    submission = predict_submission(PredictConfig(model=str(tuned.model_path), data=str(data),
                                                  out=str(root / "submission.csv"), force=True))
    result.artifacts["submission"] = submission.path
    say(f"[6/6] predicted {submission.rows} test images -> {submission.path}")
    import importlib.util

    serve = f"dogtl serve {tuned.model_path}   (then open http://127.0.0.1:8000/)"
    if importlib.util.find_spec("fastapi") is None:  # the plain install has no web server
        serve = f"pip install 'dogtl[serve]' && {serve}"
    say(f"try the model in a browser: {serve}")
    result.seconds = time.perf_counter() - started
    return result
