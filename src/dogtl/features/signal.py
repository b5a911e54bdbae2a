"""Whether features can teach a head anything.

Degenerate features (every value ~0, or the same for every image) come from a backbone whose
weights carry no signal: a plain random initialisation (its BatchNorm statistics shrink the
activations to ~1e-12), a broken weights file, float16 storage of such tiny values. A head
trained on them ends at chance level with nothing saying why, so they are refused, naming
the cause, before any head trains on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# A feature whose standard deviation across images is below this is invisible to the head: its
# input BatchNorm divides by sqrt(variance + 1e-3), leaving it under 0.3% of a real feature.
MIN_SPREAD = 1e-4


@dataclass(frozen=True)
class Spread:
    images: int
    max_abs: float  # largest |value|
    max_std: float  # the largest standard deviation of one feature across the images

    def degenerate(self) -> str | None:
        """Why a head cannot learn from these features, or None when it can."""
        if self.images < 2:
            return None
        if self.max_abs == 0:
            return f"every feature of the {self.images} clean training images is 0"
        if self.max_std < MIN_SPREAD:
            return (f"the features hardly differ between the {self.images} clean training images (largest standard "
                    f"deviation of a feature {self.max_std:.2g}, largest value {self.max_abs:.2g})")
        return None


def spread(blocks) -> Spread:
    """The Spread of feature rows given as [rows, dim] blocks (streamed: memory is one block)."""
    n, total, squares, top = 0, None, None, 0.0
    for block in blocks:
        block = np.asarray(block, dtype=np.float64)
        if not len(block):
            continue
        total = block.sum(axis=0) if total is None else total + block.sum(axis=0)
        squares = (block ** 2).sum(axis=0) if squares is None else squares + (block ** 2).sum(axis=0)
        n += len(block)
        top = max(top, float(np.abs(block).max()))
    if n == 0:
        return Spread(0, 0.0, 0.0)
    mean = total / n
    variance = np.maximum(squares / n - mean ** 2, 0.0)
    return Spread(n, top, float(np.sqrt(variance.max())))

