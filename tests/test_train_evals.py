"""The trainer runs eval.tasks (before, during, after training) and classification runs.

Tiny random Llama + word-level tokenizer (jaxtune.train.testing): milliseconds per step.
"""

import json

import jax
import numpy as np
import pytest

import jaxtune
from jaxtune.config import load_config
from jaxtune.errors import ConfigError
from jaxtune.train import testing as T
from jaxtune.train.loop import train

MESH = "{data: 2, fsdp: 4, tensor: 1}"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("evals")
    T.write_tiny_model(root / "model", hidden=32, layers=2)
    T.write_reverse_data(root / "train.jsonl", n=64)
    T.write_reverse_data(root / "val.jsonl", n=16, seed=1)
    # A multiple-choice task in the user format: which continuation reverses the words.
    rng = np.random.default_rng(3)
    with open(root / "mc.jsonl", "w") as f:
        for _ in range(12):
            q = list(rng.choice(T.WORDS, 3, replace=False))
            wrong = [q[1], q[0], q[2]]
            choices = [" ".join(q[::-1]), " ".join(wrong)]
            label = int(rng.integers(2))
            if label == 1:
                choices = choices[::-1]
            row = {"context": f"Reverse: {' '.join(q)}", "choices": choices, "label": label}
            f.write(json.dumps(row) + "\n")
    return root


def _cfg(root, name, **sections):
    sections.setdefault("mesh", MESH)
    data = (
        f"{{train: {root / 'train.jsonl'}, validation: {root / 'val.jsonl'}, "
        f"format: instruction, template: plain, length_buckets: [32], "
        f"cache_dir: {root / 'cache'}}}"
    )
    sections.setdefault("data", data)
    path = T.write_config(
        root / name / "cfg.yaml",
        root / "model",
        root / "train.jsonl",
        root / name / "run",
        **sections,
    )
    return load_config(path)


def test_eval_tasks_run_before_during_and_after_training(root):
    tasks = f"[{root / 'mc.jsonl'}, perplexity]"
    cfg = _cfg(
        root,
        "tasks",
        train="{steps: 4, batch_size: 8, seq_len: 32}",
        eval=f"{{tasks: {tasks}, every: 2, batch_size: 8}}",
    )
    out = train(cfg)
    run = root / "tasks" / "run"
    assert sorted(p.name for p in (run / "eval").glob("step_*.json")) == [
        "step_0.json",
        "step_2.json",
        "step_4.json",
    ]
    rows = {r["step"]: r for r in T.read_metrics(run)}
    for step in (2, 4):
        assert 0.0 <= rows[step]["tasks/mc/acc"] <= 1.0
        assert rows[step]["tasks/perplexity/perplexity"] > 1.0
    assert "tasks/mc/acc" not in rows[1]
    assert out["eval"]["tasks/mc/acc_norm"] == rows[4]["tasks/mc/acc_norm"]
    # The trainer scores what `jaxtune eval` scores on the saved run.
    model = jaxtune.from_pretrained(run)
    ref = jaxtune.eval.run_tasks(
        model, jaxtune.load_tokenizer(run), [str(root / "mc.jsonl")], batch_size=8, log=None
    )
    assert ref["mc"]["acc"] == rows[4]["tasks/mc/acc"]
    assert ref["mc"]["acc_norm"] == rows[4]["tasks/mc/acc_norm"]
    # Before/after: step 0 is the base model, and the report puts both side by side.
    before = json.loads((run / "eval" / "step_0.json").read_text())
    assert before["perplexity"]["loss"] > rows[4]["tasks/perplexity/loss"]
    md = (run / "eval" / "eval_report.md").read_text()
    assert "before" in md and "after" in md and "mc" in md


def test_unknown_task_fails_before_training(root, tmp_path):
    cfg = _cfg(root, "badtask", eval="{tasks: [arc_easyy]}")
    with pytest.raises(ConfigError, match="arc_easy"):
        train(cfg)
    assert not list((root / "badtask" / "run" / "checkpoints").glob("*"))


