"""Tests for jaxtune.config: loading, overrides, validation messages, mesh, reference docs."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from jaxtune.config import (
    CHOICES,
    RANGES,
    SECTIONS,
    Config,
    apply_overrides,
    config_from_dict,
    config_reference_markdown,
    config_to_dict,
    field_docs,
    load_config,
    resolve_mesh,
    save_config,
    validate_against_devices,
    validate_config,
)
from jaxtune.data.config import DataConfig
from jaxtune.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
# compare_*.yaml are comparison recipes (`base` + `runs`, scripts/compare_methods.py),
# not run configs; tests/test_features.py checks that each of their runs is one.
CONFIG_FILES = sorted(
    p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("compare_")
)

FULL = """\
model:
  path: /models/tiny
  dtype: bfloat16
  remat: dots
data:
  train: data/train.jsonl
  format: chat
  fields: {messages: conversation}
  length_buckets: [128, 256]
  labels: [yes, no]
peft:
  method: dora
  rank: 16
  alpha: 32
  targets: q_proj, k_proj , v_proj
  unfreeze: [norms, 'layers\\.\\d+\\.mlp']
optim:
  lr: 2e-4
  warmup_ratio: 0.1
  grad_clip: null
train:
  epochs: 2
  batch_size: 16
  seq_len: 256
  eval_every: 50
  early_stopping_patience: 3
