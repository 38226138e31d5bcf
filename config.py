"""One typed config tree: YAML files, `extends:`, presets by name, `--set a.b=c` overrides.

Every stage declares its section as pydantic models built on `Section` (unknown keys are
rejected, every field carries a one-line description). `load_config` turns a YAML file
plus overrides into a validated model, and every mistake into one `UserError` line that
names the dotted field and where its value came from (the file or the `--set`).
"""

from __future__ import annotations

import copy
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ember.errors import UserError

PRESET_ROOT = Path(__file__).resolve().parent / "configs"


class Section(BaseModel):
    """Base of every config section: strict about keys, described field by field."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def preset_dir(kind: str) -> dict:
    """Field marker: a string value for this section names a preset in `configs/<kind>/`."""
    return {"presets": kind}


# ---------------------------------------------------------------- reading YAML


def read_yaml(path: Path) -> dict:
    """Read one YAML mapping, turning a missing file or bad YAML into a UserError."""
    if not path.is_file():
        raise UserError("config file not found", str(path))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"malformed YAML: {problem}", where) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"a config file must hold a mapping, got {type(data).__name__}", str(path))
    return data


def find_preset(name: str, kind: str, relative_to: Path | None = None) -> Path:
    """Resolve a preset name (`llama-5m`) or a YAML path to a file."""
    candidates = []
    if name.endswith((".yaml", ".yml")) or "/" in name:
        p = Path(name)
        candidates += [p] if p.is_absolute() else [Path.cwd() / p] + ([relative_to / p] if relative_to else [])
    else:
        candidates.append(PRESET_ROOT / kind / f"{name}.yaml")
        if relative_to:
            candidates.append(relative_to / f"{name}.yaml")
    for c in candidates:
        if c.is_file():
            return c
    known = sorted(p.stem for p in (PRESET_ROOT / kind).glob("*.yaml"))
    hint = difflib.get_close_matches(name, known, n=1)
    msg = f"unknown {kind} preset '{name}'" + (f", did you mean '{hint[0]}'?" if hint else "")
    raise UserError(msg, f"known: {', '.join(known)}" if known else str(PRESET_ROOT / kind))


def deep_merge(base: dict, top: dict) -> dict:
    """`top` wins; nested mappings merge key by key."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def record_origins(data: Any, label: str, origins: dict[str, str], prefix: str = "") -> None:
    """Remember which file or `--set` gave each dotted key, for error messages."""
    if prefix:
        origins[prefix] = label
    if isinstance(data, dict):
        for k, v in data.items():
            record_origins(v, label, origins, f"{prefix}.{k}" if prefix else str(k))


def load_with_extends(path: Path, kind: str, origins: dict[str, str], schema: type[BaseModel] | None = None, seen: tuple = ()) -> dict:
    """Read a file and the chain of files it `extends:`, base first."""
    path = path.resolve()
    if path in seen:
        raise UserError("`extends:` cycle", " -> ".join(str(p) for p in (*seen, path)))
    data = read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        record_origins(data, str(path), origins)
        return data
    if not isinstance(parent, str):
        raise UserError("`extends:` must name one preset or file", str(path))
    base = load_with_extends(find_preset(parent, kind, path.parent), kind, origins, schema, (*seen, path))
    if schema is not None:
        expand_presets_under(base, data, schema)
    record_origins(data, str(path), origins)
    return deep_merge(base, data)


def expand_presets_under(base: dict, top: dict, schema: type[BaseModel]) -> None:
    """Where `top` refines a section that `base` names by preset, load the preset so the two merge.

    A preset name in `top` still replaces the base section whole.
    """
    for key, value in top.items():
        if not isinstance(value, dict):
            continue
        kind = _preset_kind(schema, key)
        if kind and isinstance(base.get(key), str):
            base[key] = load_with_extends(find_preset(base[key], kind), kind, {}, _section_class(schema, key))
        sub = _section_class(schema, key)
        if sub is not None and isinstance(base.get(key), dict):
            expand_presets_under(base[key], value, sub)


