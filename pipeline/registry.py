"""One registry for everything a string can name: heads, baselines, backbones, flow methods.

Modelled on timm's ``_registry.py``: a module-level table filled by decorators at import time, so a
sweep file or ``--head NAME`` resolves a model without hidden discovery. Each entry pairs a frozen
dataclass config with a small builder function.
"""

from __future__ import annotations

import dataclasses
import fnmatch
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
    def __init__(self, what: str):
        self.what = what
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
        return cls(**kwargs)


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


HEADS = Registry("head")
BACKBONES = Registry("backbone")
