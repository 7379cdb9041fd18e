"""`jaxtune sweep`: grids, names, one tokenization per data config, resume after a kill,
nested data sizes, shards + collect, results table and plots, one-line errors."""

import json
from pathlib import Path

import numpy as np
import pytest

import jaxtune.train.sweep as sweep_mod
from jaxtune.cli import main
from jaxtune.config import load_config
from jaxtune.data import build_datasets
from jaxtune.data.config import DataConfig
from jaxtune.data.splits import load_split
from jaxtune.data.tokenized import _Builder
from jaxtune.errors import ConfigError
from jaxtune.loading import load_tokenizer
from jaxtune.train.sweep import expand, parse_shard, sweep
from jaxtune.train.sweep_results import collect
from jaxtune.train.testing import (
    read_metrics,
    write_config,
    write_reverse_data,
    write_tiny_model,
)

GRIDS = ["data.max_examples=8,16", "optim.lr=0.01,0.001"]
NAMES = [
    "max_examples=8,lr=0.01",
    "max_examples=8,lr=0.001",
    "max_examples=16,lr=0.01",
    "max_examples=16,lr=0.001",
]
TIMING = ("wall_time_s", "tokens_per_sec")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """A tiny model, 32 rows (8 held out for validation) and a 2-step LoRA config with
    no data.cache_dir (the sweep puts the cache in OUT/cache)."""
    root = tmp_path_factory.mktemp("sweep")
    model = write_tiny_model(root / "model")
    data = write_reverse_data(root / "data.jsonl", n=32)
    cfg = write_config(
        root / "run.yaml",
        model,
        data,
        root / "unused_run",
        data=(
            f"{{train: {data}, format: instruction, template: plain, length_buckets: [32], "
            "validation_fraction: 0.25}"
        ),
        train="{steps: 2, batch_size: 8, seq_len: 32}",
        checkpoint="{every: 0, async_save: false}",
    )
    return {"root": root, "model": model, "data": data, "cfg": cfg}


@pytest.fixture(scope="module")
def full(base) -> dict:
    """One whole 2x2 sweep, counting the tokenizations it does."""
    calls = []
    real_run = _Builder.run

    def counting_run(self, source):
        calls.append((source.split, self.cfg.max_examples))
        return real_run(self, source)

    mp = pytest.MonkeyPatch()
    mp.setattr(_Builder, "run", counting_run)
    try:
        out = base["root"] / "full"
        result = sweep(base["cfg"], GRIDS, out=out)
    finally:
        mp.undo()
    return {"out": out, "result": result, "tokenized": calls}


def _rows_without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _is_png(path: Path) -> bool:
    import matplotlib.image

    img = matplotlib.image.imread(path)
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and img.ndim == 3 and img.shape[0] > 50


# ---------------------------------------------------------------- no training


def test_grid_expansion_and_names():
    runs = expand(GRIDS)
    assert [r.name for r in runs] == NAMES
    assert runs[1].overrides == ("data.max_examples=8", "optim.lr=0.001")
    assert runs[1].values() == {"data.max_examples": 8, "optim.lr": 0.001}
    # Lists keep their brackets; a last key part shared by two keys stays whole; names
    # are file-safe.
    runs = expand(["peft.targets=[q_proj,v_proj],all-linear", "train.seed=1", "model.seed=2"])
    assert [r.overrides[0] for r in runs] == [
        "peft.targets=[q_proj,v_proj]",
        "peft.targets=all-linear",
    ]
    assert runs[0].name == "targets=_q_proj,v_proj_,train.seed=1,model.seed=2"
    assert all("/" not in r.name and " " not in r.name for r in runs)
    # Random draws: seeded, from the lists or log-uniform in a range, duplicates dropped.
    a = expand(["optim.lr=1e-5:1e-2", "peft.rank=4,8,16"], random=5, seed=3)
    b = expand(["optim.lr=1e-5:1e-2", "peft.rank=4,8,16"], random=5, seed=3)
    c = expand(["optim.lr=1e-5:1e-2", "peft.rank=4,8,16"], random=5, seed=4)
    assert a == b and a != c and len(a) == 5
    for r in a:
        v = r.values()
        assert 1e-5 <= v["optim.lr"] <= 1e-2 and v["peft.rank"] in (4, 8, 16)
    assert len(expand(["peft.rank=4,8"], random=20, seed=0)) == 2
    ints = expand(["peft.rank=2:64"], random=4, seed=0)
    assert all(isinstance(r.values()["peft.rank"], int) for r in ints)


