"""Options declared once, everything else derived from the declaration.

A configuration option is a dataclass field made by :func:`option`: its type annotation, default,
help text and constraints (range, choices) in one place. A hyper-parameter of a registered factory
(a strategy, a sampler) is a keyword parameter whose annotation carries its constraints::

    samples: Annotated[int, Range(ge=2)] = 25
    acquisition: Annotated[str, OneOf(ACQUISITIONS)] = "bald"

From these declarations this module derives type and range validation (:func:`validate`,
:func:`check_arguments`), mappings such as YAML files (:func:`from_mapping`, :func:`to_mapping`)
and command-line flags (:func:`add_arguments`, whose help shows the declared defaults).

Types are strict, as a YAML file or a Python call may give anything: a bool is not an integer, a
string is not a number (``"no"`` is not a boolean), a float is not an integer even when it is
whole (``2.0``), and NaN or infinity is not a number. Every refusal is a one-line
:class:`~gradnorm_al.errors.ConfigError` that names the option, the value and what is accepted.
Supported annotations: ``bool``, ``int``, ``float``, ``str``, ``X | None``, ``list[X]``,
``dict[K, V]``, ``Any``, each optionally ``Annotated`` with :class:`Range` or :class:`OneOf`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import inspect
import math
import numbers
import operator
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Union

from .errors import ConfigError

__all__ = [
    "NonNegativeFloat",
    "OneOf",
    "PositiveFloat",
    "PositiveInt",
    "Range",
    "add_arguments",
    "check_arguments",
    "check_value",
    "describe",
    "from_mapping",
    "option",
    "option_fields",
    "to_mapping",
    "validate",
]


@dataclass(frozen=True)
class Range:
    """Inclusive (``ge``, ``le``) or exclusive (``gt``, ``lt``) bounds of a number."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, value: Any) -> bool:
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def __str__(self) -> str:
        low = ("[", self.ge) if self.ge is not None else ("(", self.gt)
        high = (self.le, "]") if self.le is not None else (self.lt, ")")
        if low[1] is not None and high[0] is not None:
            return f"in {low[0]}{low[1]:g}, {high[0]:g}{high[1]}"
        if low[1] is not None:
            return f"{'>=' if low[0] == '[' else '>'} {low[1]:g}"
        if high[0] is not None:
            return f"{'<=' if high[1] == ']' else '<'} {high[0]:g}"
        return ""


@dataclass(frozen=True)
class OneOf:
    """The accepted values, in the order help and messages list them."""

    values: tuple[Any, ...]

    def __contains__(self, value: Any) -> bool:
        return value in self.values

    def __str__(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)


#: Shorthands for the commonest declarations.
PositiveInt = Annotated[int, Range(ge=1)]
PositiveFloat = Annotated[float, Range(gt=0)]
NonNegativeFloat = Annotated[float, Range(ge=0)]

_CONSTRAINTS = (Range, OneOf)
_META = "gradnorm_al.option"  # the key of a field's metadata that holds its declaration


@dataclass(frozen=True)
class _Option:
    help: str
    constraints: tuple[Range | OneOf, ...]
    flag: str | None  # the command-line flag; None: --name-with-dashes
    metavar: str | None
    nargs: str | None  # for lists: "+" (default) or "*"
    append: bool  # a list given one value per repeated flag (a single value is a list of one)
    none: str | None  # what None means, shown as the default in help
    cli: bool  # whether there is a command-line flag
    exposed: bool  # False: a setting of the class, not a key of its mappings nor a flag


_PLAIN = _Option("", (), None, None, None, False, None, True, True)  # a field without option()


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[Any, ...] | list[Any] | None = None,
    flag: str | None = None,
    metavar: str | None = None,
    nargs: str | None = None,
    append: bool = False,
    none: str | None = None,
    cli: bool = True,
    exposed: bool = True,
) -> Any:
    """A dataclass field declaring one option.

    ``default``: its value (a list or dict is copied for every instance). ``help``: one phrase
    for ``--help``, to which the default is added. ``ge``/``gt``/``le``/``lt``: bounds of a
    number (of each element of a list); ``choices``: the accepted values. ``flag``: the
    command-line flag if not ``--`` + the name with dashes (its name is accepted as a key too);
    ``metavar``, ``nargs`` (lists: "+" by default): as in argparse; ``append``: a list given
    by repeating the flag, one value each. ``none``: what the default None means, for help.
    ``cli=False``: no flag (a file-only option); ``exposed=False``: not an option of
    the config at all (no key, no flag), a setting made from Python only.
    """
    constraints: list[Range | OneOf] = []
    if any(bound is not None for bound in (ge, gt, le, lt)):
        constraints.append(Range(ge=ge, gt=gt, le=le, lt=lt))
    if choices is not None:
        constraints.append(OneOf(tuple(choices)))
    meta = _Option(help, tuple(constraints), flag, metavar, nargs, append, none, cli, exposed)
    metadata = {_META: meta}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# ------------------------------------------------------------------------------ types


