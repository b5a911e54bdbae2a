"""Cache fingerprints compared: which settings that made a cache differ from the wanted ones.

A fingerprint is the JSON of every setting that produced a cache's features (extract.py
writes it, cacheformat.py's schema stores it). Settings that do not change the features are
reported, never refused; a cache that differs from the data folder only in its image lists is
updated incrementally (features/incremental.py).
"""

from __future__ import annotations

# Settings that do not change the features: differences are reported, never refused. The runtime
# gives the same features to float rounding (docs/runtimes.md), as TensorFlow does on another CPU.
INFORMATIONAL = {"versions", "batch_size", "runtime"}
# The fingerprint's image lists: labelled (what a head learnt from) and test. A cache that
# differs from the data folder only in these is updated incrementally.
LABELLED_LIST = ("file_list", "num_images")
TEST_LIST = ("test_file_list", "num_test_images")
IMAGE_LISTS = LABELLED_LIST + TEST_LIST
IMAGE_KEY = "image id"  # fingerprint["image_key"]: what augmentation and the split are keyed by
# Settings older caches do not record, and the value they had.
_DEFAULTS = {"precision": "float32", "image_key": "file number"}
_HINTS = {"file_list": " (labelled images, labels or files changed)", "num_images": " (labelled images)",
          "test_file_list": " (test images or files changed)", "num_test_images": " (test images)",
          "image_key": " (what augmentation and the validation split are keyed by)"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _comparable(key: str, value):
    if value is None and key in _DEFAULTS:
        return _DEFAULTS[key]
    # A local weights file is identified by its content; its name may change.
    if key == "weights" and isinstance(value, str) and value.startswith("file:"):
        return value.rsplit(":sha256:", 1)[-1]
    return value


def fingerprint_differences(stored: dict, wanted: dict, ignore=()) -> list[str]:
    """One 'setting: cache has X, now Y' line per setting that changes the features (and is
    not in `ignore`)."""
    stored, wanted = _flat(stored), _flat(wanted)
    keys = sorted(k for k in set(stored) | set(wanted) if k.split(".")[0] not in INFORMATIONAL and k not in ignore)

    def shown(d, k):
        return d.get(k, _DEFAULTS.get(k))

    return [f"{k}{_HINTS.get(k, '')}: cache has {shown(stored, k)!r}, now {shown(wanted, k)!r}"
            for k in keys if _comparable(k, stored.get(k)) != _comparable(k, wanted.get(k))]
