"""Fine-tuning from images with the frozen part of the backbone on a faster runtime.

Below the top N blocks nothing learns: images -> the activations entering the top blocks is a
frozen forward (features/cut.split_backbone's frozen part), so --runtime may run it
(core/runtimes.py: OpenVINO or ONNX Runtime on CPUs). Each training batch is the same
augmented images as fine-tuning on TensorFlow (data.training_batches), pushed through the
frozen part on the runtime; TensorFlow trains the top part and the head on the result, as
`--from-cache` trains them on stored activations (fromcache.CacheSource: the same model,
checkpoints and export, so the saved model is the whole backbone + head). On TensorFlow, with
--trainable-blocks 0 or all blocks, or under --strategy, the whole model trains on images as
before (train.py).
"""

from __future__ import annotations

import numpy as np

from dogtl.core.errors import DataError
from dogtl.core.models import build_backbone
from dogtl.core.runtimes import frozen_forward, plan
from dogtl.core.settings import ALL_BLOCKS
from dogtl.data.images import image_dataset
from dogtl.evaluation.inference import inference_fn
from dogtl.core.metrics import scores
from dogtl.features.cut import split_backbone
from dogtl.finetuning.data import training_batches
from dogtl.finetuning.fromcache import CacheSource

# local: tensorflow is imported inside `dataset`: importing this module must not load TensorFlow
# (finetuning/train.py starts a multi-worker run first).


def frozen_part_source(config, strategy, spec):
    """A FrozenPartSource when --runtime means another runtime than TensorFlow here and there is a
    frozen part below the trainable blocks; else None (train on images in TensorFlow)."""
    runtime, _ = plan(config.runtime, config.precision, strategy)
    blocks = config.trainable_blocks
    if runtime == "tensorflow" or blocks == ALL_BLOCKS or not 0 < blocks < len(spec.blocks):
        return None  # nothing frozen below the trainable blocks (or TensorFlow runs it anyway)
    return FrozenPartSource()


class FrozenPartSource(CacheSource):
    """train.py's hooks: the model, checkpoints and export of CacheSource; batches and validation
    from the images through the frozen part on the runtime."""

    def __init__(self):
        self._forward = None

    def cut_blocks(self, setup):
        """The model's input is the frozen part's output: the activations entering the trainable blocks."""
        return setup.config.trainable_blocks

    def forward(self, setup):
        """The frozen part on the runtime, converted (or loaded from the conversion cache) once."""
        if self._forward is None:
            n = self.cut_blocks(setup)
            frozen, _ = split_backbone(build_backbone(setup.spec, setup.weights, setup.size), setup.spec, n)
            self._forward = frozen_forward(frozen, runtime=setup.config.runtime, precision=setup.config.precision,
                                           label=f"{setup.spec.name}-{setup.size}-below{n}")
        return self._forward

    def runtime(self, setup) -> str:
        """The runtime the frozen part runs on, for the metadata: asked of the converted part even
        when nothing ran here (a rerun that resumes after the last epoch trains nothing)."""
        return self.forward(setup).runtime

    def batches(self, setup, epochs):
        train, forward = setup.split["train"], self.forward(setup)
        ds = training_batches(train["paths"], train["indices"], setup.spec, setup.size, seed=setup.seed,
                              augmentation=setup.augmentation, batch_size=setup.config.batch_size, epochs=epochs)
        with forward:
            for pos, images in ds:
                yield np.asarray(forward(images), np.float32), train["labels"][pos.numpy()]

    def dataset(self, setup, epochs):
        import tensorflow as tf

        shape = tuple(int(d) for d in self.forward(setup).model.output.shape[1:])
        spec = (tf.TensorSpec((None, *shape), tf.float32), tf.TensorSpec((None,), tf.int64))
        return tf.data.Dataset.from_generator(lambda: self.batches(setup, epochs),
                                              output_signature=spec).prefetch(2)

    def validate(self, setup, model):
        """(probabilities, scores) on the clean validation images, the frozen part on the runtime."""
        val, forward, top = setup.split["val"], self.forward(setup), inference_fn(model)
        probs = np.full((len(val["paths"]), model.output.shape[-1]), np.nan)
        with forward:
            for pos, _, images in image_dataset(val["paths"], setup.spec, setup.size,
                                                batch_size=2 * setup.config.batch_size):
                probs[pos.numpy()] = np.asarray(top(forward(images)), np.float64)
        if np.isnan(probs).any():
            bad = val["paths"][int(np.flatnonzero(np.isnan(probs[:, 0]))[0])]
            raise DataError(f"{bad}: cannot read this validation image any more; fix it or extract again")
        return probs, scores(val["labels"], probs)
