"""Run configuration: frozen dataclass schemas, YAML loading, dotted overrides, validation.

A run config is a YAML file with up to eleven sections (``model``, ``data``, ``peft``,
``optim``, ``train``, ``preference``, ``mesh``, ``checkpoint``, ``eval``, ``logging``,
``run``), plus ``key=value``
overrides from the command line (``train.steps=10``, ``peft.targets=[q_proj,v_proj]``,
``model.path=null``). Everything is checked before any work starts: a bad key, type or
value raises :class:`~jaxtune.errors.ConfigError` with one line naming the file (and line),
the dotted key, the bad value and what is allowed.

The schema is the dataclasses of :mod:`jaxtune.config_schema` (re-exported here); each
documents its fields in an ``Attributes:`` section, and :func:`config_reference_markdown`
renders the reference from them, together with the allowed values in ``CHOICES`` and
``RANGES``, so the docs cannot drift.

YAML is read with YAML 1.2 scalars (:mod:`jaxtune.config_yaml`): only ``true``/``false``
are booleans (``yes``/``no`` stay strings, so labels like ``[yes, no]`` survive) and
``1e-4`` is a float.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from jaxtune.atomic import atomic_file
from jaxtune.config_reference import config_reference_markdown, field_docs
from jaxtune.config_schema import (
    APPLIES_TO,
    CHOICES,
    DTYPES,
    PEFT_METHODS,
    PREFERENCE_OBJECTIVES,
    RANGES,
    SECTIONS,
    UNFREEZE_GROUPS,
    CheckpointConfig,
    Config,
    EvalConfig,
    LoggingConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    PeftConfig,
    PreferenceConfig,
    RunConfig,
    TrainConfig,
    config_to_dict,
)
from jaxtune.config_yaml import Dumper, parse_yaml, set_override
from jaxtune.errors import ConfigError

# fmt: off
__all__ = [
    "APPLIES_TO", "CHOICES", "CheckpointConfig", "Config", "DTYPES", "EvalConfig",
    "LoggingConfig", "MeshConfig", "ModelConfig", "OptimConfig", "PEFT_METHODS", "PeftConfig",
    "PreferenceConfig", "RANGES",
    "RunConfig", "SECTIONS", "TrainConfig", "UNFREEZE_GROUPS", "apply_overrides",
    "config_from_dict", "config_reference_markdown", "config_to_dict", "field_docs",
    "load_config", "resolve_mesh", "save_config", "validate_against_devices",
    "validate_config",
]
# fmt: on

# ------------------------------------------------------------------------ validation


class _Mismatch(Exception):
    """A value does not fit a field's type (the caller words the error)."""


def _describe(tp: Any) -> str:
    """A human description of a field type, for error messages."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is types.UnionType:
        inner = [a for a in args if a is not type(None)]
        return f"{_describe(inner[0])} or null"
    if typing.get_origin(tp) is tuple:
        what = "integers" if args[0] is int else "strings"
        return f"a list of {what} (or a comma-separated string)"
    if typing.get_origin(tp) is dict:
        return "a mapping of strings to strings"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]


def _coerce(value: Any, tp: Any) -> Any:
    """Convert a YAML value to a field type, or raise ``_Mismatch``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is types.UnionType:
        if value is None:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)))
    if tp is bool and isinstance(value, bool):
        return value
    if isinstance(value, bool):
        raise _Mismatch
    if tp is int and isinstance(value, int):
        return value
    if tp is float and isinstance(value, int | float):
        return float(value)  # ints are fine where a number is expected
    if tp is str and isinstance(value, str | int):
        return str(value)  # ints are fine where a name is expected (labels, run names)
    if origin is tuple:
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",") if p.strip()]
            try:
                return tuple(p if args[0] is str else int(p) for p in parts)
            except ValueError:
                raise _Mismatch from None
        if isinstance(value, list | tuple):
            return tuple(_coerce(v, args[0]) for v in value)
    if origin is dict and isinstance(value, Mapping):
        return {_coerce(k, args[0]): _coerce(v, args[1]) for k, v in value.items()}
    raise _Mismatch


def _in_range(value: float, spec: str) -> bool:
    if spec[0] in "[(":
        lo, hi = (float(x) for x in spec[1:-1].split(","))
        above = value >= lo if spec[0] == "[" else value > lo
        return above and (value <= hi if spec[-1] == "]" else value < hi)
    op, bound = spec.split()
    return value > float(bound) if op == ">" else value >= float(bound)


