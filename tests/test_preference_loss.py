"""Preference losses and gradients against TRL's formulas in torch, on a tiny random Llama.

The torch side transcribes TRL 1.16.0 (``trl/trainer/dpo_trainer.py``
``DPOTrainer._compute_loss``; ``trl/experimental/orpo/orpo_trainer.py``
``concatenated_forward`` + ``odds_ratio_loss``; ``trl/experimental/cpo/cpo_trainer.py``
``cpo_loss`` with ``loss_type="simpo"``, ``cpo_alpha=0``) on an HF ``LlamaForCausalLM``
with the same weights, batch laid out as TRL does ([chosen; rejected], right-padded).
One addition to TRL 1.16: DPO sigmoid with label smoothing is conservative DPO (TRL's
sigmoid loss before 1.0).
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
import transformers
from flax import nnx
from helpers import perturb

import jaxtune
from jaxtune.config import config_from_dict
from jaxtune.hf.io import iter_hf_tensors
from jaxtune.peft.reference import REFERENCE_ATTR, attach_reference, reference_model
from jaxtune.sharding import make_mesh
from jaxtune.train.step import make_train_step
from jaxtune.train.task import TASKS
from jaxtune.train.tasks.lm import CausalLM
from jaxtune.train.tasks.preference import pair_beta

VOCAB, T = 128, 16


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny random HF Llama (the reference) and a perturbed copy (the policy)."""
    root = tmp_path_factory.mktemp("pref")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        initializer_range=0.1,  # logits O(1): log-probabilities far from uniform
        tie_word_embeddings=False,
    )
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(root / "ref")
    policy = copy.deepcopy(ref)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    policy.save_pretrained(root / "policy")
    return root, ref, policy


def pair_lines(n_pairs=3, seed=0):
    """[(prompt, completion)] per line: pair k's chosen on line 2k, rejected on 2k + 1."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n_pairs):
        prompt = rng.integers(0, VOCAB, rng.integers(2, 6)).tolist()
        for _ in range(2):
            lines.append((prompt, rng.integers(0, VOCAB, rng.integers(1, 9)).tolist()))
    return lines


def jax_batch(lines):
    """jaxtune's batch ([2B, T] interleaved), as collate writes it."""
    n = len(lines)
    out = {k: np.zeros((n, T), np.int32) for k in ("input_ids", "targets", "attention_mask")}
    out.update(positions=np.zeros((n, T), np.int32), segment_ids=np.zeros((n, T), np.int32))
    out["loss_weights"] = np.zeros((n, T), np.float32)
    for i, (p, c) in enumerate(lines):
        ids = p + c
        out["input_ids"][i, : len(ids)] = ids
        out["targets"][i, : len(ids) - 1] = ids[1:]
        out["loss_weights"][i, len(p) - 1 : len(ids) - 1] = 1.0  # targets in the completion
        out["attention_mask"][i, : len(ids)] = 1
        out["positions"][i, : len(ids)] = np.arange(len(ids))
        out["segment_ids"][i, : len(ids)] = 1
    return {k: jnp.asarray(v) for k, v in out.items()}


def torch_batch(lines):
    """TRL's collated batch: [chosen; rejected], right-padded, completion_mask."""
    order = lines[0::2] + lines[1::2]
    ids, attn, comp = (torch.zeros((len(order), T), dtype=torch.long) for _ in range(3))
    for i, (p, c) in enumerate(order):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attn[i, : len(p) + len(c)] = 1
        comp[i, len(p) : len(p) + len(c)] = 1
    return ids, attn, comp


