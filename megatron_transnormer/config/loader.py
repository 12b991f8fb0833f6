"""YAML files plus `key=value` overrides, turned into the dataclasses of `schema`.

A config file may name a parent with `base: other.yaml` (relative to itself); the
child's values are merged over the parent's. Overrides use dotted keys
(`train.steps=20`, `optim.betas=[0.9,0.95]`) and are parsed as YAML scalars.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml

from .schema import Config, ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_CONFIG = "alm/tiny_cpu"


def available_configs() -> list[str]:
    """Names of the bundled configs, e.g. 'alm/tiny_cpu'."""
    return sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a bundled config ('alm/tiny_cpu', 'tiny_cpu')."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidates = [CONFIG_DIR / f"{name_or_path}.yaml"] + sorted(CONFIG_DIR.rglob(f"{name_or_path}.yaml"))
    for c in candidates:
        if c.exists():
            return c
    raise ConfigError(f"config {name_or_path!r} not found (a YAML path, or one of: "
                      f"{', '.join(available_configs())})")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        text = path.read_text()
    except OSError as e:
        # Only a `base:` can name a file that is not there (resolve_config_path checked the top one).
        named_by = f"base: {path.name!r} in {seen[-1]}" if seen else "config"
        raise ConfigError(f"{path}: cannot read the file ({named_by}): {e.strerror or e}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base: expected the path of a YAML file, got {base!r}")
    parent = _read_yaml((path.parent / base) if not Path(base).is_absolute() else Path(base), seen + (path,))
    return _merge(parent, raw)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _expand_compact(text: str, key: str) -> list[str]:
    items = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, star, count = (part.strip() for part in item.partition("*"))
        if not name or (star and not count.isdigit()):
            raise ConfigError(f"{key}: {item!r} is not NAME or NAME*COUNT (e.g. diag*6,norm*6)")
        items += [name] * (int(count) if star else 1)
    return items


def _coerce(value, tp, key: str):
    """Convert a YAML value to the dataclass field's type, or raise ConfigError naming key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        # A YAML list, or a compact string: comma-separated items, each optionally repeated
        # with *COUNT ("diag*6,norm*6" is six diag then six norm).
        (item_type,) = typing.get_args(tp)
        if isinstance(value, str):
            value = _expand_compact(value, key)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list (or a compact string such as a*2,b*2), got {value!r}")
        return [_coerce(v, item_type, key) for v in value]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "1e-4" as a string; accept it.
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        key, tp, v = prefix + f.name, hints[f.name], values[f.name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a mapping, got {v!r}")
            kwargs[f.name] = _build(tp, v, key + ".")
        else:
            kwargs[f.name] = _coerce(v, tp, key)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def override_keys(cls=Config, prefix: str = "") -> list[tuple[str, str, object]]:
    """(dotted key, type name, default) for every settable field, for --help."""
    out = []
    inst = cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += override_keys(tp, prefix + f.name + ".")
        else:
            out.append((prefix + f.name, getattr(tp, "__name__", str(tp)), getattr(inst, f.name)))
    return out


def load_config(config: str | None = None, overrides: list[str] = ()) -> Config:
    """Read a config (bundled name or YAML path; default tiny_cpu) and apply overrides.

    The result is type-checked but not yet validated: call `validate_config` once the
    world size is known.
    """
    path = resolve_config_path(config or DEFAULT_CONFIG)
    values = _read_yaml(path)
    # A bundled config is named as --config names it (alm/tiny_cpu and blm/tiny_cpu differ).
    bundled = path.resolve().is_relative_to(CONFIG_DIR)
    values.setdefault("name", str(path.resolve().relative_to(CONFIG_DIR).with_suffix("")) if bundled else path.stem)
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
    return _build(Config, values, "")


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(values: dict) -> Config:
    return _build(Config, values, "")