# ---------------------------------------------------------------- schema walking


def _unwrap(annotation: Any) -> Any:
    """The BaseModel class inside `X | None` or `Optional[X]`, else the annotation."""
    for arg in typing.get_args(annotation) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return annotation


def _section_class(schema: type[BaseModel], name: str) -> type[BaseModel] | None:
    field = schema.model_fields.get(name)
    if field is None:
        return None
    ann = _unwrap(field.annotation)
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _preset_kind(schema: type[BaseModel], name: str) -> str | None:
    field = schema.model_fields.get(name)
    extra = field.json_schema_extra if field is not None else None
    return extra.get("presets") if isinstance(extra, dict) else None


def resolve_presets(data: dict, schema: type[BaseModel], origins: dict[str, str], prefix: str = "") -> dict:
    """Replace a string given for a preset-able section by the preset's contents."""
    for name, value in list(data.items()):
        kind = _preset_kind(schema, name)
        dotted = f"{prefix}{name}"
        if kind and isinstance(value, str):
            path = find_preset(value, kind)
            data[name] = load_with_extends(path, kind, {}, _section_class(schema, name))
            record_origins(data[name], f"preset {value}", origins, dotted)
        sub = _section_class(schema, name)
        if sub is not None and isinstance(data[name], dict):
            resolve_presets(data[name], sub, origins, dotted + ".")
    return data


def check_key_path(schema: type[BaseModel], dotted: str, where: str) -> None:
    """Reject a `--set` path that names no field, with a suggestion."""
    cls: Any = schema
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if cls is Any or typing.get_origin(cls) is dict:
            return  # inside a free-form mapping (e.g. a DeepSpeed dict): anything goes
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            raise UserError(f"unknown config key '{dotted}'", where)
        if part not in cls.model_fields:
            raise UserError(unknown_key_message(".".join(parts[: i + 1]), part, cls), where)
        cls = _unwrap(cls.model_fields[part].annotation)


def unknown_key_message(dotted: str, key: str, cls: type[BaseModel]) -> str:
    hint = difflib.get_close_matches(key, list(cls.model_fields), n=1, cutoff=0.6)
    prefix = dotted.rsplit(".", 1)[0] + "." if "." in dotted else ""
    return f"unknown config key '{dotted}'" + (f", did you mean '{prefix}{hint[0]}'?" if hint else "")


# ---------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b.c=value` -> ("a.b.c", typed value). The value is read as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise UserError(f"--set expects KEY=VALUE, got '{text}'", "--set")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise UserError(f"--set has an empty key in '{text}'", "--set")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise UserError(f"cannot parse the value of {key}: '{raw}'", f"--set {text}") from None
    return key, value


