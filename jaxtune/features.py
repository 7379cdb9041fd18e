"""Feature-based fine-tuning: frozen-backbone features cached on disk, heads trained on them.

1. :func:`encode_features` runs the frozen backbone once over the examples (jit,
   batches sorted by length and padded to a few bucket lengths, so there are few
   compiles and little padding) and pools each example to one vector [D].
2. :class:`FeatureCache` stores them under a key of *model + data + feature spec*:
   the model's file fingerprint (or a hash of its parameters), a hash of the token ids
   (so texts, tokenizer and truncation), and pooling / layer / normalisation / dtype.
   Labels are not in the key: a second task on the same texts (another label set)
   reuses the features without loading or running the backbone. Each entry is a
   directory with ``features.npy`` [N, D] and ``manifest.json``, written to a temporary
   directory and renamed into place.
3. :func:`train_head` fits a linear or MLP head on the cached features in seconds (one
   jit-compiled ``lax.scan`` over all optimizer steps). Features are standardised for
   training and the standardisation is folded into the head's first layer, so the
   result is an ordinary :class:`~jaxtune.models.heads.ClassificationHead` that reads raw
   pooled features (and can sit on the backbone in a ``SequenceClassifier``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxtune.data import build_datasets
from jaxtune.errors import ConfigError
from jaxtune.eval.classification import classification_metrics
from jaxtune.loading import from_pretrained, load_tokenizer
from jaxtune.models.heads import ClassificationHead, backbone_states, l2_normalize, pool
from jaxtune.resources import resolve_path

CACHE_VERSION = 1
MODEL_SUFFIXES = (".safetensors", ".gguf", ".json")


@dataclass(frozen=True)
class FeatureSpec:
    """How an example becomes a feature vector.

    Attributes:
      pooling: ``cls``, ``mean``, ``last`` or ``pooler`` (see ``jaxtune.models.heads``).
      layer: -1 (final states), an HF hidden-state index, or ``"mean"`` (layers 1..L).
      normalize: L2-normalise the pooled vector (sentence-transformers' ``Normalize``).
      dtype: parameter / compute dtype of the backbone.
    """

    pooling: str = "mean"
    layer: int | str = -1
    normalize: bool = False
    dtype: str = "float32"


# ----------------------------------------------------------------------- fingerprints


def _file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """Size + hashes of the first and last MiB: cheap, and changes with the weights."""
    size = path.stat().st_size
    h = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(size - chunk, chunk))
            h.update(f.read(chunk))
    return h.hexdigest()


def model_fingerprint(model) -> str:
    """Identity of a backbone: its files (HF dir / .gguf) or, in memory, its parameters."""
    if isinstance(model, nnx.Module):
        h = hashlib.blake2b(repr(model.config).encode(), digest_size=16)
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            h.update("/".join(map(str, path)).encode())
            h.update(np.ascontiguousarray(np.asarray(var[...])).tobytes())
        return "params:" + h.hexdigest()

    path = resolve_path(model)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    files = [f for f in files if f.suffix in MODEL_SUFFIXES]
    if not files:
        raise ConfigError(f"{path}: no model files to fingerprint (.safetensors, .gguf, .json)")
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        h.update(f"{f.name}:{_file_digest(f)};".encode())
    return "files:" + h.hexdigest()


def data_fingerprint(examples: list[np.ndarray]) -> str:
    """Hash of the token ids of every example, in order (texts + tokenizer + truncation)."""
    h = hashlib.blake2b(digest_size=16)
    lengths = np.asarray([len(e) for e in examples], np.int64)
    h.update(lengths.tobytes())
    for e in examples:
        h.update(np.asarray(e, np.int32).tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------- extraction


@nnx.jit(static_argnames=("pooling", "layer", "normalize"))
def _pooled(model, ids, mask, pooling, layer, normalize):
    h = backbone_states(model, ids, mask, layer)
    x = model.pooled_output(h) if pooling == "pooler" else pool(h, mask, pooling)
    x = x.astype(jnp.float32)
    return l2_normalize(x) if normalize else x


def encode_features(
    model: nnx.Module,
    examples: list[np.ndarray],
    spec: FeatureSpec,
    *,
    batch_size: int = 32,
    pad_id: int = 0,
    bucket: int = 16,
    progress=None,
) -> tuple[np.ndarray, int]:
    """Pooled features of every example (one frozen forward each).

    Args:
      model: the backbone (``hidden_states(ids, mask) -> [B, T, D]``).
      examples: N int arrays of token ids (unpadded).
      spec: pooling / layer / normalisation.
      batch_size: rows per forward; the last batch is padded with empty rows.
      pad_id: id written into padding (the mask, not the id, marks it).
      bucket: pad T up to a multiple of this (fewer distinct shapes, fewer compiles).
      progress: optional callable ``(done, total)``.

    Returns:
      (features float32 [N, D] in example order, number of forward batches run).
    """
    n = len(examples)
    lengths = np.asarray([len(e) for e in examples])
    if n == 0 or lengths.min() == 0:
        raise ConfigError("feature extraction: every example needs at least one token")
    order = np.argsort(-lengths, kind="stable")  # longest first: the first compile is the max
    out: np.ndarray | None = None
    batches = 0
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        t = int(math.ceil(lengths[idx].max() / bucket) * bucket)
        ids = np.full((batch_size, t), pad_id, np.int32)
        mask = np.zeros((batch_size, t), np.int32)
        for row, i in enumerate(idx):
            ids[row, : lengths[i]] = examples[i]
            mask[row, : lengths[i]] = 1
        mask[len(idx) :, 0] = 1  # filler rows: one token, so no row is fully masked
        feats = np.asarray(
            _pooled(model, ids, mask, spec.pooling, spec.layer, bool(spec.normalize))
        )
        if out is None:
            out = np.zeros((n, feats.shape[-1]), np.float32)
        out[idx] = feats[: len(idx)]
        batches += 1
        if progress is not None:
            progress(min(start + batch_size, n), n)
    return out, batches


# ------------------------------------------------------------------------- the cache


class FeatureCache:
    """Pooled features on disk, keyed by model + data + :class:`FeatureSpec`.

    Args:
      root: cache directory (one sub-directory per entry).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()

    @staticmethod
    def key(model_fp: str, data_fp: str, spec: FeatureSpec) -> str:
        payload = json.dumps(
            {"v": CACHE_VERSION, "model": model_fp, "data": data_fp, "spec": asdict(spec)},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:24]

    def load(self, key: str) -> tuple[np.ndarray, dict] | None:
        """(features [N, D], manifest) of an entry, or None."""
        entry = self.root / key
        try:
            manifest = json.loads((entry / "manifest.json").read_text())
            feats = np.load(entry / "features.npy")
        except (OSError, ValueError):
            return None
        if feats.shape != (manifest["n"], manifest["dim"]):
            return None  # a damaged entry is recomputed, never trusted
        return feats, manifest

    def store(self, key: str, feats: np.ndarray, manifest: dict) -> Path:
        """Writes an entry atomically (a concurrent writer's identical entry wins)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        try:
            np.save(tmp / "features.npy", feats)
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            final = self.root / key
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def features(
        self,
        model,
        examples: list[np.ndarray],
        spec: FeatureSpec,
        *,
        batch_size: int = 32,
        pad_id: int = 0,
        loader=None,
        progress=None,
    ) -> tuple[np.ndarray, dict]:
        """Cached features of ``examples``: computed once, then read from disk.

        Args:
          model: a model path (HF dir / .gguf; loaded only on a miss) or a loaded model.
          examples: N int arrays of token ids.
          spec: the feature spec (part of the key).
          batch_size, pad_id, progress: see :func:`encode_features`.
          loader: ``path -> model`` for a miss (default ``jaxtune.from_pretrained``).

        Returns:
          (features float32 [N, D], info) with info keys ``key``, ``hit``,
          ``forward_batches`` (0 on a hit), ``seconds``, ``manifest``, ``path``.
        """
        t0 = time.perf_counter()
        model_fp = model_fingerprint(model)
        data_fp = data_fingerprint(examples)
        key = self.key(model_fp, data_fp, spec)
        found = self.load(key)
        if found is not None:
            feats, manifest = found
            return feats, self._info(key, True, 0, t0, manifest)
        source = None
        if not isinstance(model, nnx.Module):
            source = str(model)
            if loader is None:
                loader = lambda p: from_pretrained(p, dtype=spec.dtype)  # noqa: E731
            model = loader(model)
        t1 = time.perf_counter()
        feats, batches = encode_features(
            model, examples, spec, batch_size=batch_size, pad_id=pad_id, progress=progress
        )
        manifest = {
            "version": CACHE_VERSION,
            "key": key,
            "model": source or getattr(model, "source", None) or type(model).__name__,
            "model_fingerprint": model_fp,
            "model_config": repr(model.config),
            "backbone_params": int(
                sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
            ),
            "data_fingerprint": data_fp,
            "spec": asdict(spec),
            "n": int(feats.shape[0]),
            "dim": int(feats.shape[1]),
            "max_tokens": int(max(len(e) for e in examples)),
            "forward_batches": batches,
            "forward_seconds": round(time.perf_counter() - t1, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        path = self.store(key, feats, manifest)
        return feats, self._info(key, False, batches, t0, manifest, path)

    def _info(self, key, hit, batches, t0, manifest, path=None) -> dict:
        return {
            "key": key,
            "hit": hit,
            "forward_batches": batches,
            "seconds": time.perf_counter() - t0,
            "manifest": manifest,
            "path": str(path or self.root / key),
        }


def dataset_examples(ds) -> list[np.ndarray]:
    """The token ids of every example of a split (unpadded)."""
    return [ds.example(i)[0] for i in range(ds.num_examples)]


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
    head, hinfo = train_head(
        feats["train"],
        splits["train"].labels,
        k,
        hidden=cfg.peft.head_hidden,
        steps=int(feature.get("head_steps", 300)),
        lr=float(feature.get("head_lr", 1e-2)),
        l2=feature.get("l2", "auto"),
        l2_grid=tuple(feature.get("l2_grid", L2_GRID)),
        folds=int(feature.get("folds", 5)),
        seed=cfg.train.seed,
        **head_kw,
    )
    return head, feats, infos, hinfo


# ------------------------------------------------------------------- head training


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

    Returns:
      (head reading raw features, info: ``l2``, ``cv_accuracy`` per grid value,
      ``loss`` curve, ``train_accuracy``, ``seconds``).
    """
    t0 = time.perf_counter()
    keep = np.asarray(labels) >= 0
    x = np.asarray(features, np.float32)[keep]
    y = np.asarray(labels, np.int32)[keep]
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
            ce = jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)
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
        return p, losses, jnp.sum(hit * (1 - w)) / jnp.maximum(jnp.sum(1 - w), 1.0)

    cv = None
    if l2 == "auto":
        k = max(2, min(folds, len(x)))
        fold = np.random.default_rng(seed).permutation(len(x)) % k
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


# ------------------------------------------------------------------ classification runs


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
      ``head_seconds``, ``head_l2``, ``seconds``; and, not JSON, ``_head`` (the fitted
      head) and ``_labels`` (``{"num_labels", "label_names"}``) for callers that save it.
    """
    t0 = time.perf_counter()
    datasets, result = classification_data(cfg)
    ev, k = result["eval_split"], result["num_labels"]
    eval_ds = datasets[ev]
    splits = {"train": datasets["train"], ev: eval_ds}
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
        seconds=time.perf_counter() - t0,
        _head=head,
        _labels={"num_labels": k, "label_names": result["label_names"]},
    )
    return result
