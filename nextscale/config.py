"""Typed configs: dataclass trees loaded from YAML and overridden with dotted ``key.sub=value`` strings.

Every stage declares one ``@dataclass(frozen=True, kw_only=True)`` tree whose fields carry a one-line
doc (``field(metadata={"doc": ...})``, see :func:`doc`). :func:`load_config` merges, in order of
precedence, command-line overrides > YAML file > dataclass defaults, coerces every value by the
field's declared type, and raises :class:`ConfigError` naming the key and what is allowed for
unknown keys, ill-typed values and failed ``__post_init__`` checks. A config file is a YAML path or the
name of a config shipped in the package (``nextscale/configs/<name>.yaml``, e.g. ``prior_d16``).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal, TypeVar, Union

import yaml

from nextscale.errors import UserError

T = TypeVar("T")
# which device a stage computes on, the same key and values in every stage config (devices.pick_device resolves it)
Device = Literal["auto", "cpu", "cuda"]
log = logging.getLogger(__name__)

SHIPPED_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


class ConfigError(UserError, ValueError):
    """A config file or override is wrong; the message names the key and the fix."""


def doc(default: Any, text: str, *, keys: type | None = None) -> Any:
    """A dataclass field with a default and a one-line description shown by ``--help``.

    ``keys``: for a ``dict`` field whose keys are the fields of a dataclass (e.g. model ``overrides``),
    that dataclass, so that a misspelt key elsewhere can be pointed at ``<field>.<key>``.
    """
    metadata = {"doc": text, **({"keys": keys} if keys is not None else {})}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# ------------------------------------------------------------------------------------------------
# Loading


def shipped_configs() -> list[str]:
    """Names of the configs shipped in the package (``nextscale/configs/<name>.yaml``)."""
    return sorted(n.removesuffix(".yaml") for n in os.listdir(SHIPPED_CONFIGS) if n.endswith(".yaml"))


def locate_config(spec: str) -> str:
    """The YAML file ``spec`` names: an existing path, else, for a bare name (``prior_d16``, ``prior_d16.yaml``),
    the shipped config of that name, wherever the command runs."""
    if os.path.isfile(spec):
        return spec
    name = os.path.basename(spec).removesuffix(".yaml").removesuffix(".yml")
    shipped = os.path.join(SHIPPED_CONFIGS, f"{name}.yaml")
    if os.path.isfile(shipped) and os.sep not in spec and "/" not in spec:
        return shipped
    close = difflib.get_close_matches(name, shipped_configs(), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"config {spec!r} does not exist (no such YAML file, nor a shipped config); {hint}give a "
                      f"path or one of: {', '.join(shipped_configs())}")


def split_config_args(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] key.sub=value ...`` -> (CONFIG or None, overrides): an override always holds a '='."""
    if args and "=" not in args[0]:
        return args[0], list(args[1:])
    return None, list(args)


