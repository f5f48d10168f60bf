"""Typed configuration trees: YAML recipes -> `@dataclass(kw_only=True)` sections, strictly.

Every stage (data_prep, tokenizer, pretrain) describes its settings as a tree of dataclasses whose
fields carry a docstring (the string literal right after the field). This module turns YAML plus
dotted command-line overrides (`optimizer.lr=1e-4`) into such a tree and refuses anything it does
not understand: unknown keys, wrong types, values outside a `Literal`. Every refusal is a
`ConfigError` whose message is one line naming the dotted key, the value and the fix.

A recipe may start with `extends: other.yaml` (a path relative to the recipe): the other file is
loaded first and this one is deep-merged on top of it, so the LLM-jp-3 family shares one base.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import os
import textwrap
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from kumihimo.core.errors import UserError
from kumihimo.core.files import write_text_atomic  # noqa: F401 - re-exported: configtree.write_text_atomic
from kumihimo.core.recipes import resolve_recipe

EXTENDS_KEY = "extends"


class ConfigError(UserError):
    """A problem a user can fix in a recipe or an override. The message is one line."""


def bad_value(key: str, value: Any, problem: str, fix: str) -> ConfigError:
    """Build the canonical error: `key=value problem; fix`."""
    return ConfigError(f"{key}={value!r} {problem}; {fix}")


def check_file_name(key: str, value: str) -> None:
    """A name that becomes part of file names (sources: `curated/<name>.jsonl`, `<name>_text_document`)."""
    if not value or not all(c.isalnum() or c in "-_." for c in value):
        raise bad_value(key, value, "is not a usable file name", "use letters, digits, '-', '_' or '.'")


# --------------------------------------------------------------------------------------------
# YAML reading and overrides
# --------------------------------------------------------------------------------------------


def read_yaml(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe, resolving `extends:` chains (relative to the file that names them)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass the path of a YAML recipe")
    if path.resolve() in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path.resolve()))
        raise ConfigError(f"extends={str(path)!r} forms a cycle ({chain}); remove one of the extends keys")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}; fix the syntax there") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} holds a {type(data).__name__}, not a mapping of sections; start it with keys"
        )
    parent = data.pop(EXTENDS_KEY, None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise bad_value(EXTENDS_KEY, parent, "is not a path", "write extends: base.yaml")
    base = read_yaml(path.parent / parent, (*_seen, path.resolve()))
    return deep_merge(base, data)


def deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `top` into a copy of `base`; mappings merge key by key, everything else replaces."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; the value is parsed as YAML (`true`, `3e-4`, `[1, 2]`, `null`)."""
    data = deep_merge({}, data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(
                f"override {item!r} is not of the form section.key=value; write e.g. optimizer.lr=1e-4"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise bad_value(key, raw, "is not a valid YAML value", "quote it or fix its syntax") from exc
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            if isinstance(node, list):  # a list of named items (sources): address one by its name
                node = _named_item(node, part, ".".join(parts[:depth]), key)
                continue
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if _is_named_list(child):  # copied, so the recipe's own list is never changed
                child = node[part] = [dict(item) for item in child]
            elif child == [] and depth + 2 < len(parts):  # `a.list.name.key=` with the list empty
                where = ".".join(parts[: depth + 1])
                raise _keyed_item_of_missing_list(
                    where, {parts[depth + 1]: {".".join(parts[depth + 2 :]): value}}
                )
            elif not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise bad_value(
                    key,
                    value,
                    f"reaches into {where}, which is a value, not a section",
                    f"override {where}=... directly",
                )
            node = child
        if isinstance(node, list):
            raise bad_value(
                key,
                value,
                f"names an item of the list {'.'.join(parts[:-1])}, not one of its keys",
                f"override {'.'.join(parts[:-1])}.<key>=... or the whole list",
            )
        node[parts[-1]] = value
    return data


def _is_named_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) and "name" in v for v in value)


def _named_item(items: list[dict[str, Any]], name: str, where: str, key: str) -> dict[str, Any]:
    """The item called `name` of a list of named mappings (`input.sources.ja.paths=...`)."""
    for item in items:
        if str(item.get("name")) == name:
            return item
    names = ", ".join(str(item.get("name")) for item in items)
    raise ConfigError(
        f"override {key!r}: {where} has no item named {name!r} (names: {names}); use one of "
        f"those names or set the whole list with {where}=[...]"
    )


def _has_name_field(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) and any(f.name == "name" for f in dataclasses.fields(tp))


def _keyed_item_of_missing_list(key: str, value: Mapping) -> ConfigError:
    """`score.scorers.edu.min_score=0.9` with no (or an empty) score.scorers list to find `edu` in: the
    dotted key made a mapping, `value`, where a list of named items belongs. Say what to write instead."""
    name, settings = next(iter(value.items()))
    fields = ", ".join(f"{k}: {v}" for k, v in (settings.items() if isinstance(settings, Mapping) else []))
    example = f"{key}='[{{name: {name}{', ' + fields if fields else ''}, ...}}]'"
    dotted = ".".join([key, str(name), *(list(settings)[:1] if isinstance(settings, Mapping) else [])])
    return ConfigError(
        f"{dotted} addresses the item {name!r} of the list {key}, which lists none (a dotted key only "
        f"changes an item the recipe already lists); give the whole list: {example}"
    )


