"""A saved model's metadata: the JSON beside `models/head.keras` (`models/head.json`), as one type.

Everything that reads or writes that JSON goes through `ModelMetadata` (docs/cache-format.md,
"Model metadata"). In memory a model has a list of backbones (`BackboneInput`), one per image
input: one for a head on one cache or a fine-tuned model, one per cache for a head on several.

On disk the first backbone's fields stay at the top level (`backbone`, `weights`, `image_size`,
...; `feature_dim` the model's whole input size) and `backbones` is written only for several,
as dogtl wrote it before `format_version` existed; so older dogtl releases read new files, and
files without `format_version` (format 1) load as format 2. Top-level keys this dogtl does not
know (a later release's) are kept in `extra` and written back unchanged; a later format is refused.

The "integrity" entry binds the metadata to its model against damage on disk (bit rot, a bad
copy): the SHA-256 of the .keras file and of the metadata itself (its JSON without that entry).
Both are checked on load (core.artifacts checks the model's); models saved before this still load.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from dogtl.core.errors import DamagedError, DogtlError
from dogtl.core.files import json_text, write_text_atomic

FORMAT_VERSION = 2  # 1: files written before it was recorded (same shape)
INTEGRITY = "integrity"
RETRAIN = "retrain it (or copy it again from where it was made)"


def metadata_path(model_path: str | Path) -> Path:
    return Path(model_path).with_suffix(".json")


@dataclass
class BackboneInput:
    """One backbone a model's input comes from, and the cache its features were extracted into."""
    backbone: str | None = None
    weights: str | None = None  # "imagenet", "none" or a local file's identity ("file:NAME:SHA256")
    image_size: int | None = None
    preprocessing: str | None = None
    feature_dim: int | None = None
    weights_path: str | None = None  # where that local file was read from
    cache: str | None = None
    cache_fingerprint: dict | None = None

    @classmethod
    def from_dict(cls, d: dict) -> BackboneInput:
        return cls(**{k: d.get(k) for k in BACKBONE_KEYS})


BACKBONE_KEYS = tuple(f.name for f in fields(BackboneInput))


@dataclass
class ModelMetadata:
    """What a saved model is: its kind and classes, the backbone(s) its inputs come from, and how it
    was made (settings, metrics, ...). Fields that a kind of model does not have are None."""
    kind: str | None = None  # "head" or "finetuned"
    classes: list | None = None
    backbones: list[BackboneInput] = field(default_factory=list)  # in the model's input order
    settings: dict | None = None
    metrics: dict | None = None
    resolved: dict | None = None  # head: the settings as the run resolved them (precision, ...)
    history: str | None = None  # head: its history CSV's name
    train_images: int | None = None
    val_images: int | None = None
    passes_used: int | None = None
    head: str | None = None  # finetuned: the head it started from
    trainable_layers: list | None = None
    frozen_part_runtime: str | None = None
    augmentation: dict | None = None  # finetuned: what --augment meant
    ensemble: dict | None = None  # {"members": [...], "member_metrics": [...]}
    name: str | None = None
    integrity: dict | None = None  # {"model_sha256", "metadata_sha256"}
    extra: dict = field(default_factory=dict)  # keys of a later dogtl, kept as they are

    @property
    def is_multi(self) -> bool:
        """A head on several concatenated caches (one image input per backbone)."""
        return len(self.backbones) > 1

    @property
    def feature_dim(self) -> int | None:
        """A head's input size: its backbones' feature sizes together."""
        dims = [b.feature_dim for b in self.backbones]
        return sum(int(d) for d in dims) if dims and None not in dims else None

    @classmethod
    def from_dict(cls, raw: dict, source: str = "metadata") -> ModelMetadata:
        """The metadata in a JSON object of any format this dogtl reads (old ones upgraded)."""
        version = raw.get("format_version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise DamagedError(f"{source}: damaged metadata (format_version {version!r}); {RETRAIN}")
        if version > FORMAT_VERSION:
            raise DogtlError(f"{source}: metadata format {version} is newer than this dogtl reads "
                             f"(up to {FORMAT_VERSION}); upgrade dogtl to use this model")
        if raw.get("backbones"):
            entries = raw["backbones"]
        else:  # one backbone: its fields at the top level
            entries = [raw] if any(k in raw for k in BACKBONE_KEYS) else []
        known = {f.name for f in fields(cls)} - {"backbones", "extra"}
        return cls(backbones=[BackboneInput.from_dict(e) for e in entries],
                   **{k: raw[k] for k in known if k in raw},
                   extra={k: v for k, v in raw.items() if k not in known | set(BACKBONE_KEYS)
                          | {"backbones", "format_version"}})

    def to_dict(self) -> dict:
        """The JSON object written to disk (see the module docstring for its shape): every field,
        null where this model has none (finetuned "augmentation": null is "no augmentation")."""
        out = {"format_version": FORMAT_VERSION, **self.extra}
        if self.backbones:
            out.update(asdict(self.backbones[0]), feature_dim=self.feature_dim)
        if self.is_multi:
            out["backbones"] = [asdict(b) for b in self.backbones]
        out.update({f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("backbones", "extra")})
        return out

    def text(self, model_sha256: str | None = None) -> str:
        """The file's text, with the integrity entry made anew (the model's hash kept unless given)."""
        out = {k: v for k, v in self.to_dict().items() if k != INTEGRITY}
        integrity = {**(self.integrity or {}), "metadata_sha256": _sha256(out)}
        if model_sha256 is not None:
            integrity["model_sha256"] = model_sha256
        self.integrity = integrity
        return json_text({**out, INTEGRITY: integrity})

    def save(self, model_path: str | Path) -> None:
        """Replace a model's metadata (a deliberate edit): the model's hash is kept, the metadata's
        own hash is made anew, so the edited pair loads."""
        if self.integrity is None and metadata_path(model_path).exists():
            self.integrity = json.loads(metadata_path(model_path).read_text()).get(INTEGRITY)
        write_text_atomic(metadata_path(model_path), self.text())

    @classmethod
    def load(cls, model_path: str | Path) -> ModelMetadata:
        """The metadata beside a model file; DogtlError when missing, DamagedError when damaged."""
        path = Path(model_path)
        if not path.exists():
            raise DogtlError(f"{path}: no such model file; train one first or pass --model/--head FILE")
        meta = metadata_path(path)
        if not meta.exists():
            raise DogtlError(f"{path}: its metadata {meta.name} is missing; dogtl needs both files side by side")
        try:
            raw = json.loads(meta.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DamagedError(f"{meta}: damaged metadata ({e}); {RETRAIN}") from None
        if not isinstance(raw, dict):
            raise DamagedError(f"{meta}: damaged metadata (not a JSON object); {RETRAIN}")
        wanted = (raw.get(INTEGRITY) or {}).get("metadata_sha256")
        if wanted and _sha256({k: v for k, v in raw.items() if k != INTEGRITY}) != wanted:
            raise DamagedError(f"{meta}: damaged metadata (its content hash differs from the one it was saved "
                               f"with); {RETRAIN}")
        return cls.from_dict(raw, str(meta))


def _sha256(raw: dict) -> str:
    return hashlib.sha256(json_text(raw).encode()).hexdigest()
