"""Cut activations: what enters the top N blocks of the backbone, stored by extraction so that
`finetune --from-cache` can train those blocks without decoding an image or re-running the
frozen layers below them.

The cut is one tensor: the input of the first layer of the top N blocks (models.top_blocks_start,
the same layer fine-tuning from images unfreezes from). The frozen part maps images to it; the
top part maps it to the pooled features, and holds every layer that depends on it (a residual
shortcut created just before the block, such as Xception's, runs in the top part but stays
frozen, exactly as when fine-tuning from images). A cut at N serves fine-tuning of any M <= N
top blocks: the frozen layers between the cut and the top M run forward only. With N = 'all' the
cut is the backbone's input, the preprocessed (augmented) images themselves: the whole backbone
then trains from the cache, skipping decoding, resizing and augmenting but running every layer.

Stored per pass as `<split>/cut` [passes, rows, H, W, C], float16, or int8 with a symmetric
scale per image and channel in `<split>/cut_scale` [passes, rows, C] (value = int8 x scale).
"""

from __future__ import annotations

import numpy as np

from dogtl.core.errors import CacheError, DogtlError, SettingError
from dogtl.core.models import top_blocks_start
from dogtl.core.settings import ALL_BLOCKS

CUT_DTYPES = ("float16", "int8")
BYTES = {"float16": 2, "int8": 1}


def cut_tensor(backbone, spec, n):
    """The KerasTensor entering the top `n` blocks (or 'all') of `backbone`."""
    layers = backbone.layers
    start = top_blocks_start([layer.name for layer in layers], spec, n)
    if n == 0 or start >= len(layers):
        raise DogtlError(f"--cut-blocks {n}: choose 1 to {len(spec.blocks)} or all for {spec.name}")
    tensor = layers[start].input
    if isinstance(tensor, (list, tuple)):
        raise DogtlError(f"--cut-blocks {n}: {spec.name}'s block {layers[start].name} takes several tensors; "
                         "choose another number of blocks")
    return tensor


def split_backbone(backbone, spec, n):
    """(frozen part: images -> cut, top part: cut -> pooled features). Both share the backbone's
    layer objects, so training the top part trains the backbone itself."""
    import keras

    cut = cut_tensor(backbone, spec, n)
    return keras.Model(backbone.input, cut, name="frozen_part"), keras.Model(cut, backbone.output, name="top_part")


def extraction_model(backbone, spec, n):
    """images -> [pooled features, cut activations], in one forward pass."""
    import keras

    return keras.Model(backbone.input, [backbone.output, cut_tensor(backbone, spec, n)], name="with_cut")


def cut_info(backbone, spec, n, dtype: str) -> dict:
    """What the fingerprint records of a cut: blocks, stored dtype and the shape of one image's cut."""
    if dtype not in CUT_DTYPES:
        raise SettingError(f"--cut-dtype {dtype!r} must be one of {', '.join(CUT_DTYPES)}")
    shape = [int(d) for d in cut_tensor(backbone, spec, n).shape[1:]]
    return {"blocks": n, "dtype": dtype, "shape": shape}


def cut_covers(cut_blocks, blocks) -> bool:
    """Whether a cut entering the top `cut_blocks` blocks serves fine-tuning the top `blocks`."""
    return cut_blocks == ALL_BLOCKS or (blocks != ALL_BLOCKS and blocks <= cut_blocks)


def stored_layout(fingerprint: dict) -> dict:
    """{dataset name: (shape of one row, dtype)} of the cut datasets a cache with `fingerprint` holds."""
    cut = fingerprint.get("cut")
    if not cut:
        return {}
    shape = tuple(int(d) for d in cut["shape"])
    layout = {"cut": (shape, cut["dtype"])}
    if cut["dtype"] == "int8":
        layout["cut_scale"] = ((shape[-1],), "float32")
    return layout


def bytes_per_image_pass(info: dict) -> int:
    values = int(np.prod(info["shape"]))
    return values * BYTES[info["dtype"]] + (4 * info["shape"][-1] if info["dtype"] == "int8" else 0)


def cut_bytes(info: dict, image_passes: int) -> int:
    """Bytes the cut activations of `image_passes` images-times-passes take in the cache."""
    return bytes_per_image_pass(info) * image_passes


def encode(activations: np.ndarray, dtype: str) -> dict:
    """The arrays stored for a batch of cut activations [b, H, W, C]: {'cut'} or {'cut', 'cut_scale'}."""
    x = np.asarray(activations, dtype=np.float32)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            stored = x.astype(np.float16)
        if not np.isfinite(stored).all():
            raise DogtlError(f"cut activations reach {np.abs(x).max():.3g}, beyond float16: rerun with "
                             "--cut-dtype int8 --force")
        return {"cut": stored}
    peak = np.abs(x).max(axis=tuple(range(1, x.ndim - 1)))  # [b, C]
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / scale[:, None, None, :]), -127, 127).astype(np.int8)
    return {"cut": q, "cut_scale": scale}


def decode(values: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """float32 activations from stored values (and int8 scales)."""
    x = np.asarray(values).astype(np.float32)
    if scale is not None:
        x *= np.asarray(scale, np.float32)[:, None, None, :]
    return x


def check_cut(cache, blocks=None) -> dict:
    """The cache's cut info; refuses a cache without cut activations, or with a cut below the top
    `blocks` blocks, saying what to run."""
    info = cache.fingerprint.get("cut")
    if not info:
        want = blocks or 2
        raise CacheError(f"{cache.path} holds no cut activations: extract with `dogtl extract-features "
                         f"--cut-blocks {want} --cache {cache.path} --force` (same other options) to fine-tune "
                         "from the cache, or fine-tune from the images without --from-cache")
    if blocks is not None and not cut_covers(info["blocks"], blocks):
        raise CacheError(f"--trainable-blocks {blocks} but {cache.path} holds the activations entering the top "
                         f"{info['blocks']} blocks: run with --trainable-blocks {info['blocks']} or fewer, or extract "
                         f"again with --cut-blocks {blocks} --force")
    return info


class CutReader:
    """Reads cut activations of a complete cache, decoded to float32."""

    def __init__(self, cache):
        import h5py

        self.path, self.info = cache.path, check_cut(cache)
        try:
            self.file = h5py.File(cache.path, "r")
        except OSError as e:
            raise CacheError(f"{cache.path}: cannot read its cut activations ({str(e)[:120]})") from None

    def read(self, split: str, pass_index: int, rows) -> np.ndarray:
        """[len(rows), H, W, C] float32 of `rows` (any order) of one pass."""
        g = self.file[split]
        # Row by row: each row is one chunk, and h5py's selection of a list of rows reads them
        # ~50x slower (245 ms against 5 ms for 16 rows of xception's 19x19x728), which starved
        # fine-tuning from the cache.
        try:
            values = np.stack([g["cut"][pass_index, int(i)] for i in rows])
            scale = np.stack([g["cut_scale"][pass_index, int(i)] for i in rows]) if "cut_scale" in g else None
        except (OSError, KeyError) as e:
            raise CacheError(f"{self.path}: damaged cut activations ({str(e)[:120]}); extract again") from None
        return decode(values, scale)

    def close(self) -> None:
        self.file.close()
