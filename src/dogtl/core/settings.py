"""One declaration per setting: its type, default, allowed values, help text, and whether a
sweep may search it and the fused sweep path reproduces it.

A stage's settings are a tuple of `Setting`s. From it come the stage's frozen dataclass
(`settings_class`: typed fields, conversion of untyped values from config files and sweep
grids, range checks with one-line errors), its command-line options (`with_options`), the
Python API's defaults (`defaults`), the keys its `--config FILE` accepts, and (for train-head)
the sweep's search space. Adding a setting is one entry there plus its test. Choices come from
the registries (backbones, runtimes, precisions, strategies), and so does their help.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from dogtl.core.budget import format_seconds, parse_budget
from dogtl.core.errors import DogtlError, SettingError  # noqa: F401  SettingError: also dogtl.core.settings's
from dogtl.core.settingsfile import read_table

_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "path": str, "hidden": tuple, "blocks": (int, str),
          "duration": float}
_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string", "path": "a path",
             "hidden": "layer sizes like 1024 or 1024x512, or none", "blocks": "a number of blocks (0 or more) or all",
             "duration": "a time like 90s, 30m or 1h (a bare number is seconds)"}
ALL_BLOCKS = "all"  # a number of backbone blocks meaning the whole backbone, its stem included
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_AUTOMATIC = ("none", "null", "default")


def parse_blocks(value) -> int | str:
    """A number of top backbone blocks: an integer >= 0 (also as text) or 'all' (the whole backbone)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == ALL_BLOCKS:
            return ALL_BLOCKS
        try:
            value = int(text)
        except ValueError:
            raise SettingError(_EXPECTED["blocks"]) from None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise SettingError(_EXPECTED["blocks"])
    return int(value)


def parse_hidden(value) -> tuple[int, ...]:
    """'1024', '1024,512', '1024x512', 1024, [1024, 512], '' or 'none' (no hidden layer) -> sizes."""
    if value is None:
        return ()
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, str):
        text = value.strip().lower().replace("x", ",").replace("+", ",")
        items = [] if text in ("", "none", "0") else [s.strip() for s in text.split(",")]
    elif isinstance(value, (list, tuple, np.ndarray)):
        items = list(value)
    else:
        raise SettingError(_EXPECTED["hidden"])
    try:
        sizes = tuple(int(s) for s in items)
    except (TypeError, ValueError):
        raise SettingError(_EXPECTED["hidden"]) from None
    if any(s < 1 for s in sizes):
        raise SettingError("layer sizes of at least 1")
    return sizes


@dataclass(frozen=True)
class Setting:
    """One setting of a stage. `low`/`high` bound numbers (open bounds exclude the value);
    `optional` settings may be None, meaning "chosen automatically" (the help says how).
    `cli_names` replaces the option's declaration (e.g. ("--force",): a flag without --no-force);
    `cli=False` settings are fields of the config but no command-line option (the command
    takes them its own way, e.g. as an argument); `hint` ends a range error (what to do)."""

    name: str
    kind: str  # int, float, bool, str, path (a str; Path on the command line), hidden (a tuple of layer
    # sizes), blocks (an int or 'all') or duration (seconds; '30m' on the command line)
    default: object
    help: str
    optional: bool = False
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    searchable: bool = True  # a sweep may search it
    fusable: bool = True  # sweeps/fused.py reproduces it (else trials using it train alone)
    cli_names: tuple = ()
    cli: bool = True
    hint: str = ""

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def expected(self) -> str:
        return _EXPECTED[self.kind]

    def convert(self, value, from_text: bool = False):
        """`value` as this setting's type (numpy scalars, ints for floats, text from `--param`
        or TOML); SettingError saying what was expected."""
        if hasattr(value, "item") and not isinstance(value, (str, bytes, tuple, list)) \
                and getattr(value, "ndim", 0) == 0:
            value = value.item()  # a numpy scalar, e.g. from a sweep grid
        if isinstance(value, str) and self.optional and value.strip().lower() in _AUTOMATIC:
            return None
        if value is None:
            if self.optional:
                return None
            raise SettingError("a value, not null")
        if self.kind == "hidden":
            return parse_hidden(value)
        if self.kind == "blocks":
            return parse_blocks(value)
        if self.kind == "duration":
            return parse_budget(value, self.option)  # its own one-line errors
        if self.kind == "path" and isinstance(value, os.PathLike):
            value = os.fspath(value)
        if from_text:
            return self._from_text(str(value).strip())
        if self.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, _TYPES[self.kind]) or (isinstance(value, bool) and self.kind != "bool"):
            raise SettingError(self.expected)
        if self.kind == "float" and not math.isfinite(value):
            raise SettingError("a finite number")
        return self._canonical(value)

    def _canonical(self, value):
        """A choice in any letter case (Adam, ADAM) as it is declared (adam)."""
        if self.kind == "str" and self.choices and value not in self.choices:
            folded = {str(c).casefold(): c for c in self.choices}
            return folded.get(value.strip().casefold(), value)
        return value

    def _from_text(self, text: str):
        if text == "":
            raise SettingError(f"{self.expected} (empty text between commas?)")
        if self.kind == "bool":
            if text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
            raise SettingError(self.expected)
        if self.kind in ("str", "path"):
            return self._canonical(text)
        try:
            return self.convert(int(text) if self.kind == "int" else float(text))
        except ValueError:
            raise SettingError(self.expected) from None

    def rule(self) -> str | None:
        """The allowed range in words, e.g. 'in [0, 1)' or 'at least 1'."""
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return "a positive number" if self.low_open and self.low == 0 else \
                f"{'above' if self.low_open else 'at least'} {self.low:g}"
        if self.high is not None:
            return f"{'below' if self.high_open else 'at most'} {self.high:g}"
        return None

    def check(self, value) -> None:
        """Refuse a value outside the choices or range, naming the option and the value."""
        if value is None:
            return
        if self.choices and value not in self.choices:
            raise DogtlError(f"{self.option} {value!r}: choose one of {', '.join(map(str, self.choices))}")
        if self.kind in ("int", "float"):
            too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
            too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
            if too_low or too_high:
                raise DogtlError(f"{self.option} {value} must be {self.rule()}{self.hint}")

    def validate(self, value):
        """convert + check, with errors naming the option: what a dataclass field gets."""
        try:
            value = self.convert(value)
        except SettingError as e:
            raise DogtlError(f"{self.option} {value!r}: expected {e}") from None
        self.check(value)
        return value

    # -- the command line -------------------------------------------------------------------
    def cli_annotation(self):
        kind = {"hidden": str, "blocks": str, "path": Path, "duration": str}.get(self.kind) or _TYPES[self.kind]
        return Optional[kind] if self.optional else kind

    def cli_default(self):
        """The default as the command line shows and parses it."""
        if self.kind == "hidden":
            return ",".join(map(str, self.default)) or "none"
        if self.kind == "blocks":
            return str(self.default)
        if self.kind == "duration":
            return format_seconds(self.default)
        if self.kind == "path" and self.default is not None:
            return Path(self.default)
        return self.default

    def cli_option(self):
        import typer  # local: typer is the command line's; configs and the API never need it

        names = self.cli_names or ((f"{self.option}/--no-{self.option[2:]}",) if self.kind == "bool" else ())
        return typer.Option(self.cli_default(), *names, help=self.help)


