"""Bit-for-bit reproducible training on CPU, at a cost in speed (finetune --deterministic).

Seeds Python, NumPy and Keras (`keras.utils.set_random_seed`) and turns on TensorFlow's op
determinism (`tf.config.experimental.enable_op_determinism`): ops then pick deterministic
kernels and reductions, so the same command gives the same weights, also after a kill and
resume. It is process-wide and cannot be turned off again in the same process. Measured
cost: benchmarks/faults.py --determinism-cost.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def make_deterministic(seed: int) -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(int(seed))
    tf.config.experimental.enable_op_determinism()
    log.info("deterministic ops on, seed %d", seed)
