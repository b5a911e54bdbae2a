"""Search spaces of `dogtl sweep`: which train-head settings to try, checked before any training.

A space maps train-head setting names (`HeadConfig` fields) to candidate values. It comes
from a TOML or JSON file, from repeated `--param name=v1,v2` options, or both (an option
replaces the file's entry of the same name):

    hidden = [512, 1024, [1024, 512], "none"]   # a list holds candidates; [1024, 512] is two layers
    max_lr = [1e-3, 3e-3]
    dropout = {low = 0.2, high = 0.6}            # a range: random search only (--trials N)
    base_lr = {low = 1e-5, high = 1e-3, log = true}
    optimizer = "rmsprop"                        # a single value: fixed for every trial

    --param hidden=512,1024x512,none --param max_lr=1e-3,3e-3 --param dropout=0.2..0.6 --param base_lr=log:1e-5..1e-3

Besides HeadConfig's settings, `layers` (number of hidden layers, each as wide as the
first of `hidden`) may be searched. Problems (unknown name, empty list, wrong type,
out-of-range value) raise DogtlError with one line naming the source and the value.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dogtl.core.errors import DogtlError
from dogtl.core.settings import Setting, SettingError, parse_hidden
from dogtl.core.settingsfile import read_table
from dogtl.head.settings import HEAD_SETTINGS, HeadConfig

NOT_SEARCHED = {"cache": "--cache", "out": "--out", "force": "--force"}  # sweep's own options, not settings
LAYERS = Setting("layers", "int", 1, "Number of hidden layers, each as wide as the first of `hidden`.", low=0)
MAX_GRID = 1_000_000  # more grid points than this: use --trials N
_RANGE_KEYS = {"low", "high", "log"}


def parameters() -> dict[str, Setting]:
    """Everything a sweep may search: train-head's searchable settings, and `layers`."""
    searchable = {s.name: s for s in HEAD_SETTINGS if s.searchable}
    return {**searchable, LAYERS.name: LAYERS}


def parameter_names() -> list[str]:
    return sorted(parameters())


@dataclass(frozen=True)
class Param:
    """Candidates `values` (grid and random search), or a numeric range [low, high] (random only)."""

    name: str
    values: tuple = ()
    low: float | None = None
    high: float | None = None
    log: bool = False

    @property
    def is_range(self) -> bool:
        return self.low is not None

    def describe(self) -> str:
        if self.is_range:
            return f"{'log-uniform' if self.log else 'uniform'} {self.low:g}..{self.high:g}"
        return ", ".join(format_value(v) for v in self.values)


def format_value(value) -> str:
    """A value as the results table and plots show it (hidden sizes as 1024x512 or none)."""
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value) if value else "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    @property
    def searched(self) -> list[str]:
        """Parameters that take more than one value."""
        return [p.name for p in self.params if p.is_range or len(set(p.values)) > 1]

    @property
    def grid_size(self) -> int | None:
        """Number of grid points, None if some parameter is a range."""
        if any(p.is_range for p in self.params):
            return None
        return math.prod(len(p.values) for p in self.params)

    def to_json(self) -> list:
        return [{"name": p.name, "values": [list(v) if isinstance(v, tuple) else v for v in p.values]}
                if not p.is_range else {"name": p.name, "low": p.low, "high": p.high, "log": p.log}
                for p in self.params]


# -- parsing ---------------------------------------------------------------------------------

