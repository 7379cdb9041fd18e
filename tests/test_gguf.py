"""Native GGUF importer: parity with transformers' GGUF loading, tiny synthetic files, errors.

Fast tests write tiny GGUF files with ``gguf.GGUFWriter`` (llama.cpp's q/k permutation
applied by hand); ``slow`` tests use the real SmolLM2 file and transformers + torch as the
reference.
"""

import math
import subprocess
import sys
import textwrap

import gguf
import numpy as np
import pytest

from jaxtune.errors import ModelLoadError
from jaxtune.gguf.load import iter_gguf_tensors, load_gguf_tokenizer, read_gguf_config
from jaxtune.gguf.reader import GGUFFile, GGUFFormatError

# ----------------------------------------------------------------------------- helpers

N_LAYERS, HIDDEN, N_HEAD, N_KV, FFN, VOCAB = 2, 64, 4, 2, 128, 96


def _permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py's q/k permutation (HF rotate-half -> interleaved)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _hf_weights(head_dim, tied, seed=0):
    rng = np.random.default_rng(seed)

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    w = {"model.embed_tokens.weight": r(VOCAB, HIDDEN), "model.norm.weight": r(HIDDEN)}
    if not tied:
        w["lm_head.weight"] = r(VOCAB, HIDDEN)
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = r(HIDDEN)
        w[p + "post_attention_layernorm.weight"] = r(HIDDEN)
        w[p + "self_attn.q_proj.weight"] = r(N_HEAD * head_dim, HIDDEN)
        w[p + "self_attn.k_proj.weight"] = r(N_KV * head_dim, HIDDEN)
        w[p + "self_attn.v_proj.weight"] = r(N_KV * head_dim, HIDDEN)
        w[p + "self_attn.o_proj.weight"] = r(HIDDEN, N_HEAD * head_dim)
        w[p + "mlp.gate_proj.weight"] = r(FFN, HIDDEN)
        w[p + "mlp.up_proj.weight"] = r(FFN, HIDDEN)
        w[p + "mlp.down_proj.weight"] = r(HIDDEN, FFN)
    return w


