"""Running the backbone over every pass of an extraction, saving each finished batch.

Pass p of an image depends only on (seed, p, its key) and every backbone call holds exactly
--batch-size images, so features resumed after a kill equal an uninterrupted run's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from dogtl.core.errors import DataError, DogtlError
from dogtl.data.images import decode_error, multi_pass_dataset
from dogtl.features.cut import encode

log = logging.getLogger(__name__)


def unreadable_reason(path) -> str:
    return decode_error(path) or "unreadable"


class PassRunner:
    """Runs the backbone over every pass, saving each finished batch.

    All passes of both splits form one stream of batches (images.multi_pass_dataset), each
    pass starting at its first unsaved batch; a batch may end one pass and begin the next (its
    rows are saved per pass), so a small update's passes share batches instead of each
    padding its own. Every pass covers every file it is given,
    positions numbering them; unreadable files are missing from every pass. Progress counts
    image-passes: `total` is (1 + passes) x images (+ the test images' passes); skipped
    images count as done, so the count ends exactly at `total`.
    """

    def __init__(self, config, spec, image_size, partial, infer, progress):
        self.config, self.spec, self.image_size = config, spec, image_size
        self.partial, self.infer, self.progress = partial, infer, progress
        self.total, self.done, self.resumed = 0, 0, 0
        self.warned = False
        self.cut_dtype = None  # with --cut-blocks: infer gives (features, cut activations), stored in this

    def _advance(self, n: int, resumed: bool = False):
        self.done += n
        if resumed:
            self.resumed += n
        if self.progress:
            self.progress(min(self.done, self.total), self.total)

    def run(self, splits: dict, on_clean_pass=None) -> dict:
        """Extracts what is missing; returns {split: positions of the readable files}.

        `splits` maps a split to (paths, extra passes, augmentation keys): positions number
        `paths` from 0, the augmentation key of position i is keys[i].
        """
        self.good, self.on_clean_pass = {}, on_clean_pass
        segments = []
        for split, (paths, extra, keys) in splits.items():
            paths = [str(p) for p in paths]
            n = len(paths)
            self.total += (1 + extra) * n
            readable = self.partial.load_json(f"{split}-readable.json")
            if readable is not None:
                self.good[split] = np.asarray(readable, dtype=np.int64)
            for p in range(1 + extra):
                start = n if (p == 0 and readable is not None) else min(self.partial.covered(split, p), n)
                segments.append(Segment(split, p, paths, start, np.asarray(keys, dtype=np.int64)))
        self._advance(sum(s.start for s in segments), resumed=True)

        ds = multi_pass_dataset([(s.pass_index, range(s.start, len(s.paths)), s.keys[s.start:], s.paths[s.start:])
                                 for s in segments],
                                self.spec, self.image_size, seed=self.config.seed,
                                augmentation=self.config.augmentation, batch_size=self.config.batch_size)
        current = 0
        for tags, pos, _, images in ds if ds is not None else []:
            tags, pos = tags.numpy(), pos.numpy()
            out = self._infer(images)  # one call, whichever passes the batch spans
            for k in np.unique(tags):
                for s in segments[current:k]:
                    self._finish(s)
                current = k
                rows = tags == k
                self._batch(segments[k], pos[rows], tuple(o[rows] for o in out) if isinstance(out, tuple) else out[rows])
        for s in segments[current:]:
            self._finish(s)
        return {split: self.good[split].tolist() for split in splits}

    def _batch(self, s, pos, out):
        """Check and save one pass's rows `pos` of a batch, `out` the backbone's outputs for them."""
        if s.pass_index == 0:
            if self.config.on_bad_image == "fail" and (pos[0] != s.expected or pos[-1] - pos[0] != len(pos) - 1):
                self._fail(s, pos)
        else:  # exactly the files readable in the clean pass
            good = self.good[s.split]
            if not np.array_equal(pos, good[(good >= s.expected) & (good <= pos[-1])]):
                self._fail(s, pos)
        extra = {}
        if self.cut_dtype:
            out, extra = out[0], encode(np.asarray(out[1]).astype(np.float32), self.cut_dtype)
        features = self._store(np.asarray(out).astype(np.float32))  # computed perhaps in bfloat16/float16
        self.partial.write(s.split, s.pass_index, pos, features, **extra)
        self._advance(int(pos[-1]) + 1 - s.expected)
        s.expected = int(pos[-1]) + 1

    def _infer(self, images):
        """The backbone's outputs (arrays) on a batch padded to --batch-size: every call has the same
        shape, so an image's features do not depend on the batch it lands in (a last batch of one
        image runs other kernels, a bit apart), and resumed, sharded and incremental runs give the
        same bits."""
        import tensorflow as tf  # local: dogtl.features.passes is imported before TensorFlow is needed

        n = int(images.shape[0])
        pad = self.config.batch_size - n
        if pad > 0:
            images = tf.concat([images, tf.zeros([pad, *images.shape[1:]], images.dtype)], 0)
        out = self.infer(images)
        return tuple(np.asarray(o)[:n] for o in out) if isinstance(out, (tuple, list)) else np.asarray(out)[:n]

    def _finish(self, s):
        """After the last batch of a pass: unreadable files at its end, the clean pass's record."""
        if s.finished:
            return
        s.finished = True
        n = len(s.paths)
        if s.pass_index == 0:
            if self.config.on_bad_image == "fail" and s.expected != n:
                self._fail(s, np.array([n]))
            if s.split not in self.good:  # not yet recorded: this run finished the clean pass
                self.good[s.split] = self.partial.positions(s.split, 0)
                self.partial.save_json(f"{s.split}-readable.json", self.good[s.split].tolist())
            if self.on_clean_pass:
                self.on_clean_pass(s.split, self.good[s.split])
        elif np.any(self.good[s.split] >= s.expected):
            self._fail(s, np.array([n]))
        self._advance(n - s.expected)

    def _store(self, features: np.ndarray) -> np.ndarray:
        """Features in the stored dtype; float16 overflow is an error, underflow a warning."""
        with np.errstate(over="ignore"):  # reported below, as one error naming the fix
            stored = features.astype(self.config.dtype)
        if not np.isfinite(stored).all():
            raise DogtlError(f"backbone features reach {np.abs(features).max():.3g}, beyond --dtype "
                             f"{self.config.dtype}: rerun with --dtype float32 --force")
        if not self.warned and np.any(features) and not np.any(stored):
            self.warned = True
            log.warning("features are too small for %s (max %.3g) and are stored as zeros: use --dtype float32",
                        self.config.dtype, np.abs(features).max())
        return stored

    def _fail(self, s, pos):
        seen = set(pos.tolist())
        if s.pass_index == 0:
            missing = next(p for p in range(s.expected, int(pos[-1]) + 1) if p not in seen)
            raise DataError(f"{s.paths[missing]}: cannot read image ({unreadable_reason(s.paths[missing])}); "
                            "rerun with --on-bad-image skip to go on without it (work done is kept)")
        good = self.good[s.split]
        missing = [int(p) for p in good[good >= s.expected] if p not in seen]
        if missing:
            raise DataError(f"{s.paths[missing[0]]}: readable in the clean pass but not in pass {s.pass_index} "
                            f"({unreadable_reason(s.paths[missing[0]])}); did it change during the run? rerun with --force")
        extra = next(int(p) for p in pos if p not in set(good.tolist()))
        raise DataError(f"{s.paths[extra]}: unreadable in the clean pass but readable in pass {s.pass_index}; "
                        "did it change during the run? rerun with --force")


@dataclass
class Segment:
    """One pass of one split, from its first unsaved position."""

    split: str
    pass_index: int
    paths: list
    start: int
    keys: np.ndarray  # augmentation key of each position
    expected: int = -1  # next position not yet accounted for
    finished: bool = False

    def __post_init__(self):
        self.expected = self.start
