"""Reading a cluster file: YAML, dotted overrides, Ray's own schema, the typed `metadata.llm` half."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from llm.config import LLM_PREFIX, LoadedConfig, PipelineConfig
from llm.errors import ConfigError
from llm.sizing import cross_check

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
# pydantic's wording -> the terse form of a config error
_WORDING = [
    (re.compile(r"^Input should be greater than or equal to "), "must be >= "),
    (re.compile(r"^Input should be greater than "), "must be > "),
    (re.compile(r"^Input should be less than or equal to "), "must be <= "),
    (re.compile(r"^Input should be less than "), "must be < "),
    (re.compile(r"^Input should be a valid integer.*"), "must be an integer"),
    (re.compile(r"^Input should be a valid number.*"), "must be a number"),
    (re.compile(r"^Input should be a valid boolean.*"), "must be true or false"),
    (re.compile(r"^Input should be "), "must be "),
    (re.compile(r"^String should match pattern "), "must match "),
]


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error: PyYAML keeps the last one
    silently, so `min_chars: 50` early in a file would be undone by a forgotten `min_chars:` further down.
    Keys brought in by a merge (`<<: *defaults`) may still be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class names that error
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"duplicate key {key!r} (first given at line {first})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load(path: Path, overrides: list[str]) -> LoadedConfig:
    """Load `path`, apply `overrides` (`pretrain.max_steps=200`), validate both halves, cross-check."""
    where = _display(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {where}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {where}: {e}") from None
    try:
        cluster = yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader: no object construction
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"invalid YAML{at}: {getattr(e, 'problem', e)} in {where}") from None
    if not isinstance(cluster, dict):
        raise ConfigError(f"top level must be a mapping (a Ray cluster file) in {where}")
    llm = (cluster.get("metadata") or {}).get("llm")
    if not isinstance(llm, dict):
        raise ConfigError(f"{LLM_PREFIX}: missing (the pipeline lives under metadata.llm) in {where}")
    llm = copy.deepcopy(llm)
    for item in overrides:
        apply_override(llm, item, where)
    validate_ray_half(cluster, where)
    try:
        cfg = PipelineConfig.model_validate(llm)
    except ValidationError as e:
        raise ConfigError(f"{_describe(e)} in {where}") from None
    cfg.storage = _resolve_storage(cfg.storage)
    cfg._cluster = cluster
    loaded = LoadedConfig(path=path, cluster=cluster, llm=cfg)
    problems = cross_check(loaded)
    if problems:
        raise ConfigError(f"{problems[0]} in {where}")
    return loaded


def apply_override(tree: dict[str, Any], item: str, where: str = "the command line") -> None:
    """Set `a.b.c=value` in `tree`; the value is parsed as YAML (so `3`, `true`, `[a, b]` keep their type)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if key.startswith(LLM_PREFIX + "."):
        key = key[len(LLM_PREFIX) + 1 :]
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: expected KEY=VALUE such as pretrain.max_steps=200")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # PyYAML (YAML 1.1) reads 1e-3 as a string
    node = tree
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            dotted = ".".join(parts[: i + 1])
            raise ConfigError(f"{LLM_PREFIX}.{dotted}: is a value, not a section (override {item!r}) for {where}")
        node = child
    node[parts[-1]] = value


def validate_ray_half(cluster: dict[str, Any], where: str) -> None:
    """The same check `ray up` runs: Ray's `prepare_config`, then its JSON-schema `validate_config`."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(cluster)))
    except Exception as e:  # jsonschema.ValidationError, ValueError, or Ray's cli_logger.abort
        path = ".".join(str(p) for p in getattr(e, "absolute_path", []) or [])
        message = getattr(e, "message", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path + ': ' if path else ''}Ray cluster config: {message} in {where}") from None


def _describe(e: ValidationError) -> str:
    """The first pydantic error as `metadata.llm.<dotted key>: <problem> (got <value>)`."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    key = f"{LLM_PREFIX}.{loc}" if loc else LLM_PREFIX
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if err["type"] == "missing":
        return f"{key}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    for pattern, replacement in _WORDING:
        if pattern.search(msg):
            msg = pattern.sub(replacement, msg)
            break
    got = err.get("input")
    shown = "" if isinstance(got, dict) or err["type"].startswith("value_error") else f" (got {got!r})"
    more = len(e.errors()) - 1
    return f"{key}: {msg}{shown}" + (f" [+{more} more]" if more else "")


def _resolve_storage(storage: str) -> str:
    if "://" in storage:
        return storage
    return str(Path(os.path.expanduser(storage)).resolve())


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def default_config_path() -> Path:
    """`cluster/local.yaml` of the checkout (or the working directory)."""
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        candidate = base / "cluster" / "local.yaml"
        if candidate.exists():
            return candidate
    raise ConfigError("no config given and cluster/local.yaml not found in the working directory")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> LoadedConfig:
    """Load, override and validate a cluster file. Raises `ConfigError` naming the key and the file."""
    return load(Path(path) if path is not None else default_config_path(), list(overrides))
