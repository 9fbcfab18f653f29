"""Typed configuration: keyword-only dataclasses <- YAML files <- dotted command-line overrides.

A config is a tree of ``Config`` dataclasses. Values come, later winning, from

1. the dataclass defaults,
2. YAML files (``load(cls, "a.yaml", "b.yaml")``),
3. a plain nested dict (``data=``), and
4. dotted overrides as typed on a command line: ``async_training.max_queue_size=500``.

Everything is checked once, at construction, with errors that name the dotted key, the value
and the rule (``async_training.max_queue_size=-1 is invalid: must be >= 1``). Every float is
finite (``optim.lr=inf`` is an error, not a run that trains until its loss is NaN) unless its
field says ``option(allow_inf=True)``, where ``inf`` means "no limit" (a timeout with no
deadline); NaN is never a value, because every comparison with it is false. An unknown or
mistyped key is an error that suggests the closest valid key, because a silently ignored typo
(``max_queu_size=10``) is the most expensive config bug there is: the run goes on with the
default. Wherever a config object is expected, a plain nested dict (or an OmegaConf
``DictConfig``) is accepted and converted.

Declaring a config::

    @dataclass(kw_only=True)
    class QueueConfig(Config):
        max_queue_size: int = option(1000, ge=1, help="most samples the queue holds")
        mode: Literal["async", "sync"] = "async"

A field without a default is required; in YAML, ``???`` marks such a value as "must be set".
This module imports nothing from the project (it sits at the bottom of the layering).
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

__all__ = [
    "MISSING_VALUE",
    "Config",
    "apply_overrides",
    "config_keys",
    "describe",
    "from_dict",
    "load",
    "merge_dicts",
    "non_finite_rule",
    "option",
    "parse_override",
    "parse_overrides",
    "read_yaml",
    "to_dict",
]

C = TypeVar("C", bound="Config")

# The YAML spelling of "no value yet, the user must set it" (OmegaConf's and Hydra's convention).
MISSING_VALUE = "???"

# The dotted path of the config being built and the root class, so that a nested config's
# __post_init__ can name ``async_training.max_queue_size`` and not just ``max_queue_size``.
_PATH: contextvars.ContextVar[str] = contextvars.ContextVar("config_path", default="")
_ROOT: contextvars.ContextVar[type | None] = contextvars.ContextVar("config_root", default=None)

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


# -- declaring fields -------------------------------------------------------------------------
def option(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    allow_inf: bool = False,
    help: str = "",
) -> Any:
    """A config field with bounds (checked at construction) and a help text.

    ``allow_inf``: the field takes ``inf`` (say what it means in ``help``, e.g. "no deadline");
    without it a float must be finite. NaN is refused either way.
    """
    metadata = {"ge": ge, "gt": gt, "le": le, "lt": lt, "allow_inf": allow_inf, "help": help}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(kw_only=True)
class Config:
    """Base of every config dataclass: validation, dict/YAML conversion and dict-style reads."""

    def __post_init__(self) -> None:
        path = _PATH.get()
        object.__setattr__(self, "_config_path", path)
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            key = _join(path, f.name)
            value = _coerce(getattr(self, f.name), hints[f.name], key)
            # Before the bounds: NaN fails every bound with a misleading rule ("must be > 0").
            _check_finite(value, bool(f.metadata.get("allow_inf")), key)
            _check_bounds(value, f.metadata, key)
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Cross-field rules; override and raise ``ValueError`` naming ``self.key(...)``."""

    def key(self, name: str) -> str:
        """The dotted key of one of this config's fields, for error messages."""
        return _join(self.__dict__.get("_config_path", ""), name)

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any] | None = None) -> C:
        return from_dict(cls, data or {})

    @classmethod
    def load(
        cls: type[C],
        *files: str | Path,
        data: Mapping[str, Any] | None = None,
        overrides: Sequence[str] = (),
    ) -> C:
        return load(cls, *files, data=data, overrides=overrides)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def with_overrides(self: C, *overrides: str) -> C:
        """A new config with dotted overrides applied (``'a.b=3'``); this one is unchanged."""
        return from_dict(type(self), apply_overrides(self.to_dict(), overrides))

    # Dict-style reads, so that code written for verl's DictConfig (``cfg.get("k", 1)``,
    # ``cfg["k"]``) keeps working on a typed config.
    def get(self, name: str, default: Any = None) -> Any:
        if name in self._field_names():
            return getattr(self, name)
        return default

    def __getitem__(self, name: str) -> Any:
        if name not in self._field_names():
            raise KeyError(_unknown_key_message(type(self), self.key(name), name))
        return getattr(self, name)

    def __contains__(self, name: object) -> bool:
        return name in self._field_names()

    @classmethod
    def _field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