def trl_loss(model, ref_model, lines, objective, beta, loss_type="sigmoid", eps=0.0, gamma=0.5):
    """TRL 1.16's loss and metrics (transcribed), for the policy ``model``."""
    ids, attn, comp = torch_batch(lines)
    logits = model(input_ids=ids, attention_mask=attn).logits.float()
    per_token = torch.gather(logits[:, :-1].log_softmax(-1), 2, ids[:, 1:, None])[..., 0]
    mask = comp[:, 1:].float()
    logps, n = (per_token * mask).sum(-1), mask.sum(-1)
    b = len(lines) // 2
    m = {}
    if objective == "dpo":
        with torch.no_grad():
            ref_logits = ref_model(input_ids=ids, attention_mask=attn).logits.float()
            ref_tok = torch.gather(ref_logits[:, :-1].log_softmax(-1), 2, ids[:, 1:, None])[..., 0]
            ref = (ref_tok * mask).sum(-1)
        chosen_lr, rejected_lr = logps[:b] - ref[:b], logps[b:] - ref[b:]
        delta = chosen_lr - rejected_lr
        if loss_type == "sigmoid":  # cDPO when eps > 0 (TRL < 1.0's sigmoid)
            loss = -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps
        elif loss_type == "hinge":
            loss = torch.relu(1 - beta * delta)
        else:  # ipo: normalised by completion length (completion_mask.sum)
            c_len, r_len = comp.sum(1).clamp(min=1.0).chunk(2)
            loss = (chosen_lr / c_len - rejected_lr / r_len - 1 / (2 * beta)) ** 2
        rc, rr = beta * chosen_lr.detach(), beta * rejected_lr.detach()
        lc, lr = logps[:b], logps[b:]
        loss = loss.mean()
    else:
        avg = logps / n  # get_batch_logps(average_log_prob=True)
        lc, lr = avg[:b], avg[b:]
        rc, rr = beta * lc.detach(), beta * lr.detach()
        if objective == "orpo":
            # NLL over the chosen rows' prompt + completion (labels = ids where attended).
            labels = torch.where(attn == 1, ids, -100)[:b, 1:]
            nll = F.cross_entropy(logits[:b, :-1].reshape(-1, VOCAB), labels.reshape(-1))

            def log1mexp(x):
                t = -0.6931471805599453
                return torch.where(x < t, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))

            log_odds = (lc - lr) - (log1mexp(lc) - log1mexp(lr))
            ratio = F.logsigmoid(log_odds)
            loss = nll - (beta * ratio).mean()
            m.update(nll_loss=nll.item(), log_odds_ratio=ratio.mean().item())
            m["log_odds_chosen"] = log_odds.mean().item()
        else:  # simpo
            x = (lc - lr) - gamma / beta
            loss = (-F.logsigmoid(beta * x) * (1 - eps) - F.logsigmoid(-beta * x) * eps).mean()
    m.update(
        {
            "rewards/chosen": rc.mean().item(),
            "rewards/rejected": rr.mean().item(),
            "rewards/accuracies": (rc > rr).float().mean().item(),
            "rewards/margins": (rc - rr).mean().item(),
            "logps/chosen": lc.mean().item(),
            "logps/rejected": lr.mean().item(),
        }
    )
    return loss, m


def config(root, objective, peft=None, model=None, **pref):
    return config_from_dict(
        {
            # Unscanned layers: op-by-op (eager) gradients are then fast after a warm-up.
            "model": {"path": str(root / "ref"), "scan_layers": False, **(model or {})},
            "data": {"format": "preference"},
            "peft": peft or {"method": "full"},
            "train": {"objective": objective, "steps": 1},
            "preference": pref,
        }
    )


def jaxtune_policy(root, task):
    """The policy as jaxtune loads it (DPO: reference copied first, then policy weights)."""
    kw = dict(dtype="float32", scan_layers=False)
    if task.name != "dpo":
        return jaxtune.from_pretrained(root / "policy", **kw)
    model = jaxtune.from_pretrained(root / "ref", **kw)
    attach_reference(model, task.trainable(model))
    policy = jaxtune.from_pretrained(root / "policy", **kw)
    nnx.update(model, nnx.state(policy, nnx.Param))
    return model


def jaxtune_loss_and_grads(model, task, batch):
    graphdef, params, frozen = nnx.split(model, task.trainable(model), ...)

    def mean_loss(params):
        s, w, m = task.loss_sums(nnx.merge(graphdef, params, frozen), batch, None)
        return s / w, {k: v / w for k, v in m.items()}

    (loss, metrics), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
    hf_grads = dict(iter_hf_tensors(nnx.merge(graphdef, grads, frozen)))
    return float(loss), {k: float(v) for k, v in metrics.items()}, hf_grads


CASES = [
    ("dpo", {"loss_type": "sigmoid"}),
    ("dpo", {"loss_type": "sigmoid", "label_smoothing": 0.2}),
    ("dpo", {"loss_type": "ipo", "beta": 0.5}),
    ("dpo", {"loss_type": "hinge", "beta": 0.3}),
    ("orpo", {"beta": 0.25}),
    ("simpo", {}),
    ("simpo", {"beta": 2.5, "simpo_gamma": 0.8, "label_smoothing": 0.1}),
]


@pytest.mark.parametrize("objective, pref", CASES, ids=[f"{o}-{p}" for o, p in CASES])
def test_loss_metrics_and_gradients_match_trl(hf, objective, pref):
    root, ref, policy = hf
    cfg = config(root, objective, **pref)
    task = TASKS[objective](cfg)
    beta = pair_beta(cfg)
    lines = pair_lines()
    loss, metrics, grads = jaxtune_loss_and_grads(
        jaxtune_policy(root, task), task, jax_batch(lines)
    )
    policy.zero_grad()
    want, want_metrics = trl_loss(
        policy,
        ref,
        lines,
        objective,
        beta,
        pref.get("loss_type", "sigmoid"),
        pref.get("label_smoothing", 0.0),
        pref.get("simpo_gamma", 0.5),
    )
    want.backward()
    np.testing.assert_allclose(loss, want.item(), rtol=1e-5, atol=1e-5)
    assert metrics.keys() == want_metrics.keys()
    for k, v in want_metrics.items():
        np.testing.assert_allclose(metrics[k], v, rtol=1e-5, atol=1e-5, err_msg=k)
    named = dict(policy.named_parameters())
    assert grads.keys() == named.keys()
    biggest = max(float(np.abs(g).max()) for g in grads.values())
    assert biggest > 1e-3  # the gradients are not trivially zero
    for name, g in grads.items():
        np.testing.assert_allclose(g, named[name].grad.numpy(), atol=1e-5, err_msg=name)


