"""Ensembles as one model: the mean of several models' class probabilities.

`dogtl ensemble A.keras B.keras ... --out E.keras` combines heads trained on the same
cache(s), or full (fine-tuned) models on the same backbone and image size, into one Keras
model: one input like its members' (`features`, or `image`), each member nested under the
name `member_<k>`, and a Keras `Average` layer over their softmax outputs. Its metadata is
the first member's binding (classes, backbone(s), cache(s)) plus `ensemble` (the members
and their metrics), so evaluate and predict take it like any head or fine-tuned model.
Fine-tuning an ensemble (or a multi-backbone head) is refused: fine-tune each member.

`ensemble_of_trials` retrains sweep trials on the cache's training split and saves their
ensemble (`dogtl sweep --ensemble K`, `train-head --auto`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from dogtl.core.artifacts import check_writable, load_model, save_model
from dogtl.core.errors import DogtlError
from dogtl.core.files import check_overwrite
from dogtl.core.metadata import BackboneInput, ModelMetadata
from dogtl.core.metrics import scores
from dogtl.core.modelinfo import check_metadata, check_model_matches
from dogtl.core.models import renamed
from dogtl.features.fingerprint import fingerprint_differences
from dogtl.features.modelcache import open_model_cache
from dogtl.features.multicache import head_inputs
from dogtl.head.train import fit_head, head_metadata, load_training_data

# Metadata of a member that describes its own training, not the ensemble.
MEMBER_ONLY = ("settings", "metrics", "resolved", "history", "train_images", "val_images", "passes_used",
               "ensemble", "integrity")


@dataclass
class EnsembleResult:
    model_path: Path
    members: list  # paths (dogtl ensemble) or settings (retrained trials)
    metrics: dict | None  # validation accuracy and log loss of the ensemble (None: not measurable here)
    member_metrics: list = field(default_factory=list)
    seconds: float = 0.0


def refuse_composite(meta: ModelMetadata, path) -> None:
    """Fine-tuning takes a head on one backbone: refuse ensembles and multi-backbone heads."""
    if meta.ensemble:
        raise DogtlError(f"{path} is an ensemble of {len(meta.ensemble['members'])} models: fine-tune "
                         "each member head, then combine the fine-tuned models with `dogtl ensemble`")
    if meta.is_multi:
        raise DogtlError(f"{path} is a head on {len(meta.backbones)} concatenated caches: fine-tuning "
                         "supports one backbone; fine-tune a head trained on one cache")


def _binding(meta: ModelMetadata) -> dict:
    """What members must share: their kind, classes and the inputs their models take."""
    def entry(e: BackboneInput):
        keep = ("backbone", "weights", "image_size", "preprocessing", "feature_dim")
        return {**{k: getattr(e, k) for k in keep}, **({"cache_fingerprint": e.cache_fingerprint}
                                                        if meta.kind == "head" else {})}

    return {"kind": meta.kind, "classes": meta.classes, "inputs": [entry(e) for e in meta.backbones]}


def _first_difference(a: dict, b: dict) -> str:
    for key in ("kind", "classes"):
        if a[key] != b[key]:
            return key
    if len(a["inputs"]) != len(b["inputs"]):
        return f"number of caches ({len(a['inputs'])} against {len(b['inputs'])})"
    for x, y in zip(a["inputs"], b["inputs"]):
        diff = fingerprint_differences(x, y)
        if diff:
            return diff[0].split(":")[0]
    return ""


def ensemble_model(models, name: str = "ensemble"):
    """One Keras model averaging the probabilities of `models` (same input and output shapes)."""
    import keras

    first = models[0]
    shape = tuple(first.input.shape[1:])
    input_name = "features" if len(shape) == 1 else "image"
    for m in models[1:]:
        if tuple(m.input.shape[1:]) != shape or m.output.shape[-1] != first.output.shape[-1]:
            raise DogtlError("ensemble members take different inputs or give different outputs")
    inputs = keras.Input(shape, name=input_name)
    members = [renamed(m, f"member_{k}") for k, m in enumerate(models)]
    outputs = [m(inputs, training=False) for m in members]
    mean = keras.layers.Average(name="mean_probabilities")(outputs) if len(outputs) > 1 else outputs[0]
    return keras.Model(inputs, mean, name=name)


def ensemble_metadata(first_meta: ModelMetadata, members: list, member_metrics: list,
                      metrics: dict | None) -> ModelMetadata:
    meta = replace(first_meta, **{k: None for k in MEMBER_ONLY})
    meta.ensemble = {"members": members, "member_metrics": member_metrics}
    meta.metrics = metrics
    return meta


def _validation_scores(model, meta: ModelMetadata) -> dict | None:
    """Validation accuracy and log loss of a head model on its cache(s); None for image models or
    when the cache is not found."""
    if meta.kind != "head":
        return None
    cache = open_model_cache(meta, required=False)
    if cache is None or not cache.is_val.any():
        return None
    features = cache.features("labelled", passes=[0])[0][cache.is_val]
    probs = model.predict(features, batch_size=1024, verbose=0)
    return scores(cache.labels[cache.is_val], probs, len(cache.classes))


def combine_models(paths, out, force: bool = False) -> EnsembleResult:
    """`dogtl ensemble`: average the saved models at `paths` into one model at `out`."""
    started = time.perf_counter()
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise DogtlError("an ensemble needs at least two models: pass two or more MODEL files")
    out = Path(out)
    check_writable(out, force)
    check_overwrite(out.with_suffix(".json"), force)
    metas = [check_metadata(p)[0] for p in paths]
    first = _binding(metas[0])
    for p, meta in zip(paths[1:], metas[1:]):
        why = _first_difference(first, _binding(meta))
        if why:
            raise DogtlError(f"{p} does not take the same inputs as {paths[0]} ({why} differs): ensemble heads "
                             "trained on the same cache(s), or full models on the same backbone and image size")
    models = []
    for p, meta in zip(paths, metas):
        model, _ = load_model(p, compile=False)
        check_model_matches(model, meta, p)
        models.append(model)
    model = ensemble_model(models)
    metrics = _validation_scores(model, metas[0])
    meta = ensemble_metadata(metas[0], [str(p) for p in paths], [m.metrics for m in metas], metrics)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, out, meta)
    return EnsembleResult(out, [str(p) for p in paths], metrics, [m.metrics for m in metas],
                          time.perf_counter() - started)


def ensemble_of_trials(cache, configs, out, force: bool = True, stop=None, on_member=None) -> EnsembleResult:
    """Retrain each HeadConfig of `configs` (best first) on the cache's training split, and save
    the ensemble of the retrained heads at `out` (one member: as a plain head, like train-head's).
    member_metrics[0] is the best single trial's.

    `stop(seconds of the last epoch)` is a deadline (see `fit_head`): the first member always
    trains (cut short if need be); a later member cut short, and those after it, are left out.
    `on_member(index, FitResult)` is called as each member is kept."""
    started = time.perf_counter()
    out = Path(out)
    check_writable(out, force)
    data = load_training_data(cache)
    fits = []
    for config in configs:
        if fits and stop is not None and stop(2 * fits[-1].seconds_per_epoch):  # its set-up and a first epoch
            break
        features = data.train_features[:1] if config.clean_only else data.train_features
        fit = fit_head(config, features, data.train_labels, data.val_features, data.val_labels,
                       len(cache.classes), stop=stop)
        if fits and fit.cut_short:
            break
        fits.append(fit)
        if on_member:
            on_member(len(fits) - 1, fit)
    configs = list(configs)[:len(fits)]
    member_metrics = [f.metrics for f in fits]
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(fits) == 1:  # one member is a plain head (train-head's metadata), which finetune accepts
        model, metrics = fits[0].model, fits[0].metrics
        save_model(model, out, head_metadata(cache, configs[0], fits[0], data))
    else:
        model = ensemble_model([f.model for f in fits])
        metrics = scores(data.val_labels, model.predict(data.val_features, batch_size=1024, verbose=0),
                         len(cache.classes))
        meta = ensemble_metadata(ModelMetadata(kind="head", classes=list(cache.classes), backbones=head_inputs(cache)),
                                 [asdict(c) for c in configs], member_metrics, metrics)
        meta.train_images, meta.val_images = int(data.train_features.shape[1]), int(len(data.val_labels))
        save_model(model, out, meta)
    return EnsembleResult(out, [asdict(c) for c in configs], metrics, member_metrics,
                          time.perf_counter() - started)
