"""Judges of a pair of answers to one prompt: a reference metric or a judge model.

* ``exact`` (SQuAD-normalised exact match), ``f1`` (token F1) and ``rougeL`` (ROUGE-L F1)
  score each answer against the prompt's reference(s), the best over several references;
  the higher score wins, equal scores tie.
* a judge model reads a template holding the question and both answers and is asked
  which is better; its verdict is the likelier of the continuations ``A`` / ``B`` under
  :func:`jaxtune.eval.scoring.score_choices` (deterministic, no free text to parse). It
  is asked in both orders, and a model wins only when both orders agree: a judge that
  prefers whatever comes first produces ties, not wins.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxtune.data.encoding import bos_prefix
from jaxtune.errors import ConfigError, DataError
from jaxtune.eval.analysis import normalize_answer, token_f1
from jaxtune.eval.scoring import score_choices

METRICS = ("exact", "f1", "rougeL")
VERDICTS = ("A", "B")

DEFAULT_TEMPLATE = (
    "You are a strict judge. Read the question and two answers, then say which answer is "
    "better: more correct, more helpful, more to the point.\n\n"
    "Question: {question}\n\n"
    "Answer A: {answer_a}\n\n"
    "Answer B: {answer_b}\n\n"
    "Which answer is better, A or B? The better answer is"
)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the SQuAD-normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def _rouge_tokens(text: str) -> list[str]:
    # rouge_score's default tokenizer: lowercase, runs of [a-z0-9], no stemming.
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: longest common token subsequence, as ``rouge_score``'s ``fmeasure``.

    Implemented here because ``rouge_score`` is not a jaxtune dependency (it only comes
    with lm-eval); the tests check this against it where it is installed.
    """
    pred, ref = _rouge_tokens(prediction), _rouge_tokens(reference)
    if not pred or not ref:
        return 0.0
    # LCS by dynamic programming, one row at a time: O(len(pred) * len(ref)).
    prev = [0] * (len(ref) + 1)
    for p in pred:
        cur = [0]
        for k, r in enumerate(ref):
            cur.append(prev[k] + 1 if p == r else max(prev[k + 1], cur[k]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


_METRIC_FNS = {"exact": exact_match, "f1": token_f1, "rougeL": rouge_l}


def metric_score(metric: str, prediction: str, reference: str | Sequence[str]) -> float:
    """``metric`` of a prediction against one reference or the best of several."""
    fn = _METRIC_FNS[metric]
    refs = [reference] if isinstance(reference, str) else list(reference)
    return max(fn(prediction, r) for r in refs)


def check_references(metric: str, rows: Sequence[dict], path: str) -> None:
    """Raises DataError naming the first row without a reference (metric judges need one)."""
    for no, row in enumerate(rows, 1):
        ref = row.get("reference")
        if ref is None or (not isinstance(ref, str) and not ref):
            raise DataError(
                f"{path}: prompt {no} has no 'reference'; --judge {metric} scores answers "
                "against references (give every row one, or judge with a model)"
            )


def metric_judgment(metric: str, answer_a: str, answer_b: str, reference) -> dict:
    """``{"scores": [a, b], "outcome": "a" | "b" | "tie"}``: the higher score wins."""
    a, b = metric_score(metric, answer_a, reference), metric_score(metric, answer_b, reference)
    outcome = "a" if a > b + 1e-12 else "b" if b > a + 1e-12 else "tie"
    return {"scores": [a, b], "outcome": outcome}


def combine_orders(first: str, second: str) -> str:
    """Outcome of a pair judged in both orders.

    Args:
      first: verdict ``"A"``/``"B"``/``"tie"`` with model a shown as answer A.
      second: verdict with the order swapped (model b shown as answer A).

    Returns:
      ``"a"`` when both orders prefer a (``first == "A"`` and ``second == "B"``), ``"b"``
      for the mirror case, else ``"tie"`` (the orders disagree: position bias, not a
      preference).
    """
    if first == "A" and second == "B":
        return "a"
    if first == "B" and second == "A":
        return "b"
    return "tie"


class Template:
    """A judging prompt: a jinja template (holds ``{{`` or ``{%``) or a ``str.format`` one.

    Fields: ``question``, ``answer_a``, ``answer_b`` and ``reference`` ('' when none).
    """

    def __init__(self, text: str = DEFAULT_TEMPLATE, source: str = "template"):
        self.text, self.source = text, source
        self.jinja = None
        if "{{" in text or "{%" in text:
            self.jinja = ImmutableSandboxedEnvironment().from_string(text)
        try:
            self.render("q", "a", "b", None)
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(
                f"{source}: cannot fill the judge template ({type(e).__name__}: {e}); "
                "use the fields {question}, {answer_a}, {answer_b}, {reference}"
            ) from None
        for field in ("question", "answer_a", "answer_b"):
            if field not in text:
                raise ConfigError(f"{source}: the judge template never uses {{{field}}}")

    def render(self, question: str, answer_a: str, answer_b: str, reference) -> str:
        """The judge's context for one ordered pair of answers."""
        if isinstance(reference, list):
            reference = reference[0] if reference else None
        fields = {
            "question": question,
            "answer_a": answer_a,
            "answer_b": answer_b,
            "reference": reference or "",
        }
        if self.jinja is not None:
            return self.jinja.render(**fields)
        return self.text.format(**fields)


def judge_contexts(
    tokenizer, texts: Sequence[str], chat: bool
) -> tuple[list[str], list[str], bool]:
    """Contexts and the two continuations to score, and whether to add special tokens.

    With ``chat`` the context is a user turn rendered with the tokenizer's chat template
    (which writes its own BOS: no special tokens added) and the continuations are the bare
    letters an assistant turn starts with; without, the letters follow a space.
    """
    if not chat:
        return list(texts), [" A", " B"], True
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("--chat given, but the judge's tokenizer has no chat template")
    bos = tokenizer.decode(bos_prefix(tokenizer)) if bos_prefix(tokenizer) else ""
    contexts = []
    for t in texts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True
        )
        contexts.append(text if not bos or text.startswith(bos) else bos + text)
    return contexts, ["A", "B"], False


def model_verdicts(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    chat: bool = False,
    batch_size: int = 16,
    max_len: int = 2048,
    progress=None,
) -> list[dict]:
    """The judge model's verdict on each rendered judging prompt.

    Args:
      texts: N rendered templates (one ordered pair of answers each).
      chat: render each as a user turn with the judge's chat template.

    Returns:
      N ``{"verdict": "A" | "B" | "tie", "logprob": [lp_A, lp_B]}``; equal log-probs tie.
    """
    contexts, conts, special = judge_contexts(tokenizer, texts, chat)
    scores = score_choices(
        model,
        tokenizer,
        [(c, conts) for c in contexts],
        batch_size=batch_size,
        max_len=max_len,
        add_special_tokens=special,
        progress=progress,
    )
    out = []
    for s in scores:
        a, b = (float(x) for x in s.logprob)
        verdict = "A" if a > b else "B" if b > a else "tie"
        out.append({"verdict": verdict, "logprob": [a, b]})
    return out