def load_config(cls: type[T], path: str | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from an optional YAML file (a path or a shipped config's name) plus ``key.sub=value``
    overrides."""
    data: dict[str, Any] = {}
    if path:
        path = locate_config(path)
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            what = " ".join(filter(None, [getattr(e, "context", None), getattr(e, "problem", None)])) or str(e)
            raise ConfigError(f"config file {path!r} is not valid YAML{where}: {what}; fix the file there") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of keys, not {type(data).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        _set_dotted(data, key.strip(), _OverrideString(value))
    return from_dict(cls, data)


class _OverrideString(str):
    """A raw command-line value: parsed according to the declared field type, not guessed."""


def _set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Recursively build dataclass ``cls`` from a mapping, checking keys and types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    data = _renamed(cls, data, prefix)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        guess = did_you_mean(cls, unknown[0])
        hint = f"; did you mean {prefix + guess!r}?" if guess else ""
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r}{hint} (allowed keys here: {', '.join(sorted(fields))})"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: coerce(value, hints[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


@dataclasses.dataclass(frozen=True)
class Renamed:
    """An old key that still loads, with a deprecation warning naming ``key``, its new dotted place below the same
    section; ``values`` translates an old value where the values changed too (``hint`` says how)."""

    key: str
    values: Callable[[Any, str], Any] | None = None  # (old value, old key) -> new value
    hint: str = ""


def _renamed(cls: type, data: Mapping[str, Any], prefix: str) -> Mapping[str, Any]:
    """``data`` with the keys ``cls`` renamed (its ``RENAMED = {old: "new.dotted" or Renamed(...)}``) moved to their
    new place, each with a deprecation warning."""
    renamed = getattr(cls, "RENAMED", {})
    old_keys = [k for k in data if k in renamed]
    if not old_keys:
        return data
    data = dict(data)
    for old in old_keys:
        new = renamed[old] if isinstance(renamed[old], Renamed) else Renamed(renamed[old])
        *parents, leaf = new.key.split(".")
        node = data
        for part in parents:
            node[part] = node = dict(node.get(part) or {})
        if leaf in node:
            raise ConfigError(f"{prefix + old!r} and {prefix + new.key!r} are both set; keep only {prefix + new.key!r}")
        value = data.pop(old)
        node[leaf] = new.values(value, prefix + old) if new.values else value
        log.warning("config key %r is deprecated, use %r%s", prefix + old, prefix + new.key,
                    f" ({new.hint})" if new.hint else "")
    return data


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key below ``cls``: sections, leaves, and the keys of ``doc(..., keys=...)`` dict fields."""
    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        out.append(prefix + f.name)
        sub = hints[f.name] if dataclasses.is_dataclass(hints[f.name]) else f.metadata.get("keys")
        if sub is not None:
            out.extend(all_keys(sub, f"{prefix}{f.name}."))
    return out


def renamed_keys(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(old dotted key, new dotted key, hint) for every key that ``cls`` and its sections still accept under an old
    name."""
    hints = typing.get_type_hints(cls)
    out = []
    for old, new in getattr(cls, "RENAMED", {}).items():
        new = new if isinstance(new, Renamed) else Renamed(new)
        out.append((prefix + old, prefix + new.key, new.hint))
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.extend(renamed_keys(hints[f.name], f"{prefix}{f.name}."))
    return out


def did_you_mean(cls: type, key: str) -> str | None:
    """The key below ``cls`` that ``key`` most likely meant (a typo, or a leaf given at the wrong depth)."""
    def score(candidate: str) -> float:
        leaf = candidate.rsplit(".", 1)[-1]
        return max(difflib.SequenceMatcher(None, key, candidate).ratio(),
                   difflib.SequenceMatcher(None, key.rsplit(".", 1)[-1], leaf).ratio())

    scored = [(score(c), -c.count("."), c) for c in all_keys(cls) if c != key]
    best = max(scored, default=None)
    return best[2] if best and best[0] >= 0.75 else None


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to the declared type ``tp`` or raise a ConfigError naming ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, _OverrideString):
            raise ConfigError(f"{key!r} is a section; set one of its keys, e.g. {key}.<name>=...")
        return from_dict(tp, value, key + ".")
    if origin in (Union, types.UnionType):
        if type(None) in args and _is_null(value):
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        for choice in args:
            try:
                if coerce(value, type(choice), key) == choice:
                    return choice
            except ConfigError:
                pass
        raise ConfigError(f"{key!r} must be one of {', '.join(map(repr, args))}, got {value!r}")
    if origin in (tuple, list):
        items = _as_sequence(value, key)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(items))
        if origin is tuple:
            if len(items) != len(args):
                raise ConfigError(f"{key!r} needs {len(args)} values, got {len(items)}")
            return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(items, args)))
        return [coerce(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(items)]
    if origin is dict:
        if isinstance(value, _OverrideString):
            value = yaml.safe_load(value) or {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key!r} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key!r} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key!r} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{key!r} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return str(value)
        raise ConfigError(f"{key!r} must be a string, got {value!r}")
    raise ConfigError(f"{key!r}: unsupported config type {tp!r}")


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~"))


def _as_sequence(value: Any, key: str) -> list:
    if isinstance(value, _OverrideString):
        text = value.strip()
        if text.startswith("["):
            value = yaml.safe_load(text)
        else:
            return [_OverrideString(v.strip()) for v in text.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key!r} must be a list, got {value!r}")
    return list(value)


# ------------------------------------------------------------------------------------------------
# Saving and describing


def to_dict(cfg: Any) -> Any:
    """Plain YAML/JSON-able data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, doc) for every leaf field: what ``--help`` prints."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, f"{prefix}{f.name}."))
        else:
            if typing.get_origin(tp) is Literal:
                type_name = "one of " + ", ".join(map(str, typing.get_args(tp)))
            else:
                type_name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
            rows.append((prefix + f.name, type_name, to_dict(default), f.metadata.get("doc", "")))
    return rows


def preset(presets: Mapping[str, T], name_or_cfg: str | T, kind: str, **overrides) -> T:
    """A config from a named preset or given as is, with field overrides; a clear error for unknown names."""
    if isinstance(name_or_cfg, str):
        if name_or_cfg not in presets:
            raise ConfigError(f"unknown {kind} preset {name_or_cfg!r}; choose one of {', '.join(presets)}")
        name_or_cfg = presets[name_or_cfg]
    return dataclasses.replace(name_or_cfg, **overrides) if overrides else name_or_cfg


def require(condition: bool, message: str) -> None:
    """Cross-field check for ``__post_init__``: raise a ConfigError with ``message`` if false."""
    if not condition:
        raise ConfigError(message)


# ------------------------------------------------------------------------------------------------
# Sections shared by every stage


@dataclasses.dataclass(frozen=True, kw_only=True)
class StorageConfig:
    """Object-storage settings; credentials come from the usual AWS_* / GOOGLE_* environment variables."""

    endpoint_url: str = doc("", "S3-compatible endpoint (MinIO, R2, moto); empty = AWS_ENDPOINT_URL or AWS itself")
    region: str = doc("", "S3 region; empty = AWS_DEFAULT_REGION")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RayConfig:
    """Where the Ray parts run: the cluster in RAY_ADDRESS when set, else a local instance."""

    address: str = doc("", "Ray cluster address; empty = $RAY_ADDRESS, else start a local Ray instance")
    num_cpus: int = doc(0, "CPUs of a local Ray instance; 0 = all cores of this machine")
    object_store_memory_mb: int = doc(0, "object store size of a local Ray instance; 0 = Ray's default")


def _use_gpu_as_device(value: Any, key: str) -> str:
    """The old ``use_gpu`` flag (true / false; tokenize's also auto) as a ``device`` value."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return "cuda" if coerce(value, bool, key) else "cpu"


def use_gpu_renamed(device_key: str) -> Renamed:
    """The old ``use_gpu`` key of a stage, now ``device_key``."""
    return Renamed(device_key, _use_gpu_as_device, "use_gpu=true is device=cuda, false is cpu, auto is auto")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkersConfig:
    """The Ray Train workers of a training stage (train-prior, train-tokenizer): one data-parallel rank each."""

    RENAMED: ClassVar[dict[str, Renamed]] = {"use_gpu": use_gpu_renamed("device")}

    count: int = doc(1, "Ray Train workers (data-parallel ranks); 0 = run in this process without Ray (train-prior)")
    device: Device = doc("cpu", "cuda = one GPU per worker; auto = cuda when the Ray cluster has GPUs (count=0: when "
                                "this process sees one); cpu by default: the workers do not follow the GPUs there "
                                "are, so auto with fewer GPUs than workers would wait for more")
    cpus_per_worker: float = doc(1.0, "CPUs Ray reserves per worker (Ray also sets its torch threads from it)")
    strategy: Literal["ddp", "fsdp"] = doc("ddp", "data parallelism: DDP, or FSDP (sharded weights and optimizer "
                                                  "state, train-prior) for the large presets")
    max_failures: int = doc(3, "worker-group restarts after a lost worker or storage trouble, each from the latest "
                               "checkpoint (a user's or a data error fails at once); -1 = unlimited")

    def __post_init__(self) -> None:
        require(self.count >= 0, f"workers.count={self.count} must be >= 0 (0 = in this process, no Ray)")
        require(self.cpus_per_worker > 0, f"workers.cpus_per_worker={self.cpus_per_worker} must be > 0")
        require(self.max_failures >= -1, f"workers.max_failures={self.max_failures} must be >= -1 (-1 = unlimited)")
        require(self.strategy == "ddp" or self.count >= 2,
                f"workers.strategy={self.strategy!r} needs workers.count >= 2; use workers.strategy=ddp for one worker")


# the top-level keys that became the workers section (accepted with a deprecation warning)
RENAMED_WORKER_KEYS: dict[str, str | Renamed] = {"num_workers": "workers.count", "use_gpu": use_gpu_renamed("workers.device"),
                       "cpus_per_worker": "workers.cpus_per_worker", "strategy": "workers.strategy",
                       "max_failures": "workers.max_failures"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class WandbConfig:
    """Weights & Biases logging."""

    mode: Literal["disabled", "offline", "online"] = doc("disabled", "wandb mode")
    project: str = doc("nextscale", "wandb project")
    entity: str = doc("", "wandb entity (team); empty = your default")
    run_name: str = doc("", "run name; empty = derived from the output location")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorBoardConfig:
    """TensorBoard event files of a training run: ``tensorboard --logdir runs/`` shows every run below it."""

    enabled: bool = doc(True, "write event files under {output}/tensorboard: the logged metrics, the sample grids or "
                              "reconstruction strips, the resolved config")
