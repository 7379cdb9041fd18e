"""GGUF export: a Hugging Face-named model written as one llama.cpp file with ``gguf``'s writer.

The inverse of :mod:`jaxtune.gguf.load`. Each architecture describes its side with an
:class:`~jaxtune.gguf.arch.ExportArch` (metadata keys, tensor table, per-tensor fix-ups);
this module picks tensor types, streams the tensors and writes the file::

    write_gguf(path, config, tensors, tokenizer_kv, general, "q8_0")

``tensors`` is called twice (a factory, not an iterator): once for names and shapes, so
the header can be written first, then to stream the data. Peak memory is one tensor plus
its quantized copy, whatever the model's size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType, LlamaFileType

from jaxtune.gguf import gemma as gguf_gemma
from jaxtune.gguf import llama as gguf_llama
from jaxtune.gguf.arch import KV, ExportArch

Tensors = Callable[[], Iterator[tuple[str, np.ndarray]]]


@dataclass(frozen=True)
class GGUFType:
    """One ``--gguf-type``: the file's ``general.file_type`` and its weights' tensor type."""

    name: str  # CLI spelling, e.g. "q8_0"
    file_type: LlamaFileType
    tensor_type: Q

    @property
    def label(self) -> str:  # llama.cpp's spelling, used in file names: "Q8_0", "F16"
        return self.tensor_type.name

    @property
    def quantized(self) -> bool:
        return self.tensor_type not in (Q.F32, Q.F16, Q.BF16)


GGUF_TYPES: dict[str, GGUFType] = {
    t.name: t
    for t in (
        GGUFType("f32", LlamaFileType.ALL_F32, Q.F32),
        GGUFType("f16", LlamaFileType.MOSTLY_F16, Q.F16),
        GGUFType("bf16", LlamaFileType.MOSTLY_BF16, Q.BF16),
        GGUFType("q8_0", LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
        GGUFType("q4_0", LlamaFileType.MOSTLY_Q4_0, Q.Q4_0),
        GGUFType("q4_1", LlamaFileType.MOSTLY_Q4_1, Q.Q4_1),
        GGUFType("q5_0", LlamaFileType.MOSTLY_Q5_0, Q.Q5_0),
        GGUFType("q5_1", LlamaFileType.MOSTLY_Q5_1, Q.Q5_1),
    )
}

# llama-quantize keeps the output projection (and token_embd when it doubles as the output)
# at Q6_K for the 4- and 5-bit types; gguf-py cannot write K-quants, so its nearest
# higher-precision type stands in, for the embeddings as well.
_HIGH_PRECISION = Q.Q8_0
_EMBEDDINGS = ("token_embd.weight", "output.weight")


def export_arch(config: dict) -> ExportArch:
    """The :class:`ExportArch` for an HF config dict (by ``model_type``).

    Raises:
        ValueError: no GGUF export for this model type, or a config llama.cpp cannot run
            (the message says which field).
    """
    spec = _EXPORTS.get(config.get("model_type"))
    if spec is None:
        raise ValueError(
            f"model_type {config.get('model_type')!r} has no GGUF export "
            f"(supported: {', '.join(sorted(_EXPORTS))})"
        )
    spec.check(config)
    return spec


def tensor_type(gguf_name: str, shape: tuple[int, ...], kind: GGUFType) -> Q:
    """The type one tensor is stored as, the way llama.cpp's converter chooses it.

    1-D tensors and norms stay float32 (llama.cpp's kernels expect it); for the 4- and
    5-bit types the embeddings and output keep Q8_0; a row length the block size does not
    divide falls back to F16, as the converter's ``QuantError`` fallback does.
    """
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or kind.tensor_type == Q.F32:
        return Q.F32
    qtype = kind.tensor_type
    if kind.quantized and qtype != Q.Q8_0 and gguf_name in _EMBEDDINGS:
        qtype = _HIGH_PRECISION
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return Q.F16
    return qtype


def _encode(array: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


def _gguf_tensors(spec: ExportArch, config: dict, tensors: Tensors) -> Iterator:
    """(GGUF name, float array in ggml row order) for every tensor the file holds."""
    table = {hf: g for g, hf in spec.tensors.items()}
    for hf_name, array in tensors():
        parts = hf_name.split(".")
        layer = next((int(p) for p in parts if p.isdecimal()), None)
        key = hf_name if layer is None else hf_name.replace(f".{layer}.", ".{i}.", 1)
        name = table.get(key)
        if name is None:
            raise ValueError(f"tensor {hf_name!r} has no llama.cpp name in {spec.arch!r}")
        yield name.format(i=layer), spec.fix(hf_name, np.asarray(array, np.float32), config)
    yield from spec.extra(config)


def _add_kv(writer: gguf.GGUFWriter, kvs: list[KV]) -> None:
    for key, value, vtype, sub in kvs:
        if value is None:
            continue
        writer.add_key_value(key, value, vtype, sub_type=sub)


def write_gguf(
    path: str | os.PathLike,
    config: dict,
    tensors: Tensors,
    tokenizer_kv: list[KV],
    general_kv: list[KV],
    kind: str | GGUFType = "f32",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Q]:
    """Writes one GGUF file: metadata, tokenizer and every tensor, in llama.cpp's names.

    Args:
        path: the file to write (its directory must exist; an existing file is replaced).
        config: HF ``config.json`` dict (``model_type`` picks the architecture).
        tensors: factory of ``(HF name, float array in HF layout)``, e.g.
            ``("model.layers.0.self_attn.q_proj.weight", [n_heads * head_dim, hidden])``;
            called twice, it must yield the same tensors both times.
        tokenizer_kv / general_kv: ``(key, value, GGUFValueType, array item type)`` rows
            (``tokenizer.*`` and ``general.*``); None values are skipped.
        kind: a :data:`GGUF_TYPES` name or entry.
        progress: called as ``progress(tensors written, tensors in all)``.

    Returns:
        GGUF tensor name -> stored type, in file order.

    Raises:
        ValueError: unsupported model type or config, or a tensor without a llama.cpp name.
    """
    kind = GGUF_TYPES[kind] if isinstance(kind, str) else kind
    spec = export_arch(config)
    plan: dict[str, Q] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, array in _gguf_tensors(spec, config, tensors):
        if name in plan:
            raise ValueError(f"tensor {name!r} is written twice")
        shapes[name] = array.shape
        plan[name] = tensor_type(name, array.shape, kind)

    writer = gguf.GGUFWriter(str(path), spec.arch)
    writer.add_type(gguf.GGUFType.MODEL)
    _add_kv(writer, general_kv)
    _add_kv(writer, spec.kv(config))
    writer.add_file_type(kind.file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_kv(writer, tokenizer_kv)
    for name, qtype in plan.items():
        byte_shape = gguf.quant_shape_to_byte_shape(shapes[name], qtype)
        if qtype == Q.F32:
            dtype, nbytes = np.float32, 4 * math.prod(shapes[name])
        elif qtype == Q.F16:
            dtype, nbytes = np.float16, 2 * math.prod(shapes[name])
        else:
            dtype, nbytes = np.uint8, math.prod(byte_shape)
        shape = byte_shape if dtype == np.uint8 else shapes[name]
        writer.add_tensor_info(name, shape, np.dtype(dtype), nbytes, raw_dtype=qtype)
    writer.write_header_to_file(Path(path))
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for done, (name, array) in enumerate(_gguf_tensors(spec, config, tensors), 1):
        if array.shape != shapes[name]:
            raise ValueError(f"tensor {name!r} changed shape between passes")
        writer.write_tensor_data(_encode(array, plan[name]))
        if progress is not None:
            progress(done, len(plan))
    writer.close()
    return plan


def string_kv(key: str, value: str | None) -> KV:
    """A ``(key, value, STRING, None)`` metadata row (skipped when value is None)."""
    return (key, value, GGUFValueType.STRING, None)


_EXPORTS: dict[str, ExportArch] = {**gguf_llama.EXPORTS, **gguf_gemma.EXPORTS}