@pytest.mark.parametrize(
    "grids, random, match",
    [
        (["optim.lr"], None, "expected section.key=V1,V2"),
        (["lr=1,2"], None, "expected section.key=V1,V2"),
        (["optim.lr=1,,2"], None, "empty value"),
        (["optim.lr=1e-4:1e-2"], None, "needs --random"),
        (["optim.lr=1e-2:1e-4"], 3, "LO < HI"),
        (["optim.lr=1,2", "optim.lr=3"], None, "swept twice"),
        (["run.dir=a,b"], None, "set by the sweep"),
        ([], None, "nothing to sweep"),
        (["optim.lr=1,2"], 0, "positive number"),
    ],
)
def test_bad_grids(grids, random, match):
    with pytest.raises(ConfigError, match=match):
        expand(grids, random)


def test_shard_spec():
    assert parse_shard("0/2") == (0, 2) and parse_shard("1/2") == (1, 2)
    for bad in ("2/2", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(ConfigError, match="0-based"):
            parse_shard(bad)


def test_max_examples_is_a_nested_seeded_prefix(base):
    """data.max_examples takes the first N of one seeded permutation: 8 inside 16 inside
    all, not the file's first rows, and another split_seed picks others."""

    def indices(n, split="train", seed=0):
        cfg = DataConfig(
            train=str(base["data"]), validation_fraction=0.25, max_examples=n, split_seed=seed
        )
        return [rec.index for rec in load_split(cfg, split)]

    small, large, every = set(indices(8)), set(indices(16)), set(indices(None))
    assert len(small) == 8 and len(large) == 16 and len(every) == 24
    assert small < large < every
    assert sorted(small) != sorted(every)[:8]  # a random subset, not the first rows
    assert set(indices(8, seed=1)) != small
    assert set(indices(4, "validation")) < set(indices(None, "validation"))
    assert indices(8) == sorted(indices(8))  # read in file order


def test_train_fraction_nests_and_keeps_validation(base, tmp_path, monkeypatch):
    """data.train_fraction: the same nested seeded prefix of train only; validation is
    the same examples (one cache entry) whatever the fraction."""

    def cfg(fraction, **kw):
        return DataConfig(
            train=str(base["data"]),
            format="instruction",
            template="plain",
            validation_fraction=0.25,
            train_fraction=fraction,
            cache_dir=str(tmp_path / "cache"),
            **kw,
        )

    def indices(c, split="train"):
        return {rec.index for rec in load_split(c, split)}

    quarter, half, whole = indices(cfg(0.25)), indices(cfg(0.5)), indices(cfg(1.0))
    assert len(quarter) == 6 and len(half) == 12 and len(whole) == 24
    assert quarter < half < whole
    assert indices(cfg(0.5, max_examples=8)) < half  # the smaller of the two caps
    assert indices(cfg(0.25), "validation") == indices(cfg(1.0), "validation")
    calls = []
    real_run = _Builder.run
    monkeypatch.setattr(
        _Builder, "run", lambda self, src: calls.append(src.split) or real_run(self, src)
    )
    tok = load_tokenizer(str(base["model"]))
    small = build_datasets(cfg(0.5), tok, 32)
    large = build_datasets(cfg(1.0), tok, 32)
    assert sorted(calls) == ["train", "train", "validation"]
    assert set(small["train"].hashes.tolist()) < set(large["train"].hashes.tolist())
    assert load_config_error("data.train_fraction=0", base["cfg"])
    assert load_config_error("data.train_fraction=1.5", base["cfg"])


def load_config_error(override: str, path) -> bool:
    with pytest.raises(ConfigError, match="data.train_fraction"):
        load_config(path, [override])
    return True


def test_cli_bad_inputs_one_line_exit_2(base, tmp_path, capsys):
    cfg = str(base["cfg"])
    out = tmp_path / "out"
    cases = [
        ["sweep", cfg, "--grid", "optim.lrr=0.1,0.2", "--out", str(out)],  # unknown key
        ["sweep", cfg, "--grid", "optim.lr=0.1,fast", "--out", str(out)],  # bad value
        ["sweep", cfg, "--grid", "optim.lr", "--out", str(out)],
        ["sweep", cfg, "--grid", "optim.lr=0.1", "--shard", "2/2", "--out", str(out)],
        ["sweep", "--grid", "optim.lr=0.1"],
        ["sweep", "--collect", str(tmp_path)],
        ["sweep", cfg, "--collect", str(tmp_path)],
    ]
    for argv in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1, (argv, err)
    assert not out.exists()  # nothing was started
    (tmp_path / "mine.txt").write_text("x")
    assert main(["sweep", cfg, "--grid", "optim.lr=0.1", "--out", str(tmp_path)]) == 2
    assert "holds no sweep" in capsys.readouterr().err


# ------------------------------------------------------------------- sweeps


def test_full_sweep_results_and_plots(full):
    out, result = full["out"], full["result"]
    rows = json.loads((out / "results.json").read_text())
    assert rows == json.loads(json.dumps(result["rows"]))
    assert [r["name"] for r in rows] == NAMES
    for r in rows:
        assert r["status"] == "completed" and r["steps"] == 2
        assert r["final_train_loss"] > 0 and r["trainable_params"] > 0
        assert r["best_eval_loss"] <= r["final_eval_loss"]
        assert r["wall_time_s"] > 0 and r["tokens_per_sec"] > 0
        assert "eval/perplexity" in r and "retention" not in json.dumps(r)
        assert len(read_metrics(out / r["name"])) == 2
    best = min(rows, key=lambda r: r["final_eval_loss"])["name"]
    assert result["best"] == best
    md = (out / "results.md").read_text()
    best_lines = [line for line in md.splitlines() if "**best**" in line]
    assert len(best_lines) == 1 and f"**{best}**" in best_lines[0]
    assert md.count("| completed |") == 4
    for png in ("metric_vs_data.max_examples.png", "metric_vs_optim.lr.png"):
        assert _is_png(out / png), png
    assert _is_png(out / "validation_curves.png")


def test_tokenizes_once_per_data_config(full):
    """Four runs, two data configs: each split is tokenized twice (once per
    max_examples), and the shared cache OUT/cache holds one entry per split and size."""
    assert sorted(full["tokenized"]) == sorted(
        [("train", 8), ("validation", 8), ("train", 16), ("validation", 16)]
    )
    entries = sorted(p.name.split("-")[0] for p in (full["out"] / "cache").iterdir() if p.is_dir())
    assert entries == ["train", "train", "validation", "validation"]
    assert any((full["out"] / "jax_cache").iterdir())  # the persistent compilation cache


def test_sweep_data_sizes_nest(full):
    """The 8-example runs trained on examples that are all in the 16-example runs'."""
    out = full["out"]

    def hashes(name):
        cfg = load_config(out / name / "config.yaml")
        ds = build_datasets(cfg.data, load_tokenizer(cfg.model.path), cfg.train.seq_len)
        return set(np.asarray(ds["train"].hashes).tolist())

    small, large = hashes(NAMES[0]), hashes(NAMES[2])
    assert len(small) == 8 and len(large) == 16 and small < large


def test_killed_sweep_resumes_without_redoing(base, monkeypatch, capsys):
    out = base["root"] / "killed"
    grids = ["optim.lr=0.01,0.001"]
    real_train = sweep_mod.train
    calls = []

    def killed_in_second_run(cfg, **kw):
        calls.append(Path(cfg.run.dir).name)
        if len(calls) == 2:  # one step of the second run, a checkpoint, then "SIGKILL"
            real_train(cfg, stop_after=1)
            raise RuntimeError("killed")
        return real_train(cfg, **kw)

    monkeypatch.setattr(sweep_mod, "train", killed_in_second_run)
    with pytest.raises(RuntimeError, match="killed"):
        sweep(base["cfg"], grids, out=out)
    first, second = out / "lr=0.01", out / "lr=0.001"
    rows = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in rows] == ["completed", "pending"]  # written after run 1
    done_metrics = (first / "metrics.jsonl").read_bytes()
    done_mtime = (first / "metrics.jsonl").stat().st_mtime_ns
    assert [r["step"] for r in read_metrics(second)] == [1]

    calls.clear()
    monkeypatch.setattr(sweep_mod, "train", lambda cfg, **kw: calls.append(1) or real_train(cfg))
    capsys.readouterr()
    result = sweep(base["cfg"], grids, out=out)
    assert len(calls) == 1  # only the unfinished run trained
    assert f"resumed {second} at step 1" in capsys.readouterr().out
    assert (first / "metrics.jsonl").read_bytes() == done_metrics
    assert (first / "metrics.jsonl").stat().st_mtime_ns == done_mtime
    assert [r["step"] for r in read_metrics(second)] == [1, 2]
    assert [r["status"] for r in result["rows"]] == ["completed", "completed"]
    # A third invocation trains nothing.
    calls.clear()
    sweep(base["cfg"], grids, out=out)
    assert calls == []


def test_shards_and_collect_equal_one_sweep(base, full, capsys):
    out = base["root"] / "sharded"
    common = ["sweep", str(base["cfg"]), "--grid", GRIDS[0], "--grid", GRIDS[1], "--out", str(out)]
    assert main([*common, "--shard", "0/2"]) == 0
    shard0 = json.loads((out / "results.shard-0-of-2.json").read_text())
    assert [r["name"] for r in shard0] == NAMES[0::2]
    assert not (out / "results.json").exists()
    assert main([*common, "--shard", "1/2"]) == 0
    capsys.readouterr()
    assert main(["sweep", "--collect", str(out)]) == 0
    assert "4/4 runs finished" in capsys.readouterr().out
    merged = json.loads((out / "results.json").read_text())
    whole = json.loads((full["out"] / "results.json").read_text())
    assert _rows_without_timing(merged) == _rows_without_timing(whole)
    assert collect(out)["best"] == full["result"]["best"]
    assert (out / "results.md").is_file() and _is_png(out / "validation_curves.png")
