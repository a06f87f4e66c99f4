"""Command-line options derived from the stage configs, so that every option is declared exactly once.

A stage's config is a dataclass whose docstring has an ``Args:`` section (one ``name: text`` entry per field,
continued on deeper-indented lines). `config_options(Config)` turns every leaf field (recursing into nested
config dataclasses such as `SynthConfig.ccd`) into a click option ``--field-name`` whose help is the field's
Args text plus its paper default; `config_from(preset, given)` rebuilds the config from a preset instance and
the options the user actually gave. Field types map to click types: int, float, str, bool (``--x/--no-x``),
``Literal[...]`` (a choice), tuples of ints ("64,128,256") and dicts ("k=v,k=v").
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable, Iterator
from typing import Any, Literal, get_args, get_origin

import click

# "name: text" or "name, other: text" (one text shared by several fields)
_ARG_RE = re.compile(r"^(\s*)(\w+(?:,\s*\w+)*):\s?(.*)$")


def args_doc(cls: type) -> dict[str, str]:
    """{field: help text} from the ``Args:`` section of a class docstring."""
    doc = cls.__doc__ or ""
    out: dict[str, str] = {}
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:") + 1
    except StopIteration:
        return out
    indent, current = None, []
    for line in lines[start:]:
        if not line.strip():
            continue
        m = _ARG_RE.match(line)
        depth = len(line) - len(line.lstrip())
        if m and (indent is None or depth == indent):
            indent, current = depth, [name.strip() for name in m.group(2).split(",")]
            out.update(dict.fromkeys(current, m.group(3).strip()))
        elif current and indent is not None and depth > indent:
            for name in current:
                out[name] += " " + line.strip()
        else:
            break
    return out


def parse_kv(text: str) -> dict[str, Any]:
    """"k=v,k=v" -> {k: v} with int/float/bool values where they parse."""
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise click.BadParameter(f"expected key=value, got {item!r}")
        key, value = (s.strip() for s in item.split("=", 1))
        out[key] = _scalar(value)
    return out


def _scalar(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            continue
    return value


def _parse_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from err


@dataclasses.dataclass(frozen=True)
class _Leaf:
    path: tuple[str, ...]  # field names from the top config down to this field
    annotation: Any
    default: Any
    help: str
    name: str = ""  # the option's own name (a field's metadata "option"), when the field's would mislead

    @property
    def option(self) -> str:
        return self.name or "--" + self.path[-1].replace("_", "-")

    @property
    def dest(self) -> str:
        return "cfg__" + "__".join(self.path)


def _leaves(cls: type, instance: Any, prefix: tuple[str, ...] = ()) -> Iterator[_Leaf]:
    hints = typing.get_type_hints(cls)
    docs = args_doc(cls)
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(type(value), value, prefix + (f.name,))
        else:
            yield _Leaf(prefix + (f.name,), hints[f.name], value, docs.get(f.name, ""), f.metadata.get("option", ""))


def _click_type(annotation: Any) -> tuple[Any, Callable[[Any], Any] | None]:
    """(click type, converter of the parsed value) for a field annotation."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    origin = get_origin(annotation)
    if origin is Literal:
        return click.Choice([str(a) for a in get_args(annotation)]), None
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        return _click_type(args[0]) if len(args) == 1 else (str, None)
    if annotation in (int, float, str, bool):
        return annotation, None
    if origin is tuple or annotation is tuple:
        return str, _parse_ints
    if origin is dict or annotation is dict:
        return str, parse_kv
    return str, None


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "none"
    return str(value)


def config_options(cls: type, *, exclude: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorator adding one click option per leaf field of config class `cls` (default: not given); `exclude`
    names fields by their dotted path (e.g. "datafree.seed") that the command sets itself."""
    leaves = [leaf for leaf in _leaves(cls, cls()) if ".".join(leaf.path) not in exclude]
    names = [leaf.option for leaf in leaves]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ValueError(f"{cls.__name__}: options {clash} are declared twice")

    def decorate(fn: Callable) -> Callable:
        for leaf in reversed(leaves):
            ctype, _ = _click_type(leaf.annotation)
            shown = "" if leaf.default is None else f" [paper: {_shown(leaf.default)}]"
            help_text = (leaf.help + shown).strip()
            if ctype is bool:
                flag = leaf.option
                fn = click.option(f"{flag}/--no-{flag[2:]}", leaf.dest, default=None, help=help_text)(fn)
            else:
                fn = click.option(leaf.option, leaf.dest, type=ctype, default=None, help=help_text)(fn)
        return fn

    return decorate


def given_options(kwargs: dict[str, Any]) -> dict[tuple[str, ...], Any]:
    """Pop the config options out of a command's kwargs: {field path: value} for those actually given."""
    given = {}
    for dest in [k for k in kwargs if k.startswith("cfg__")]:
        value = kwargs.pop(dest)
        if value is not None:
            given[tuple(dest[len("cfg__") :].split("__"))] = value
    return given


def object_fields(value: Any, where: str, allowed: tuple[str, ...]) -> dict:
    """`value` as a JSON object whose keys are all `allowed`; else one ValueError naming `where` and the field."""
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected an object, got {type(value).__name__}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(allowed)})")
    return value


def apply_overrides(base: Any, overrides: dict, where: str = "") -> Any:
    """`base` (a config dataclass) with `overrides` replaced, nested dataclasses by nested objects, JSON lists as
    tuples: the one way a config is changed, from command-line options (`config_from`) and from JSON configs.
    A bad value is one ValueError, prefixed with `where` (the JSON path) when given."""
    names = [f.name for f in dataclasses.fields(base)]
    changes = {}
    for key, value in object_fields(overrides, where or type(base).__name__, tuple(names)).items():
        current = getattr(base, key)
        if dataclasses.is_dataclass(current):
            changes[key] = apply_overrides(current, value, f"{where}.{key}" if where else "")
        else:
            changes[key] = tuple(value) if isinstance(current, tuple) and isinstance(value, list) else value
    try:
        return dataclasses.replace(base, **changes)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: {err}" if where else str(err)) from err


def config_from(base: Any, given: dict[tuple[str, ...], Any]) -> Any:
    """`base` (a preset's config instance) with the given option values replaced, nested configs included: the
    option strings converted by each field's type, then `apply_overrides`; a bad value is a usage error."""
    nested: dict[str, Any] = {}
    for path, value in given.items():
        node, owner = nested, base
        for part in path[:-1]:
            node, owner = node.setdefault(part, {}), getattr(owner, part)
        _, convert = _click_type(typing.get_type_hints(type(owner))[path[-1]])
        node[path[-1]] = convert(value) if convert and isinstance(value, str) else value
    try:
        return apply_overrides(base, nested)
    except ValueError as err:
        raise click.UsageError(str(err)) from err


weights_key_option = click.option(
    "--weights-key", help="The entry of an official .pth that holds the weights (e.g. params, params_ema, "
    "model/state_dict); default: the first present of params_ema, params, state_dict, model, net (BasicSR's "
    "EMA weights first). The log names the entry taken.")