def _split(annotation: Any) -> tuple[Any, tuple[Range | OneOf, ...]]:
    """``Annotated[T, c...]`` -> ``(T, constraints)``; any other type -> ``(type, ())``."""
    if typing.get_origin(annotation) is Annotated:
        base, *extras = typing.get_args(annotation)
        return base, tuple(x for x in extras if isinstance(x, _CONSTRAINTS))
    return annotation, ()


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _matches(value: Any, annotation: Any) -> bool:
    tp, constraints = _split(annotation)
    origin = typing.get_origin(tp)
    if tp is Any:
        ok = True
    elif _is_union(tp):
        return any(_matches(value, arg) for arg in typing.get_args(tp))
    elif tp is type(None):
        ok = value is None
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif tp is float:
        ok = (
            isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        )
    elif tp is str:
        ok = isinstance(value, str)
    elif origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        ok = isinstance(value, list) and all(_matches(v, item) for v in value)
    elif origin is dict:
        key, item = typing.get_args(tp) or (Any, Any)
        ok = isinstance(value, dict) and all(
            _matches(k, key) and _matches(v, item) for k, v in value.items()
        )
    else:
        raise TypeError(f"options cannot check values of type {tp!r}")
    return ok and all(value in c for c in constraints)


_NOUNS = {
    bool: ("true or false", "booleans"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
    Any: ("anything", "values"),
}


def describe(annotation: Any, plural: bool = False) -> str:
    """What values of ``annotation`` are accepted, in words: ``"an integer >= 1 or null"``."""
    tp, constraints = _split(annotation)
    if _is_union(tp):
        args = typing.get_args(tp)
        words = " or ".join(describe(a, plural) for a in args if a is not type(None))
        return words + (" or null" if type(None) in args else "")
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        words = ("lists" if plural else "a list") + " of " + describe(item, plural=True)
    elif origin is dict:
        words = "mappings" if plural else "a mapping"
        key, item = typing.get_args(tp) or (Any, Any)
        if item is not Any:
            words += f" of {describe(key, True)} to {describe(item, True)}"
    elif tp in _NOUNS:
        words = _NOUNS[tp][plural]
    else:
        words = repr(tp)
    for c in constraints:
        if isinstance(c, OneOf):
            words = str(c)  # the choices say it all
        elif str(c):
            words += " " + str(c)
    return words


def _shown(value: Any) -> str:
    """``value`` in a message; a YAML float written without a dot is read as a string."""
    hint = ""
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d+[eE][-+]?\d+", value.strip()):
        mantissa, exponent = re.split("[eE]", value.strip())
        hint = f" (YAML reads this as a string; write {mantissa}.0e{exponent})"
    return f"{value!r}{hint}"


def check_value(value: Any, annotation: Any, label: str) -> None:
    """Raise ConfigError unless ``value`` is of ``annotation`` and within its constraints."""
    if not _matches(value, annotation):
        raise ConfigError(f"{label} must be {describe(annotation)}, got {_shown(value)}")


# ------------------------------------------------------------------------------ dataclasses


def option_fields(cls: Any) -> list[tuple[dataclasses.Field, Any]]:
    """``(field, resolved annotation)`` of every field of the dataclass ``cls`` that is an
    option (all fields but those declared ``exposed=False``), in declaration order."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return [
        (f, _with_metadata(hints[f.name], f)) for f in dataclasses.fields(cls) if _meta(f).exposed
    ]


def _meta(f: dataclasses.Field) -> _Option:
    return f.metadata.get(_META, _PLAIN)


def _with_metadata(annotation: Any, f: dataclasses.Field) -> Any:
    """The field's annotation with the constraints given to :func:`option` attached (to ``X`` of
    ``X | None`` and to the elements of a list)."""
    constraints = _meta(f).constraints
    if not constraints:
        return annotation

    def attach(tp: Any) -> Any:
        if tp is type(None):
            return tp
        if _is_union(tp):
            return functools.reduce(operator.or_, [attach(a) for a in typing.get_args(tp)])
        if typing.get_origin(tp) is list:
            return list[attach(typing.get_args(tp)[0])]  # type: ignore[misc]
        return Annotated[(tp, *constraints)]

    return attach(annotation)


def _label(name: str) -> str:
    return name.replace("_", "-")


def validate(obj: Any, owner: str | None = None) -> None:
    """Raise ConfigError for the first field of the dataclass instance ``obj`` whose value is not
    of its declared type or outside its declared constraints.

    Messages name a field as on the command line (``initial-fraction``), or, for the
    parameters of an ``owner``, as ``"{owner}: {name}"`` (``strategy vaal: lr``)."""
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        label = f"{owner}: {f.name}" if owner else _label(f.name)
        check_value(getattr(obj, f.name), _with_metadata(hints[f.name], f), label)


def _keys(cls: Any) -> dict[str, str]:
    """Accepted mapping key (underscores) -> field name: the names and the flags' names."""
    keys = {}
    for f, _ in option_fields(cls):
        keys[f.name] = f.name
        flag = _meta(f).flag
        if flag is not None:
            keys[flag.lstrip("-").replace("-", "_")] = f.name
    return keys