def choices_help(choices, described: dict | None = None) -> str:
    """'a, b or c' from a registry's names, each followed by its description if `described` has one."""
    names = [f"{c} ({described[c]})" if described and c in described else str(c) for c in choices]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def settings_class(name: str, settings: tuple[Setting, ...], doc: str, namespace: dict | None = None,
                   extra_fields: tuple = ()):
    """A frozen dataclass with one field per setting, converted and checked on creation.
    `namespace` may add methods; its `check(self)` runs last, for rules across settings.
    `extra_fields`: (name, type, dataclasses.field) of values that are no setting (e.g. the
    image files predict takes as arguments), after the settings."""
    namespace = dict(namespace or {})
    cross_check = namespace.pop("check", None)

    def __post_init__(self):
        for s in settings:
            object.__setattr__(self, s.name, s.validate(getattr(self, s.name)))
        if cross_check:
            cross_check(self)

    namespace.update(__post_init__=__post_init__, __doc__=doc, SETTINGS=settings)
    fields = [(s.name, {"hidden": tuple, "blocks": int | str, "path": Optional[str] if s.optional else str}.get(
        s.kind, s.cli_annotation()), dataclasses.field(default=s.default)) for s in settings]
    return dataclasses.make_dataclass(name, fields + list(extra_fields), frozen=True, namespace=namespace)


def known_settings(settings: tuple[Setting, ...]) -> dict[str, Setting]:
    return {s.name: s for s in settings}


def defaults(settings: tuple[Setting, ...]) -> dict:
    """Each setting's default, by name: what the Python API's named parameters take."""
    return {s.name: s.default for s in settings}


def with_options(settings: tuple[Setting, ...]):
    """Decorate a typer command so that it also takes one option per setting (but `cli=False`
    ones); the command receives their values as one dict, `settings`."""
    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "settings"]
        options = [s for s in settings if s.cli]
        added = [inspect.Parameter(s.name, inspect.Parameter.KEYWORD_ONLY, default=s.cli_option(),
                                   annotation=s.cli_annotation()) for s in options]

        @functools.wraps(command)
        def wrapper(**kwargs):
            values = {s.name: kwargs.pop(s.name) for s in options}
            return command(**kwargs, settings=values)

        wrapper.__signature__ = signature.replace(parameters=own + added)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + added}
        return wrapper
    return decorate


def read_settings_file(path, settings: tuple[Setting, ...], section: str, extra: tuple = ()) -> dict:
    """Settings from a TOML or JSON file: keys are setting names (hyphens accepted too) and the
    `extra` names, optionally under a table named `section`. Unknown keys are refused."""
    values = read_table(path, f"--config {path}", "a table of settings")
    for name in (section, section.replace("_", "-")):
        if isinstance(values.get(name), dict) and len(values) == 1:
            values = values[name]
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    known = [*known_settings(settings), *extra]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise DogtlError(f"--config {path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return values
