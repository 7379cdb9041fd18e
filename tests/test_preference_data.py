"""data.format: preference: TRL-style tokenization of pairs, truncation, batches, errors,
the data report, and the config rules of the preference objectives."""

import json

import numpy as np
import pytest

from jaxtune.config import config_from_dict
from jaxtune.data import BatchIterator, DataConfig, build_datasets, collate, inspect_data
from jaxtune.data.preference import truncate_pair
from jaxtune.errors import ConfigError, DataError
from jaxtune.train.testing import SPECIALS, WORDS

CHAT = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def tokenizer():
    """A word-level tokenizer that writes BOS before text, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIALS, ":", "user", "assistant", "system", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )
    out.chat_template = CHAT
    return out


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build(tmp_path, rows, seq_len=32, **data):
    cfg = DataConfig(
        train=str(write(tmp_path / "pairs.jsonl", rows)),
        format="preference",
        cache_dir=str(tmp_path / "cache"),
        **data,
    )
    return build_datasets(cfg, tokenizer(), seq_len)["train"]


def ids(text, special=True):
    return tokenizer()(text, add_special_tokens=special)["input_ids"]


def test_standard_pairs_share_the_prompt_ids_end_with_eos_and_train_completions_only(tmp_path):
    tok = tokenizer()
    rows = [
        {"prompt": "alpha beta :", "chosen": " gamma delta", "rejected": " zeta"},
        {"prompt": "eta :", "chosen": " theta", "rejected": " iota kappa mu"},
    ]
    ds = build(tmp_path, rows)
    assert ds.paired and len(ds) == 2 and ds.num_examples == 4
    eos = tok.eos_token_id
    for k, row in enumerate(rows):
        prompt = ids(row["prompt"])
        assert prompt[0] == tok.bos_token_id
        for side, ex in (("chosen", 2 * k), ("rejected", 2 * k + 1)):
            got, mask = ds.example(ex)
            # TRL: tokenize prompt and prompt + completion; the completion is what follows.
            want = ids(row["prompt"] + row[side]) + [eos]
            assert got.tolist() == want
            assert got[: len(prompt)].tolist() == prompt  # both sides share the prompt ids
            assert mask.tolist() == [0] * len(prompt) + [1] * (len(want) - len(prompt))
    batch = collate(ds, [1, -1, 0], 16)
    assert batch["input_ids"].shape == (6, 16)  # 3 pairs, two lines each
    for line, ex in ((0, 2), (1, 3), (4, 0), (5, 1)):  # row 1's chosen, its rejected, row 0's
        want = ds.example(ex)[0]
        np.testing.assert_array_equal(batch["input_ids"][line, : len(want)], want)
        assert batch["attention_mask"][line].sum() == len(want)
    assert batch["attention_mask"][2:4].sum() == 0  # a padding pair: two empty lines
    # loss_weights mark the completion targets (completion + EOS), nothing else.
    n_prompt = len(ids(rows[1]["prompt"]))
    w = batch["loss_weights"][0]
    assert w.tolist() == [0.0] * (n_prompt - 1) + [1.0] * 2 + [0.0] * (16 - n_prompt - 1)
    assert batch["targets"][0, n_prompt] == eos
    it = BatchIterator(ds, 2, shuffle=False)
    assert next(it)["input_ids"].shape[0] == 4


def test_truncation_keeps_the_prompt_end_bos_and_completion_starts():
    prompt, chosen, rejected = [2, *range(10, 30)], list(range(40, 52)), list(range(60, 64))
    p, c, r = truncate_pair(prompt, chosen, rejected, 16, keep_head=1)
    # Prompt first: down to half of seq_len (BOS + its last 7 tokens), then completions.
    assert p == [2, *range(23, 30)]
    assert c == list(range(40, 48)) and r == rejected
    p, c, r = truncate_pair(prompt, chosen[:3], rejected, 16, keep_head=1)
    assert p == [2, *range(19, 30)] and len(p) + 4 == 16 and r == rejected  # room for both
    assert truncate_pair([1, 2], [3], [4, 5], 16) == ([1, 2], [3], [4, 5])


def test_truncated_identical_and_long_pairs_in_stats_and_report(tmp_path):
    long_prompt = " ".join(WORDS * 3) + " :"
    rows = [
        {"prompt": long_prompt, "chosen": " alpha beta", "rejected": " gamma"},
        {"prompt": "alpha :", "chosen": " beta", "rejected": " beta"},
        {"prompt": "delta :", "chosen": " eta", "rejected": " theta iota"},
    ]
    ds = build(tmp_path, rows, seq_len=16)
    assert ds.stats["pairs"] == 3
    assert ds.stats["truncated_pairs"] == 1 and ds.stats["identical_pairs"] == 1
    chosen, mask = ds.example(0)
    assert len(chosen) <= 16 and chosen[0] == tokenizer().bos_token_id
    assert chosen[-1] == tokenizer().eos_token_id  # the completion fits whole after the cut
    assert chosen[-4] == ids(":", special=False)[0]  # the prompt's end is kept
    assert mask.sum() == 3
    cfg = DataConfig(
        train=str(tmp_path / "pairs.jsonl"), format="preference", cache_dir=str(tmp_path / "cache")
    )
    report = inspect_data(cfg, tokenizer(), 16, tmp_path / "report", batch_size=2, echo=False)
    s = report["splits"]["train"]
    assert (s["pairs"], s["truncated_pairs"], s["identical_pairs"]) == (3, 1, 1)
    assert s["length_max"] == len(ids(long_prompt + " alpha beta")) + 1  # longer side, untruncated
    assert s["rendered"][0].startswith("chosen:") and "\nrejected:" in s["rendered"][0]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "truncated pairs" in md and "pairs with chosen == rejected" in md


def test_conversational_pairs_render_with_the_chat_template(tmp_path):
    tok = tokenizer()
    user = {"role": "user", "content": "alpha beta"}
    good, bad = (
        {"role": "assistant", "content": "gamma"},
        {"role": "assistant", "content": "delta epsilon"},
    )
    rows = [
        {"prompt": [user], "chosen": [good], "rejected": [bad]},
        {"chosen": [user, good], "rejected": [user, bad]},  # implicit prompt: shared messages
    ]
    ds = build(tmp_path, rows, system_prompt="zeta")
    system = {"role": "system", "content": "zeta"}
    prompt = tok.apply_chat_template([system, user], tokenize=False, add_generation_prompt=True)
    p_ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    for k in range(2):
        for ex, reply in ((2 * k, good), (2 * k + 1, bad)):
            full = tok.apply_chat_template([system, user, reply], tokenize=False)
            want = [tok.bos_token_id] + tok(full, add_special_tokens=False)["input_ids"]
            got, mask = ds.example(ex)
            assert got.tolist() == want  # no EOS added: the template ends the turn
            assert mask.tolist() == [0] * len(p_ids) + [1] * (len(want) - len(p_ids))
            assert got[-1] == tok.eos_token_id


def test_data_fields_remap_the_three_columns(tmp_path):
    rows = [{"q": "alpha :", "good": " beta", "bad": " gamma"}]
    ds = build(tmp_path, rows, fields={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert ds.example(0)[0].tolist() == ids("alpha : beta") + [tokenizer().eos_token_id]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "alpha", "chosen": " beta"}, r"pairs.jsonl:2: missing field 'rejected'"),
        (
            {"prompt": "alpha", "chosen": " beta", "rejected": [{"role": "user"}]},
            r"pairs.jsonl:2: 'prompt' is str, 'chosen' is str, 'rejected' is list; expected",
        ),
        (
            {"chosen": [{"role": "user", "content": "a"}], "rejected": [{"content": "b"}]},
            r"pairs.jsonl:2: field 'rejected': message 0 has no string 'role'",
        ),
    ],
)
def test_a_bad_row_is_one_line_naming_file_line_and_field(tmp_path, row, message):
    good = {"prompt": "alpha", "chosen": " beta", "rejected": " gamma"}
    with pytest.raises(DataError, match=message) as e:
        build(tmp_path, [good, row])
    assert "\n" not in str(e.value)


def config(**sections):
    base = {"train": {"steps": 1}, "peft": {"method": "full"}}
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return config_from_dict(base)


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"train": {"objective": "dpo"}}, "data.format: train.objective=dpo with data.format="),
        ({"data": {"format": "preference"}}, "train.objective: train.objective=sft with"),
        (
            {
                "train": {"objective": "orpo"},
                "data": {"format": "preference"},
                "preference": {"loss_type": "ipo"},
            },
            "preference.loss_type=ipo has no effect with train.objective=orpo",
        ),
        (
            {
                "train": {"objective": "dpo"},
                "data": {"format": "preference"},
                "preference": {"loss_type": "hinge", "label_smoothing": 0.1},
            },
            "preference.label_smoothing: applies to loss_type sigmoid, not hinge",
        ),
        (
            {
                "train": {"objective": "simpo"},
                "data": {"format": "preference"},
                "preference": {"precompute_ref": True},
            },
            "preference.precompute_ref=true has no effect with train.objective=simpo",
        ),
        (
            {"train": {"objective": "simpo"}, "data": {"format": "preference", "packing": True}},
            "data.packing: not supported with data.format=preference",
        ),
        (
            {
                "train": {"objective": "dpo"},
                "data": {"format": "preference"},
                "preference": {"label_smoothing": 0.5},
            },
            r"preference.label_smoothing: got 0.5, expected a value in \[0, 0.5\)",
        ),
    ],
)
def test_preference_config_rules(sections, message):
    with pytest.raises(ConfigError, match=message):
        config(**sections)


def test_preference_defaults_follow_trl():
    from jaxtune.train.tasks.preference import pair_beta

    cfg = config(train={"objective": "simpo"}, data={"format": "preference"})
    assert pair_beta(cfg) == 2.0 and cfg.preference.simpo_gamma == 0.5
    dpo = config(train={"objective": "dpo"}, data={"format": "preference"})
    assert pair_beta(dpo) == 0.1 and dpo.preference.loss_type == "sigmoid"
    assert dpo.preference.label_smoothing == 0.0 and not dpo.preference.precompute_ref