def from_mapping(cls: Any, mapping: Mapping[Any, Any], base: Any = None) -> Any:
    """``base`` (or ``cls()``) updated with ``mapping`` and validated.

    Keys may use - or _ and may be a field's name or its flag's; an unknown key is refused with
    the list of the known ones. A repeatable (``append``) option accepts one value for a list
    of one."""
    keys = _keys(cls)
    updates = {}
    for key, value in mapping.items():
        name = keys.get(str(key).replace("-", "_"))
        if name is None:
            known = ", ".join(sorted(f.name for f, _ in option_fields(cls)))
            raise ConfigError(f"unknown option {key!r}; known options: {known}")
        if _meta(_field(cls, name)).append and not isinstance(value, list):
            value = [value]
        updates[name] = value
    obj = dataclasses.replace(base, **updates) if base is not None else cls(**updates)
    validate(obj)
    return obj


def _field(cls: Any, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def to_mapping(obj: Any) -> dict[str, Any]:
    """The options of the dataclass instance ``obj`` as plain data, in declaration order (what
    :func:`from_mapping` reads back)."""
    return {f.name: copy.deepcopy(getattr(obj, f.name)) for f, _ in option_fields(type(obj))}


# ------------------------------------------------------------------------------ command line


def _parse(tp: Any) -> Callable[[str], Any]:
    """argparse ``type`` for a scalar type: int refuses "1.5", float refuses "fast"."""
    if tp is int:
        word = "an integer"
    elif tp is float:
        word = "a number"
    else:
        return str

    def parse(text: str) -> Any:
        try:
            return tp(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {word}, got {text!r}") from None

    return parse


def _default_text(f: dataclasses.Field, meta: _Option) -> str | None:
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        value = f.default
    if value is None:
        return meta.none
    if isinstance(value, bool):
        return None if value is False else "on"
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def add_arguments(parser: argparse.ArgumentParser, cls: Any) -> None:
    """Add a flag for every option of the dataclass ``cls`` (but ``cli=False`` ones).

    Flags are ``--name-with-dashes`` unless declared otherwise; a flag left out is absent from
    the parsed namespace (``argparse.SUPPRESS``), so that only the options given on the command
    line override a config file. Their help ends with the declared default. Booleans are
    switches (``--name``; ``--no-name`` too where the default is true); lists take ``nargs``
    values (one per repeated flag with ``append``); choices are checked by argparse. Values
    are validated against the declared constraints by :func:`from_mapping`, not here.
    """
    for f, annotation in option_fields(cls):
        meta = _meta(f)
        if not meta.cli:
            continue
        tp, constraints = _split(annotation)
        if _is_union(tp):  # X | None: None cannot be given on the command line
            (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
            tp, constraints = _split(tp)
        help_text = meta.help
        default = _default_text(f, meta)
        if default is not None:
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": argparse.SUPPRESS,
            "help": help_text.replace("%", "%%"),
        }
        if tp is bool:
            default_on = f.default is True
            kwargs["action"] = argparse.BooleanOptionalAction if default_on else "store_true"
        else:
            if typing.get_origin(tp) is list:
                (item,) = typing.get_args(tp)
                tp, constraints = _split(item)
                if meta.append:
                    kwargs["action"] = "append"
                else:
                    kwargs["nargs"] = meta.nargs or "+"
            kwargs["type"] = _parse(tp)
            for c in constraints:
                if isinstance(c, OneOf):
                    kwargs["choices"] = list(c.values)
            if meta.metavar is not None:
                kwargs["metavar"] = meta.metavar
        parser.add_argument(meta.flag or "--" + _label(f.name), **kwargs)


# ------------------------------------------------------------------------------ factories


def _signature_hints(factory: Callable[..., Any]) -> dict[str, Any]:
    if dataclasses.is_dataclass(factory):
        return typing.get_type_hints(factory, include_extras=True)
    target = factory.__init__ if inspect.isclass(factory) else factory  # type: ignore[misc]
    try:
        return typing.get_type_hints(target, include_extras=True)
    except TypeError:  # a slot wrapper such as object.__init__: nothing declared
        return {}


def check_arguments(factory: Callable[..., Any], params: Mapping[str, Any], owner: str) -> None:
    """Raise ConfigError unless ``factory(**params)`` passes only keyword parameters it declares,
    each of the declared type and within the constraints ``Annotated`` on its annotation.

    ``owner`` names the factory in messages: ``"strategy qbc: members must be an integer >= 2,
    got 1"``. Parameters without annotation take anything."""
    parameters = inspect.signature(factory).parameters
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = sorted(n for n, p in parameters.items() if p.kind in kinds)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = sorted(set(params) - set(accepted))
    if unknown and not takes_any:
        raise ConfigError(
            f"{owner} does not take {', '.join(unknown)}; it takes: "
            f"{', '.join(accepted) or 'no parameters'}"
        )
    hints = _signature_hints(factory)
    for name, value in params.items():
        check_value(value, hints.get(name, Any), f"{owner}: {name}")
