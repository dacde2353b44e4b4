"""The compressor registry and the spec strings that choose a compressor everywhere.

A compressor registers by name with a class decorator (as timm's `register_model`):

    @register_compressor("avgpool", aliases=("pool",))
    @dataclass
    class AvgPool:
        '''Spatial average pooling of each frame's grid.'''
        stage = "pre_llm"
        trainable = False
        uses_question = False
        factor: int = field(default=2, metadata={"help": "pooling window side"})

Its dataclass fields are its parameters (int, float, bool or str, each with a default and a
`help`); `stage`, `trainable` and `uses_question` are plain class attributes (unannotated or `ClassVar`), so
they are not parameters. Parameter ranges are checked in `__post_init__`, raising `SpecError`.

A spec string picks one: `name` or `name:key=value,key=value` (whitespace tolerant, names
and keys case-insensitive; a value may contain ':' and '=' but not ','). The keys `ratio`,
`tokens` and `per_frame` are common to every compressor and become its `Budget`; the others
are converted by the field's type (bools: true/false/yes/no/on/off/1/0).
The CLI, HTTP, WebSocket and Gradio front doors all go through `parse_spec`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from compressors.budget import Budget, BudgetError
from compressors.protocol import Compressor
from kernels.errors import VidsieveError


class SpecError(VidsieveError):
    """A compressor spec string that names no compressor, an unknown key or a bad value."""


class ParamInfo(NamedTuple):
    """One parameter of a compressor, as `vidsieve compressors` prints it."""

    name: str
    type: str  # "int", "float", "bool" or "str"
    default: Any
    help: str


@dataclass(frozen=True)
class CompressorInfo:
    """What the registry knows about one compressor."""

    name: str
    aliases: tuple[str, ...]
    stage: str
    trainable: bool
    summary: str  # first line of the class docstring
    params: list[ParamInfo]


@dataclass(frozen=True, eq=False)
class CompressorSpec:
    """A parsed spec string: the compressor instance and the budget it should meet."""

    name: str  # canonical name, never an alias
    compressor: Compressor
    budget: Budget
    text: str  # canonical spec: every parameter plus the budget, keys sorted

    def __str__(self) -> str:
        return self.text


# The budget keys every spec accepts, on top of the compressor's own parameters.
BUDGET_PARAMS: tuple[ParamInfo, ...] = (
    ParamInfo("ratio", "float", None, "keep this fraction of the visual tokens, in (0, 1]"),
    ParamInfo("tokens", "int", None, "keep this many visual tokens for the whole clip"),
    ParamInfo("per_frame", "int", None, "keep this many visual tokens per frame"),
)
_BUDGET_TYPES: dict[str, type] = {"ratio": float, "tokens": int, "per_frame": int}
_PARAM_TYPES = (int, float, bool, str)
_TYPES_BY_NAME: dict[str, type] = {t.__name__: t for t in _PARAM_TYPES}
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True,
               "false": False, "no": False, "off": False, "0": False}
_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_-]*")
_STAGES = ("pre_llm", "in_llm")

_COMPRESSORS: dict[str, type] = {}  # canonical name -> class
_ALIASES: dict[str, str] = {}  # alias -> canonical name


def register_compressor(name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[type], type]:
    """Class decorator registering a compressor dataclass under `name` (and `aliases`).

    Refuses a name or alias already taken, classes that are not dataclasses, parameters
    that are not int/float/bool/str with a default, and a missing or unknown `stage`.
    """

    def decorator(cls: type) -> type:
        keys = (name, *aliases)
        for key in keys:
            if not isinstance(key, str) or not _NAME_PATTERN.fullmatch(key):
                raise ValueError(
                    f"Compressor name {key!r} must be lowercase letters, digits, '_' and '-', "
                    "starting with a letter."
                )
            if key in _COMPRESSORS or key in _ALIASES or keys.count(key) > 1:
                raise ValueError(f"Compressor name {key!r} is already registered.")
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass whose fields are its parameters.")
        if getattr(cls, "stage", None) not in _STAGES:
            raise TypeError(f"{cls.__name__}.stage must be one of {_STAGES}.")
        if not isinstance(getattr(cls, "trainable", None), bool):
            raise TypeError(f"{cls.__name__}.trainable must be a bool.")
        if not isinstance(getattr(cls, "uses_question", None), bool):
            raise TypeError(f"{cls.__name__}.uses_question must be a bool.")
        if cls.stage == "pre_llm" and not callable(getattr(cls, "compress", None)):
            raise TypeError(f"{cls.__name__} is a pre_llm compressor without compress().")
        for param in _params_of(cls):
            if param.name in _BUDGET_TYPES:
                raise TypeError(
                    f"{cls.__name__} may not have a parameter named {param.name!r}: "
                    "budget keys are common to every compressor."
                )
        cls.name = name
        _COMPRESSORS[name] = cls
        for alias in aliases:
            _ALIASES[alias] = name
        return cls

    return decorator


def unregister_compressor(name: str) -> None:
    """Remove a compressor and its aliases (for tests that register fakes)."""
    if name not in _COMPRESSORS:
        raise ValueError(f"Compressor {name!r} is not registered.")
    del _COMPRESSORS[name]
    for alias in [a for a, target in _ALIASES.items() if target == name]:
        del _ALIASES[alias]


def list_compressors() -> list[CompressorInfo]:
    """Every registered compressor, sorted by name."""
    infos = []
    for name in sorted(_COMPRESSORS):
        cls = _COMPRESSORS[name]
        doc = (cls.__doc__ or "").strip()
        infos.append(
            CompressorInfo(
                name=name,
                aliases=tuple(sorted(a for a, target in _ALIASES.items() if target == name)),
                stage=cls.stage,
                trainable=cls.trainable,
                summary=doc.splitlines()[0] if doc else "",
                params=_params_of(cls),
            )
        )
    return infos


def parse_spec(text: str) -> CompressorSpec:
    """Parse `name` or `name:key=value,...` into a compressor instance and its budget."""
    if not isinstance(text, str) or not text.strip():
        raise SpecError("The compressor spec is empty; write a name such as 'random:ratio=0.1'.")
    head, has_params, rest = text.partition(":")
    requested = head.strip().lower()
    if not requested:
        raise SpecError(f"The compressor spec {text!r} has no name before ':'.")
    raw = _split_params(text, rest) if has_params else {}
    name = _ALIASES.get(requested, requested)
    if name not in _COMPRESSORS:
        raise SpecError(
            f"Unknown compressor {requested!r}. Registered compressors: {_names_listing()}."
        )
    cls = _COMPRESSORS[name]

    param_types = {p.name: p.type for p in _params_of(cls)}
    budget_values: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _BUDGET_TYPES:
            budget_values[key] = _convert(name, key, value, _BUDGET_TYPES[key])
        elif key in param_types:
            values[key] = _convert(name, key, value, _TYPES_BY_NAME[param_types[key]])
        else:
            raise SpecError(
                f"Compressor {name!r} has no parameter {key!r}. {_params_listing(name)}"
            )
    try:
        budget = Budget(**budget_values)
    except BudgetError as err:
        raise SpecError(f"In compressor spec {text!r}: {err}") from None
    compressor = cls(**values)
    return CompressorSpec(
        name=name, compressor=compressor, budget=budget, text=_canonical(name, compressor, budget)
    )


def _params_of(cls: type) -> list[ParamInfo]:
    """The init fields of a compressor dataclass, checked to be simple typed parameters."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kind = hints[f.name]
        if kind not in _PARAM_TYPES:
            raise TypeError(
                f"{cls.__name__}.{f.name} must be typed int, float, bool or str; got {kind!r}."
            )
        if f.default is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{f.name} needs a default value.")
        params.append(ParamInfo(f.name, kind.__name__, f.default, f.metadata.get("help", "")))
    return params


