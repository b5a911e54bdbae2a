"""Stage three: fine-tune the top backbone blocks together with the trained head, on images.

The model is backbone -> pooling -> the trained head object itself, so it starts exactly
where the head stopped. Only the top N blocks learn; BatchNorm layers stay frozen (inference
mode). Training reads the images again with the extraction pipeline and augmentation
(epoch e uses augmented pass 1 + e, fresh each epoch), on the cache's train/validation split.

Each finished epoch is checkpointed in `<out>.partial/` (model + optimizer, and a state file
written last, atomically), so a killed run resumes from its last finished epoch. The best
model by validation log loss, starting with the untouched head itself (epoch 0), is kept
there and only replaced by a better one: the saved model is never worse on validation
than what the head already gave.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from functools import reduce
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from dogtl.core.errors import DataError, DogtlError
from dogtl.evaluation.metrics import scores

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]  # (images trained on, images in all remaining epochs)
Report = Callable[[str], None]  # one line per finished epoch
STATE = "state.json"
# Settings that may change between a killed run and its resumption.
RESUMABLE = {"epochs", "patience", "force", "strategy"}


@dataclass(frozen=True)
class FinetuneConfig:
    data: str = "data"
    head: str = "models/head.keras"
    out: str = "models/finetuned.keras"
    cache: str | None = None  # default: the cache recorded with the head (holds the split)
    weights: str | None = None  # only needed when the backbone came from a local weights file
    trainable_blocks: int = 2
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-4
    optimizer: str = "sgd"  # sgd (momentum 0.9), rmsprop or adam
    schedule: str = "constant"  # constant | cyclic
    max_lr: float = 1e-3  # cyclic schedule's peak
    step_size: int | None = None  # cyclic half-cycle in steps (default: 2 epochs)
    cyclic_mode: str = "triangular"  # triangular | triangular2 | exp_range
    augment: bool = True
    patience: int = 3  # epochs without a better validation log loss before stopping
    seed: int | None = None  # shuffling seed (default: the cache's seed)
    force: bool = False
    strategy: str = "default"  # default | mirrored | multi-worker; batch_size is the global batch

    def __post_init__(self):
        from dogtl.core.distribute import check_strategy

        check_strategy(self.strategy)
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"--epochs {self.epochs} and --batch-size {self.batch_size} must be at least 1")
        if self.lr <= 0 or self.max_lr <= 0:
            raise ValueError(f"--lr {self.lr} and --max-lr {self.max_lr} must be positive")
        if self.schedule not in ("constant", "cyclic"):
            raise ValueError(f"--schedule {self.schedule!r} must be 'constant' or 'cyclic'")
        if self.optimizer not in ("sgd", "rmsprop", "adam"):
            raise ValueError(f"--optimizer {self.optimizer!r} must be 'sgd', 'rmsprop' or 'adam'")
        if self.patience < 1:
            raise ValueError(f"--patience {self.patience} must be at least 1")


@dataclass
class FinetuneResult:
    model_path: Path
    before: dict  # val_accuracy, val_log_loss of the head before fine-tuning
    after: dict  # the same for the saved (best) model
    best_epoch: int  # 0: no epoch beat the head, the saved model is the head on the backbone
    epochs_run: int
    resumed_from: int  # epochs already finished by a killed run (0 for a fresh run)
    trainable_layers: list[str]
    head_difference: float  # max |p(images) - p(cached features)| on clean validation images
    history: pd.DataFrame
    history_path: Path
    plot_path: Path | None
    seconds: float


def training_batches(paths, indices, spec, image_size: int, *, seed: int, augmentation, batch_size: int,
                     epochs):
    """Batches of (row, image) for the given epochs, each epoch reshuffled and freshly augmented.

    Epoch e is augmented pass 1 + e of the extraction pipeline (same function, same keys), so
    the first fine-tuning epoch sees exactly the images of the cache's first augmented pass.
    Rows index `paths`; the order of epoch e depends only on (seed, e), so a resumed run
    sees the same batches. Unreadable images raise (they were readable at extraction).
    """
    from dogtl.data.images import image_dataset

    indices = np.asarray(indices)
    parts = []
    for epoch in epochs:
        order = np.random.default_rng([seed, epoch]).permutation(len(paths))
        parts.append(image_dataset(
            [paths[i] for i in order], spec, image_size, positions=order, indices=indices[order],
            pass_index=1 + epoch if augmentation is not None else 0, seed=seed, augmentation=augmentation,
            batch_size=batch_size, skip_bad=False))
    if not parts:
        raise ValueError("no epochs to run")
    return reduce(lambda a, b: a.concatenate(b), parts).map(lambda pos, index, image: (pos, image))


def training_dataset(paths, indices, labels, spec, image_size: int, *, seed: int, augmentation,
                     batch_size: int, epochs):
    """The (image, label) batches `fit` trains on: `training_batches` with the rows' labels."""
    import tensorflow as tf

    labels = tf.constant(np.asarray(labels, dtype=np.int64))
    ds = training_batches(paths, indices, spec, image_size, seed=seed, augmentation=augmentation,
                          batch_size=batch_size, epochs=epochs)
    return ds.map(lambda pos, image: (image, tf.gather(labels, pos)),
                  num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def finetune(config: FinetuneConfig, progress: Progress | None = None, report: Report | None = None) -> FinetuneResult:
    started = time.perf_counter()
    return _Run(config, progress, report).run(started)


class _Run:
    def __init__(self, config: FinetuneConfig, progress, report):
        self.config, self.progress, self.report = config, progress, report

    # -- setup -------------------------------------------------------------------------
    def _prepare(self):
        from dogtl.core.artifacts import check_writable
        from dogtl.data.augment import AugmentConfig
        from dogtl.data.folders import load_dataset
        from dogtl.core.modelinfo import backbone_weights, check_metadata, open_model_cache, split_paths

        from dogtl.core.distribute import check_global_batch, training_steps, worker

        c = self.config
        # Every worker of a multi-worker run saves its own copy; only the chief's is at --out.
        self.out = check_writable(worker(self.strategy).private_path(c.out), c.force)
        self.meta, self.spec, self.size = check_metadata(c.head, kinds=("head",))
        self.weights = backbone_weights(self.meta, c.weights)
        self.cache = open_model_cache(self.meta, c.cache)
        if not self.cache.is_val.any():
            raise DataError(f"{self.cache.path} has no validation split (--val-fraction 0): fine-tuning needs "
                            "one to stop early and keep the best model; extract with --val-fraction > 0")
        self.split = split_paths(self.cache, load_dataset(c.data))
        if len(self.split["train"]["paths"]) == 0:
            raise DataError(f"{self.cache.path} has no training images outside the validation split")
        fingerprint = self.cache.fingerprint
        self.augmentation = AugmentConfig(**fingerprint["augmentation"]) if c.augment else None
        self.seed = int(fingerprint.get("seed", 0)) if c.seed is None else c.seed
        check_global_batch(c.batch_size, self.strategy, len(self.split["train"]["paths"]))
        self.steps = training_steps(len(self.split["train"]["paths"]), c.batch_size, self.strategy)
        self.partial = self.out.with_name(self.out.name + ".partial")
        settings = {k: v for k, v in asdict(c).items() if k not in RESUMABLE}
        self.identity = {"settings": settings, "head": self.meta, "cache_fingerprint": fingerprint}

    def _load_state(self):
        """The state of a killed run with the same settings, or None (stale ones are refused)."""
        path = self.partial / STATE
        if not path.exists():
            if self.partial.exists():
                shutil.rmtree(self.partial)  # killed before its first checkpoint: nothing to keep
            return None
        state = json.loads(path.read_text())
        if state["identity"] != json.loads(json.dumps(self.identity, default=str)):
            if not self.config.force:
                raise DogtlError(f"{self.partial} holds an unfinished fine-tuning with other settings or "
                                 "another head: rerun it with those settings to finish it, or pass --force "
                                 "to discard it")
            shutil.rmtree(self.partial)
            return None
        return state

    def _fresh_model(self):
        from dogtl.core.distribute import scope

        with scope(self.strategy):  # variables mirrored on every replica
            return self._build_model()

    def _build_model(self):
        from dogtl.core.artifacts import load_model
        from dogtl.core.modelinfo import check_model_matches
        from dogtl.core.models import build_backbone, compose, freeze_batchnorm, unfreeze_top_blocks

        head, _ = load_model(self.config.head, compile=False)
        check_model_matches(head, self.meta, self.config.head)
        backbone = build_backbone(self.spec, self.weights, self.size)
        trainable = unfreeze_top_blocks(backbone, self.spec, self.config.trainable_blocks)
        freeze_batchnorm(head)
        model = compose(backbone, head)
        self._compile(model)  # after every trainability change
        return model, head, trainable

    def _compile(self, model):
        from dogtl.head.schedules import CyclicLR, make_optimizer

        c = self.config
        lr = c.lr
        if c.schedule == "cyclic":
            lr = CyclicLR(c.lr, c.max_lr, c.step_size or 2 * self.steps, mode=c.cyclic_mode)
        model.compile(optimizer=make_optimizer(c.optimizer, lr),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        model.optimizer.build(model.trainable_variables)  # so every checkpoint holds its state

    # -- checkpoints ---------------------------------------------------------------------
    def _save(self, model, name: str) -> str:
        tmp = self.partial / f"{name}.tmp.keras"
        model.save(tmp)
        os.replace(tmp, self.partial / f"{name}.keras")
        return f"{name}.keras"

    def _commit(self, state: dict) -> None:
        from dogtl.core.artifacts import write_json_atomic

        state["identity"] = self.identity
        write_json_atomic(self.partial / STATE, state)
        keep = {state["best_file"], state["last_file"], STATE}
        for p in self.partial.iterdir():
            if p.name not in keep and not p.name.endswith(".tmp"):
                p.unlink()

    def _validate(self, model) -> tuple[np.ndarray, dict]:
        from dogtl.evaluation.predict import predict_images

        val = self.split["val"]
        probs, ok = predict_images(model, val["paths"], self.spec, self.size,
                                   batch_size=2 * self.config.batch_size)
        if not ok.all():
            bad = val["paths"][int(np.flatnonzero(~ok)[0])]
            raise DataError(f"{bad}: cannot read this validation image any more; fix it or extract again")
        return probs, scores(val["labels"], probs)

    # -- training ------------------------------------------------------------------------
    def _dataset(self, first_epoch: int):
        train = self.split["train"]
        ds = training_dataset(train["paths"], train["indices"], train["labels"], self.spec, self.size,
                              seed=self.seed, augmentation=self.augmentation,
                              batch_size=self.config.batch_size, epochs=range(first_epoch, self.config.epochs))
        if self.strategy is not None:
            from dogtl.core.distribute import data_sharding, drop_small_batches

            ds = drop_small_batches(ds, self.strategy).with_options(data_sharding())
        return ds

    def run(self, started: float) -> FinetuneResult:
        import keras
        import tensorflow as tf

        from dogtl.core.distribute import agree, make_strategy, scope

        self.strategy = make_strategy(self.config.strategy)  # first: multi-worker must start before TensorFlow
        self._prepare()
        c = self.config
        state = self._load_state()
        agree(self.strategy, [-1, 0] if state is None else [state["epoch"], int(state["stopped"])],
              "the epochs already run")
        if state is None:
            model, head, trainable = self._fresh_model()
            self.partial.mkdir(exist_ok=True)
            probs, before = self._validate(model)
            cached = head.predict(self.cache.features("labelled", passes=[0])[0][self.split["val"]["rows"]],
                                  batch_size=1024, verbose=0)
            difference = float(np.max(np.abs(probs - cached)))
            if difference > 0.05:
                log.warning("the backbone does not reproduce the cached features (predictions differ by "
                            "up to %.3f): were the weights or images changed since extraction?", difference)
            first = self._save(model, "epoch-0000")
            state = {"epoch": 0, "stopped": False, "history": [], "before": before, "best": before,
                     "best_epoch": 0, "best_file": first, "last_file": first, "wait": 0,
                     "trainable_layers": trainable, "head_difference": difference}
            self._commit(state)
            resumed_from = 0
        else:
            from dogtl.head import schedules  # noqa: F401  registers the cyclical schedule for loading

            with scope(self.strategy):
                model = keras.saving.load_model(self.partial / state["last_file"], compile=True)
            resumed_from = state["epoch"]
            log.info("resuming fine-tuning after epoch %d", resumed_from)

        if not state["stopped"] and state["epoch"] < c.epochs:
            from dogtl.core.distribute import prepare_fit

            callback = _make_epoch_end()(self, state, resumed_from)
            dataset = self._dataset(state["epoch"])
            try:
                with prepare_fit(model, self.strategy, dataset.element_spec):
                    model.fit(dataset, epochs=c.epochs, initial_epoch=state["epoch"],
                              steps_per_epoch=self.steps, callbacks=[callback], shuffle=False, verbose=0)
            except tf.errors.OpError as e:
                message = getattr(e, "message", str(e)).strip().splitlines()
                raise DataError(f"cannot read a training image while fine-tuning ({message[-1][:200] if message else e}); "
                                "fix or remove it and extract features again") from None
        return self._finish(state, resumed_from, started)

    def _finish(self, state, resumed_from, started) -> FinetuneResult:
        import keras

        from dogtl.core.artifacts import save_model
        from dogtl.evaluation.predict import write_csv_atomic

        from dogtl.head import schedules  # noqa: F401  registers the cyclical schedule for loading

        best = keras.saving.load_model(self.partial / state["best_file"], compile=True)
        history = pd.DataFrame(state["history"], columns=["epoch", "loss", "accuracy", "val_loss",
                                                          "val_accuracy", "lr"])
        after = state["best"]
        metrics = {**after, "before": state["before"], "best_epoch": state["best_epoch"],
                   "epochs_run": state["epoch"], "head_difference": state["head_difference"]}
        metadata = {
            "kind": "finetuned", "classes": list(self.meta["classes"]), "backbone": self.spec.name,
            "weights": self.meta["weights"], "image_size": self.size, "preprocessing": self.spec.preprocessing,
            "feature_dim": self.spec.feature_dim, "cache": str(self.cache.path),
            "cache_fingerprint": self.cache.fingerprint, "head": str(self.config.head),
            "settings": asdict(self.config), "metrics": metrics,
            "trainable_layers": state["trainable_layers"],
        }
        history_path = self.out.with_suffix(".history.csv")
        write_csv_atomic(history, history_path)
        plot_path = None
        if len(history):
            from dogtl.core.plots import plot_history

            plot_path = self.out.with_suffix(".png")
            plot_history(history, plot_path)
        save_model(best, self.out, metadata)
        shutil.rmtree(self.partial, ignore_errors=True)
        return FinetuneResult(self.out, state["before"], after, state["best_epoch"], state["epoch"],
                              resumed_from, state["trainable_layers"], state["head_difference"], history,
                              history_path, plot_path, time.perf_counter() - started)


def _make_epoch_end():
    import keras

    class EpochEnd(keras.callbacks.Callback):
        """Validates on clean images, keeps the best model, checkpoints, stops early, reports."""

        def __init__(self, run: _Run, state: dict, resumed_from: int):
            super().__init__()
            self.run, self.state = run, state
            c = run.config
            self.images = len(run.split["train"]["paths"])
            self.total = self.images * (c.epochs - state["epoch"])
            self.offset = state["epoch"]

        def on_train_batch_end(self, batch, logs=None):
            if self.run.progress:
                c = self.run.config
                done = (self.state["epoch"] - self.offset) * self.images + min(self.images, (batch + 1) * c.batch_size)
                self.run.progress(done, self.total)

        def on_epoch_end(self, epoch, logs=None):
            run, state, logs = self.run, self.state, logs or {}
            _, metrics = run._validate(self.model)
            lr = float(np.asarray(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))
            row = {"epoch": epoch + 1, "loss": float(logs.get("loss", np.nan)),
                   "accuracy": float(logs.get("accuracy", np.nan)), "val_loss": metrics["val_log_loss"],
                   "val_accuracy": metrics["val_accuracy"], "lr": lr}
            logs.update(val_loss=row["val_loss"], val_accuracy=row["val_accuracy"])
            state["history"].append(row)
            state["epoch"] = epoch + 1
            state["last_file"] = run._save(self.model, f"epoch-{epoch + 1:04d}")
            if metrics["val_log_loss"] < state["best"]["val_log_loss"]:
                state["best"], state["best_epoch"], state["wait"] = metrics, epoch + 1, 0
                state["best_file"] = state["last_file"]
            else:
                state["wait"] += 1
            state["stopped"] = state["wait"] >= run.config.patience
            run._commit(state)
            if state["stopped"]:
                self.model.stop_training = True
            if run.report:
                mark = " *" if state["best_epoch"] == epoch + 1 else ""
                run.report(f"epoch {epoch + 1}/{run.config.epochs}: loss {row['loss']:.4f} acc {row['accuracy']:.3f}"
                           f"  val log loss {row['val_loss']:.4f} val acc {row['val_accuracy']:.3f}"
                           f"  lr {lr:.2e}{mark}")

    return EpochEnd

