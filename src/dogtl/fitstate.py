"""fit's work folder (`models/model.fit/` for `models/model.keras`): `fit.json`, the record of
what this fit is and which of its stages are finished, written atomically so that a killed fit
resumes; the models its stages write there; the final copy to --out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dogtl.core.errors import DogtlError
from dogtl.core.files import atomic_paths, write_json_atomic
from dogtl.core.metadata import ModelMetadata


class FitState:
    """fit.json: what this fit is (its settings) and which stages are finished, written atomically."""

    def __init__(self, folder: Path, identity: dict, force: bool):
        self.path = folder / "fit.json"
        if force and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        saved = json.loads(self.path.read_text()) if self.path.exists() else None
        if saved is not None and saved.get("identity") != identity:
            old = saved.get("identity") or {}
            diff = next((k for k in identity if old.get(k) != identity[k]), "settings")
            raise DogtlError(f"{folder} holds a fit made with other settings ({diff}: {old.get(diff)!r}, now "
                             f"{identity.get(diff)!r}): pass --force to start over, or another --out")
        self.data = saved or {"identity": identity, "stages": {}}

    def stage(self, name: str) -> dict | None:
        return self.data["stages"].get(name)

    def done(self, name: str, **record) -> dict:
        self.data["stages"][name] = record
        write_json_atomic(self.path, self.data)
        return record

    def plan(self, **values) -> None:
        self.data.setdefault("plan", {}).update(values)
        write_json_atomic(self.path, self.data)


def written_model(model: Path) -> ModelMetadata | None:
    """The metadata of a model a stage finished writing (both files are renamed into place together)."""
    return ModelMetadata.load(model) if model.exists() and model.with_suffix(".json").exists() else None


def publish(model: Path, out: Path) -> None:
    """The final model and its metadata at --out, together (atomic renames)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_paths(out, out.with_suffix(".json")) as (model_tmp, meta_tmp):
        shutil.copyfile(model, model_tmp)
        shutil.copyfile(model.with_suffix(".json"), meta_tmp)