def test_early_stopping_watches_a_task_metric(root):
    cfg = _cfg(
        root,
        "early",
        train=(
            "{steps: 8, batch_size: 8, seq_len: 32, early_stopping_patience: 1, "
            "early_stopping_metric: tasks/mc/acc}"
        ),
        optim="{lr: 1e-9, schedule: constant}",  # acc cannot improve
        eval=f"{{tasks: [{root / 'mc.jsonl'}], every: 2, at_start: false, batch_size: 8}}",
    )
    out = train(cfg)
    assert out["steps"] == 4 and out["stop_reason"].startswith("early stopping")


def test_early_stopping_state_survives_a_resume(root):
    # Patience 2, evals every 2 steps, a metric that cannot improve: the uninterrupted
    # run stops at step 6 (best at 2, worse at 4 and 6). Interrupted after step 4, the
    # resumed run must remember the best and the one bad evaluation and stop at 6 too.
    def cfg(name):
        return _cfg(
            root,
            name,
            train="{steps: 10, batch_size: 8, seq_len: 32, early_stopping_patience: 2, "
            "early_stopping_metric: tasks/mc/acc}",
            optim="{lr: 1e-9, schedule: constant}",  # acc cannot improve
            eval=f"{{tasks: [{root / 'mc.jsonl'}], every: 2, at_start: false, batch_size: 8}}",
            checkpoint="{async_save: false}",
        )

    whole = train(cfg("es_whole"))
    assert whole["steps"] == 6 and whole["stop_reason"].startswith("early stopping")
    part = cfg("es_part")
    assert train(part, stop_after=4)["steps"] == 4
    resumed = train(part)
    assert resumed["steps"] == 6 and resumed["stop_reason"] == whole["stop_reason"]


# ------------------------------------------------------------------ classification


def _write_cls(path, n, seed):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            label = int(rng.integers(2))
            pool = T.WORDS[:6] if label == 0 else T.WORDS[6:]
            text = " ".join(rng.choice(pool, rng.integers(3, 7)))
            f.write(json.dumps({"text": text, "label": ["low", "high"][label]}) + "\n")


@pytest.fixture(scope="module")
def cls_data(root):
    for name, n, seed in (("cls_train", 96, 0), ("cls_val", 24, 1), ("cls_test", 40, 2)):
        _write_cls(root / f"{name}.jsonl", n, seed)
    return (
        f"{{train: {root / 'cls_train.jsonl'}, validation: {root / 'cls_val.jsonl'}, "
        f"test: {root / 'cls_test.jsonl'}, format: classification, labels: [low, high], "
        f"length_buckets: [16], cache_dir: {root / 'cache'}}}"
    )


def _cls_cfg(root, cls_data, name, steps=8, **sections):
    sections.setdefault(
        "peft",
        "{method: lora, rank: 4, alpha: 8, targets: all-linear, "
        "head: classification, pooling: last}",
    )
    sections.setdefault("train", f"{{steps: {steps}, batch_size: 8, seq_len: 16}}")
    sections.setdefault("optim", "{lr: 0.03, schedule: constant}")
    sections.setdefault("checkpoint", "{every: 12, async_save: false}")
    return _cfg(root, name, data=cls_data, **sections)