mesh: {data: 2, fsdp: -1}
checkpoint: {every: 100, keep_best: true, best_mode: min}
eval: {tasks: perplexity}
logging: {wandb: true, wandb_project: demo}
run: {dir: runs/demo, name: "2024"}
"""


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def minimal(**sections) -> dict:
    """A valid raw config (train.steps set) with some sections replaced."""
    raw = {"train": {"steps": 10}, "peft": {"method": "lora", "alpha": 16}}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


def error_of(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, source="run.yaml")
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------- loading


def test_load_full_file_types_and_values(tmp_path):
    cfg = load_config(write(tmp_path, FULL))
    assert isinstance(cfg, Config) and isinstance(cfg.data, DataConfig)
    assert cfg.model.dtype == "bfloat16" and cfg.model.compute_dtype is None
    assert cfg.peft.targets == ("q_proj", "k_proj", "v_proj")
    assert cfg.peft.alpha == 32.0 and isinstance(cfg.peft.alpha, float)
    assert cfg.peft.unfreeze == ("norms", r"layers\.\d+\.mlp")
    assert cfg.optim.lr == 2e-4  # YAML 1.2 float, not the string "2e-4"
    assert cfg.optim.grad_clip is None
    assert cfg.train.epochs == 2.0 and cfg.train.steps is None
    assert cfg.data.labels == ("yes", "no")  # not booleans
    assert cfg.data.fields == {"messages": "conversation"}
    assert cfg.data.length_buckets == (128, 256)
    assert cfg.eval.tasks == ("perplexity",)
    assert cfg.run.name == "2024"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 5  # type: ignore[misc]


def test_defaults_and_empty_sections(tmp_path):
    cfg = load_config(write(tmp_path, "train: {steps: 5}\npeft: {alpha: 8}\neval:\n"))
    assert cfg.model == Config().model
    assert cfg.peft.targets == ("q_proj", "v_proj") and cfg.mesh.data == -1
    assert load_config(None, ["train.steps=3", "peft.method=full"]).train.steps == 3


def test_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, FULL))
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, out)
    assert load_config(out) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert validate_config(cfg) == cfg
    assert not list(out.parent.glob(".*tmp*"))  # atomic write leaves nothing behind


def test_round_trip_of_tricky_strings(tmp_path):
    raw = minimal(run={"dir": "runs/x", "name": "1e5"}, data={"labels": ["yes", "true", "1"]})
    cfg = config_from_dict(raw)
    save_config(cfg, tmp_path / "c.yaml")
    back = load_config(tmp_path / "c.yaml")
    assert back == cfg and back.run.name == "1e5" and back.data.labels == ("yes", "true", "1")


# --------------------------------------------------------------------- overrides


def test_overrides(tmp_path):
    path = write(tmp_path, FULL)
    cfg = load_config(
        path,
        [
            "peft.targets=[o_proj,gate_proj]",
            "train.steps=10",
            "train.epochs=null",
            "model.path=null",
            "optim.lr=3e-5",
            "data.fields.prompt=question",
            "mesh.data=8",
            "mesh.fsdp=1",
            "logging.wandb=false",
            "run.name=",
        ],
    )
    assert cfg.peft.targets == ("o_proj", "gate_proj")
    assert cfg.train.steps == 10 and cfg.train.epochs is None
    assert cfg.model.path is None and cfg.optim.lr == 3e-5
    assert cfg.data.fields == {"messages": "conversation", "prompt": "question"}
    assert (cfg.mesh.data, cfg.mesh.fsdp) == (8, 1)
    assert cfg.logging.wandb is False and cfg.run.name is None
    assert load_config(path, ["peft.targets=all-linear"]).peft.targets == ("all-linear",)


def test_apply_overrides():
    cfg = config_from_dict(minimal())
    assert apply_overrides(cfg, ["train.batch_size=4"]).train.batch_size == 4
    with pytest.raises(ConfigError, match="train.batch_size"):
        apply_overrides(cfg, ["train.batch_size=0"])


@pytest.mark.parametrize(
    "arg", ["train.steps", "steps=3", "=3", "train..steps=1", "mesh={data: 8}"]
)
def test_malformed_override(arg):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, [arg])


def test_override_errors_name_the_override(tmp_path):
    path = write(tmp_path, "train: {steps: 5}\npeft: {alpha: 8}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.steps=ten"])
    msg = str(info.value)
    assert str(path) in msg and "train.steps=ten" in msg and "an integer" in msg
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path, ["peft.targets=[a,"])


# ------------------------------------------------------------------- file errors


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "train:\n  steps: 5\n  batch_size: [1, 2\npeft: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert f"{path}:" in msg and "invalid YAML" in msg and "\n" not in msg
    line = int(msg.split(f"{path}:")[1].split(":")[0])
    assert 3 <= line <= 4


def test_value_errors_name_file_and_line(tmp_path):
    path = write(tmp_path, "train:\n  steps: 5\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match=rf"^{path}:3: train\.batch_size: got 0"):
        load_config(path)


def test_duplicate_key(tmp_path):
    path = write(tmp_path, "train:\n  steps: 5\n  steps: 6\n")
    with pytest.raises(ConfigError, match=r":3: duplicate key 'train.steps'"):
        load_config(path)


def test_top_level_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(write(tmp_path, "- a\n- b\n"))
    assert "mapping of train" in error_of({"train": 5})


# ------------------------------------------------------------- validation errors


@pytest.mark.parametrize(
    ("raw", "key", "expected"),
    [
        (minimal(train={"steps": "ten"}), "train.steps", "an integer"),
        (minimal(train={"batch_size": 8.5}), "train.batch_size", "an integer"),
        (minimal(train={"resume": "yes"}), "train.resume", "true or false"),
        (minimal(train={"resume": 1}), "train.resume", "true or false"),
        (minimal(optim={"lr": "fast"}), "optim.lr", "a number"),
        (minimal(optim={"lr": True}), "optim.lr", "a number"),
        (minimal(model={"path": 1.5}), "model.path", "a string or null"),
        (minimal(peft={"targets": {"q": 1}}), "peft.targets", "a list of strings"),
        (minimal(data={"fields": ["a"]}), "data.fields", "a mapping"),
        (minimal(data={"length_buckets": "128,x"}), "data.length_buckets", "integers"),
    ],
)
def test_type_errors(raw, key, expected):
    msg = error_of(raw)
    assert msg.startswith("run.yaml: ") and key in msg and expected in msg


def test_ints_accepted_for_floats_and_strings_for_tuples():
    cfg = config_from_dict(minimal(optim={"lr": 1, "weight_decay": 0}, eval={"tasks": "a,b"}))
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.eval.tasks == ("a", "b")
    assert config_from_dict(minimal(data={"length_buckets": "64, 128"})).data.length_buckets == (
        64,
        128,
    )


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("peft.method", "lorra", "did you mean 'lora'"),
        ("model.dtype", "fp16", "one of float32, bfloat16, float16"),
        ("model.remat", "some", "none, dots, full"),
        ("model.quantize", "int4", "int8, nf4"),
        ("data.format", "alpaca", "instruction, chat, completion, text, classification"),
        ("optim.schedule", "step", "constant, linear, cosine"),
        ("peft.pooling", "max", "cls, mean, last"),
        ("checkpoint.best_mode", "lowest", "min, max"),
    ],
)
def test_choice_errors(key, value, expected):
    section, name = key.split(".")
    msg = error_of(minimal(**{section: {name: value}}))
    assert key in msg and repr(value) in msg and expected in msg


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("peft.rank", 0, "> 0"),
        ("peft.dropout", 1.0, "[0, 1)"),
        ("peft.dropout", -0.1, "[0, 1)"),
        ("optim.lr", 0, "> 0"),
        ("optim.warmup_ratio", 1, "[0, 1)"),
        ("train.batch_size", -4, "> 0"),
        ("train.grad_accum", 0, ">= 1"),
        ("train.steps", 0, "> 0"),
        ("data.validation_fraction", 1.5, "[0, 1)"),
        ("checkpoint.keep", 0, ">= 1"),
        ("mesh.tensor", 0, "-1 (the rest of the devices) or >= 1"),
    ],
)
def test_range_errors(key, value, expected):
    section, name = key.split(".")
    msg = error_of(minimal(**{section: {name: value}}))
    assert key in msg and f"got {value!r}" in msg and expected in msg


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_alpha_required_for_lora_and_dora(method):
    raw = {"train": {"steps": 1}, "peft": {"method": method, "rank": 4}}
    msg = error_of(raw)
    assert "peft.alpha" in msg and method in msg and "peft.alpha=8" in msg
    raw["peft"] = {"method": "adapter"}
    assert config_from_dict(raw).peft.alpha is None


def test_steps_and_epochs_exactly_one():
    assert "got neither" in error_of({"peft": {"alpha": 1}})
    msg = error_of(minimal(train={"epochs": 1}))
    assert "train.steps" in msg and "train.epochs" in msg and "got both" in msg


@pytest.mark.parametrize(
    ("sections", "key", "expected"),
    [
        ({"mesh": {"data": -1, "fsdp": -1}}, "mesh", "at most one"),
        ({"optim": {"warmup_steps": 10, "warmup_ratio": 0.1}}, "optim.warmup", "not both"),
        ({"peft": {"targets": ["all-linear", "q_proj"]}}, "peft.targets", "all-linear on its own"),
        ({"peft": {"targets": []}}, "peft.targets", "at least one"),
        ({"peft": {"unfreeze": ["norms", "("]}}, "peft.unfreeze", "a regex"),
        ({"model": {"quantize": "nf4"}, "peft": {"method": "full"}}, "model.quantize", "lora"),
        ({"data": {"validation_fraction": 0.5, "test_fraction": 0.5}}, "data.test_fraction", "< 1"),
        ({"data": {"length_buckets": [256, 128]}}, "data.length_buckets", "increasing"),
        ({"model": {"max_seq_len": 128}, "train": {"seq_len": 256}}, "train.seq_len", "<= model"),
        ({"train": {"early_stopping_patience": 2}}, "early_stopping_patience", "eval_every"),
        ({"checkpoint": {"keep_best": True}}, "checkpoint.keep_best", "eval_every"),
        ({"run": {"dir": ""}}, "run.dir", "non-empty"),
    ],
)
def test_cross_field_errors(sections, key, expected):
    msg = error_of(minimal(**sections))
    assert key in msg and expected in msg


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (minimal(peft={"rnak": 8}), "unknown key 'peft.rnak'; did you mean 'peft.rank'?"),
        ({**minimal(), "trian": {"steps": 1}}, "unknown section 'trian'; did you mean 'train'?"),
        (minimal(train={"lr": 1e-3}), "did you mean 'optim.lr'?"),
        (minimal(train={"batchsize": 8}), "did you mean 'train.batch_size'?"),
        (minimal(run={"zzz": 1}), "expected one of dir, name"),
    ],
)
def test_unknown_keys_suggest(raw, expected):
    assert expected in error_of(raw)


def test_unknown_key_from_override_suggests(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'peft.rank'"):
        load_config(write(tmp_path, "train: {steps: 1}\n"), ["peft.rnak=4"])
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_config(None, ["trian.steps=1"])


# -------------------------------------------------------------------------- mesh


@pytest.mark.parametrize(
    ("mesh", "n", "expected"),
    [
        ({}, 8, (8, 1, 1)),
        ({"data": -1, "fsdp": 2}, 8, (4, 2, 1)),
        ({"data": 2, "fsdp": -1, "tensor": 2}, 8, (2, 2, 2)),
        ({"data": 1, "fsdp": 1, "tensor": -1}, 1, (1, 1, 1)),
        ({"data": 2, "fsdp": 4, "tensor": 1}, 8, (2, 4, 1)),
    ],
)
def test_mesh_resolution(mesh, n, expected):
    cfg = config_from_dict(minimal(mesh=mesh, train={"batch_size": 8}))
    assert resolve_mesh(cfg.mesh, n) == expected
    assert validate_against_devices(cfg, n) == expected


def test_mesh_bad_product():
    cfg = config_from_dict(minimal(mesh={"data": 2, "fsdp": 3, "tensor": 1}))
    with pytest.raises(ConfigError) as info:
        validate_against_devices(cfg, 8)
    assert "mesh data=2 x fsdp=3 x tensor=1 = 6 does not match 8 devices" in str(info.value)
    cfg = config_from_dict(minimal(mesh={"data": -1, "fsdp": 3}))
    with pytest.raises(ConfigError, match="8 devices are not divisible"):
        validate_against_devices(cfg, 8)


def test_batch_divisibility():
    cfg = config_from_dict(
        minimal(mesh={"data": 2, "fsdp": 2, "tensor": 2}, train={"batch_size": 6})
    )
    with pytest.raises(ConfigError) as info:
        validate_against_devices(cfg, 8)
    msg = str(info.value)
    assert "train.batch_size=6" in msg and "data x fsdp" in msg and "= 4" in msg
    # tensor parallelism does not split the batch
    cfg = config_from_dict(
        minimal(mesh={"data": 1, "fsdp": 2, "tensor": 4}, train={"batch_size": 6})
    )
    assert validate_against_devices(cfg, 8) == (1, 2, 4)
    with pytest.raises(ConfigError, match="4 processes"):
        validate_against_devices(cfg, 8, process_count=4)


# --------------------------------------------------------------------- reference


def test_every_field_is_documented():
    for name, cls in SECTIONS.items():
        fields = [f.name for f in dataclasses.fields(cls)]
        assert list(field_docs(cls)) == fields, name
        assert all(field_docs(cls).values()), name
    assert list(field_docs(Config)) == list(SECTIONS)


def test_reference_markdown_mentions_every_field():
    md = config_reference_markdown()
    assert len(SECTIONS) == 11
    for name, cls in SECTIONS.items():
        assert f"## `{name}`" in md
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in md, f"{name}.{f.name}"
    assert "`lorra`" not in md and "`dora`" in md  # choices are listed
    assert "Range: `[0, 1)`" in md
    assert "| `targets` | `tuple[str, ...]` | `[q_proj, v_proj]` |" in md
    for key in (*CHOICES, *RANGES):  # tables only name real fields
        section, name = key.split(".")
        assert name in {f.name for f in dataclasses.fields(SECTIONS[section])}, key


# ----------------------------------------------------------------------- configs/


_NO_CONFIGS = pytest.param(
    None, marks=pytest.mark.skip(reason="configs/ has no *.yaml files yet"), id="no-configs"
)


@pytest.mark.parametrize("path", CONFIG_FILES or [_NO_CONFIGS], ids=lambda p: getattr(p, "name", p))
def test_shipped_configs_parse(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