def _split_params(text: str, rest: str) -> dict[str, str]:
    """'k=v, k2=v2' -> {'k': 'v', 'k2': 'v2'}, refusing malformed or repeated items."""
    raw: dict[str, str] = {}
    for item in rest.split(","):
        key, has_value, value = (part.strip() for part in item.partition("="))
        key = key.lower()
        if not item.strip():
            raise SpecError(
                f"The compressor spec {text!r} has an empty parameter; "
                "write name:key=value,key=value with no stray ',' or ':'."
            )
        if not has_value:
            raise SpecError(
                f"In compressor spec {text!r}, {item.strip()!r} is not of the form key=value."
            )
        if not key:
            raise SpecError(f"In compressor spec {text!r}, {item.strip()!r} has no key before '='.")
        if not value:
            raise SpecError(f"In compressor spec {text!r}, parameter {key!r} has no value.")
        if key in raw:
            raise SpecError(f"The compressor spec {text!r} gives parameter {key!r} twice.")
        raw[key] = value
    return raw


def _convert(name: str, key: str, value: str, kind: type) -> Any:
    """The spec value converted to the parameter's type, or a SpecError saying what was expected."""
    try:
        if kind is bool:
            return _BOOL_WORDS[value.lower()]
        if kind is float:
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(value)
            return number
        return kind(value)
    except (KeyError, ValueError):
        expected = {
            bool: "a bool (true/false, yes/no, on/off, 1/0)",
            int: "an int",
            float: "a finite float",
        }[kind]
        raise SpecError(
            f"Parameter {key!r} of compressor {name!r} expects {expected}; got {value!r}."
        ) from None


def _canonical(name: str, compressor: Compressor, budget: Budget) -> str:
    """`name:k=v,...` with every parameter and the budget, keys sorted."""
    items = {p.name: getattr(compressor, p.name) for p in _params_of(type(compressor))}
    items.update({k: v for k, v in vars(budget).items() if v is not None})
    if not items:
        return name
    return name + ":" + ",".join(f"{k}={_format_value(items[k])}" for k in sorted(items))


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def _names_listing() -> str:
    parts = []
    for name in sorted(_COMPRESSORS):
        aliases = sorted(a for a, target in _ALIASES.items() if target == name)
        parts.append(f"{name} (alias {', '.join(aliases)})" if aliases else name)
    return ", ".join(parts)


def _params_listing(name: str) -> str:
    params = _params_of(_COMPRESSORS[name])
    budget = ", ".join(p.name for p in BUDGET_PARAMS)
    if not params:
        return f"It takes no parameters of its own; every compressor takes {budget}."
    own = ", ".join(f"{p.name} ({p.type})" for p in params)
    return f"Its parameters: {own}; every compressor also takes {budget}."