# --------------------------------------------------------------------------------------------
# dict -> dataclass, with types checked
# --------------------------------------------------------------------------------------------


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"mapping to {_type_name(get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return f"{tp.__name__} section"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against the type hint `tp` and convert what YAML left loose (e.g. '3e-4')."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise bad_value(key, value, f"is not a {_type_name(tp)}", f"set a {_type_name(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        raise bad_value(
            key,
            value,
            "is not one of the allowed values",
            f"choose one of {', '.join(repr(c) for c in choices)}",
        )
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise bad_value(key, value, "is not a section", f"write {key}: followed by its keys")
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        (item_tp, *_rest) = get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            if isinstance(value, Mapping) and value and _has_name_field(item_tp):
                raise _keyed_item_of_missing_list(key, value)
            raise bad_value(key, value, "is not a list", f"write a YAML list of {_type_name(item_tp)}")
        items = [_coerce(item_tp, item, f"{key}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        key_tp, val_tp = get_args(tp) or (Any, Any)
        if not isinstance(value, Mapping):
            raise bad_value(key, value, "is not a mapping", f"write a YAML mapping of {_type_name(val_tp)}")
        return {_coerce(key_tp, k, f"{key}.{k}"): _coerce(val_tp, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad_value(key, value, "is not a boolean", "write true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad_value(key, value, "is not an integer", "write a whole number")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise bad_value(key, value, "is not a number", "write a number such as 3.0e-4")
        # One rule for every float field of every tree: NaN passes every range check (all comparisons
        # are false) and Inf passes lower bounds, so both are refused here, before any section's check.
        if not math.isfinite(number):
            raise bad_value(key, value, "is not a finite number", "write a finite number such as 3.0e-4")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad_value(key, value, "is not a string", "write a string (quote it if needed)")
    raise TypeError(f"configtree cannot check fields of type {tp!r} ({key})")  # programming error


def from_dict[T](cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build `cls` from a mapping, rejecting unknown keys and missing required ones."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    renamed = getattr(cls, "RENAMED", {})
    for key in unknown:
        if key in renamed:
            raise ConfigError(f"{_join(prefix, str(key))!r} is an old spelling; {renamed[key]}")
    if unknown:
        key = str(unknown[0])
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = (
            f"did you mean {_join(prefix, close[0])!r}?"
            if close
            else (f"valid keys{' of ' + repr(prefix) if prefix else ''} are: {', '.join(fields)}")
        )
        raise ConfigError(f"unknown key {_join(prefix, key)!r}; {hint}")
    kwargs = {}
    for name, field in fields.items():
        key = _join(prefix, name)
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = _coerce(hints[name], {}, key)
            else:
                raise ConfigError(f"{key} is required and missing; set it in the recipe or as {key}=...")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """A plain-YAML view of a config tree (dataclasses -> dicts, tuples -> lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True, default_flow_style=False)


def validate_tree(obj: Any) -> None:
    """Call `validate()` on every section (children first), then on the root."""
    for field in dataclasses.fields(obj):
        child = getattr(obj, field.name)
        if dataclasses.is_dataclass(child) and not isinstance(child, type):
            validate_tree(child)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()


def load[T](cls: type[T], path: str | os.PathLike | None, overrides: list[str] | None = None) -> T:
    """Recipe file (or none: all defaults) + overrides -> a validated config tree."""
    if path is not None:  # a path, or the name of a recipe shipped for this config's stage
        path = resolve_recipe(path, getattr(cls, "RECIPE_FOLDER", None))
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    config = from_dict(cls, data)
    validate_tree(config)
    return config


def save(config: Any, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (never a half-written file)."""
    write_text_atomic(Path(path), dump_yaml(config))


# --------------------------------------------------------------------------------------------
# Field documentation (for --help and docs)
# --------------------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under each field of a dataclass, by field name."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, type, doc) for every leaf of a config tree, for `--help-config`."""
    rows = []
    hints = get_type_hints(cls)
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        key = _join(prefix, field.name)
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key))
        else:
            rows.append((key, _type_name(tp), docs.get(field.name, "")))
    return rows


def check_documented(cls: type, prefix: str = "") -> list[str]:
    """Dotted keys of fields that lack a docstring (tests require none)."""
    missing = []
    hints = get_type_hints(cls)
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        key = _join(prefix, field.name)
        if field.name not in docs:
            missing.append(key)
        if dataclasses.is_dataclass(hints[field.name]):
            missing.extend(check_documented(hints[field.name], key))
    return missing
