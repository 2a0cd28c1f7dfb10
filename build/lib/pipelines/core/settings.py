"""Settings as code: sections of typed keys, filled from YAML and `section.key=value` overrides, each value coerced
to its field's type, and checks whose errors name the key, the bad value and what is allowed. Every stage's config
(`pipelines.train.config`, `pipelines.batch.config`) is built from these."""

from __future__ import annotations

import json
import re
import types
import typing
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import yaml

from pipelines.core.errors import ConfigError


def _parts(typ: Any) -> tuple[Any, bool]:
    """(the type, whether None is allowed) of an annotation such as `int`, `float | None` or `list[int]`."""
    args = typing.get_args(typ)
    if typing.get_origin(typ) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"a setting must have one type (or it and None); got {typ}")
        return rest[0], True
    return typ, False


def type_name(typ: Any) -> str:
    """How errors and the schema name a setting's type: int, float | None, list[int]."""
    base, optional = _parts(typ)
    name = str(base) if typing.get_origin(base) is list else base.__name__
    return f"{name} | None" if optional else name


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise TypeError


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise TypeError  # YAML's true is not 1, and 2.5 is not 2
    return int(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError
    return float(value)


def _list_of(item):
    def to_list(value: Any) -> list:
        if isinstance(value, str):  # a `--set` list written inline: [1, 2]
            value = yaml.safe_load(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise TypeError
        return [item(v) for v in value]

    return to_list


# the types a setting may have, each with how a YAML or `--set` value becomes one
COERCE = {
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: str,
    list[int]: _list_of(_to_int),
    list[float]: _list_of(_to_float),
}


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Coerce a YAML/CLI value to the field's type (a real annotation), or raise ConfigError naming the key."""
    base, optional = _parts(typ)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: null is not allowed (expected {type_name(typ)})")
    try:
        return COERCE[base](value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {value!r} is not a valid {type_name(typ)}") from None


def _parse_value(key: str, text: str) -> Any:
    """A `--set` value as YAML (so lists, numbers, booleans and null read as they do in the config files)."""
    try:
        return yaml.safe_load(text) if text else text
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: {text!r} is not a valid value ({str(err).splitlines()[0]})") from None


def _set(obj, section: str, key: str, value: Any) -> None:
    """Set one field of a config dataclass, coerced to its type; raise ConfigError naming the key."""
    hints = field_types(type(obj))
    if key not in hints:
        raise ConfigError(f"unknown key {section}.{key}; allowed in {section}: {', '.join(hints)}")
    setattr(obj, key, _coerce(f"{section}.{key}", value, hints[key]))


def field_types(cls) -> dict[str, Any]:
    """A config dataclass's fields and their types, evaluated (the modules use postponed annotations)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _apply(cfg, section: str, key: str, value: Any) -> None:
    sections = {f.name: f for f in fields(cfg)}
    if section not in sections:
        raise ConfigError(f"unknown section {section!r}; allowed: {', '.join(sections)}")
    _set(getattr(cfg, section), section, key, value)


def apply_overrides(obj, section: str, items: list[str]) -> None:
    """Apply `section.key=value` (or `key=value`) items to one config dataclass (a job's `sample` or `eval`
    section), with the same parsing, coercion and errors as `load_config`."""
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"override {item!r} must look like {section}.key=value")
        key = key.removeprefix(f"{section}.")
        _set(obj, section, key, _parse_value(f"{section}.{key}", value))


def load_sections(cfg, path: str | Path | None, overrides: list[str] | None = None):
    """Fill a config of sections (a dataclass whose fields are section dataclasses) from a YAML file (or leave the
    defaults when path is None), then apply `section.key=value` overrides; returns cfg. Validation is the caller's."""
    sections = [f.name for f in fields(cfg)]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            raw = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not a YAML file ({str(err).splitlines()[0]})") from None
        # an empty file is not "all defaults": with the default run name it would continue whatever run has it
        if raw is None or raw == {}:
            raise ConfigError(
                f"{path} is empty; a config maps sections ({', '.join(sections)}) to keys. "
                "Omit --config to use the defaults"
            )
        if not isinstance(raw, dict):
            raise ConfigError(
                f"{path}: top level must be a mapping of sections ({', '.join(sections)}); got a {type(raw).__name__}"
            )
        for section, values in raw.items():
            if section not in sections:
                raise ConfigError(
                    f"{path}: {section!r} is not a section; allowed: {', '.join(sections)} "
                    "(every key goes under its section, e.g. 'train:' then '  steps: 500')"
                )
            if values is None:
                raise ConfigError(f"{path}: section {section!r} is empty; give its keys or remove it")
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping")
            for key, value in values.items():
                _apply(cfg, section, key, value)
    for item in overrides or []:
        lhs, eq, rhs = item.partition("=")
        if not eq or "." not in lhs:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        section, key = lhs.split(".", 1)
        _apply(cfg, section, key, _parse_value(lhs, rhs))
    return cfg


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def autocast_dtype(precision: str, device_type: str):
    """The autocast dtype of a precision setting on a device ("cpu" or "cuda"); None: plain fp32."""
    import torch

    if precision == "auto":
        return torch.bfloat16 if device_type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} is not allowed; {allowed}")


RAY_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def check_resource_name(name: str, key: str) -> None:
    """A node label (a Ray custom resource name): "" (none), or letters, digits, `_`, `-`, `.` and `:`, not one of
    Ray's own resources (asking a sliver of those would take a share, not mark a node)."""
    check(
        not name or (re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.:-]*", name) is not None and name not in RAY_RESOURCES),
        key,
        name,
        "must be empty (any node) or a custom resource name that nodes are started with (ray start "
        f"--resources='{{\"NAME\": 1}}'): letters, digits, _ . : -, not one of {', '.join(RAY_RESOURCES)}",
    )


def dump(cfg) -> str:
    """A config of sections as indented JSON (what `--dry-run` prints)."""
    return json.dumps(asdict(cfg), indent=1)


def _comments(cls) -> dict[str, str]:
    """The trailing comment of each field line in a dataclass's source: its documentation."""
    import inspect
    import io
    import tokenize

    out, line_field = {}, {}
    source = inspect.getsource(cls)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.start[0] not in line_field:
            line_field[tok.start[0]] = tok.string
        elif tok.type == tokenize.COMMENT and tok.start[0] in line_field:
            out[line_field[tok.start[0]]] = tok.string.lstrip("# ").strip()
    return out


def _field_schema(typ: Any, default: Any) -> dict:
    """JSON Schema of one field from its type: bool, int, float, str, list[int], list[float], each maybe `| None`."""
    base, optional = _parts(typ)
    schemas: dict[Any, dict[str, Any]] = {
        bool: {"type": "boolean"},
        int: {"type": "integer"},
        float: {"type": "number"},
        str: {"type": "string"},
        list[int]: {"type": "array", "items": {"type": "integer"}},
        list[float]: {"type": "array", "items": {"type": "number"}},
    }
    schema = schemas[base]
    if optional:
        schema = {"anyOf": [schema, {"type": "null"}]}
    return {**schema, "default": default}


def json_schema(cfg, title: str, choices: dict[str, list] | None = None) -> dict:
    """A JSON Schema (draft 2020-12) of a config of sections, for editors that validate YAML: one object per
    section, each key with its type, default, description (the field's comment) and, from `choices`
    ("section.key" -> allowed values), an enum. Unknown sections and keys are refused, as `load_sections` does."""
    choices = choices or {}
    sections = {}
    for section in fields(cfg):
        obj = getattr(cfg, section.name)
        notes = _comments(type(obj))
        props = {}
        for name, typ in field_types(type(obj)).items():
            prop = _field_schema(typ, getattr(obj, name))
            if f"{section.name}.{name}" in choices:
                prop["enum"] = list(choices[f"{section.name}.{name}"])
            if name in notes:
                prop["description"] = notes[name]
            props[name] = prop
        doc = (type(obj).__doc__ or "").strip()
        sections[section.name] = {
            "type": "object",
            "additionalProperties": False,
            "properties": props,
            **({"description": doc} if doc and not doc.startswith(type(obj).__name__ + "(") else {}),
        }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": title,
        "type": "object",
        "additionalProperties": False,
        "properties": sections,
    }
