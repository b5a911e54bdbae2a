"""`dogtl demo`: the whole product end to end on a small, clearly synthetic data set.

Generates procedurally drawn images in the Kaggle layout, then runs extract-features,
train-head, finetune, evaluate and predict at a small image size, with the same library
calls the commands use. ImageNet weights are used when they can be had; offline, the
backbone is randomly initialised (deterministically, so every stage sees the same one).
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dogtl.core.errors import DogtlError
from dogtl.data.synthetic import make_kaggle_dataset
from dogtl.demo_settings import DemoConfig
from dogtl.evaluation.evaluate import evaluate
from dogtl.evaluation.predict import predict_submission
from dogtl.evaluation.settings import EvaluateConfig, PredictConfig
from dogtl.core.backbones import get_backbone
from dogtl.features.extract import extract_features
from dogtl.features.settings import ExtractConfig
from dogtl.features.random_backbone import calibrate_random_backbone
from dogtl.finetuning.settings import FinetuneConfig
from dogtl.finetuning.train import finetune
from dogtl.head.settings import HeadConfig
from dogtl.head.train import train_head

log = logging.getLogger(__name__)
Note = Callable[[str], None]
WEIGHTS_HOST = ("storage.googleapis.com", 443)  # where keras.applications downloads from
GENERATED = ("data", "cache", "models", "reports", "submission.csv")


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
    backbone_file = weights if weights not in ("imagenet", "none") else None
    if backbone_file:
        result.artifacts["backbone weights"] = Path(backbone_file)
    result.weights = weights
    result.artifacts["feature cache"] = summary.path
    say(f"[2/6] extracted features with {config.backbone} ({Path(weights).name} weights) at {config.image_size} px: "
        f"{summary.images} images x {1 + config.passes} passes -> {summary.path}")

    tuned = _train(config, data, root, summary.path, backbone_file, result, say)
    _evaluate_and_predict(tuned.model_path, data, root, result, say)
    serve = f"dogtl serve {tuned.model_path}   (then open http://127.0.0.1:8000/)"
    if importlib.util.find_spec("fastapi") is None:  # the plain install has no web server
        serve = f"pip install 'dogtl[serve]' && {serve}"
    say(f"try the model in a browser: {serve}")
    result.seconds = time.perf_counter() - started
    return result


def _train(config: DemoConfig, data: Path, root: Path, cache: Path, backbone_file: str | None,
           result: DemoResult, say: Note):
    """Stages two and three: the head on the cached features, then fine-tuned with the backbone."""
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
    return tuned


def _evaluate_and_predict(model: Path, data: Path, root: Path, result: DemoResult, say: Note) -> None:
    """The fine-tuned model's evaluation report and the test images' submission."""
    report = evaluate(EvaluateConfig(model=str(model), data=str(data),
                                     out=str(root / "reports" / "finetuned"), force=True))
    result.artifacts["evaluation report"] = report.json_path
    result.artifacts["confusion plot"] = report.png_path
    result.metrics["evaluate"] = {"accuracy": report.accuracy, "log_loss": report.log_loss,
                                  f"top{report.top_k}_accuracy": report.top_k_accuracy}
    say(f"[5/6] evaluated on {report.images} validation images: accuracy {report.accuracy:.3f}, "
        f"log loss {report.log_loss:.4f}, top-{report.top_k} {report.top_k_accuracy:.3f} -> {report.json_path}")

    submission = predict_submission(PredictConfig(model=str(model), data=str(data),
                                                  out=str(root / "submission.csv"), force=True))
    result.artifacts["submission"] = submission.path
    say(f"[6/6] predicted {submission.rows} test images -> {submission.path}")
