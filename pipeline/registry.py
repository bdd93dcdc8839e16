"""One registry for everything a string can name: heads, baselines, backbones, flow methods.

Modelled on timm's ``_registry.py``: a module-level table filled by decorators at import time, so a
sweep file or ``--head NAME`` resolves a model without hidden discovery. Each entry pairs a frozen
dataclass config with a small builder function.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.errors import UserError


class RegistryError(UserError):
    """A user-facing error: unknown name, unknown key or a value of the wrong type."""


@dataclass(frozen=True)
class Entry:
    name: str
    config_cls: type
    builder: Callable[..., Any]
    kind: str  # "torch" (nn.Module over [B, T, D]) or "sklearn" (fit / decision_function)
    doc: str


class Registry:
    def __init__(self, what: str, check_ranges: bool = False):
        self.what = what
        self.check_ranges = check_ranges  # heads: every config passes ``check_config`` before any work starts
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, config_cls: type, kind: str = "torch"):
        """Decorator: ``@HEADS.register("ts-lstm", TSLSTMConfig)`` over a builder function."""
        if not dataclasses.is_dataclass(config_cls):
            raise TypeError(f"{name}: config must be a dataclass")

        def deco(fn):
            if name in self._entries:
                raise KeyError(f"{self.what} {name!r} registered twice")
            doc = (fn.__doc__ or config_cls.__doc__ or "").strip().splitlines()
            self._entries[name] = Entry(name, config_cls, fn, kind, doc[0] if doc else "")
            return fn

        return deco

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            raise RegistryError(f"unknown {self.what} {name!r}; choose one of: {', '.join(self.names())}")
        return self._entries[name]

    def make_config(self, name: str, overrides: dict[str, Any] | None = None):
        """Config of ``name`` with ``overrides`` applied; values given as strings are parsed to the field type."""
        cls = self.get(name).config_cls
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in (overrides or {}).items():
            if key not in fields:
                raise RegistryError(f"{self.what} {name!r} has no key {key!r}; valid keys: {', '.join(fields)}")
            kwargs[key] = parse_value(value, hints[key], f"{name}.{key}") if isinstance(value, str) else value
        cfg = cls(**kwargs)  # a config's own __post_init__ checks what needs more than the generic rules
        if self.check_ranges:
            check_config(cfg, f"{self.what} setting {name}")
        return cfg


# The generic range rules of ``check_config``, by field name: an int is a size or a count (>= 1) unless named here.
INT_MAY_BE_ZERO = {"fc", "num_clips", "clip_seed", "seed", "stream",
                   "reduce", "gating_reduction"}  # 0 means "none", "every" or an index
INT_NONZERO = {"n_jobs"}  # joblib: -1 is every core, 0 is invalid
FLOAT_POSITIVE = {"C", "tol", "gamma"}  # > 0; any other float is >= 0 (a weight, a penalty, a rate)
FLOAT_AT_LEAST_ONE = {"p"}  # lp-norm MKL


def _range_problem(key: str, value: Any) -> str | None:
    """Why ``value`` is out of range for a config field named ``key`` (None when it is fine)."""
    if value is None or isinstance(value, (bool, str)):
        return None
    if isinstance(value, (tuple, list)):
        if not value:
            return "needs at least one value"
        problems = [p for v in value if (p := _range_problem(key, v))]
        return problems[0] if problems else None
    if isinstance(value, int):
        if key in INT_NONZERO:
            return "must not be 0" if value == 0 else None
        low = 0 if key in INT_MAY_BE_ZERO else 1
        return f"must be >= {low}" if value < low else None
    if isinstance(value, float):
        if not math.isfinite(value):
            return "must be a finite number"
        if key.startswith("dropout"):
            return None if 0 <= value < 1 else "is a drop probability in [0, 1)"
        if key in FLOAT_POSITIVE:
            return "must be > 0" if value <= 0 else None
        if key in FLOAT_AT_LEAST_ONE:
            return "must be >= 1" if value < 1 else None
        return "must be >= 0" if value < 0 else None
    return None


def check_config(cfg: Any, what: str) -> None:
    """Range-check every field of a config dataclass by its name and type, and its ``choices`` (a class-level
    ``{field: allowed values}``), raising one ``RegistryError`` line that names the first bad key."""
    choices = getattr(cfg, "choices", None) or {}
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if type(value) is int and float in (hints.get(f.name), *typing.get_args(hints.get(f.name))):
            value = float(value)  # a float field given as an int from Python: checked as the float it means
        if f.name in choices and value not in choices[f.name]:
            problem = f"choose one of {', '.join(map(str, choices[f.name]))}"
        else:
            problem = _range_problem(f.name, value)
        if problem:
            shown = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
            raise RegistryError(f"invalid {what}: {f.name}={shown}: {problem}")


def parse_value(text: str, hint: Any, where: str) -> Any:
    """Parse a ``--set key=value`` string into ``hint`` (int, float, bool, str, tuples/lists of those, Optional)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if text.lower() in ("none", "null"):
            return None
        inner = [a for a in args if a is not type(None)]
        return parse_value(text, inner[0], where)
    if origin in (tuple, list):
        inner = args[0] if args else str
        parts = [p for p in text.strip("()[]").replace(";", ",").split(",") if p.strip()]
        vals = [parse_value(p.strip(), inner, where) for p in parts]
        return tuple(vals) if origin is tuple else vals
    try:
        if hint is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if hint in (int, float, str):
            return hint(text)
    except ValueError:
        raise RegistryError(f"{where}: cannot read {text!r} as {hint.__name__}") from None
    return text


def config_fields(config_cls: type) -> list[tuple[str, Any]]:
    """(name, default) pairs of a config dataclass, for ``twostream heads``."""
    out = []
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append((f.name, default))
    return out


HEADS = Registry("head", check_ranges=True)
BACKBONES = Registry("backbone")