def test_chunked_cross_entropy_gives_the_same_dpo_loss(hf):
    root = hf[0]
    lines = pair_lines()
    out = []
    for chunk in (0, 4):
        task = TASKS["dpo"](config(root, "dpo", model={"loss_chunk": chunk}))
        out.append(jaxtune_loss_and_grads(jaxtune_policy(root, task), task, jax_batch(lines)))
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-6)
    for k in out[0][2]:
        np.testing.assert_allclose(out[0][2][k], out[1][2][k], atol=1e-6, err_msg=k)


def nbytes(model, kind=nnx.Variable) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(nnx.state(model, kind)))


def test_lora_dpo_keeps_one_copy_of_the_base_and_its_reference_is_the_base(hf):
    root = hf[0]
    mesh = make_mesh(1, 1, 1, jax.devices()[:1])
    lora = {"method": "lora", "rank": 4, "alpha": 8, "targets": "all-linear"}
    dpo_task = TASKS["dpo"](config(root, "dpo", peft=lora))
    sft_cfg = config_from_dict(
        {
            "model": {"path": str(root / "ref"), "scan_layers": False},
            "peft": lora,
            "train": {"steps": 1},
        }
    )
    dpo, sft = dpo_task.build_model(mesh), CausalLM(sft_cfg).build_model(mesh)
    assert nbytes(dpo) == nbytes(sft)  # no second copy of the base weights
    assert not getattr(dpo, REFERENCE_ATTR).weights
    perturb(dpo)  # trained LoRA factors: the policy now differs from the base
    batch = jax_batch(pair_lines())
    base = jaxtune.from_pretrained(root / "ref", dtype="float32", scan_layers=False)
    want = dpo_task.completion_logps(base, batch, None)
    got = dpo_task.completion_logps(reference_model(dpo), batch, None)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    policy = dpo_task.completion_logps(dpo, batch, None)
    assert np.abs(np.asarray(policy - want)).max() > 1e-2
    # DoRA and bottleneck adapters switch off alike: the reference is the base model.
    for peft in ({**lora, "method": "dora"}, {"method": "adapter", "adapter_size": 4}):
        model = TASKS["dpo"](config(root, "dpo", peft=peft)).build_model(mesh)
        perturb(model)
        for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):  # adapters' up = 0
            if v.get_value().ndim and not np.any(np.asarray(v.get_value())):
                v.set_value(v.get_value() + 0.1)
        got = dpo_task.completion_logps(reference_model(model), batch, None)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=peft["method"])
        moved = dpo_task.completion_logps(model, batch, None)
        assert np.abs(np.asarray(moved - want)).max() > 1e-3, peft["method"]
    # Full fine-tuning keeps exactly one frozen copy of the weights for the reference.
    full = TASKS["dpo"](config(root, "dpo")).build_model(mesh)
    copies = nbytes(getattr(full, REFERENCE_ATTR))
    assert copies == nbytes(full, nnx.Param) == nbytes(full) - copies


def test_accumulated_micro_batches_equal_one_big_batch(hf):
    root = hf[0]
    task = TASKS["dpo"](config(root, "dpo"))
    model = jaxtune_policy(root, task)
    graphdef, params, frozen = nnx.split(model, task.trainable(model), ...)
    tx = optax.sgd(0.5)
    big = jax_batch(pair_lines(n_pairs=4, seed=1))
    stacked = {k: v.reshape(2, -1, T) for k, v in big.items()}  # 2 micro-batches of 2 pairs
    out = []
    for accum, batch in ((1, big), (2, stacked)):
        state = {"step": jnp.int32(0), "params": params, "opt_state": tx.init(params)}
        state["seed"] = jnp.uint32(0)
        step = jax.jit(make_train_step(graphdef, tx, grad_accum=accum, loss_sums=task.loss_sums))
        out.append(step(state, frozen, batch))
    (s1, m1), (s2, m2) = out
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    assert m1["tokens"] == m2["tokens"] == 4  # the weight is the number of pairs
    for k in m1["task"]:
        np.testing.assert_allclose(m1["task"][k], m2["task"][k], rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
