"""``make test-llamacpp``: llama.cpp (llama-cpp-python, compiled from source) runs jaxtune's
GGUF exports. Not part of ``make test``: the build takes 10-40 minutes on 2 cores."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
