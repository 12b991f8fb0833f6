"""YAML files plus `key=value` overrides, turned into the dataclasses of `schema`.

A config file may name a parent with `base: other.yaml` (relative to itself); the
child's values are merged over the parent's. Overrides use dotted keys
(`train.steps=20`, `optim.betas=[0.9,0.95]`) and are parsed as YAML scalars.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import tokenize
import types
import typing
from functools import lru_cache
from pathlib import Path

import yaml

from . import schema
from .schema import Config, ConfigError


class YamlBool(str):
    """A YAML 1.1 boolean word (true/false, yes/no, on/off, y/n), kept as written: a str key
    takes the text ("off" stays "off"), a bool key its truth value (`truth`)."""
    truth: bool


class _Loader(yaml.SafeLoader):
    """safe_load, except that boolean words are `YamlBool`s, resolved by the key's type."""


def _construct_bool(loader, node):
    word = YamlBool(node.value)
    word.truth = loader.construct_yaml_bool(node)
    return word


_Loader.add_constructor("tag:yaml.org,2002:bool", _construct_bool)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)

# The bundled configs: an installed wheel carries them as megatron_transnormer/configs; a source
# checkout (an editable install too) keeps them in the top-level configs/ beside the package.
_PACKAGE = Path(__file__).resolve().parents[1]
CONFIG_DIR = _PACKAGE / "configs" if (_PACKAGE / "configs").is_dir() else _PACKAGE.parent / "configs"
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
        raw = _yaml(text) or {}
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
        if isinstance(value, YamlBool):
            return value.truth
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
        return str.__str__(value) if isinstance(value, str) else str(value)  # a YamlBool as plain text
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}{_did_you_mean(prefix + unknown[0])} "
                          f"(known in {prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))})")
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
        value = _yaml(raw) if raw != "" else ""
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


def _did_you_mean(key: str) -> str:
    """'; did you mean X?' for the settable key closest to `key` (a typo, or the right name in
    the wrong section: train.lr -> optim.lr), or ''."""
    keys = [k for k, _, _ in override_keys()]
    last = key.rsplit(".", 1)[-1]
    close = ([k for k in keys if k.rsplit(".", 1)[-1] == last and k != key][:1]  # the name in another section
             or difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
             or [k for k in keys if k.rsplit(".", 1)[-1] in difflib.get_close_matches(
                 last, [x.rsplit(".", 1)[-1] for x in keys], n=1, cutoff=0.75)][:1])
    return f"; did you mean {close[0]}?" if close else ""


def option_habit(argv: list[str]) -> str | None:
    """What to write instead of an option-style override (`--train.steps=20`, `--steps 20`):
    overrides are `key=value` words; None when argv holds none."""
    keys = [k for k, _, _ in override_keys()]
    for i, arg in enumerate(argv):
        if not arg.startswith("--") or arg in ("--config", "--help", "--local_rank", "--local-rank"):
            continue
        name, eq, value = arg[2:].partition("=")
        if name in ("config", "local_rank", "local-rank"):
            continue
        if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("-") and "=" not in argv[i + 1]:
            value = argv[i + 1]
        name = name.replace("-", "_")
        matches = [name] if name in keys else [k for k in keys if k.rsplit(".", 1)[-1] == name]
        if not matches:
            return (f"{arg}: not an option; settings are key=value words (e.g. train.steps=20), and "
                    f"{name!r} is no key{_did_you_mean(name)} (python pretrain.py --help lists them)")
        shown = value if value else "VALUE"
        return (f"{arg}: settings are given as key=value, without dashes: write "
                f"{' or '.join(f'{k}={shown}' for k in matches)}")
    return None


@lru_cache(maxsize=None)
def _field_docs() -> dict[str, str]:
    """{"model.arch": "...", ...}: the comments of schema.py, which document each field (the
    comment lines right above a field, and the one after it on its line), so that --help
    and the schema cannot disagree."""
    sections = {f.type if isinstance(f.type, str) else f.type.__name__: f.name for f in dataclasses.fields(Config)}
    docs: dict[str, str] = {}
    cls, pending, last_line = None, [], (-1, "")  # last_line: (line number, key) of the last field
    source = inspect.getsource(schema)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 0:
            cls = None
        if tok.type == tokenize.NAME and tok.string == "class" and tok.start[1] == 0:
            cls, pending = "?", []
        elif cls == "?" and tok.type == tokenize.NAME:
            cls = tok.string
        elif tok.type == tokenize.COMMENT and cls:
            text = tok.string.lstrip("#").strip()
            if tok.start[0] == last_line[0]:  # a comment after the field, on its line
                docs[last_line[1]] = (docs.get(last_line[1], "") + " " + text).strip()
            else:
                pending.append(text)
        elif tok.type == tokenize.NAME and cls and tok.start[1] == 4 and cls in sections:
            name = f"{sections[cls]}.{tok.string}"
            docs[name] = " ".join(pending)
            pending, last_line = [], (tok.start[0], name)
    return docs


@lru_cache(maxsize=None)
def _field_choices() -> dict[str, tuple]:
    """{"model.arch": ("transnormer", ...), ...}: the values `validate_config` accepts, read
    from its `_one_of(value, "key", CHOICES)` checks."""
    out = {}
    for node in ast.walk(ast.parse(inspect.getsource(schema))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "_one_of" and len(node.args) == 3:
            key, choices = node.args[1], node.args[2]
            if not isinstance(key, ast.Constant):
                continue
            try:
                out[key.value] = tuple(ast.literal_eval(choices))
            except ValueError:  # a module-level name such as MIXERS
                if isinstance(choices, ast.Name):
                    out[key.value] = tuple(getattr(schema, choices.id))
    return out


def describe_keys(cfg: Config | None = None) -> str:
    """Every settable key, one per line: key, type, value in `cfg` (and the schema default where
    it differs), then its meaning and allowed values, indented below it."""
    import textwrap
    cfg = cfg or Config()
    docs, choices = _field_docs(), _field_choices()
    keys = override_keys()
    width = max(len(k) for k, _, _ in keys)
    lines = []
    for k, tp, default in keys:
        value = cfg
        for part in k.split("."):
            value = getattr(value, part)
        differs = "" if value == default else f"  (default {default!r})"
        lines.append(f"  {k:<{width}}  {tp:<18} {value!r}{differs}")
        text = docs.get(k, "")
        if k in choices:
            text += f" Allowed: {', '.join(map(str, choices[k]))}."
        if text.strip():
            lines += textwrap.wrap(text.strip(), 100, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def config_warnings(cfg: Config) -> list[str]:
    """Settings that are valid but most likely not meant."""
    out = []
    if cfg.optim.warmup_steps >= cfg.train.steps:
        out.append(f"optim.warmup_steps={cfg.optim.warmup_steps} >= train.steps={cfg.train.steps}: the learning "
                   f"rate never leaves its warm-up (the schema default is {schema.OptimConfig().warmup_steps}); "
                   f"set optim.warmup_steps below train.steps")
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
