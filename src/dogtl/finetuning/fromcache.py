"""`finetune --from-cache`: fine-tune the top M blocks and the head on the cut activations that
`extract-features --cut-blocks N` (N >= M, or all) stored, instead of on the images.

The frozen layers below the cut are a deterministic function of (image, pass) that stage one
already ran, so an epoch here reads one cached pass per image (drawn as train-head draws them,
head/trainloop.epoch_plan), never decodes an image and never runs a frozen layer below the cut.
Everything else is fine-tuning from images (train.py): the head object itself on top (exact
carry-over), BatchNorm frozen, epoch 0 is the head, a checkpoint per epoch (resume after a
kill), the best epoch by validation log loss (on the cached clean validation pass) is kept.

The model trained is cut -> top part -> pooling -> head; its layers are the backbone's own
(features/cut.split_backbone); of the top part, only the top M blocks train (with M < N the
blocks between the cut and them run forward only, frozen). The saved model is the whole
backbone + head: the backbone is rebuilt from the weights it came from (so the frozen part is
bit-identical to it) and the trained top part's weights are copied in, so predict, evaluate and
export need no change.
"""

from __future__ import annotations

import numpy as np

from dogtl.core.errors import DogtlError
from dogtl.core.models import build_backbone, compose
from dogtl.evaluation.inference import inference_fn
from dogtl.core.metrics import scores
from dogtl.features.cut import CutReader, check_cut, split_backbone
from dogtl.finetuning.model import compile_model, load_head, unfreeze, unfrozen_batchnorm
from dogtl.finetuning.settings import FinetuneConfig
from dogtl.finetuning.setup import prepare_common
from dogtl.head.trainloop import epoch_plan

# local: tensorflow is imported inside the functions that make datasets: importing this module
# must not load TensorFlow (finetuning/train.py starts a multi-worker run first).


def prepare_from_cache(config: FinetuneConfig, strategy):
    """train.Setup for a run on the cache's cut activations, checked: the cut is at or below the
    top --trainable-blocks."""
    if strategy is not None:
        raise DogtlError(f"--from-cache runs on one device: drop --strategy {config.strategy}")

    def split(cache):
        check_cut(cache, config.trainable_blocks)
        out = {}
        for name, mask in (("train", ~cache.is_val), ("val", cache.is_val)):
            rows = np.flatnonzero(mask)
            out[name] = {"rows": rows, "labels": cache.labels[rows].astype(np.int64)}
        return out

    return prepare_common(config, strategy, split, source=CacheSource())


def _backbone_and_head(setup):
    return build_backbone(setup.spec, setup.weights, setup.size), load_head(setup.config, setup.meta)


class CacheSource:
    """The hooks train.py calls for a run from the cache (build, dataset, validate, export)."""

    def cut_blocks(self, setup):
        """Where the model's input enters the backbone: the cache's cut (top blocks above it)."""
        return setup.cache.fingerprint["cut"]["blocks"]

    def build(self, setup):
        """(compiled model on cut activations, the head inside it, names of the trainable layers,
        the BatchNorm layers --batchnorm reestimate re-estimates)."""
        c = setup.config
        backbone, head = _backbone_and_head(setup)
        trainable = unfreeze(backbone, head, setup.spec, c.trainable_blocks)
        _, top = split_backbone(backbone, setup.spec, self.cut_blocks(setup))
        model = compose(top, head, name="finetuned_from_cache", input_names=["cut"])
        compile_model(model, backbone, setup.spec, c, setup.steps)
        return model, head, trainable, unfrozen_batchnorm(backbone, head, setup.spec, c.trainable_blocks)

    def _reader(self, setup):
        return CutReader(setup.cache)

    def batches(self, setup, epochs):
        """(cut activations, labels) batches of the given epochs: every training row once per epoch
        (topped up to whole batches), each from one cached pass, as train-head draws them."""
        train = setup.split["train"]
        n, batch = len(train["rows"]), min(setup.config.batch_size, len(train["rows"]))
        total = setup.cache.num_passes
        # augmented passes 1..K, as fine-tuning from images trains on augmented images; the clean
        # pass with --augment none or a cache without augmented passes
        passes = np.arange(1, total) if setup.augmentation is not None and total > 1 else np.array([0])
        reader = self._reader(setup)
        try:
            for epoch in epochs:
                rows, draws = (np.asarray(t) for t in epoch_plan(setup.seed, epoch, n, len(passes), batch))
                for s in range(setup.steps):
                    idx, p = rows[s * batch:(s + 1) * batch], passes[draws[s * batch:(s + 1) * batch]]
                    x = np.empty((len(idx), *reader.info["shape"]), np.float32)
                    for q in np.unique(p):
                        at = np.flatnonzero(p == q)
                        x[at] = reader.read("labelled", int(q), train["rows"][idx[at]])
                    yield x, train["labels"][idx]
        finally:
            reader.close()

    def dataset(self, setup, epochs):
        import tensorflow as tf

        shape = tuple(setup.cache.fingerprint["cut"]["shape"])
        spec = (tf.TensorSpec((None, *shape), tf.float32), tf.TensorSpec((None,), tf.int64))
        return tf.data.Dataset.from_generator(lambda: self.batches(setup, epochs),
                                              output_signature=spec).prefetch(2)

    def reestimation_batches(self, setup, limit: int, batch_size: int = 64):
        """Batches of the cached clean cut of up to `limit` training rows, drawn at random by the
        seed (as from images: data.reestimation_images)."""
        rows = setup.split["train"]["rows"]
        chosen = np.sort(np.random.default_rng([setup.seed, 1]).permutation(len(rows))[:limit])
        reader = self._reader(setup)
        try:
            for k in range(0, len(chosen), batch_size):
                yield reader.read("labelled", 0, rows[chosen[k:k + batch_size]])
        finally:
            reader.close()

    def validate(self, setup, model):
        """(probabilities, scores) on the cached clean pass of the validation rows."""
        val, b = setup.split["val"], 2 * setup.config.batch_size
        reader = self._reader(setup)
        infer = inference_fn(model)
        try:
            probs = np.concatenate([np.asarray(infer(reader.read("labelled", 0, val["rows"][k:k + b])), np.float64)
                                    for k in range(0, len(val["rows"]), b)])
        finally:
            reader.close()
        return probs, scores(val["labels"], probs)

    def export(self, setup, trained):
        """The whole backbone + head: the backbone as built from its weights, the trained top
        part's weights copied in layer by layer, then the trained head."""
        backbone, _ = _backbone_and_head(setup)
        trained_top = next(layer for layer in trained.layers if layer.name == "top_part")
        # Layer by layer in the order the same construction gives (unnamed layers such as
        # Xception's conv2d_N are numbered per process, so names cannot be matched).
        _, top = split_backbone(backbone, setup.spec, self.cut_blocks(setup))
        pairs = list(zip(top.layers, trained_top.layers))
        if len(top.layers) != len(trained_top.layers) or any(
                type(a) is not type(b) or [w.shape for w in a.weights] != [w.shape for w in b.weights]
                for a, b in pairs):
            raise DogtlError(f"{setup.checkpoints.folder}: the checkpoint's top blocks do not match "
                             f"{setup.spec.name}'s; rerun with --force to start over")
        for a, b in pairs:
            if a.weights:
                a.set_weights(b.get_weights())
        return compose(backbone, trained.layers[-1])
