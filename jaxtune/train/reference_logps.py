"""DPO's reference log-probabilities computed once before training and cached on disk
(``preference.precompute_ref: true``, TRL's ``precompute_ref_log_probs``).

The reference is the model as built, before any update: adapters switched off
(:func:`jaxtune.peft.reference.reference_model`), base weights as loaded. One in-order pass
over a split scores every completion; the result, float32 [N] (one value per example:
pair ``k``'s chosen side at ``2k``, rejected at ``2k + 1``), is saved under the data cache
(``<data.cache_dir>/ref_logps/<key>.npy``) keyed by the split's fingerprint (its files,
tokenization and ``seq_len``) and a hash of the model's files and numerics. A resumed or
repeated run reads it back; the step then needs neither a reference pass nor, for
``peft.method: full``, a frozen copy of the weights.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxtune.atomic import atomic_file
from jaxtune.data import BatchIterator
from jaxtune.data.splits import hash_files
from jaxtune.data.tokenized import default_cache_dir
from jaxtune.peft.reference import reference_model
from jaxtune.resources import resolve_path
from jaxtune.sharding import device_batch, replicated

CACHE_VERSION = 1


def cache_path(cfg, dataset) -> Path:
    """Where the reference log-probabilities of ``dataset`` under ``cfg``'s model live."""
    m = cfg.model
    cache = default_cache_dir(cfg.data)
    key = {
        "version": CACHE_VERSION,
        "data": dataset.fingerprint,
        "model": hash_files([Path(resolve_path(m.path))], cache),
        "numerics": [m.dtype, m.compute_dtype, m.quantize, m.attention, m.loss_chunk],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache / "ref_logps" / f"{dataset.split}-{digest}.npy"


def reference_logps(task, model, dataset, mesh) -> np.ndarray:
    """float32 [N]: the reference's summed completion log-probability of every example.

    Read from the cache when there; else computed with ``task.completion_logps`` on
    :func:`reference_model` of ``model`` (batches of ``train.batch_size`` pairs, sharded
    like training) and written atomically.
    """
    path = cache_path(task.cfg, dataset)
    if path.exists():
        return np.load(path)
    graphdef, state = nnx.split(reference_model(model))
    # Replicated output: every host reads the whole batch's values.
    score = jax.jit(
        lambda state, batch: task.completion_logps(nnx.merge(graphdef, state), batch, None)[0],
        out_shardings=replicated(mesh),
    )
    it = BatchIterator.one_pass(
        dataset, task.cfg.train.batch_size, jax.process_index(), jax.process_count()
    )
    out = np.zeros(dataset.num_examples, np.float32)
    for step in range(it.steps_per_epoch):
        rows = it.global_rows(0, step)
        lines = np.asarray(jax.device_get(score(state, device_batch(next(it), mesh))))
        for k, r in enumerate(rows):
            if r >= 0:  # a pair's examples are 2r (chosen) and 2r + 1 (rejected)
                out[2 * r : 2 * r + 2] = lines[2 * k : 2 * k + 2]
    if jax.process_index() == 0:
        buf = io.BytesIO()
        np.save(buf, out)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_file(path, buf.getvalue())
    return out