def test_classification_trains_resumes_exactly_and_exports(root, cls_data, tmp_path):
    ckpt = "{every: 4, async_save: false}"
    with T.persistent_compile_cache(root / "xla"):  # three runs, one program
        out = train(_cls_cfg(root, cls_data, "cls", checkpoint=ckpt))
        cfg = _cls_cfg(root, cls_data, "cls_split", checkpoint=ckpt)
        assert train(cfg, stop_after=4)["steps"] == 4
        assert train(cfg)["steps"] == 8 == out["steps"]
    # Resume = uninterrupted, head included.
    _, a = T.checkpoint_arrays(root / "cls" / "run")
    _, b = T.checkpoint_arrays(root / "cls_split" / "run")
    assert a.keys() == b.keys() and any(k.startswith("head") for k in a)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    run = root / "cls" / "run"
    assert T.read_metrics(run)[-1]["eval/accuracy"] >= 0.9  # separable by vocabulary
    report = json.loads((run / "classification_report.json").read_text())
    assert report["split"] == "test" and report["n"] == 40
    assert report["accuracy"] > report["majority"] + 0.2
    assert out["eval"]["test/accuracy"] == report["accuracy"]
    md = (run / "classification_report.md").read_text()
    assert "| gold \\ pred | low | high |" in md
    # eval.bias_probe (builtin): the tiny word-level tokenizer knows none of the probe's
    # words, so all variants of a group are the same ids: nothing can flip.
    assert report["bias_probe"]["attributes"]["pronoun"]["groups"] == 25
    assert report["bias_probe"]["attributes"]["pronoun"]["flip_rate"] == 0.0
    assert "## Bias probe (builtin)" in md and "| pronoun | 25 | 0.000 | 0.000 |" in md
    # The run loads back as the trained classifier, and exports as an HF
    # *ForSequenceClassification directory that reproduces its logits.
    from jaxtune.cli import main
    from jaxtune.hf.classifier import load_classifier

    assert main(["export", str(run), str(tmp_path / "hf"), "--merged"]) == 0
    clf = jaxtune.from_pretrained(run)
    reloaded = load_classifier(tmp_path / "hf")
    ids = np.array([[4, 6, 7, 8, 1], [9, 10, 11, 12, 13]], np.int32)
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], np.int32)
    np.testing.assert_allclose(
        np.asarray(reloaded(ids, mask)), np.asarray(clf(ids, mask)), atol=1e-5
    )
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"]
    assert cfg["id2label"] == {"0": "low", "1": "high"}


def test_feature_method_runs_through_jaxtune_train(root, cls_data):
    peft = "{method: feature, head: classification, pooling: mean}"
    train_cfg = "{steps: 200, batch_size: 8, seq_len: 16}"
    cfg = _cls_cfg(root, cls_data, "cls_feature", peft=peft, optim="{lr: 0.05}", train=train_cfg)
    out = train(cfg)
    run = root / "cls_feature" / "run"
    report = json.loads((run / "classification_report.json").read_text())
    assert report["method"] == "feature" and report["trainable_params"] < 100
    assert report["bias_probe"]["probe"] == "builtin"
    assert "## Bias probe (builtin)" in (run / "classification_report.md").read_text()
    assert out["eval"]["test/accuracy"] == report["accuracy"] > report["majority"]
    # The fitted head is the run's checkpoint: the run loads back as the classifier
    # that scored the report (backbone from model.path + head), and scores the same.
    from jaxtune.api import load_tokenizer
    from jaxtune.config import load_config
    from jaxtune.data import build_datasets
    from jaxtune.eval.classification import classification_metrics, predict

    clf = jaxtune.from_pretrained(run)
    saved = load_config(run / "config.yaml")
    test = build_datasets(saved.data, load_tokenizer(saved.model.path), 16)["test"]
    logits, gold = predict(clf, test, 8)
    m = classification_metrics(np.asarray(logits).argmax(-1), gold, 2)
    assert m["accuracy"] == report["accuracy"] and m["confusion"] == report["confusion"]
    # Run again on the same directory: resumes as finished, same report.
    assert train(cfg)["eval"] == out["eval"]


def test_head_and_format_must_agree(root, cls_data):
    with pytest.raises(ConfigError, match="peft.head"):
        _cls_cfg(root, cls_data, "mismatch", peft="{method: lora, rank: 4, alpha: 8}")
    assert jax.device_count() == 8


def test_classifier_backbone_follows_the_model_section(root, cls_data):
    # model.quantize / attention / compute_dtype reach a classifier's backbone too.
    from jaxtune import quant
    from jaxtune.loading import build_classifier

    model = f"{{path: {root / 'model'}, quantize: nf4, attention: xla, compute_dtype: bfloat16}}"
    cfg = _cls_cfg(root, cls_data, "cls_q", steps=2, model=model)
    clf = build_classifier(cfg, 2)
    assert quant.quant_format(clf.backbone) == "nf4"
    assert clf.backbone.config.attention_impl == "xla"
    assert clf.backbone.compute_dtype == jax.numpy.bfloat16
    out = train(cfg)
    assert out["steps"] == 2 and np.isfinite(out["final_loss"])
