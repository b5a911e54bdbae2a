"""Reading a TOML or JSON table of settings, shared by train-head --config and sweep --space."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from dogtl.core.errors import DogtlError


def read_table(path: str | Path, source: str, expected: str) -> dict:
    """The file's top-level table; `source` prefixes every error (e.g. "--config FILE")."""
    path = Path(path)
    if not path.is_file():
        raise DogtlError(f"{source}: no such file")
    text = path.read_text()
    as_json = path.suffix.lower() == ".json" or (path.suffix.lower() != ".toml" and text.lstrip().startswith("{"))
    try:
        values = json.loads(text) if as_json else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise DogtlError(f"{source}: not valid {'JSON' if as_json else 'TOML'} ({e})") from None
    if not isinstance(values, dict):
        raise DogtlError(f"{source}: expected {expected}, got {type(values).__name__}")
    return values
