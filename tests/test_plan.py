"""``jaxtune plan``: AOT compilation of the real train step for a TPU topology / N devices."""

import importlib.util
import json
import math

import pytest

from jaxtune.cli import build_parser
from jaxtune.cli.plan import run as run_plan
from jaxtune.config import load_config
from jaxtune.errors import ConfigError
from jaxtune.train import testing as T
from jaxtune.train.plan import model_config, presets

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install 'jax[tpu]'); TPU topologies need it",
)


def _parse(argv):
    return build_parser().parse_args(["plan", *argv])


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    """A config whose model.path does not exist: the architecture comes from the preset."""
    root = tmp_path_factory.mktemp("plan")
    return T.write_config(
        root / "cfg.yaml",
        root / "not-downloaded",
        root / "train.jsonl",
        root / "run",
        model="{path: /nowhere/model, preset: tiny, dtype: bfloat16, remat: full}",
        mesh="{data: 1, fsdp: -1, tensor: 1}",
        train="{steps: 10, batch_size: 8, seq_len: 64}",
    )


@needs_libtpu
def test_plan_for_a_v5p_topology(tiny_cfg, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert run_plan(_parse([str(tiny_cfg), "--topology", "v5p:2x2x2", "--json", str(out)])) == 0
    text = capsys.readouterr().out
    assert "8 x TPU v5" in text and "fits        yes" in text
    p = json.loads(out.read_text())
    assert p["num_devices"] == 8 and p["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert p["hbm_bytes"] == 95 * 1024**3
    assert 0 < p["argument_bytes"] and 0 < p["temp_bytes"] and p["fits"] is True
    assert p["total_bytes"] == (
        p["argument_bytes"]
        + p["output_bytes"]
        - p["alias_bytes"]
        + p["temp_bytes"]
        + p["code_bytes"]
    )
    assert p["alias_bytes"] > 0  # the donated state is updated in place
    # XLA's live-buffer peak: at least the inputs, at most every allocation at once.
    assert p["argument_bytes"] <= p["peak_bytes"] <= p["total_bytes"]
    assert "XLA peak" in text
    assert p["flops_per_device"] > 0 and p["model_flops"] > 0
    # Too little memory: exit code 1 and a clear message.
    assert run_plan(_parse([str(tiny_cfg), "--topology", "v5p:2x2x2", "--hbm-gib", "1e-6"])) == 1
    captured = capsys.readouterr()
    assert "fits        NO" in captured.out and "does not fit" in captured.err


def test_plan_for_local_devices_without_libtpu(tiny_cfg, capsys):
    # Fake CPU devices; CPU has no memory limit, so the fit is unknown (exit 0).
    argv = [str(tiny_cfg), "mesh.fsdp=2", "mesh.data=-1", "--devices", "2"]
    assert run_plan(_parse(argv)) == 0
    text = capsys.readouterr().out
    assert "2 x cpu" in text and "mesh data=1 x fsdp=2 x tensor=1" in text
    assert "fits        unknown" in text


def test_measure_runs_the_planned_step_on_made_up_inputs(tiny_cfg, tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = [str(tiny_cfg), "mesh.fsdp=2", "mesh.data=-1", "model.quantize=nf4"]
    argv += ["--devices", "2", "--measure", "2", "--json", str(out)]
    assert run_plan(_parse(argv)) == 0
    assert "measured" in capsys.readouterr().out
    m = json.loads(out.read_text())["measured"]
    assert m["steps"] == 2 and len(m["losses"]) == 3 and 0 < m["step_s_min"] <= m["step_s"]
    # Uniform made-up weights: the loss starts near ln(vocab) and training moves it.
    assert abs(m["losses"][0] - math.log(256)) < 0.5 and m["losses"][-1] != m["losses"][0]
    assert m["peak_bytes_in_use"] is None  # the CPU allocator keeps no statistics
    with pytest.raises(ConfigError, match="--measure"):
        run_plan(_parse([str(tiny_cfg), "--topology", "v5p:2x2x2", "--measure", "1"]))


def test_plan_errors(tiny_cfg):
    with pytest.raises(ConfigError, match="expected GENERATION:AxB"):
        run_plan(_parse([str(tiny_cfg), "--topology", "v5p-16"]))
    with pytest.raises(ConfigError, match="does not match 4 devices"):
        run_plan(_parse([str(tiny_cfg), "mesh.fsdp=8", "--devices", "4"]))
    with pytest.raises(ConfigError, match="model.preset 'nope'"):
        run_plan(_parse([str(tiny_cfg), "--devices", "1", "--preset", "nope"]))


def test_architecture_comes_from_path_or_preset(tmp_path):
    cfg = load_config(None, ["train.steps=1", "peft.method=full", "model.path=/nowhere"])
    with pytest.raises(ConfigError, match="set model.preset"):
        model_config(cfg)
    assert model_config(cfg, "llama31_8b").hidden_size == 4096
    assert {"llama31_8b", "llama3_8b", "smollm2_135m"} <= set(presets())
    model_dir = T.write_tiny_model(tmp_path / "m", hidden=48)
    cfg = load_config(
        None,
        ["train.steps=1", "peft.method=full", f"model.path={model_dir}", "model.preset=llama31_8b"],
    )
    assert model_config(cfg).hidden_size == 48  # existing weights win over the preset


RECIPES = {  # recipe: (preset, layers, topology named in its header)
    "llama31_8b_lora.yaml": ("llama31_8b", 32, "v5p:2x2x2"),
    "llama31_8b_full.yaml": ("llama31_8b", 32, "v5p:2x2x2"),
    "mistral_7b_lora.yaml": ("mistral_7b", 32, "v5e:2x4"),
    "tinyllama_1b_full.yaml": ("tinyllama_1b", 22, "v5e:2x2"),
    "qwen2_0_5b_lora.yaml": ("qwen2_0_5b", 24, "v5e:1x1"),
    "qwen2_1_5b_full.yaml": ("qwen2_1_5b", 28, "v5e:2x2"),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_accelerator_recipes_parse_and_name_a_preset(name):
    from pathlib import Path

    path = Path(__file__).parent.parent / "configs" / name
    cfg = load_config(path)
    preset, layers, topology = RECIPES[name]
    assert cfg.model.preset == preset and cfg.model.dtype == "bfloat16"
    assert model_config(cfg).num_layers == layers
    assert f"jaxtune plan configs/{name} --topology {topology}" in path.read_text()


def test_every_preset_recipe_is_listed():
    from pathlib import Path

    configs = Path(__file__).parent.parent / "configs"
    with_preset = {p.name for p in configs.glob("*.yaml") if "preset:" in p.read_text()}
    assert with_preset == set(RECIPES)


# The 8B recipes compile in `make test`; the others (30-40 s of libtpu compilation each,
# the same code path with other shapes) in `make test-heavy`, which CI does not run.
IN_MAKE_TEST = ("llama31_8b_lora.yaml", "llama31_8b_full.yaml")


@pytest.mark.parametrize(
    "name",
    [n if n in IN_MAKE_TEST else pytest.param(n, marks=pytest.mark.heavy) for n in sorted(RECIPES)],
)
def test_accelerator_recipe_fits_its_topology(name, tmp_path):
    """The real train step of each recipe compiles for its TPU slice and fits its HBM
    (XLA's TPU compiler on this CPU host; about a minute per recipe)."""
    import json
    from pathlib import Path

    path = Path(__file__).parent.parent / "configs" / name
    _, layers, topology = RECIPES[name]
    out = tmp_path / "plan.json"
    assert run_plan(_parse([str(path), "--topology", topology, "--json", str(out)])) == 0
    p = json.loads(out.read_text())
    cfg = load_config(path)
    assert p["fits"] is True and p["scanned"] is True
    assert p["total_bytes"] <= p["hbm_bytes"] and p["temp_bytes"] > 0
    assert p["tokens_per_step"] == cfg.train.batch_size * cfg.train.seq_len * cfg.train.grad_accum
    assert p["num_devices"] == p["mesh"]["data"] * p["mesh"]["fsdp"] * p["mesh"]["tensor"]
