"""Quality on real images with the real pretrained backbone: what each way to a model buys, and
what it costs in wall-clock time, against a plain-Keras fine-tune written here as the anchor.

Two real data sets nobody on the project drew, each on one split (seed 2018):
  - fashion: 9,000 Fashion-MNIST photos in the Kaggle layout, 96 px (`/work/data/fashion`, built
    by `../shared/data/make_fashion_dev.py`), 10% validation (900 images);
  - digits: scikit-learn's 1,797 digits upscaled to 128 px JPEGs (built here), 20% validation.
The real pretrained backbone: MobileNetV2 fine-tuned on the Stanford Dogs
(`../shared/weights/mobilenet_v2_stanford_dogs.weights.h5`). Caches: clean + 2 light augmented
passes (rotation 10, zoom 0.1, shift 0.1; mirror images for fashion only) at the images' own
size (A) and at a larger one (B: 160 px for fashion, the backbone's training size; 96 px for digits).

Per data set, in one run, validation accuracy, log loss and seconds of:
  - heads on cached features: train-head's defaults, the linear head, caches A + B concatenated,
    a 12-trial sweep's best trial and top-5 ensemble, TTA (in this process: seconds are the work);
  - `train-head --auto` at two budgets, wall time against budget (a `dogtl` process, start-up included);
  - `finetune` at its defaults from the default head, from the cache (`--from-cache`), and the
    reference recipe's fine-tuning (`--recipe reference`);
  - `dogtl fit` at two budgets (10m and 30m; 3m and 10m for digits), from the images alone, wall
    time against budget;
  - the anchor: a plain-Keras fine-tune of the same backbone on the same split (the Keras transfer
    learning guide's recipe: frozen base + linear head 3 epochs, then the whole base 5 epochs with
    BatchNorm in inference mode, Adam warming up to 3e-4 then cosine), its wall time.
Every command and the anchor run as their own processes, one after the other. Timed runs must
not overlap other timed work: `--lock FILE` holds that flock during each row whose wall time is
compared (the budgets, fine-tuning, the anchor; others may run between rows):

    python benchmarks/quality.py --lock /work/bench.lock [--sets fashion,digits] [--quick]

`--quick` is a smoke check (digits only, tiny budgets, 1 epoch each): minutes, no figures to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = Path(__file__).resolve().parent
# ../shared beside the checkout (a worktree may sit one level deeper)
WEIGHTS = next((p / "shared" / "weights" / "mobilenet_v2_stanford_dogs.weights.h5" for p in HERE.parents
                if (p / "shared" / "weights").is_dir()), HERE.parent.parent / "shared" / "weights")
FASHION = Path("/work/data/fashion")
LIGHT = dict(rotation=10.0, zoom=0.1, shift=0.1)


def digits_dataset(root: Path, size: int = 128) -> Path:
    """sklearn's digits as Kaggle-layout JPEGs (labels.csv, train/<id>.jpg), upscaled to `size` px."""
    import csv

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    if (root / "labels.csv").exists():
        return root
    digits = load_digits()
    (root / "train").mkdir(parents=True, exist_ok=True)
    rows = [("id", "breed")]
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        pixels = (255 - image * (255 / 16)).astype(np.uint8)  # dark digits on white, like photos' contrast
        Image.fromarray(pixels).convert("RGB").resize((size, size), Image.BICUBIC).save(
            root / "train" / f"d{i:05d}.jpg", quality=95)
        rows.append((f"d{i:05d}", f"digit_{label}"))
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root


def data_sets(work: Path) -> dict:
    return {
        "fashion": dict(data=FASHION, a=96, b=160, hflip=True, val_fraction=0.1, fit_budgets=("10m", "30m")),
        # digits are small and saturated (~0.97): shorter fit budgets
        "digits": dict(data=work / "digits" / "data", a=128, b=96, hflip=False, val_fraction=0.2,
                       fit_budgets=("3m", "10m")),
    }


# -- the anchor: plain Keras, written as a user of the Keras guide would ------------------------

