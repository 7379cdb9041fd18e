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
3. Heads are fitted on them by :mod:`jaxtune.feature_heads`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.atomic import cache_entry
from jaxtune.errors import ConfigError
from jaxtune.loading import from_pretrained
from jaxtune.models.heads import backbone_states, l2_normalize, pool
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
        # replace: store() runs on a miss, which includes a damaged entry load() refused.
        with cache_entry(self.root / key, replace=True) as tmp:
            np.save(tmp / "features.npy", feats)
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        return self.root / key

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