_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf):
    if hf in _TO_GGUF:
        return _TO_GGUF[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{_TO_GGUF[rest.removesuffix('.weight')]}.weight"


def write_tiny_llama(path, *, arch="llama", head_dim=16, tied=True, kv=None, extra=None, drop=()):
    """Writes a tiny llama GGUF the way llama.cpp would; returns the expected HF tensors.

    q/k are stored permuted in F32 (exact round trip), MLP weights as Q8_0 and norms as F16
    so three storage types are exercised; the expected arrays carry their rounding.
    """
    hf = _hf_weights(head_dim, tied)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(N_LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_KV)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    for key, value in (kv or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    expected = {}
    for name, w in hf.items():
        if name in drop:
            continue
        gname = _gguf_name(name)
        if "q_proj" in name or "k_proj" in name:
            writer.add_tensor(gname, _permute(w, N_HEAD if "q_proj" in name else N_KV))
            expected[name] = w
        elif ".mlp." in name:
            q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            expected[name] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
        elif w.ndim == 1:
            writer.add_tensor(gname, w.astype(np.float16))
            expected[name] = w.astype(np.float16).astype(np.float32)
        else:
            writer.add_tensor(gname, w)
            expected[name] = w
    for gname, w in (extra or {}).items():
        writer.add_tensor(gname, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def _assert_one_line_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for needle in needles:
        assert str(needle) in msg, msg
    # Wrapped with `from None`: no gguf-internal traceback is chained underneath.
    err = excinfo.value
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)


def _llama3_factors(theta, head_dim, factor, low, high, old):
    """Llama 3.1 rope_freqs exactly as llama.cpp's convert_hf_to_gguf.py computes them."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


# ----------------------------------------------------------------------------- fast tests


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_file_round_trips_to_hf_tensors(tmp_path, tied):
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_llama(path, tied=tied)
    got = dict(iter_gguf_tensors(path))
    assert set(got) == set(expected)
    assert ("lm_head.weight" in got) == (not tied)
    for name, w in expected.items():
        assert got[name].dtype == np.float32 and got[name].shape == w.shape, name
        np.testing.assert_array_equal(got[name], w, err_msg=name)


def test_tiny_file_config(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, tied=False, head_dim=32)
    cfg = read_gguf_config(path)
    assert cfg["vocab_size"] == VOCAB  # from the embedding: this file has no token list
    assert (cfg["hidden_size"], cfg["intermediate_size"]) == (HIDDEN, FFN)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 32)
    assert cfg["num_hidden_layers"] == N_LAYERS and cfg["max_position_embeddings"] == 256
    assert cfg["rms_norm_eps"] == 1e-5  # not float32's 9.99999974e-06
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert cfg["tie_word_embeddings"] is False
    assert "bos_token_id" not in cfg


@pytest.mark.parametrize("factor", [8.0, 32.0])  # Llama 3.1, Llama 3.2
def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path, factor):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim, theta = 128, 500000.0
    factors = _llama3_factors(theta, head_dim, factor, 1.0, 4.0, 8192)
    path = tmp_path / "llama32.gguf"
    write_tiny_llama(
        path,
        head_dim=head_dim,
        kv={"llama.rope.freq_base": theta},
        extra={"rope_freqs.weight": factors},
    )
    rope = read_gguf_config(path)["rope_parameters"]
    assert rope == {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    # rope_freqs is folded into the config, not yielded as a weight.
    assert "rope_freqs.weight" not in dict(iter_gguf_tensors(path))
    # transformers' own llama3 rope gives the frequencies llama.cpp divides by rope_freqs.
    hf_cfg = LlamaConfig(
        hidden_size=HIDDEN,
        num_attention_heads=N_HEAD,
        head_dim=head_dim,
        rope_parameters=rope,
        max_position_embeddings=131072,
    )
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    base = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    np.testing.assert_allclose(inv_freq.numpy(), base / factors, rtol=1e-5)


def test_linear_rope_scaling(tmp_path):
    path = tmp_path / "linear.gguf"
    kv = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    write_tiny_llama(path, kv=kv)
    rope = read_gguf_config(path)["rope_parameters"]
    assert rope == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}


def test_unsupported_rope_scaling_rejected(tmp_path):
    path = tmp_path / "yarn.gguf"
    write_tiny_llama(path, kv={"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0})
    with pytest.raises(ModelLoadError) as e:
        read_gguf_config(path)
    _assert_one_line_error(e, path, "yarn")


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_tiny_llama(path, arch="gpt2")
    for fn in (read_gguf_config, iter_gguf_tensors):
        with pytest.raises(ModelLoadError) as e:
            fn(path)
        _assert_one_line_error(e, path, "'gpt2'", "not supported", "llama")


def test_mixture_of_experts_llama_rejected(tmp_path):
    path = tmp_path / "mixtral.gguf"
    write_tiny_llama(path, kv={"llama.expert_count": 8})
    with pytest.raises(ModelLoadError) as e:
        read_gguf_config(path)
    _assert_one_line_error(e, path, "mixture-of-experts")


def test_unknown_and_missing_tensors_rejected_before_streaming(tmp_path):
    extra = tmp_path / "bias.gguf"
    write_tiny_llama(extra, extra={"blk.0.attn_q.bias": np.zeros(64, np.float32)})
    with pytest.raises(ModelLoadError) as e:
        iter_gguf_tensors(extra)  # raised by the call, not by the first next()
    _assert_one_line_error(e, extra, "blk.0.attn_q.bias")

    missing = tmp_path / "missing.gguf"
    write_tiny_llama(missing, drop=("model.layers.1.mlp.up_proj.weight",))
    with pytest.raises(ModelLoadError) as e:
        iter_gguf_tensors(missing)
    _assert_one_line_error(e, missing, "model.layers.1.mlp.up_proj.weight")


def _cut(src, dst, size):
    with open(src, "rb") as f:
        dst.write_bytes(f.read(size))
    return dst


_ALL = {
    "config": read_gguf_config,
    "tensors": iter_gguf_tensors,
    "tokenizer": load_gguf_tokenizer,
}


@pytest.mark.parametrize("fn", _ALL.values(), ids=_ALL.keys())
def test_file_errors(tmp_path, fn):
    tiny = tmp_path / "tiny.gguf"
    write_tiny_llama(tiny)
    size = tiny.stat().st_size
    cases = {
        tmp_path / "nope.gguf": "no such file",
        tmp_path: "is not a file",
        tmp_path / "empty.gguf": "not a GGUF file",
        tmp_path / "model.safetensors": "not a GGUF file",
        _cut(tiny, tmp_path / "header.gguf", 200): "truncated or corrupt",
        _cut(tiny, tmp_path / "data.gguf", size - 100): "truncated",
    }
    (tmp_path / "empty.gguf").write_bytes(b"")
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    for path, what in cases.items():
        with pytest.raises(ModelLoadError) as e:
            fn(path)
        _assert_one_line_error(e, path, what)


# ----------------------------------------------------------------------------- light reader


def _assert_same_as_gguf_reader(path, dequantize=True):
    """GGUFFile reads every metadata value and tensor exactly as gguf.GGUFReader does."""
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    assert set(ref.fields) - set(ours.fields) == {
        "GGUF.version",
        "GGUF.tensor_count",
        "GGUF.kv_count",
    }
    assert set(ours.fields) <= set(ref.fields)
    assert (ours.version, ours.alignment, ours.data_offset) == (
        ref.fields["GGUF.version"].contents(),
        ref.alignment,
        ref.data_offset,
    )
    for key, (vtype, _) in ours.fields.items():
        field = ref.fields[key]
        value = ours.get(key)
        assert vtype == field.types[0], key
        if field.types[:2] == [gguf.GGUFValueType.ARRAY] * 2:  # GGUFReader flattens nesting
            value = [x for row in value for x in row]
        assert value == field.contents(), key
        assert type(value) is type(field.contents()), key
        if isinstance(value, list):
            assert {type(x) for x in value} == {type(x) for x in field.contents()}, key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for t, r in zip(ours.tensors, ref.tensors, strict=True):
        assert t.tensor_type == r.tensor_type and t.shape == tuple(r.shape.tolist()), t.name
        assert (t.offset, t.n_elements, t.n_bytes) == (r.data_offset, r.n_elements, r.n_bytes)
        assert t.data.dtype == np.uint8 and t.data.nbytes == t.n_bytes, t.name
        np.testing.assert_array_equal(t.data.ravel(), r.data.view(np.uint8).ravel())
        if not dequantize:
            continue
        np.testing.assert_array_equal(
            gguf.quants.dequantize(t.data, t.tensor_type),
            gguf.quants.dequantize(r.data, r.tensor_type),
            err_msg=t.name,
        )
    return ours


def _write_rich_file(path, *, alignment=None):
    """Every metadata value type, large arrays (skipped while parsing) and mixed tensor types."""
    writer = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        writer.add_custom_alignment(alignment)
    V = gguf.GGUFValueType
    for i, (vtype, value) in enumerate(
        [
            (V.UINT8, 200),
            (V.INT8, -100),
            (V.UINT16, 60000),
            (V.INT16, -30000),
            (V.UINT32, 4_000_000_000),
            (V.INT32, -2_000_000_000),
            (V.FLOAT32, 0.1),
            (V.BOOL, True),
            (V.STRING, "naïve café 🤗"),
            (V.UINT64, 2**63 + 5),
            (V.INT64, -(2**62)),
            (V.FLOAT64, 1e-300),
        ]
    ):
        writer.add_key_value(f"test.scalar.{i}", value, vtype)
    writer.add_key_value("test.small", [3, 3, 1], V.ARRAY, sub_type=V.INT32)
    writer.add_key_value("test.large", list(range(5000)), V.ARRAY, sub_type=V.UINT32)
    writer.add_key_value("test.scores", [-i / 7 for i in range(3000)], V.ARRAY, sub_type=V.FLOAT32)
    writer.add_key_value("test.flags", [i % 3 == 0 for i in range(2000)], V.ARRAY, sub_type=V.BOOL)
    writer.add_array("test.strings", ["", "a", "日本語", "x" * 300] * 700)
    writer.add_key_value("test.nested", [[1, 2], [3, 4]], V.ARRAY, sub_type=V.ARRAY)
    writer.add_string("test.after", "still in sync")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    writer.add_tensor("f32", w)
    writer.add_tensor("f16.1d", w[0].astype(np.float16))
    writer.add_tensor(
        "bf16",
        gguf.quants.quantize(w, gguf.GGMLQuantizationType.BF16),
        raw_dtype=gguf.GGMLQuantizationType.BF16,
    )
    for qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1):
        writer.add_tensor(qtype.name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.add_tensor("f32.3d", rng.standard_normal((2, 3, 32)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("alignment", [None, 64])
def test_light_reader_matches_gguf_reader(tmp_path, alignment):
    path = tmp_path / "rich.gguf"
    _write_rich_file(path, alignment=alignment)
    f = _assert_same_as_gguf_reader(path)
    assert f.alignment == (alignment or 32) and f.data_offset % f.alignment == 0
    assert f.get("test.after") == "still in sync" and f.get("test.nested") == [[1, 2], [3, 4]]
    assert f.get("test.scalar.6") == float(np.float32(0.1))
    # Small numeric arrays are kept while parsing; large ones and strings only on demand.
    assert f.fields["test.small"][1] == [3, 3, 1]
    for key in ("test.large", "test.scores", "test.flags", "test.strings", "test.nested"):
        assert not isinstance(f.fields[key][1], list), key
    assert f.get("missing", "default") == "default" and f.value_type("missing") is None


def test_light_reader_matches_gguf_reader_on_tiny_llama(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, tied=False)
    _assert_same_as_gguf_reader(path)


def test_truncated_header_every_cut(tmp_path):
    """Any cut inside the header is a one-line "truncated or corrupt" error, never a crash."""
    path = tmp_path / "rich.gguf"
    _write_rich_file(path)
    data = path.read_bytes()
    end = GGUFFile(path).data_offset - 32  # before the padding to the tensor data
    # Every few bytes through the scalars, then spread over the arrays and tensor infos.
    cuts = sorted({4, 5, 8, 12, 23, 24, 25, *range(26, 700, 5), *range(700, end, end // 40)})
    for n in cuts:
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(data[:n])
        with pytest.raises(GGUFFormatError, match="needs .* bytes but the file ends at"):
            GGUFFile(cut)
        with pytest.raises(ModelLoadError) as e:
            read_gguf_config(cut)
        _assert_one_line_error(e, cut, "truncated or corrupt", f"({n} bytes)")
    # Cut after the header: it parses, and the first tensor is found missing by arithmetic.
    cut = tmp_path / "nodata.gguf"
    cut.write_bytes(data[: end + 32])
    assert GGUFFile(cut).truncated_tensor().name == "f32"


def _patched(tmp_path, src, offset, raw):
    data = bytearray(src.read_bytes())
    data[offset : offset + len(raw)] = raw
    out = tmp_path / f"patched{offset}.gguf"
    out.write_bytes(bytes(data))
    return out


def test_corrupt_headers_rejected(tmp_path):
    import struct

    tiny = tmp_path / "tiny.gguf"
    write_tiny_llama(tiny)
    f = GGUFFile(tiny)
    first_key = 24 + 8 + len("general.architecture")  # value type of the first metadata entry
    first_tensor = next(t for t in f.tensors)
    cases = {
        "version 1 is not supported": (4, struct.pack("<I", 1)),
        "big-endian": (4, struct.pack(">I", 3)),
        "unknown value type": (first_key, struct.pack("<I", 99)),
        "metadata entries": (16, struct.pack("<Q", 2**60)),
    }
    for what, (offset, raw) in cases.items():
        bad = _patched(tmp_path, tiny, offset, raw)
        with pytest.raises(ModelLoadError) as e:
            read_gguf_config(bad)
        _assert_one_line_error(e, bad, "truncated or corrupt", what)
    assert first_tensor.offset == f.data_offset


@pytest.mark.slow
def test_light_reader_matches_gguf_reader_on_real_file(smollm2_gguf):
    import time

    t0 = time.perf_counter()
    f = GGUFFile(smollm2_gguf)
    assert time.perf_counter() - t0 < 1.0  # GGUFReader takes ~4 s
    assert len(f.tensors) == 272 and len(f.get("tokenizer.ggml.tokens")) == 49152
    _assert_same_as_gguf_reader(smollm2_gguf, dequantize=False)  # same bytes: same tensors


# ----------------------------------------------------------------------------- real file


@pytest.fixture(scope="module")
def reference_model(smollm2_gguf, hf_gguf_parses_once):
    """transformers' own GGUF load of the real file (torch; ~25 s, once per module)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    )


@pytest.mark.slow
def test_tensors_match_transformers(smollm2_gguf, reference_model):
    ref = reference_model.state_dict()
    assert reference_model.config.tie_word_embeddings
    seen = set()
    for name, w in iter_gguf_tensors(smollm2_gguf):
        expected = ref[name].numpy()
        assert w.dtype == np.float32 and w.shape == expected.shape, name
        assert np.abs(w - expected).max() <= 1e-6, name
        seen.add(name)
    assert seen == set(ref) - {"lm_head.weight"}  # tied: HF re-uses the embedding


@pytest.mark.slow
def test_q_k_are_unpermuted(smollm2_gguf, reference_model):
    """The parity above is meaningful: the stored q/k rows really are in another order."""
    from jaxtune.gguf.load import _open

    _, reader = _open(smollm2_gguf)  # the importer's cached reader
    raw = {t.name: t for t in reader.tensors}
    ref = reference_model.state_dict()
    for gname, hf in (("blk.0.attn_q.weight", "q_proj"), ("blk.0.attn_k.weight", "k_proj")):
        t = raw[gname]
        stored = gguf.quants.dequantize(t.data, t.tensor_type)
        expected = ref[f"model.layers.0.self_attn.{hf}.weight"].numpy()
        assert not np.array_equal(stored, expected)
        n_head = 9 if hf == "q_proj" else 3
        np.testing.assert_array_equal(_permute(expected, n_head), stored)


@pytest.mark.slow
def test_config_matches_transformers(smollm2_gguf, reference_model):
    from transformers import LlamaConfig

    ours = read_gguf_config(smollm2_gguf)
    ref = reference_model.config.to_dict()
    same = [
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "hidden_act",
        "attention_bias",
        "mlp_bias",
        "rope_parameters",
    ]
    for key in same:
        assert ours[key] == ref[key], key
    assert ours["rope_theta"] == ref["rope_parameters"]["rope_theta"] == 100000.0
    # transformers keeps float32's 9.99999974e-06; ours is the original 1e-05, equal in float32.
    assert math.isclose(ours["rms_norm_eps"], ref["rms_norm_eps"], rel_tol=1e-6)
    assert np.float32(ours["rms_norm_eps"]) == np.float32(ref["rms_norm_eps"])
    assert ours["architectures"] == ["LlamaForCausalLM"]
    # And our dict is a valid transformers config.
    built = LlamaConfig(**ours).to_dict()
    for key in same:
        assert built[key] == ref[key], key


TEXTS = [
    "Hello world",
    "  leading spaces,\ttabs\n\nand newlines  ",
    "naïve café, 日本語, emoji 🤗!",
    "def f(x):\n    return x ** 2  # 1234567",
    "<|im_start|>user\nhi<|im_end|><|endoftext|>",
]


@pytest.mark.slow
def test_tokenizer_matches_transformers(smollm2_gguf, smollm2_tokenizer):
    ours, ref = load_gguf_tokenizer(smollm2_gguf), smollm2_tokenizer
    assert ours.get_vocab() == ref.get_vocab()
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "all_special_tokens"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    for text in TEXTS:
        ids = ours(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids) == ref.decode(ids)
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    for messages in (chat, chat[1:2]):
        text = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text.endswith("<|im_start|>assistant\n")
    assert "SmolLM" in ours.apply_chat_template(chat[1:2], tokenize=False)  # default system


@pytest.mark.slow
def test_no_torch_import(smollm2_gguf):
    code = textwrap.dedent(
        f"""
        import sys
        from jaxtune.gguf.load import iter_gguf_tensors, load_gguf_tokenizer, read_gguf_config
        path = {str(smollm2_gguf)!r}
        read_gguf_config(path)
        n = sum(1 for _ in iter_gguf_tensors(path))
        tok = load_gguf_tokenizer(path)
        tok.apply_chat_template([{{"role": "user", "content": "hi"}}], tokenize=False)
        assert n == 272, n
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.slow
def test_truncated_real_file(smollm2_gguf, tmp_path):
    # One entry point only: test_file_errors already covers all three on a tiny truncated file.
    half = _cut(smollm2_gguf, tmp_path / "half.gguf", smollm2_gguf.stat().st_size // 2)
    with pytest.raises(ModelLoadError) as e:
        iter_gguf_tensors(half)
    _assert_one_line_error(e, half, "truncated")
