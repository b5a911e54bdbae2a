"""Fine-tuning recipes measured on real images with the real pretrained backbone: the record
behind `dogtl finetune`'s defaults (docs/finetuning.md).

Data: the Fashion set (`--data fashion`, a Kaggle-layout folder, default /work/data/fashion) or
scikit-learn's digits as benchmarks/quality.py builds them (`--data digits`). One cache per data
set (mobilenet_v2 at 96 px, clean + 2 light augmented passes, as the docs say), one head
(`train-head` defaults), then each recipe is one `dogtl.finetune(...)` call from that head; its
record (validation accuracy and log loss kept, every epoch's, seconds, load averages) is appended
to WORK/records.jsonl and the table of all records printed. `--plain-keras` adds the anchor of
issue 22: the Keras guide's fine-tune (a linear head on the frozen base for 3 epochs, then the
whole base unfrozen for 5, BatchNorm in inference mode, Adam warmed up to 3e-4 then cosine) in
plain Keras on the same split and the same preprocessed images.

    python benchmarks/finetune_recipes.py --data fashion [--recipes defaults,reference,...] [--plain-keras]

Quality only: the seconds are wall time on whatever else the machine runs (the load averages
say how much); compare them within one run at most.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE.parent.parent / "shared" / "weights" / "mobilenet_v2_stanford_dogs.weights.h5"
LIGHT = dict(rotation=10.0, zoom=0.1, shift=0.1)
# name -> finetune settings on top of the defaults (a "recipe" key picks a named recipe first)
RECIPES = {
    "defaults": {},
    "light": dict(augment="light"),
    "recipe-augment": dict(augment="recipe"),
    "light-smoothing": dict(augment="light", label_smoothing=0.1),
    "light-smoothing-reestimate": dict(augment="light", label_smoothing=0.1, batchnorm="reestimate"),
    "light-reestimate": dict(augment="light", batchnorm="reestimate"),
    "light-smoothing-1e-3-decay": dict(augment="light", label_smoothing=0.1, max_lr=1e-3, block_lr_decay=0.8),
    "light-1e-4": dict(augment="light", max_lr=1e-4),
    "1e-4": dict(max_lr=1e-4),
    "reference": dict(recipe="reference"),
}


def prepare(data: str, work: Path, weights: Path):
    """(data folder, head path) for `data`: the cache and head made once in `work`."""
    import dogtl

    if data == "digits":
        import sys

        sys.path.insert(0, str(HERE))
        from quality import digits_dataset

        folder, extra = digits_dataset(work / "digits"), dict(hflip=False, val_fraction=0.2)
    else:
        folder, extra = Path(data), {}
    name = folder.name if data != "digits" else "digits"
    cache, head = work / f"{name}96.h5", work / "models" / f"{name}-head.keras"
    dogtl.extract_features(folder, cache, backbone="mobilenet_v2", weights=str(weights), image_size=96, passes=2,
                           batch_size=64, progress=False, **LIGHT, **extra)
    if not head.exists():
        dogtl.train_head(cache, head, progress=False)
    return folder, head


def finetune_record(name: str, folder: Path, head: Path, work: Path, settings: dict) -> dict:
    import dogtl

    settings = dict(settings)
    recipe = settings.pop("recipe", None)
    load0, t = os.getloadavg(), time.perf_counter()
    r = dogtl.finetune(folder, head, work / "models" / f"{name}.keras", force=True, recipe=recipe,
                       progress=lambda e: e.line() and print(f"  [{name}] {e.line()}", flush=True), **settings)
    return {"name": name, "settings": {"recipe": recipe, **settings}, "before": r.before, "after": r.after,
            "best_epoch": r.best_epoch, "epochs": r.history[["val_accuracy", "val_loss"]].values.tolist(),
            "seconds": time.perf_counter() - t, "load": [*load0, *os.getloadavg()]}


def plain_keras_record(folder: Path, head: Path, weights: Path, head_epochs: int = 3, epochs: int = 5,
                       batch: int = 32) -> dict:
    """The Keras guide's transfer-learning fine-tune, in plain Keras, on dogtl's split."""
    import keras
    import numpy as np
    from PIL import Image

    from dogtl.core.metadata import ModelMetadata
    from dogtl.features.modelcache import split_paths
    from dogtl.data.folders import load_dataset
    from dogtl.core.metrics import scores
    from dogtl.features.cache import open_cache

    load0, t = os.getloadavg(), time.perf_counter()
    split = split_paths(open_cache(ModelMetadata.load(head).backbones[0].cache), load_dataset(folder))

    def arrays(part):
        x = np.stack([np.asarray(Image.open(p).convert("RGB").resize((96, 96), Image.BILINEAR), np.float32)
                      for p in split[part]["paths"]])
        return keras.applications.mobilenet_v2.preprocess_input(x), np.asarray(split[part]["labels"])

    (x, y), (xv, yv) = arrays("train"), arrays("val")
    classes = int(max(y.max(), yv.max())) + 1
    base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(96, 96, 3))
    base.load_weights(weights)
    base.trainable = False
    inputs = keras.Input((96, 96, 3))
    features = keras.layers.GlobalAveragePooling2D()(base(inputs, training=False))  # BatchNorm in inference mode
    model = keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(keras.layers.Dropout(0.2)(features)))
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=batch, epochs=head_epochs, verbose=0)
    head_scores = scores(yv, model.predict(xv, verbose=0))
    base.trainable = True
    steps = -(-len(x) // batch)
    schedule = keras.optimizers.schedules.CosineDecay(0.0, (epochs - 1) * steps, warmup_target=3e-4, warmup_steps=steps)
    model.compile(keras.optimizers.Adam(schedule), "sparse_categorical_crossentropy", metrics=["accuracy"])
    history = []
    for _ in range(epochs):
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
        s = scores(yv, model.predict(xv, verbose=0))
        history.append([s["val_accuracy"], s["val_log_loss"]])
        print(f"  [plain keras] epoch {len(history)}/{epochs}: val log loss {s['val_log_loss']:.4f} "
              f"val acc {s['val_accuracy']:.3f}", flush=True)
    return {"name": "plain-keras", "settings": {"keras guide": "linear head 3 epochs, whole base 5, Adam warm-up 3e-4 "
                                                "+ cosine, BatchNorm in inference mode"},
            "before": head_scores, "after": scores(yv, model.predict(xv, verbose=0)), "best_epoch": epochs,
            "epochs": history, "seconds": time.perf_counter() - t, "load": [*load0, *os.getloadavg()]}


def table(records: list[dict]) -> str:
    lines = ["| run | settings (on top of the defaults) | val accuracy | val log loss | kept | seconds | load |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        a, b = r["after"], r["before"]
        kept = "head" if r["best_epoch"] == 0 else f"epoch {r['best_epoch']}"
        lines.append(f"| {r['name']} | {json.dumps(r['settings'])} | {a['val_accuracy']:.4f} "
                     f"({a['val_accuracy'] - b['val_accuracy']:+.3f}) | {a['val_log_loss']:.4f} "
                     f"({a['val_log_loss'] - b['val_log_loss']:+.3f}) | {kept} | {r['seconds']:.0f} | "
                     f"{r['load'][0]:.0f}-{r['load'][3]:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/data/fashion", help="a Kaggle-layout folder, or 'digits'")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dogtl-finetune-recipes"))
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--recipes", default="defaults,reference", help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--plain-keras", action="store_true", help="also the Keras guide's fine-tune in plain Keras")
    args = parser.parse_args()
    if not args.weights.is_file():
        raise SystemExit(f"{args.weights}: the pretrained backbone is needed (see ../shared/weights/README.md)")
    (args.work / "models").mkdir(parents=True, exist_ok=True)
    folder, head = prepare(args.data, args.work, args.weights)
    records_path = args.work / f"records-{folder.name}.jsonl"
    for name in [n for n in args.recipes.split(",") if n]:
        record = finetune_record(name, folder, head, args.work, RECIPES[name])
        with open(records_path, "a") as f:
            f.write(json.dumps(record) + "\n")
    if args.plain_keras:
        with open(records_path, "a") as f:
            f.write(json.dumps(plain_keras_record(folder, head, args.weights)) + "\n")
    print(table([json.loads(line) for line in open(records_path)]))


if __name__ == "__main__":
    main()
