"""Settings as code: sections of typed keys, filled from YAML and `section.key=value` overrides, each value coerced
to its field's type, and checks whose errors name the key, the bad value and what is allowed. Every stage's config
(`pipelines.train.config`, `pipelines.batch.config`) is built from these."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import yaml

from pipelines.core.errors import ConfigError


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Coerce a YAML/CLI value to the field's type, or raise ConfigError naming the key."""
    t = str(typ)
    if value is None:
        if "None" in t:
            return None
        raise ConfigError(f"{key}: null is not allowed (expected {t})")
    try:
        if t.startswith("list"):
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if isinstance(value, int):
                value = [value]
            if not isinstance(value, list):
                raise TypeError
            return [int(v) for v in value]
        if t.startswith("bool"):
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise TypeError
        if t.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if t.startswith("float"):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {value!r} is not a valid {t}") from None


def _parse_value(key: str, text: str) -> Any:
    """A `--set` value as YAML (so lists, numbers, booleans and null read as they do in the config files)."""
    try:
        return yaml.safe_load(text) if text else text
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: {text!r} is not a valid value ({str(err).splitlines()[0]})") from None


def _set(obj, section: str, key: str, value: Any) -> None:
    """Set one field of a config dataclass, coerced to its type; raise ConfigError naming the key."""
    types = {f.name: f.type for f in fields(obj)}
    if key not in types:
        raise ConfigError(f"unknown key {section}.{key}; allowed in {section}: {', '.join(types)}")
    setattr(obj, key, _coerce(f"{section}.{key}", value, types[key]))


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
            raise ConfigError(f"{path} is empty; a config maps sections ({', '.join(sections)}) to keys. "
                              "Omit --config to use the defaults")
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections ({', '.join(sections)}); "
                              f"got a {type(raw).__name__}")
        for section, values in raw.items():
            if section not in sections:
                raise ConfigError(f"{path}: {section!r} is not a section; allowed: {', '.join(sections)} "
                                  "(every key goes under its section, e.g. 'train:' then '  steps: 500')")
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


def _field_schema(typ: str, default: Any) -> dict:
    """JSON Schema of one field from its annotation: int, float, bool, str, list[int], each maybe `| None`."""
    base = {"int": {"type": "integer"}, "float": {"type": "number"}, "bool": {"type": "boolean"},
            "str": {"type": "string"}, "list[int]": {"type": "array", "items": {"type": "integer"}}}
    parts = [p.strip() for p in typ.split("|")]
    kinds = [base[p] for p in parts if p != "None"]
    if len(kinds) != 1:
        raise TypeError(f"no JSON Schema for the annotation {typ!r}")
    schema = dict(kinds[0])
    if "None" in parts:
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
        for f in fields(obj):
            prop = _field_schema(str(f.type), getattr(obj, f.name))
            if f"{section.name}.{f.name}" in choices:
                prop["enum"] = list(choices[f"{section.name}.{f.name}"])
            if f.name in notes:
                prop["description"] = notes[f.name]
            props[f.name] = prop
        doc = (type(obj).__doc__ or "").strip()
        sections[section.name] = {"type": "object", "additionalProperties": False, "properties": props,
                                  **({"description": doc} if doc and not doc.startswith(type(obj).__name__ + "(")
                                     else {})}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": title, "type": "object",
            "additionalProperties": False, "properties": sections}