def _check_name(name: str, source: str) -> str:
    key = str(name).strip().replace("-", "_")
    kinds = parameters()
    if key in NOT_SEARCHED:
        raise DogtlError(f"{source}: '{key}' is not a search parameter; pass {NOT_SEARCHED[key]} to dogtl sweep")
    if key not in kinds:
        close = difflib.get_close_matches(key, list(kinds), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise DogtlError(f"{source}: unknown parameter '{name}'{hint}; parameters: {', '.join(sorted(kinds))}")
    return key


def _coerce(name: str, value, source: str, from_text: bool):
    """One candidate value of parameter `name`, converted to the setting's type, or a clear error."""
    try:
        return parameters()[name].convert(value, from_text=from_text)
    except SettingError as e:
        shown = f"'{value}'" if from_text else repr(value)
        raise DogtlError(f"{source}: {name} value {shown}: expected {e}") from None


def _check_value(name: str, value, source: str) -> None:
    """Refuse values train-head would refuse (range checks), one value at a time."""
    if name == LAYERS.name:
        try:
            LAYERS.check(value)
        except DogtlError as e:
            raise DogtlError(f"{source}: layers value {value} is not accepted ({e})") from None
        return
    settings = {name: value}
    if name in ("base_lr", "max_lr"):  # checked on its own: base <= max is a property of a combination
        settings["schedule"] = "constant"
    try:
        HeadConfig(**settings)
    except DogtlError as e:
        raise DogtlError(f"{source}: {name} value {format_value(value)} is not accepted by train-head ({e})") from None
    except TypeError as e:
        raise DogtlError(f"{source}: {name} value {value!r}: {e}") from None


def _range(name: str, low, high, log, source: str) -> Param:
    kind = parameters()[name].kind
    if kind not in ("int", "float"):
        raise DogtlError(f"{source}: {name} is not numeric: give a list of values instead of a range")
    for what, v in (("low", low), ("high", high)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise DogtlError(f"{source}: {name} range {what} {v!r}: expected a number")
    if not low < high:
        raise DogtlError(f"{source}: {name} range {low:g}..{high:g}: low must be below high")
    if not isinstance(log, bool):
        raise DogtlError(f"{source}: {name} range log {log!r}: expected true or false")
    if log and low <= 0:
        raise DogtlError(f"{source}: {name} log range {low:g}..{high:g}: bounds must be positive")
    for v in (low, high):
        _check_value(name, int(round(v)) if kind == "int" else float(v), source)
    return Param(name, low=float(low), high=float(high), log=log)


def _param_from_file(name: str, value, source: str) -> Param:
    if isinstance(value, dict):
        extra = set(value) - _RANGE_KEYS
        if extra or not {"low", "high"} <= set(value):
            raise DogtlError(f"{source}: {name} = {json.dumps(value, default=str)}: a range is a table "
                             "with low, high and optionally log = true")
        return _range(name, value["low"], value["high"], value.get("log", False), source)
    candidates = value if isinstance(value, list) else [value]
    if not candidates:
        raise DogtlError(f"{source}: {name} has an empty list of values; give at least one")
    values = []
    for v in candidates:
        coerced = _coerce(name, v, source, from_text=False)
        _check_value(name, coerced, source)
        values.append(coerced)
    return Param(name, tuple(values))


def parse_param_option(text: str) -> Param:
    """One `--param name=v1,v2,...` (or name=low..high, name=log:low..high)."""
    source = f"--param {text}"
    name, sep, rest = str(text).partition("=")
    if not sep or not name.strip():
        raise DogtlError(f"{source}: expected name=value1,value2,... (e.g. max_lr=1e-3,3e-3)")
    name = _check_name(name, source)
    rest = rest.strip()
    if rest == "":
        raise DogtlError(f"{source}: {name} has an empty list of values; give at least one")
    if ".." in rest:
        log = rest.lower().startswith("log:")
        low, _, high = rest[4 if log else 0:].partition("..")
        try:
            low_v, high_v = float(low), float(high)
        except ValueError:
            raise DogtlError(f"{source}: {name} range '{rest}': expected low..high or log:low..high") from None
        return _range(name, low_v, high_v, log, source)
    values = []
    for item in rest.split(","):
        coerced = _coerce(name, item, source, from_text=True)
        _check_value(name, coerced, source)
        values.append(coerced)
    return Param(name, tuple(values))


def load_space_file(path: str | Path) -> list[Param]:
    """Parameters from a TOML or JSON file: a table of name = candidates (optionally under [space])."""
    source = f"--space {path}"
    table = read_table(path, source, "a table of parameter = values")
    if set(table) == {"space"} and isinstance(table["space"], dict):
        table = table["space"]
    if not table:
        raise DogtlError(f"{source}: no parameters; add lines like max_lr = [1e-3, 3e-3]")
    return [_param_from_file(_check_name(name, source), value, source) for name, value in table.items()]


def build_space(space_file: str | Path | None = None, param_options=()) -> SearchSpace:
    """The space of a file and/or --param options (an option replaces the file's entry)."""
    params: dict[str, Param] = {}
    if space_file:
        for p in load_space_file(space_file):
            params[p.name] = p
    seen = set()
    for option in param_options:
        p = parse_param_option(option)
        if p.name in seen:
            raise DogtlError(f"--param {option}: {p.name} is given twice; list every value in one --param")
        seen.add(p.name)
        params[p.name] = p
    return SearchSpace(tuple(params.values()))


# -- trials ----------------------------------------------------------------------------------

def trial_config(base: dict, trial: dict) -> HeadConfig:
    """The HeadConfig of one trial: `base` settings overridden by the trial's values."""
    settings = {**base, **{k: v for k, v in trial.items() if k != LAYERS.name}}
    if LAYERS.name in trial:
        hidden = parse_hidden(settings.get("hidden", HeadConfig().hidden)) or HeadConfig().hidden or (1024,)
        settings["hidden"] = (hidden[0],) * int(trial["layers"])
    return HeadConfig(**settings)


def _valid(base: dict, trial: dict) -> str | None:
    try:
        trial_config(base, trial)
    except (DogtlError, TypeError) as e:
        return str(e)
    return None


def grid(space: SearchSpace, base: dict) -> tuple[list[dict], list[str]]:
    """Every combination (the last parameter varies fastest), without those train-head would refuse
    (e.g. base_lr above max_lr): (trials, reasons for the dropped ones)."""
    ranges = [p.name for p in space.params if p.is_range]
    if ranges:
        raise DogtlError(f"{ranges[0]} is a range ({space.params[space.names.index(ranges[0])].describe()}): "
                         "ranges need random search; pass --trials N")
    size = space.grid_size
    if size > MAX_GRID:
        raise DogtlError(f"the grid has {size:,} points: too many; pass --trials N for a random sample")
    trials, dropped = [], []
    for values in itertools.product(*(p.values for p in space.params)):
        trial = dict(zip(space.names, values))
        reason = _valid(base, trial)
        (dropped if reason else trials).append(reason or trial)
    if not trials:
        raise DogtlError(f"no combination of the space is a valid train-head setting (e.g. {dropped[0]})")
    return trials, dropped


def _round(value: float) -> float:
    return float(f"{value:.3g}")


def sample(space: SearchSpace, base: dict, n: int, seed: int) -> tuple[list[dict], list[str]]:
    """`n` distinct random trials, a pure function of (space, n, seed): without ranges, a sample
    of the grid without replacement (all of it if n is larger); ranges are drawn uniformly
    (or log-uniformly) and rounded to 3 significant digits."""
    if n < 1:
        raise DogtlError(f"--trials {n} must be at least 1")
    rng = np.random.default_rng([int(seed), 77])
    size = space.grid_size
    dropped: list[str] = []
    if size is not None and size <= MAX_GRID:
        points, reasons = grid(space, base)
        if n >= len(points):
            return points, reasons
        picks = rng.choice(len(points), size=n, replace=False)
        return [points[i] for i in picks], reasons
    trials, seen, attempts = [], set(), 0
    while len(trials) < n and attempts < 100 * n + 1000:
        attempts += 1
        trial = {}
        for p in space.params:
            if p.is_range:
                u = rng.random()
                x = math.exp(math.log(p.low) + u * (math.log(p.high) - math.log(p.low))) if p.log \
                    else p.low + u * (p.high - p.low)
                trial[p.name] = int(round(x)) if parameters()[p.name].kind == "int" else _round(x)
            else:
                trial[p.name] = p.values[int(rng.integers(len(p.values)))]
        key = json.dumps(trial, sort_keys=True, default=str)
        if key in seen:
            continue
        reason = _valid(base, trial)
        if reason:
            dropped.append(reason)
            continue
        seen.add(key)
        trials.append(trial)
    if not trials:
        raise DogtlError(f"no random draw from the space is a valid train-head setting (e.g. {dropped[0]})")
    return trials, dropped