# -- building configs -------------------------------------------------------------------------
def from_dict(cls: type[C], data: Any, *, path: str = "") -> C:
    """Build ``cls`` from a nested mapping, checking every key and value on the way."""
    data = _plain(data)
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise TypeError(
            f"{path or cls.__name__}={data!r} is invalid: must be a mapping of "
            f"{cls.__name__} fields, got {type(data).__name__}"
        )
    root_token = _ROOT.set(_ROOT.get() or cls)
    try:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name in data:
            if not isinstance(name, str) or name not in fields:
                raise ValueError(_unknown_key_message(cls, _join(path, str(name)), str(name)))
        missing = [
            n
            for n, f in fields.items()
            if n not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ValueError(_required_message(_join(path, missing[0])))
        token = _PATH.set(path)
        try:
            hints = _hints(cls)
            kwargs = {}
            for name, value in data.items():
                kwargs[name] = _coerce(value, hints[name], _join(path, name))
            # Defaults that are themselves configs are built here too, so they know their path.
            for name, f in fields.items():
                if name not in kwargs and f.default_factory is not dataclasses.MISSING:
                    sub = _config_class(hints[name])
                    if sub is not None:
                        kwargs[name] = from_dict(sub, {}, path=_join(path, name))
            return cls(**kwargs)
        finally:
            _PATH.reset(token)
    finally:
        _ROOT.reset(root_token)


def load(
    cls: type[C],
    *files: str | Path,
    data: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> C:
    """Defaults <- each YAML file in order <- ``data`` <- dotted ``overrides``."""
    merged: dict[str, Any] = {}
    for file in files:
        merged = merge_dicts(merged, read_yaml(file))
    if data is not None:
        merged = merge_dicts(merged, _as_dict(data, "data"))
    return from_dict(cls, apply_overrides(merged, overrides))


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml  # lazily: only YAML users need PyYAML

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    with path.open() as fh:
        loaded = yaml.safe_load(fh)
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(
            f"config file {str(path)!r} must hold a mapping at the top level, "
            f"got {type(loaded).__name__}"
        )
    return loaded


def to_dict(config: Any) -> Any:
    """A plain nested dict (lists and scalars inside) of a config; safe to dump as YAML/JSON."""
    if isinstance(config, Config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, Mapping):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    return config


def config_keys(cls: type[Config], prefix: str = "") -> list[str]:
    """Every dotted leaf key of a config class, e.g. ``async_training.max_queue_size``."""
    keys: list[str] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        sub = _config_class(hints[f.name])
        if sub is not None:
            keys.extend(config_keys(sub, _join(prefix, f.name)))
        else:
            keys.append(_join(prefix, f.name))
    return keys


def describe(cls: type[Config], prefix: str = "") -> str:
    """One line per key: ``key: type = default  # help``; what a ``--help`` prints."""
    lines: list[str] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        sub = _config_class(hints[f.name])
        if sub is not None:
            lines.append(describe(sub, key))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        line = f"{key}: {_type_name(hints[f.name])} = {default}"
        note = f.metadata.get("help")
        lines.append(f"{line}  # {note}" if note else line)
    return "\n".join(lines)


# -- dotted overrides -------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    """``'a.b.c=value'`` -> (['a', 'b', 'c'], value parsed as YAML: 3, 0.5, true, null, [x])."""
    if not isinstance(text, str):
        raise TypeError(f"override {text!r} must be a string 'key=value'")
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(
            f"override {text!r} is invalid: must look like key=value, "
            "e.g. async_training.max_queue_size=500"
        )
    parts = key.split(".")
    if any(not p for p in parts):
        raise ValueError(f"override {text!r} is invalid: key {key!r} has an empty part")
    import yaml

    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not valid YAML (e.g. 'a: b: c'): keep the text, type checks decide
    return parts, value


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Dotted overrides as one nested dict (later overrides of the same key win)."""
    out: dict[str, Any] = {}
    for text in overrides:
        parts, value = parse_override(text)
        _set_path(out, parts, value, text)
    return out


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    return merge_dicts(_as_dict(data, "config"), parse_overrides(overrides))


def merge_dicts(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else in ``update`` replaces."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def _set_path(out: dict[str, Any], parts: list[str], value: Any, text: str) -> None:
    node = out
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(
                f"override {text!r} conflicts with an earlier override that set "
                f"{'.'.join(parts[: i + 1])} to a plain value"
            )
        node = child
    node[parts[-1]] = value


# -- checking and coercing values -------------------------------------------------------------
def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp`` or a TypeError/ValueError naming key, value and rule."""
    value = _plain(value)
    if isinstance(value, str) and value == MISSING_VALUE:
        raise ValueError(_required_message(key))
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option_tp in options:
            try:
                return _coerce(value, option_tp, key)
            except (TypeError, ValueError) as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise TypeError(f"{key}={value!r} is invalid: must be {_type_name(tp)}")
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        hint = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(f"{key}={value!r} is invalid: must be one of {list(args)}{did_you_mean}")
    sub = _config_class(tp)
    if sub is not None:
        if isinstance(value, sub):
            return value
        if value is None:
            raise TypeError(f"{key}=None is invalid: must be a {sub.__name__} or a mapping")
        return from_dict(sub, value, path=key)
    if origin in (list, Sequence) or tp in (list, Sequence):
        (item_tp,) = args or (Any,)
        if isinstance(value, (list, tuple)):
            return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        if value is None:
            raise TypeError(f"{key}=None is invalid: must be a list of {_type_name(item_tp)}")
        # A scalar where a list is expected is a list of one (``data.train_files=a.jsonl``).
        return [_coerce(value, item_tp, f"{key}[0]")]
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{key}={value!r} is invalid: must be a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ValueError(f"{key}={value!r} is invalid: must have {len(args)} items")
        return tuple(
            _coerce(v, args[i] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)
        )
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise TypeError(
                f"{key}={value!r} is invalid: must be a mapping, got {type(value).__name__}"
            )
        key_tp, val_tp = args or (Any, Any)
        return {
            _coerce(k, key_tp, f"{key} key"): _coerce(v, val_tp, f"{key}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        return _to_bool(value, key)
    if tp is int:
        return _to_int(value, key)
    if tp is float:
        return _to_float(value, key)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML reads ``name=123`` as a number; the field wants text
        raise TypeError(f"{key}={value!r} is invalid: must be a string, got {type(value).__name__}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise TypeError(
            f"{key}={value!r} is invalid: must be a {tp.__name__}, got {type(value).__name__}"
        )
    raise TypeError(f"{key}: the config type {tp!r} is not supported by miniray.config")


def _to_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise TypeError(f"{key}={value!r} is invalid: must be a boolean (true or false)")


def _to_int(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{key}={value!r} is invalid: must be an integer, not a boolean")
    if isinstance(value, int):
        return value
    number = value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                raise TypeError(f"{key}={value!r} is invalid: must be an integer") from None
    if isinstance(number, float) and number.is_integer():
        return int(number)
    raise TypeError(f"{key}={value!r} is invalid: must be an integer")


def _to_float(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise TypeError(f"{key}={value!r} is invalid: must be a number, not a boolean")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        # PyYAML reads ``1e-6`` (no dot) as a string; a number field takes it anyway.
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise TypeError(f"{key}={value!r} is invalid: must be a number")


def non_finite_rule(value: float, *, allow_inf: bool) -> str | None:
    """The rule a float breaks by not being finite, or None when it breaks none.

    NaN is never allowed: every comparison with it is false, so a NaN passes no bound, a NaN
    deadline never arrives and a NaN learning rate trains until the loss is NaN. ``inf`` is
    allowed only where the key declares it means "no limit"; ``-inf`` never is.
    """
    if math.isnan(value):
        return "must be a number, not NaN"
    if math.isinf(value) and not (allow_inf and value > 0):
        return "must be finite or inf (no limit)" if allow_inf else "must be finite"
    return None


def _check_finite(value: Any, allow_inf: bool, key: str) -> None:
    """Refuse a non-finite float anywhere in a field's value (lists and mappings included);
    nested configs check their own fields."""
    if isinstance(value, float):
        rule = non_finite_rule(value, allow_inf=allow_inf)
        if rule is not None:
            raise ValueError(f"{key}={value!r} is invalid: {rule}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_finite(item, allow_inf, f"{key}[{i}]")
    elif isinstance(value, Mapping):
        for name, item in value.items():
            _check_finite(item, allow_inf, f"{key}.{name}")


def _check_bounds(value: Any, metadata: Mapping[str, Any], key: str) -> None:
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    rules = [
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    ]
    for name, ok, symbol in rules:
        bound = metadata.get(name)
        if bound is not None and not ok(value, bound):
            raise ValueError(f"{key}={value!r} is invalid: must be {symbol} {bound}")


# -- helpers ----------------------------------------------------------------------------------
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = hints
    return hints


def _config_class(tp: Any) -> type[Config] | None:
    return tp if isinstance(tp, type) and issubclass(tp, Config) else None


def _plain(value: Any) -> Any:
    """An OmegaConf container as plain dicts and lists; anything else unchanged."""
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return value


def _as_dict(data: Any, what: str) -> dict[str, Any]:
    data = _plain(data)
    if isinstance(data, Config):
        return to_dict(data)
    if not isinstance(data, Mapping):
        raise TypeError(f"{what} must be a mapping, got {type(data).__name__}: {data!r}")
    return dict(data)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is not None:  # list[str], int | None, Literal['a', 'b']
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _required_message(key: str) -> str:
    return (
        f"{key} is required and has no default: set it in a YAML file or on the command "
        f"line as {key}=..."
    )


def _unknown_key_message(cls: type[Config], key: str, name: str) -> str:
    """Name the bad key and the closest valid one, at this level or anywhere in the tree."""
    parent = key.rpartition(".")[0]
    here = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, here, n=1, cutoff=0.6)
    suggestion = _join(parent, close[0]) if close else None
    if suggestion is None:
        root = _ROOT.get() or cls
        everywhere = config_keys(root)
        leaf_matches = [k for k in everywhere if k.rpartition(".")[2] == name]
        if leaf_matches:
            suggestion = leaf_matches[0]
        else:
            close = difflib.get_close_matches(key, everywhere, n=1, cutoff=0.75)
            suggestion = close[0] if close else None
    hint = f"; did you mean {suggestion!r}?" if suggestion else ""
    where = f"under {parent!r}" if parent else f"of {cls.__name__}"
    return f"unknown config key {key!r}{hint} Valid keys {where}: {sorted(here)}"
