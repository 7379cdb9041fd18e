"""Classification heads fitted on cached features (``peft.method: feature``).

:func:`train_head` fits a linear or MLP head on the cached features in seconds (one
jit-compiled ``lax.scan`` over all optimizer steps). Features are standardised for
training and the standardisation is folded into the head's first layer, so the result
is an ordinary :class:`~jaxtune.models.heads.ClassificationHead` that reads raw pooled
features (and can sit on the backbone in a ``SequenceClassifier``).
:func:`feature_head` caches the features of a run's splits
(:mod:`jaxtune.features`) and fits the head; :func:`feature_run` is a whole
classification run of that kind, scored on the held-out split.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxtune.data import build_datasets
from jaxtune.data.balance import balance_line, class_weight_info, class_weights
from jaxtune.errors import ConfigError
from jaxtune.eval.classification import classification_metrics
from jaxtune.features import FeatureCache, FeatureSpec, dataset_examples
from jaxtune.loading import from_pretrained, load_tokenizer
from jaxtune.models.heads import ClassificationHead


def feature_head(cfg, feature: dict, splits: dict, k: int, *, log=print, **head_kw):
    """Cached features of ``splits`` and a head fitted on the ``train`` one (a run's
    feature path, see ``jaxtune.train.compare.run``).

    Args:
      cfg: run config (``model``, ``peft.pooling`` / ``feature_layer`` / ``head_hidden``).
      feature: options (``cache_dir``, ``layer``, ``normalize``, ``batch_size``,
        ``head_steps``, ``head_lr``, ``l2``, ``l2_grid``, ``folds``).
      splits: {name: classification ``TokenizedDataset``}, with ``train``.
      k: number of classes.
      **head_kw: more :func:`train_head` arguments (``use_bias``, ``activation``).

    Returns:
      (head, {split: features [N, D]}, {split: cache info}, train_head info). The
      backbone is loaded on the first cache miss only and shared by every split.

    The head fits on the train split's rows (``data.balance: oversample`` /
    ``undersample`` resample them; features are cached once per example) and, with
    ``data.balance: weight``, on a class-weighted loss.
    """

    layer = feature.get("layer", cfg.peft.feature_layer)
    spec = FeatureSpec(cfg.peft.pooling, layer, bool(feature.get("normalize")), cfg.model.dtype)
    cache = FeatureCache(feature.get("cache_dir") or "~/.cache/jaxtune/features")
    loaded: list = []

    def loader(path):
        loaded[:] = loaded or [from_pretrained(path, dtype=cfg.model.dtype)]
        return loaded[0]

    feats, infos = {}, {}
    for split, ds in splits.items():
        feats[split], infos[split] = cache.features(
            cfg.model.path,
            dataset_examples(ds),
            spec,
            batch_size=int(feature.get("batch_size", 32)),
            pad_id=ds.pad_id,
            loader=loader,
        )
        hit = "cache hit" if infos[split]["hit"] else "computed"
        log(f"features {split}: {hit} ({infos[split]['seconds']:.1f}s, {infos[split]['key']})")
    train = splits["train"]
    rows = np.asarray(train.row_examples)  # one example per row: classification never packs
    weights = class_weights(train.labels, k) if cfg.data.balance == "weight" else None
    head, hinfo = train_head(
        feats["train"][rows],
        np.asarray(train.labels)[rows],
        k,
        hidden=cfg.peft.head_hidden,
        steps=int(feature.get("head_steps", 300)),
        lr=float(feature.get("head_lr", 1e-2)),
        l2=feature.get("l2", "auto"),
        l2_grid=tuple(feature.get("l2_grid", L2_GRID)),
        folds=int(feature.get("folds", 5)),
        seed=cfg.train.seed,
        class_weight=weights,
        groups=rows,
        **head_kw,
    )
    return head, feats, infos, hinfo


L2_GRID = (1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)


def train_head(
    features: np.ndarray,
    labels: np.ndarray,
    num_labels: int,
    *,
    hidden: int = 0,
    activation: str = "relu",
    use_bias: bool = True,
    steps: int = 300,
    lr: float = 1e-2,
    l2: float | str = "auto",
    l2_grid: tuple[float, ...] = L2_GRID,
    folds: int = 5,
    seed: int = 0,
    class_weight: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> tuple[ClassificationHead, dict]:
    """Fits a linear / MLP head on fixed features (full-batch Adam, cross-entropy + L2).

    Args:
      features: float [N, D].
      labels: int [N] in ``[0, K)``; rows with -1 are ignored.
      num_labels: K.
      hidden: 0 = linear (logistic regression), else the MLP width.
      activation: MLP nonlinearity.
      use_bias: head biases. Without them the features are only scaled, not centred,
        before training (a centring shift could not be folded back in).
      steps: optimizer steps (each sees every example).
      lr: Adam learning rate.
      l2: ridge penalty ``l2 / 2 * sum(W ** 2)`` on the kernels (of standardised
        features) added to the mean loss; with few examples and many dimensions the
        head overfits without it. ``"auto"`` picks it from ``l2_grid`` by ``folds``-fold
        cross-validated accuracy on the training features (never the test split).
      seed: head init and fold assignment.
      class_weight: float [K] per-class loss weights (``data.balance: weight``): the loss
        is ``sum_i w[y_i] CE_i / sum_i w[y_i]``, and the cross-validation score of
        ``l2: auto`` weighs held-out hits the same way (balanced accuracy for
        inverse-frequency weights), so the penalty is chosen for the weighted objective.
        None = every example weighs 1.
      groups: int [N] group of each row (the example a row copies, for oversampled
        data): rows of one group share a cross-validation fold, so a copy of a held-out
        example is never trained on. None = each row its own group.

    Returns:
      (head reading raw features, info: ``l2``, ``cv_accuracy`` per grid value,
      ``loss`` curve, ``train_accuracy``, ``seconds``).
    """
    t0 = time.perf_counter()
    keep = np.asarray(labels) >= 0
    x = np.asarray(features, np.float32)[keep]
    y = np.asarray(labels, np.int32)[keep]
    groups = np.arange(len(keep)) if groups is None else np.asarray(groups)
    groups = groups[keep]
    cw = np.ones(num_labels, np.float32) if class_weight is None else class_weight
    cw = jnp.asarray(np.asarray(cw, np.float32)[y])  # [N] each row's class weight
    if len(x) < 2:
        raise ConfigError("train_head: need at least 2 labelled examples")
    mu = x.mean(0) if use_bias else np.zeros(x.shape[1], np.float32)
    sd = np.maximum(x.std(0), 1e-6)
    xs, yj = jnp.asarray((x - mu) / sd), jnp.asarray(y)
    head = ClassificationHead(
        x.shape[1],
        num_labels,
        hidden=hidden,
        activation=activation,
        use_bias=use_bias,
        rngs=nnx.Rngs(seed),
    )
    graphdef, params = nnx.split(head, nnx.Param)
    tx = optax.adam(lr)

    def fit(w, l2_):
        """Trains on examples weighted by w [N] (0 = held out); returns (params, losses)."""

        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(xs)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, yj)
            wc = w * cw
            total = jnp.sum(wc)
            ce = jnp.sum(ce * wc) / jnp.where(total > 0, total, 1.0)
            kernels = [a for a in jax.tree.leaves(p) if a.ndim >= 2]
            return ce + 0.5 * l2_ * sum(jnp.sum(jnp.square(k)) for k in kernels)

        def step(carry, _):
            p, st = carry
            loss, g = jax.value_and_grad(loss_fn)(p)
            u, st = tx.update(g, st, p)
            return (optax.apply_updates(p, u), st), loss

        (p, _), losses = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
        return p, losses

    def fit_and_score(w, l2_):
        p, losses = fit(w, l2_)
        hit = (nnx.merge(graphdef, p)(xs).argmax(-1) == yj).astype(jnp.float32)
        held = (1 - w) * cw
        total = jnp.sum(held)
        return p, losses, jnp.sum(hit * held) / jnp.where(total > 0, total, 1.0)

    cv = None
    if l2 == "auto":
        k = max(2, min(folds, len(x)))
        # Folds over groups (copies of one example together); with one row per group
        # this is a seeded permutation of the rows mod k.
        _, group_of = np.unique(groups, return_inverse=True)
        fold = np.random.default_rng(seed).permutation(group_of.max() + 1)[group_of] % k
        # Rows: k folds (held-out scored) + all data (the final fit of every grid value).
        rows = [fold != i for i in range(k)] + [np.ones(len(x), bool)]
        w = jnp.asarray(np.stack(rows).astype(np.float32))  # [k + 1, N]
        # Every (l2, row) fit at once: one compile, vectorised over grid and rows.
        grid_fit = jax.jit(jax.vmap(jax.vmap(fit_and_score, (0, None)), (None, 0)))
        all_params, all_losses, acc = grid_fit(w, jnp.asarray(l2_grid, jnp.float32))
        cv = np.asarray(acc)[:, :k].mean(axis=1)
        best = int(np.argmax(cv))  # first best: the weakest penalty that ties
        l2 = float(l2_grid[best])
        params = jax.tree.map(lambda a: a[best, k], all_params)
        losses = all_losses[best, k]
    else:
        params, losses = jax.jit(fit)(jnp.ones(len(x), jnp.float32), jnp.float32(l2))
    head = nnx.merge(graphdef, params)
    _fold_standardization(head, mu, sd)
    pred = np.asarray(predict_head(head, x)).argmax(-1)
    losses = np.asarray(losses)
    info = {
        "l2": float(l2),
        "cv_accuracy": None
        if cv is None
        else {str(g): float(a) for g, a in zip(l2_grid, cv, strict=True)},
        "loss": [float(v) for v in losses[:: max(1, steps // 50)]],
        "final_loss": float(losses[-1]),
        "train_accuracy": float((pred == y).mean()),
        "steps": steps,
        "seconds": time.perf_counter() - t0,
    }
    return head, info


def _fold_standardization(head: ClassificationHead, mu: np.ndarray, sd: np.ndarray) -> None:
    """Rewrites the first layer so it reads raw x instead of (x - mu) / sd (in place).

    W' = W / sd[:, None];  b' = b - (mu / sd) @ W.
    """
    first = head.dense if head.dense is not None else head.out
    w = np.asarray(first.kernel[...])
    first.kernel.set_value(jnp.asarray(w / sd[:, None], first.kernel.dtype))
    if first.bias is not None:
        b = np.asarray(first.bias[...]) - (mu / sd) @ w
        first.bias.set_value(jnp.asarray(b, first.bias.dtype))


@nnx.jit
def _apply_head(head, x):
    return head(x)


def predict_head(head: ClassificationHead, features: np.ndarray) -> np.ndarray:
    """float [N, D] -> logits float32 [N, K]."""
    return np.asarray(_apply_head(head, jnp.asarray(features, jnp.float32)))


def feature_only(cfg) -> bool:
    """``peft.method: feature`` with no backbone parameter unfrozen: no backbone
    gradients at all, so the head is fitted on cached features (:func:`feature_run`)."""
    p = cfg.peft
    return p.method == "feature" and not p.unfreeze and not p.unfreeze_top_layers


def classification_data(cfg) -> tuple[dict, dict]:
    """(datasets, result stub) of a classification run config: the splits, and
    ``method``, ``model``, ``eval_split`` (test, else validation), ``train_examples``,
    ``majority`` (accuracy of the train split's majority class on the eval split),
    ``num_labels``, ``label_names``.

    Raises:
      ConfigError: not ``data.format: classification``, or no split to evaluate on.
    """
    if cfg.data.format != "classification":
        raise ConfigError("data.format: classification runs need format classification")
    datasets = build_datasets(cfg.data, load_tokenizer(cfg.model.path), cfg.train.seq_len)
    ev = "test" if "test" in datasets else "validation"
    if ev not in datasets:
        raise ConfigError("classification run: needs a test or validation split to evaluate")
    train_ds, eval_ds = datasets["train"], datasets[ev]
    names = train_ds.label_names
    k = cfg.peft.num_labels or len(names)
    majority = np.bincount(train_ds.labels, minlength=k).argmax()
    return datasets, {
        "method": cfg.peft.method,
        "model": cfg.model.path,
        "eval_split": ev,
        "train_examples": train_ds.num_examples,
        "majority": float(np.mean(eval_ds.labels == majority)),
        "num_labels": int(k),
        "label_names": names if len(names) == k else None,
    }


def feature_run(cfg, *, feature: dict | None = None, log=print) -> dict:
    """A classification run with ``peft.method: feature`` (nothing unfrozen): features
    of train and the eval split cached, a head fitted on them, scored on the eval split.

    Args:
      cfg: run config with ``data.format: classification``.
      feature: options: ``cache_dir``, ``layer`` (overrides ``peft.feature_layer``;
        ``"mean"`` averages layers), ``normalize``, ``head_steps``, ``head_lr``, ``l2``
        (number or ``auto``), ``l2_grid``, ``folds`` (see :func:`train_head`),
        ``batch_size`` (forward).

    Returns:
      A dict as :func:`classification_data`'s stub plus ``accuracy``, ``macro_f1``,
      ``n``, ``confusion``, ``trainable_params``, ``total_params``, ``feature_cache``,
      ``per_class_precision``, ``per_class_recall``, ``per_class_f1``, ``support``,
      ``head_seconds``, ``head_l2``, ``seconds``; and, not JSON, ``_head`` (the fitted
      head), ``_labels`` (``{"num_labels", "label_names"}``) and ``_class_weights``
      (``class_weights.json``'s content with ``data.balance: weight``, else None) for
      callers that save it.
    """
    t0 = time.perf_counter()
    datasets, result = classification_data(cfg)
    ev, k = result["eval_split"], result["num_labels"]
    if line := balance_line(datasets["train"].stats):
        log(line)
    train, eval_ds = datasets["train"], datasets[ev]
    splits = {"train": train, ev: eval_ds}
    head, feats, infos, hinfo = feature_head(cfg, dict(feature or {}), splits, k, log=log)
    logits = predict_head(head, feats[ev])
    n_head = sum(x.size for x in jax.tree.leaves(nnx.state(head, nnx.Param)))
    m = classification_metrics(logits.argmax(-1), eval_ds.labels, k)
    result.update(
        trainable_params=int(n_head),
        total_params=int(infos["train"]["manifest"]["backbone_params"] + n_head),
        feature_cache={
            s: {key: i[key] for key in ("key", "hit", "forward_batches", "seconds")}
            for s, i in infos.items()
        },
        head_seconds=hinfo["seconds"],
        head_l2=hinfo["l2"],
        accuracy=m["accuracy"],
        macro_f1=m["macro_f1"],
        n=m["n"],
        confusion=m["confusion"],
        **{key: m[key] for key in ("per_class_precision", "per_class_recall", "support")},
        per_class_f1=m["per_class_f1"],
        seconds=time.perf_counter() - t0,
        _head=head,
        _labels={"num_labels": k, "label_names": result["label_names"]},
        _class_weights=class_weight_info(train.labels, train.label_names)
        if cfg.data.balance == "weight"
        else None,
    )
    return result