def apply_override(data: dict, schema: type[BaseModel], key: str, value: Any, origins: dict[str, str], text: str) -> None:
    where = f"--set {text}"
    check_key_path(schema, key, where)
    node, cls = data, schema
    parts = key.split(".")
    for part in parts[:-1]:
        kind = _preset_kind(cls, part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        child = node.get(part)
        if kind and isinstance(child, str):  # overriding inside a preset: load it first
            child = load_with_extends(find_preset(child, kind), kind, {}, _unwrap(cls.model_fields[part].annotation))
            record_origins(child, f"preset {node[part]}", origins, part)
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise UserError(f"cannot set '{key}': '{part}' holds a {type(child).__name__}, not a section", where)
        node[part] = child
        node = child
        cls = _unwrap(cls.model_fields[part].annotation) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
    node[parts[-1]] = value
    record_origins(value, where, origins, key)


# ---------------------------------------------------------------- validation errors

_TYPE_WORDS = {
    "int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
    "dict": "a mapping", "model": "a mapping", "list": "a list", "path": "a path",
}


def describe_error(err: dict, schema: type[BaseModel]) -> str:
    """One readable sentence for a pydantic error dict."""
    loc = [str(p) for p in err["loc"]]
    dotted = ".".join(loc)
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        parent_cls: Any = schema
        for part in err["loc"][:-1]:
            if isinstance(parent_cls, type) and issubclass(parent_cls, BaseModel) and isinstance(part, str):
                parent_cls = _unwrap(parent_cls.model_fields[part].annotation)
            else:
                parent_cls = None
        if isinstance(parent_cls, type) and issubclass(parent_cls, BaseModel):
            return unknown_key_message(dotted, loc[-1], parent_cls)
        return f"unknown config key '{dotted}'"
    if kind == "missing":
        return f"{dotted}: required field is missing"
    if kind in ("enum", "literal_error"):
        expected = err.get("ctx", {}).get("expected", "")
        return f"{dotted}: {value!r} is not one of {expected}"
    for word, phrase in _TYPE_WORDS.items():
        if kind.startswith(word + "_") or kind == word + "_type":
            if kind.endswith(("_type", "_parsing", "_from_float", "_type_error")):
                return f"{dotted}: expected {phrase}, got {value!r}"
    if kind in ("too_short", "too_long"):
        ctx = err.get("ctx", {})
        bound = f"at least {ctx.get('min_length')}" if kind == "too_short" else f"at most {ctx.get('max_length')}"
        return f"{dotted}: needs {bound} item(s), got {ctx.get('actual_length')}"
    if kind.startswith(("greater_than", "less_than", "multiple_of")):
        return f"{dotted}: {value!r} " + err["msg"].replace("Input should", "must").replace("Input", "it")
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return f"{dotted}: {msg}" if dotted else msg


def where_of(err: dict, origins: dict[str, str], default: str) -> str:
    parts = [str(p) for p in err["loc"]]
    # A cross-field check fails on the section; blame the field it names if a --set gave it.
    for key, src in origins.items():
        if src.startswith("--set") and key.startswith(".".join(parts)) and key.rsplit(".", 1)[-1] in err["msg"]:
            return src
    for n in range(len(parts), 0, -1):
        src = origins.get(".".join(parts[:n]))
        if src:
            return src
    return default


# ---------------------------------------------------------------- entry point

S = typing.TypeVar("S", bound=BaseModel)


def load_config(path: str | Path, schema: type[S], overrides: list[str] = (), kind: str = "pretrain") -> S:
    """Read `path` (following `extends:`), resolve presets, apply `--set` overrides, validate.

    `kind` is the preset folder that bare names in `extends:` refer to.
    """
    path = Path(path)
    origins: dict[str, str] = {}
    data = load_with_extends(find_preset(str(path), kind) if not path.suffix else path, kind, origins, schema)
    data = resolve_presets(data, schema, origins)
    for text in overrides:
        key, value = parse_override(text)
        apply_override(data, schema, key, value, origins, text)
    data = resolve_presets(data, schema, origins)
    return validate(data, schema, origins, default_where=str(path))


def validate(data: dict, schema: type[S], origins: dict[str, str] | None = None, default_where: str = "config") -> S:
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        # Unknown keys first: a typo often explains the other errors (a "missing" field).
        first = min(e.errors(), key=lambda err: err["type"] != "extra_forbidden")
        raise UserError(describe_error(first, schema), where_of(first, origins or {}, default_where)) from None


def to_yaml(cfg: BaseModel) -> str:
    """The resolved config as YAML, in field order; what `config show` prints and runs save."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=False)


def describe_fields(schema: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, description) for every field, for `ember config fields`."""
    rows = []
    for name, field in schema.model_fields.items():
        dotted = f"{prefix}{name}"
        sub = _unwrap(field.annotation)
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            rows.append((dotted, "section", "", field.description or ""))
            rows += describe_fields(sub, dotted + ".")
            continue
        type_name = getattr(field.annotation, "__name__", None) or str(field.annotation).replace("typing.", "")
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        rows.append((dotted, type_name, default, field.description or ""))
    return rows