def _yaml_value(value: Any) -> str:
    """A value as it would be written in an override (``[q_proj, v_proj]``, ``null``)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    return str(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Builder:
    """Turns a raw nested dict into a validated Config, naming where each key came from.

    ``given``: the dotted keys the user set (checked for keys without effect, see
    :data:`APPLIES_TO`); None = every ``section.key`` present in the raw dict.
    """

    def __init__(self, source: str, origins: Mapping[str, str], given: set[str] | None = None):
        self.source, self.origins, self.given = source, origins, given

    def where(self, key: str) -> str:
        while key:
            if key in self.origins:
                return self.origins[key]
            key = key.rpartition(".")[0]
        return self.source

    def fail(self, key: str, detail: str) -> typing.NoReturn:
        raise ConfigError(f"{self.where(key)}: {key}: {detail}")

    def bad(self, key: str, value: Any, expected: str) -> typing.NoReturn:
        self.fail(key, f"got {_short(value)}, expected {expected}")

    def unknown(
        self, key: str, candidates: Sequence[str], elsewhere: Sequence[str] = ()
    ) -> typing.NoReturn:
        name = key.rpartition(".")[2]
        what = "key" if "." in key else "section"
        close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
        prefix = key.rpartition(".")[0] + "." if "." in key else ""
        hint = elsewhere[0] if elsewhere else (prefix + close[0] if close else None)
        tail = f"did you mean {hint!r}?" if hint else f"expected one of {', '.join(candidates)}"
        raise ConfigError(f"{self.where(key)}: unknown {what} {key!r}; {tail}")

    def build(self, raw: Any) -> Config:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{self.source}: expected a mapping of sections, got {_short(raw)}")
        for name in raw:
            if name not in SECTIONS:
                self.unknown(str(name), list(SECTIONS))
        cfg = Config(**{name: self.section(name, raw.get(name)) for name in SECTIONS})
        if self.given is None:
            self.given = {
                f"{name}.{key}"
                for name, section in raw.items()
                if isinstance(section, Mapping)
                for key in section
            }
        self.check(cfg)
        self.check_no_effect(cfg)
        return cfg

    def check_no_effect(self, cfg: Config) -> None:
        """A key set to a non-default value that the chosen method ignores is an error."""
        for key, (selector, applies) in APPLIES_TO.items():
            if key not in self.given:
                continue
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            if value == getattr(SECTIONS[section](), name):
                continue  # a resolved config.yaml lists every key at its default
            sel_section, sel_name = selector.split(".")
            chosen = getattr(getattr(cfg, sel_section), sel_name)
            if chosen not in applies:
                raise ConfigError(
                    f"{self.where(key)}: {key}={_yaml_value(value)} has no effect with "
                    f"{selector}={chosen} (it applies to {selector} {', '.join(applies)}); "
                    "remove it"
                )

    def section(self, name: str, raw: Any) -> Any:
        cls = SECTIONS[name]
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            self.bad(name, raw, f"a mapping of {name}.* keys")
        hints = typing.get_type_hints(cls)
        for key in raw:
            if key not in hints:
                other = [
                    f"{s}.{key}" for s in SECTIONS if key in typing.get_type_hints(SECTIONS[s])
                ]
                self.unknown(f"{name}.{key}", list(hints), other)
        values = {}
        for key, value in raw.items():
            dotted = f"{name}.{key}"
            try:
                value = _coerce(value, hints[key])
            except _Mismatch:
                self.bad(dotted, value, _describe(hints[key]))
            if value is not None and dotted in CHOICES and value not in CHOICES[dotted]:
                close = difflib.get_close_matches(value, CHOICES[dotted], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.bad(dotted, value, f"one of {', '.join(CHOICES[dotted])}{hint}")
            if value is not None and dotted in RANGES and not _in_range(value, RANGES[dotted]):
                spec = RANGES[dotted]
                self.bad(dotted, value, f"a value {'in ' if spec[0] == '[' else ''}{spec}")
            values[key] = value
        return cls(**values)

    def check(self, cfg: Config) -> None:
        """Rules that involve more than one field."""
        t, p, m = cfg.train, cfg.peft, cfg.mesh
        if (t.steps is None) == (t.epochs is None):
            got = "both" if t.steps is not None else "neither"
            self.fail("train.steps", f"set exactly one of train.steps or train.epochs (got {got})")
        if p.method in ("lora", "dora") and p.alpha is None:
            self.fail(
                "peft.alpha",
                f"required when peft.method is {p.method!r}; expected a number > 0 "
                f"(e.g. peft.alpha={2 * p.rank}, twice the rank)",
            )
        if p.method in ("lora", "dora") and not p.targets:
            self.bad("peft.targets", list(p.targets), "at least one module name or all-linear")
        if "all-linear" in p.targets and len(p.targets) > 1:
            self.bad("peft.targets", list(p.targets), "all-linear on its own")
        for pattern in p.unfreeze:
            if pattern not in UNFREEZE_GROUPS:
                try:
                    re.compile(pattern)
                except re.error as e:
                    groups = ", ".join(UNFREEZE_GROUPS)
                    self.bad("peft.unfreeze", pattern, f"a group ({groups}) or a regex ({e})")
        if cfg.model.quantize is not None and p.method == "full":
            self.bad(
                "model.quantize",
                cfg.model.quantize,
                "null with peft.method=full "
                "(quantized base weights are frozen; use lora, dora, adapter or feature)",
            )
        for axis in ("data", "fsdp", "tensor"):
            if getattr(m, axis) < 1 and getattr(m, axis) != -1:
                self.bad(f"mesh.{axis}", getattr(m, axis), "-1 (the rest of the devices) or >= 1")
        if sum(v == -1 for v in (m.data, m.fsdp, m.tensor)) > 1:
            self.fail(
                "mesh", f"at most one of data={m.data}, fsdp={m.fsdp}, tensor={m.tensor} may be -1"
            )
        if cfg.optim.warmup_steps > 0 and cfg.optim.warmup_ratio > 0:
            self.fail(
                "optim.warmup_ratio", "set optim.warmup_steps or optim.warmup_ratio, not both"
            )
        d = cfg.data
        if d.validation_fraction + d.test_fraction >= 1:
            self.bad(
                "data.test_fraction",
                d.test_fraction,
                f"data.validation_fraction + data.test_fraction < 1 "
                f"(validation_fraction is {d.validation_fraction})",
            )
        buckets = d.length_buckets
        if any(b <= 0 for b in buckets) or list(buckets) != sorted(set(buckets)):
            self.bad("data.length_buckets", list(buckets), "strictly increasing positive lengths")
        if cfg.model.max_seq_len is not None and t.seq_len > cfg.model.max_seq_len:
            self.bad("train.seq_len", t.seq_len, f"<= model.max_seq_len={cfg.model.max_seq_len}")
        evaluates = t.eval_every > 0 or cfg.eval.every > 0
        if t.early_stopping_patience > 0 and not evaluates:
            self.fail(
                "train.early_stopping_patience",
                "needs evaluations; set train.eval_every or eval.every > 0",
            )
        if cfg.checkpoint.keep_best and not evaluates:
            self.fail(
                "checkpoint.keep_best", "needs evaluations; set train.eval_every or eval.every > 0"
            )
        if (p.head == "classification") != (d.format == "classification"):
            self.fail(
                "peft.head",
                f"peft.head={p.head!r} with data.format={d.format!r}: a classification head "
                "trains on labelled data and labelled data needs one (set both to "
                "classification, or score labels with the LM: format instruction)",
            )
        if p.method == "feature" and p.head != "classification":
            self.fail(
                "peft.method",
                "feature trains only a classification head; set peft.head=classification "
                "(and data.format=classification)",
            )
        if p.head == "classification" and cfg.eval.tasks:
            self.fail("eval.tasks", "LM evaluation tasks need peft.head=lm")
        probe = cfg.eval.bias_probe
        if probe not in ("builtin", "none") and not probe.endswith((".jsonl", ".json")):
            self.bad("eval.bias_probe", probe, "builtin, none or a .jsonl file of groups")
        self.check_preference(cfg)
        if not cfg.run.dir:
            self.bad("run.dir", cfg.run.dir, "a non-empty directory path")

    def check_preference(self, cfg: Config) -> None:
        """Preference objectives train on preference pairs, and only they do."""
        objective, fmt, pref = cfg.train.objective, cfg.data.format, cfg.preference
        if (objective in PREFERENCE_OBJECTIVES) != (fmt == "preference"):
            key = "data.format" if objective in PREFERENCE_OBJECTIVES else "train.objective"
            self.fail(
                key,
                f"train.objective={objective} with data.format={fmt}: the preference "
                f"objectives ({', '.join(PREFERENCE_OBJECTIVES)}) train on data.format="
                "preference (prompt, chosen, rejected) and that data needs one of them",
            )
        if fmt == "preference" and cfg.data.packing:
            self.fail("data.packing", "not supported with data.format=preference (pairs)")
        if objective == "dpo" and pref.loss_type != "sigmoid" and pref.label_smoothing:
            self.fail(
                "preference.label_smoothing",
                f"applies to loss_type sigmoid, not {pref.loss_type}; remove it",
            )


# ---------------------------------------------------------------------- public API


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML run config, apply dotted overrides, and validate it.

    Args:
      path: YAML file; None starts from the defaults (overrides must then say the rest).
      overrides: ``section.key=value`` strings; values are YAML scalars or flow lists and
        mappings, e.g. ``train.steps=10``, ``peft.targets=[q_proj,v_proj]``,
        ``model.path=null``, ``data.fields.output=answer``.

    Returns:
      The frozen, validated :class:`Config`.

    Raises:
      ConfigError: the file is missing or not YAML, or a key, type or value is invalid;
        the one-line message names the file (and line), the dotted key and what is allowed.
    """
    raw: Any = {}
    origins: dict[str, str] = {}
    source = "<command line>" if path is None else str(path)
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{source}: cannot read config file: {e}") from None
        raw, lines = parse_yaml(text, source)
        origins = {key: f"{source}:{line}" for key, line in lines.items()}
    raw = {} if raw is None else raw
    if overrides and not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {_short(raw)}")
    for arg in overrides:
        set_override(raw, arg, source, origins)
    return _Builder(source, origins).build(raw)


