"""One check for options: their type annotations, validated by pydantic, strictly (a value is never
converted: "2" is not an int, True is not a number).

`StoreConfig` checks its fields with `check_values`; a public constructor or call checks its
arguments with `@checked`, from its signature:

    @checked
    def __init__(self, model: str | Path, workers: Positive = 1, ...): ...

A wrong type raises TypeError, a value out of bounds ValueError; both name the option, the value
and what was expected ("Cluster: workers must be > 0, got 0"). Arguments annotated with a
container or a callable (`Iterable[int]`, `Mapping[...]`) are left to the function.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from annotated_types import Ge, Gt, Le, Lt
from pydantic import ConfigDict, InstanceOf, ValidationError, create_model

Positive = Annotated[int, Gt(0)]
NonNegative = Annotated[int, Ge(0)]
PositiveNumber = Annotated[float, Gt(0)]
NonNegativeNumber = Annotated[float, Ge(0)]
PositiveFraction = Annotated[float, Gt(0), Le(1)]
PathOrNone = str | Path | None

F = TypeVar("F", bound=Callable[..., Any])
SCALARS = (int, float, str, bool, bytes)
UNIONS = (typing.Union, types.UnionType)
BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "literal_error"}


def schema(name: str, hints: Mapping[str, Any]):
    """The strict pydantic model of options with these type hints."""
    fields = {option: (_strict(hint), ...) for option, hint in hints.items()}
    return create_model(name, __config__=ConfigDict(strict=True, arbitrary_types_allowed=True), **fields)


def check_values(model, hints: Mapping[str, Any], values: Mapping[str, Any], prefix: str) -> None:
    """Validate `values` with `model` (from `schema`); the first bad option raises, named `prefix + option`."""
    try:
        model.model_validate(values)
    except ValidationError as error:
        name = error.errors()[0]["loc"][0]
        kinds = {e["type"] for e in error.errors() if e["loc"][0] == name}
        value = values[name]
        if kinds & BOUND_ERRORS:
            raise ValueError(f"{prefix}{name} must be {bounds(hints[name])}, got {value!r}") from None
        raise TypeError(f"{prefix}{name} must be {type_name(hints[name])}, "
                        f"got {value!r} ({type(value).__name__})") from None


def checked(function: F) -> F:
    """Check the annotated arguments of `function` (scalars, bounds, literals, classes and unions of
    them) at each call, before its body runs; for a generator function, when it is called."""
    signature = inspect.signature(function)
    hints = {name: hint for name, hint in typing.get_type_hints(function, include_extras=True).items()
             if name in signature.parameters and _checkable(hint)}
    model = schema(function.__qualname__.replace(".", "_"), hints)
    where = function.__qualname__.removesuffix(".__init__") + ": "

    @functools.wraps(function)
    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        check_values(model, hints, {name: bound.arguments[name] for name in hints}, where)
        return function(*args, **kwargs)

    return call  # type: ignore[return-value]


def from_env(hints: Mapping[str, Any], env: Mapping[str, str], prefix: str = "TIERED_") -> dict[str, Any]:
    """Options from <prefix><OPTION> variables (TIERED_WORKERS=2), for the options of `hints`: text
    for text options, an empty text for None where a path may be None, YAML for the rest (a scalar, or
    a mapping); the values are checked where they are used."""
    values = {}
    for name, hint in hints.items():
        variable = prefix + name.upper()
        if variable not in env:
            continue
        text = env[variable]
        if hint == PathOrNone:
            values[name] = text or None
        elif type_name(hint) == "str":
            values[name] = text
        else:
            try:
                values[name] = yaml.safe_load(text) if text.strip() else None
            except yaml.YAMLError:
                raise ValueError(f"{variable}={text!r} must be {type_name(hint)}") from None
    return values


def read_yaml(path: Path) -> Any:
    """The content of the YAML file at `path`; ValueError, one line, if it is not YAML."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from None


def from_file(mapping: Any, names: Iterable[str], where: str) -> dict[str, Any]:
    """A file's mapping of options, all of them among `names` (ValueError naming the others)."""
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise ValueError(f"{where}: expected a mapping of options, got {type(mapping).__name__}")  # noqa: TRY004
    unknown = sorted(set(map(str, mapping)) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown options {unknown}; valid options: {sorted(names)}")
    return dict(mapping)


def arguments(function: Callable[..., Any], names: Iterable[str]) -> dict[str, Any]:
    """The type hints of the arguments `names` of `function`, for `from_env`."""
    hints = typing.get_type_hints(function, include_extras=True)
    return {name: hints[name] for name in names}


def check_some(function: Callable[..., Any], values: Mapping[str, Any]) -> None:
    """Check some of the arguments of a `@checked` function as a call would (before the call)."""
    hints = arguments(function, values)
    check_values(schema("Arguments", hints), hints, values, function.__qualname__.removesuffix(".__init__") + ": ")


def type_name(hint: Any) -> str:
    """'int', 'int or None', 'a path or None', ... for an option's type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return type_name(args[0])
    if origin is Literal:
        return "str"
    if hint == PathOrNone:
        return "a path or None"
    if args and type(None) in args:
        return " or ".join(type_name(a) for a in args if a is not type(None)) + " or None"
    if hint == str | Path:
        return "a path"
    if origin in UNIONS:
        return " or ".join(type_name(a) for a in args)
    if origin is not None:
        return origin.__name__
    return {float: "a number"}.get(hint, getattr(hint, "__name__", str(hint)))


def bounds(hint: Any) -> str:
    """'> 0', 'in [1, 22]', "one of ['through', 'back']", ... for an option's allowed values."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        return f"one of {list(args)}"
    if typing.get_origin(hint) is not Annotated:
        inner = [a for a in args if a is not type(None)]
        inner_bounds = bounds(inner[0]) if len(inner) == 1 else ""
        return f"{inner_bounds} (or None)" if inner_bounds and type(None) in args else inner_bounds
    low = high = None
    for constraint in args[1:]:
        if isinstance(constraint, Gt):
            low = f"> {constraint.gt}"
        elif isinstance(constraint, Ge):
            low = f">= {constraint.ge}"
        elif isinstance(constraint, Lt):
            high = f"< {constraint.lt}"
        elif isinstance(constraint, Le):
            high = f"<= {constraint.le}"
    if low and high:
        opening = "[" if low.startswith(">=") else "("
        closing = "]" if high.startswith("<=") else ")"
        return f"in {opening}{low.split()[-1]}, {high.split()[-1]}{closing}"
    return low or high or ""


def _checkable(hint: Any) -> bool:
    """Whether `check_values` can check values of this type without consuming or converting them."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return _checkable(args[0])
    if origin is Literal or hint is type(None) or hint is Any:
        return True
    if origin in UNIONS:
        return all(_checkable(a) for a in args)
    return origin is None and isinstance(hint, type)


def _strict(hint: Any) -> Any:
    """`hint` with every class but the scalars checked by isinstance only (a dataclass such as
    StoreConfig is not validated field by field again, nor built from a mapping)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return Annotated[(_strict(args[0]), *args[1:])]
    if origin in UNIONS:
        return functools.reduce(lambda a, b: a | b, (_strict(a) for a in args))
    if isinstance(hint, type) and hint not in SCALARS and hint is not type(None) and origin is None:
        return InstanceOf[hint]
    return hint