def plain_keras(data: Path, cache: Path, weights: Path, size: int, hflip: bool, out: Path,
                head_epochs: int, tune_epochs: int) -> None:
    """Frozen MobileNetV2 + a linear head for `head_epochs`, then the whole base for `tune_epochs`
    (BatchNorm in inference mode, Adam warming up over one epoch to 3e-4, then cosine to 0), on the
    cache's split; writes the last epoch's validation figures and the wall time to `out`."""
    started = time.time()
    import keras
    import numpy as np
    import tensorflow as tf

    from dogtl.data.folders import load_dataset
    from dogtl.core.metrics import scores
    from dogtl.features.cache import open_cache

    c = open_cache(cache)
    dataset = load_dataset(data)
    path_of = dict(zip(dataset.ids, map(str, dataset.paths)))
    paths = np.array([path_of[i] for i in c.ids])
    labels, is_val = np.asarray(c.labels, np.int32), np.asarray(c.is_val, bool)
    classes = len(c.classes)

    def load(path, label):
        image = tf.image.resize(tf.image.decode_jpeg(tf.io.read_file(path), channels=3), (size, size))
        return keras.applications.mobilenet_v2.preprocess_input(image), label

    def pipeline(rows, training):
        ds = tf.data.Dataset.from_tensor_slices((paths[rows], labels[rows]))
        if training:
            ds = ds.shuffle(len(rows), seed=2018, reshuffle_each_iteration=True)
        return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(32).prefetch(tf.data.AUTOTUNE)

    train, val = pipeline(np.flatnonzero(~is_val), True), pipeline(np.flatnonzero(is_val), False)
    augment = keras.Sequential(([keras.layers.RandomFlip("horizontal")] if hflip else [])
                               + [keras.layers.RandomRotation(0.1)])
    base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(size, size, 3))
    base.load_weights(str(weights))
    base.trainable = False
    inputs = keras.Input((size, size, 3))
    x = base(augment(inputs), training=False)  # BatchNorm in inference mode, also once unfrozen
    x = keras.layers.Dropout(0.2)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(x))
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(train, epochs=head_epochs, verbose=0, shuffle=False)  # the dataset shuffles itself
    base.trainable = True
    steps = int(np.ceil((~is_val).sum() / 32))
    schedule = keras.optimizers.schedules.CosineDecay(1e-6, decay_steps=max(1, (tune_epochs - 1) * steps),
                                                      warmup_target=3e-4, warmup_steps=steps)
    model.compile(keras.optimizers.Adam(schedule), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(train, epochs=tune_epochs, verbose=0, shuffle=False)
    probs = model.predict(val, verbose=0)
    result = scores(labels[is_val], probs, classes)
    out.write_text(json.dumps({**result, "seconds": time.time() - started}))


# -- the benchmark ------------------------------------------------------------------------------

class Bench:
    def __init__(self, work: Path, weights: Path, quick: bool, lock: Path | None):
        self.work, self.weights, self.quick, self.lock = work, weights, quick, lock
        self.rows: list = []

    @contextmanager
    def timed(self):
        """Hold `--lock` (flock) while a timed row runs, so no other timed benchmark overlaps it;
        other benchmarks may run between rows."""
        if self.lock is None:
            yield
            return
        import fcntl

        with open(self.lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def row(self, label, metrics, seconds, budget=None, note=""):
        self.rows.append((label, metrics["val_accuracy"], metrics["val_log_loss"], seconds, budget, note))
        vs = f"  {seconds / budget:.2f} x budget" if budget else ""
        print(f"  {label:<58} acc {metrics['val_accuracy']:.4f}  log loss {metrics['val_log_loss']:.4f}  "
              f"{seconds:7.1f} s{vs}  (load {os.getloadavg()[0]:.1f}){'  ' + note if note else ''}", flush=True)

    def dogtl(self, *args) -> tuple[float, str]:
        """Run `dogtl ARGS` as its own process: (wall seconds, output); a failure is printed and
        raised as CommandFailed (the row says so, the benchmark goes on)."""
        with self.timed():
            started = time.time()
            run = subprocess.run([sys.executable, "-m", "dogtl.cli", *map(str, args)], capture_output=True, text=True)
            seconds = time.time() - started
        if run.returncode != 0:
            print(f"  dogtl {' '.join(map(str, args))} failed ({run.returncode}) after {seconds:.0f} s:", flush=True)
            print("".join(f"      | {line}\n" for line in (run.stdout + run.stderr).splitlines()
                          if "I0000" not in line and "WARNING: All" not in line), end="", flush=True)
            raise CommandFailed(seconds)
        return seconds, run.stdout


class CommandFailed(Exception):
    pass


def metrics_of(model: Path) -> dict:
    return json.loads(model.with_suffix(".json").read_text())["metrics"]


def run_set(bench: Bench, name: str, spec: dict, args) -> None:
    import dogtl
    from dogtl.evaluation.evaluate import evaluate
    from dogtl.evaluation.settings import EvaluateConfig
    from dogtl.finetuning.settings import FinetuneConfig
    from dogtl.sweeps.autosearch import AUTO_PARAMS

    quick = bench.quick
    work = bench.work / name
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    data = digits_dataset(spec["data"]) if name == "digits" else spec["data"]
    extract = dict(backbone="mobilenet_v2", weights=str(bench.weights), passes=2, val_fraction=spec["val_fraction"],
                   seed=2018, batch_size=64, hflip=spec["hflip"], progress=False, **LIGHT)
    caches = {}
    for key in ("a", "b") if "heads" not in args.skip else ("a",):  # B serves the heads' rows only
        caches[key] = work / f"{name}-{spec[key]}.h5"
        t = time.time()
        dogtl.extract_features(data, caches[key], image_size=spec[key], **extract)
        print(f"cache {key.upper()}: mobilenet_v2 at {spec[key]} px, clean + 2 light passes "
              f"({time.time() - t:.0f} s, ~0 if it was there)", flush=True)
    blocks = FinetuneConfig().trainable_blocks  # finetune's default depth: the cut --from-cache needs
    caches["cut"] = work / f"{name}-{spec['a']}-cut-{blocks}.h5"
    t = time.time()
    dogtl.extract_features(data, caches["cut"], image_size=spec["a"], cut_blocks=blocks, **extract)
    print(f"cache A with the cut activations of {blocks} block(s) for --from-cache ({time.time() - t:.0f} s)",
          flush=True)

    # Heads, the sweep and TTA are quality rows (their seconds are the work, not claims) and run
    # without the lock; the rows whose wall time is compared (budgets, fine-tuning) hold it.
    def head(label, out, cache, **settings):
        t = time.time()
        r = dogtl.train_head(cache, models / out, force=True, progress=False, **settings)
        bench.row(label, r.metrics, time.time() - t)
        return models / out

    def tta(label, model):
        t = time.time()
        r = evaluate(EvaluateConfig(model=str(model), tta=True, force=True))
        bench.row(label, {"val_accuracy": r.tta["accuracy"], "val_log_loss": r.tta["log_loss"]}, time.time() - t)

    print(f"\n{name}: validation split of {spec['val_fraction']:.0%}, the same images in every row", flush=True)
    default = head("train-head (defaults: 1024 hidden)", "default.keras", caches["a"])
    if "heads" not in args.skip:
        linear = head("train-head --hidden none (linear)", "linear.keras", caches["a"], hidden=())
        head("--cache A --cache B, default head", "concat.keras", [caches["a"], caches["b"]])
        head("--cache A --cache B --hidden none", "concat-linear.keras", [caches["a"], caches["b"]], hidden=())
        t = time.time()
        sweep = dogtl.sweep(caches["a"], params=AUTO_PARAMS, trials=args.trials, ensemble=5, out=work / "sweep",
                            force=True, progress=False)
        seconds = time.time() - t
        bench.row(f"sweep --trials {args.trials}: best single trial", sweep.ensemble.member_metrics[0], seconds)
        bench.row("sweep --ensemble 5: top-5 ensemble", sweep.ensemble.metrics, seconds, note="(same run)")
        tta("evaluate --tta, default head", default)
        tta("evaluate --tta, linear head", linear)
        tta("evaluate --tta, sweep top-5 ensemble", sweep.ensemble.model_path)

    from dogtl.core.budget import parse_budget

    def command(label, out, *cli, budget=None, show=False):
        """One row from `dogtl CLI...` writing the model `out`; a failed command is a row saying so."""
        try:
            seconds, output = bench.dogtl(*cli, "--out", out)
        except CommandFailed as e:
            bench.row(label, {"val_accuracy": float("nan"), "val_log_loss": float("nan")}, e.args[0], budget,
                      note="FAILED (above)")
            return
        bench.row(label, metrics_of(out), seconds, budget)
        for line in output.splitlines() if show else ():
            if not line.startswith(("  trial", "finetune epoch")):
                print(f"      | {line}", flush=True)

    for budget in args.auto_budgets if "auto" not in args.skip else ():
        command(f"train-head --auto --budget {budget:g}s", models / f"auto-{budget:.0f}.keras", "train-head", "--auto",
                "--budget", f"{budget:g}s", "--cache", caches["a"], "--force", budget=budget)

    fit_flags = ["--weights", bench.weights, "--val-fraction", spec["val_fraction"], "--force"]
    if not spec["hflip"]:
        fit_flags.append("--no-hflip")
    for budget in (args.fit_budgets or spec["fit_budgets"]) if "fit" not in args.skip else ():
        command(f"dogtl fit --budget {budget}", models / f"fit-{budget}.keras", "fit", "--data", data, "--budget",
                budget, *fit_flags, budget=parse_budget(budget), show=True)

    if "anchor" not in args.skip:
        out = work / "plain-keras.json"
        head_epochs, tune_epochs = (1, 1) if quick else (3, 5)
        with bench.timed():
            started = time.time()
            subprocess.run([sys.executable, __file__, "--anchor", str(data), str(caches["a"]), str(bench.weights),
                            str(spec["a"]), str(int(spec["hflip"])), str(out), str(head_epochs), str(tune_epochs)],
                           check=True)
        bench.row(f"plain Keras: frozen {head_epochs} + whole base {tune_epochs} epochs (anchor)",
                  json.loads(out.read_text()), time.time() - started)

    if "finetune" not in args.skip:
        common = ["--data", data, "--force", *(["--epochs", 1] if quick else [])]
        command("finetune (defaults) from the default head", models / "ft-default.keras", "finetune", *common,
                "--head", default)
        cut_head = head("  (train-head defaults on the cut cache, for the next row)", "cut-default.keras",
                        caches["cut"])
        command("finetune --from-cache (defaults)", models / "ft-cache.keras", "finetune", *common, "--from-cache",
                "--head", cut_head)
        command("finetune --recipe reference", models / "ft-reference.keras", "finetune", *common, "--recipe",
                "reference", "--head", default)

def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--anchor":
        data, cache, weights, size, hflip, out, head_epochs, tune_epochs = sys.argv[2:]
        plain_keras(Path(data), Path(cache), Path(weights), int(size), bool(int(hflip)), Path(out),
                    int(head_epochs), int(tune_epochs))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/dogtl-quality"))
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--sets", default="fashion,digits")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--auto-budgets", type=float, nargs="+", default=(60.0, 300.0))
    parser.add_argument("--fit-budgets", nargs="+", default=None, help="default: 10m 30m (fashion), 3m 10m (digits)")
    parser.add_argument("--quick", action="store_true", help="smoke check: digits, tiny budgets, 1 epoch each")
    parser.add_argument("--skip", default="", help="comma-separated row groups to leave out: heads (all but the "
                        "default head), auto, fit, anchor, finetune (its three rows)")
    parser.add_argument("--lock", type=Path, default=None,
                        help="hold this flock (e.g. /work/bench.lock) during each row whose wall time is compared")
    args = parser.parse_args()
    if args.quick:
        args.sets, args.auto_budgets, args.fit_budgets = "digits", (20.0, 40.0), ("3m", "4m")
        args.skip += ",heads"
    if not args.weights.is_file():
        raise SystemExit(f"{args.weights}: the pretrained backbone is needed (see ../shared/weights/README.md)")
    load = os.getloadavg()
    print(f"load average at the start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (2 CPU cores)", flush=True)
    bench = Bench(args.work, args.weights, args.quick, args.lock)
    for name in args.sets.split(","):
        start = len(bench.rows)
        run_set(bench, name, data_sets(args.work)[name], args)
        rows = bench.rows[start:]
        base = rows[0][2]
        print(f"\n{name}:\n\n| run | val accuracy | val log loss | vs default log loss | seconds | x budget |")
        print("|---|---|---|---|---|---|")
        for label, acc, loss, seconds, budget, note in rows:
            print(f"| {label.strip()} | {acc:.4f} | {loss:.4f} | {100 * (loss - base) / base:+.0f}% | {seconds:.1f} |"
                  f" {seconds / budget:.2f} |" if budget else
                  f"| {label.strip()} | {acc:.4f} | {loss:.4f} | {100 * (loss - base) / base:+.0f}% | {seconds:.1f} | |")
        load = os.getloadavg()
        print(f"\nload average at the end of {name}: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)


if __name__ == "__main__":
    main()