def config_from_dict(d: Mapping[str, Any] | None, source: str = "<dict>") -> Config:
    """Validate a nested dict (as a YAML file would hold it) into a :class:`Config`.

    Args:
      d: ``{section: {key: value}}``; missing sections and keys take their defaults.
      source: name used in error messages.
    """
    return _Builder(source, {}).build(d)


def apply_overrides(cfg: Config, overrides: Sequence[str], source: str = "<config>") -> Config:
    """Return ``cfg`` with dotted ``key=value`` overrides applied, validated again.

    Only the overridden keys count as set by the user: ``cfg`` itself was validated, so
    e.g. ``peft.method=full`` over a LoRA config is not refused for its ``peft.rank``.
    """
    raw, origins = config_to_dict(cfg), {}
    for arg in overrides:
        set_override(raw, arg, source, origins)
    return _Builder(source, origins, given=set(origins)).build(raw)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically); ``load_config`` reads it back equal."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.dump(
        config_to_dict(cfg), Dumper=Dumper, sort_keys=False, allow_unicode=True, width=100
    )
    atomic_file(path, "# jaxtune resolved config\n" + text)


def resolve_mesh(mesh: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolve a -1 axis against the device count; return ``(data, fsdp, tensor)``.

    Raises:
      ConfigError: the axes cannot multiply to ``n_devices``.
    """
    shape = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
    desc = " x ".join(f"{k}={v}" for k, v in shape.items())
    fixed = 1
    for v in shape.values():
        fixed *= v if v != -1 else 1
    if -1 in shape.values():
        if n_devices % fixed:
            raise ConfigError(
                f"mesh {desc}: {n_devices} devices are not divisible by the fixed axes' "
                f"product {fixed}"
            )
        shape = {k: (n_devices // fixed if v == -1 else v) for k, v in shape.items()}
    product = shape["data"] * shape["fsdp"] * shape["tensor"]
    if product != n_devices:
        raise ConfigError(
            f"mesh {desc} = {product} does not match {n_devices} devices "
            "(set one of mesh.data, mesh.fsdp, mesh.tensor to -1 to use the rest)"
        )
    return shape["data"], shape["fsdp"], shape["tensor"]


def validate_against_devices(
    cfg: Config, n_devices: int, process_count: int = 1
) -> tuple[int, int, int]:
    """Check the mesh and batch size against the available devices.

    Args:
      cfg: a validated config.
      n_devices: global device count (``jax.device_count()``).
      process_count: number of hosts (``jax.process_count()``); each loads its share.

    Returns:
      The resolved mesh shape ``(data, fsdp, tensor)``.

    Raises:
      ConfigError: the mesh does not fit, or ``train.batch_size`` cannot be split evenly
        over the batch-sharding axes (data x fsdp) or over the hosts.
    """
    data, fsdp, tensor = resolve_mesh(cfg.mesh, n_devices)
    batch = cfg.train.batch_size
    if batch % (data * fsdp):
        raise ConfigError(
            f"train.batch_size={batch} is not divisible by mesh data x fsdp = "
            f"{data} x {fsdp} = {data * fsdp} (the batch is split over those axes)"
        )
    if batch % process_count:
        raise ConfigError(
            f"train.batch_size={batch} is not divisible by the {process_count} processes"
        )
    return data, fsdp, tensor


def validate_config(cfg: Config, source: str = "<config>") -> Config:
    """Validate a programmatically built :class:`Config` (returns a normalised copy)."""
    return config_from_dict(config_to_dict(cfg), source)
