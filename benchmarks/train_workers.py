"""Worker processes for ``bench_train.py``: one training side (jaxtune or torch) each.

A worker loads the model, builds its training step, warms it up and then obeys the
parent, one JSON line at a time on stdin:

* ``{"cmd": "run", "steps": K}`` -> ``{"times": [s, ...], "losses": [...]}``;
* ``{"cmd": "finish"}`` -> peak RSS (``VmHWM``, read *before* the matmul probe, which
  would otherwise inflate it), then the measured matmul GFLOP/s of this library; exit.

Each side is its own process so its peak RSS is its own, and so the two never share a
thread pool or an allocator. Replies go to a private copy of the original stdout;
fd 1 is pointed at stderr so library chatter can never corrupt the protocol::

    python benchmarks/train_workers.py jax|torch SPEC_JSON
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def vm_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``VmRSS``) in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _rss_mib() -> dict:
    return {"rss": vm_kib("VmRSS") // 1024, "hwm": vm_kib("VmHWM") // 1024}


def make_batch(spec: dict) -> dict[str, np.ndarray]:
    """The one synthetic batch both sides train on (same token ids, no padding).

    The last target of each row has weight 0: transformers' ``labels=input_ids`` loss
    shifts inside the model and so scores T-1 tokens per row; jaxtune then scores the
    very same tokens and the first losses of the two sides must agree.
    """
    b, t, v = spec["batch"], spec["seq"], spec["vocab"]
    ids = np.random.default_rng(spec["seed"]).integers(0, v, (b, t), dtype=np.int32)
    weights = np.ones((b, t), np.float32)
    weights[:, -1] = 0.0
    targets = np.concatenate([ids[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
    return {
        "input_ids": ids,
        "targets": targets,
        "loss_weights": weights,
        "attention_mask": np.ones((b, t), np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        "segment_ids": np.ones((b, t), np.int32),
    }


class JaxSide:
    """jaxtune's own training step, built exactly as ``jaxtune train`` builds it."""

    def __init__(self, spec: dict):
        import jax

        from jaxtune.config import config_from_dict, validate_against_devices
        from jaxtune.sharding import device_batch, make_mesh
        from jaxtune.train.state import make_state, setup_step
        from jaxtune.train.tasks import task_for

        self.jax = jax
        self.rss = {"imports": _rss_mib()}
        model_cfg = {"path": spec["model_path"], "scan_layers": spec["scan"],
                     "dtype": spec.get("dtype", "float32")}  # fmt: skip
        if spec["mode"] == "qlora":
            model_cfg["quantize"] = "nf4"
        sections = {
            "model": model_cfg,
            "peft": _jax_peft(spec),
            "optim": _jax_optim(spec),
            "train": {"batch_size": spec["batch"], "seq_len": spec["seq"], "steps": 1000},
            "run": {"dir": os.path.join(spec["scratch"], "run")},
        }
        for key, value in spec.get("set", {}).items():  # bench_train.py --variant
            section, _, name = key.partition(".")
            sections.setdefault(section, {})[name] = value
        cfg = config_from_dict(sections)
        mesh = make_mesh(*validate_against_devices(cfg, jax.device_count(), 1))
        t0 = time.perf_counter()
        task = task_for(cfg)
        model = task.build_model(mesh)
        self.rss["model"] = _rss_mib()
        setup = setup_step(task, model, mesh, 1000)
        del model
        self.frozen = setup.frozen
        self.info = {"trainable": setup.info["trainable"], "total": setup.info["total"],
                     "malloc_kept": spec.get("malloc_kept")}  # fmt: skip
        self.state = make_state(0, setup.params, setup.opt_state, cfg.train.seed, mesh)
        self.step_fn = setup.step_fn
        del setup
        self.info["load_s"] = time.perf_counter() - t0
        self.rss["state"] = _rss_mib()
        self.batch = make_batch(spec)
        self.to_device = lambda b: device_batch(b, mesh)
        # Compile time proper: trace + lower + XLA compile, without running anything.
        t0 = time.perf_counter()
        self.step_fn.lower(self.state, self.frozen, self.to_device(self.batch)).compile()
        self.info["compile_s"] = time.perf_counter() - t0
        self.rss["compiled"] = _rss_mib()

    def step(self) -> float:
        # As the host loop does: put the batch on the mesh, run, fetch the scalars.
        self.state, metrics = self.step_fn(self.state, self.frozen, self.to_device(self.batch))
        return float(self.jax.device_get(metrics)["loss"])

    def finish(self) -> dict:
        out = {"compiles": self.step_fn._cache_size(), "torch_imported": "torch" in sys.modules}
        out["device_kind"] = self.jax.devices()[0].device_kind
        stats = self.jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:  # accelerators: the allocator's high-water mark
            out["peak_device_bytes"] = int(stats["peak_bytes_in_use"])
        return out

    @staticmethod
    def matmul_gflops(n: int, reps: int, dtype: str = "float32") -> float:
        import jax

        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), dtype)
        mm = jax.jit(lambda x, y: x @ y)
        mm(a, b).block_until_ready()
        best = min(_timed(lambda: mm(a, b).block_until_ready()) for _ in range(reps))
        return 2 * n**3 / best / 1e9


def _jax_peft(spec: dict) -> dict:
    # qlora = LoRA over an NF4 base (model.quantize, set in JaxSide).
    if spec["mode"] == "full":
        return {"method": "full"}
    r = spec["rank"]
    return {"method": "lora", "rank": r, "alpha": spec["alpha"], "dropout": 0.0,
            "targets": LORA_TARGETS}  # fmt: skip


def _jax_optim(spec: dict) -> dict:
    o = spec["optim"]
    return {"name": "adamw", "lr": o["lr"], "schedule": "constant", "b1": o["b1"],
            "b2": o["b2"], "eps": o["eps"], "weight_decay": o["wd"], "grad_clip": o["clip"]}  # fmt: skip


class TorchSide:
    """transformers + PEFT + ``torch.optim.AdamW``, the way an HF training loop does it."""

    def __init__(self, spec: dict):
        if spec.get("omp_wait_policy"):
            # Read once when libgomp loads (with torch): must be set before the import.
            os.environ["OMP_WAIT_POLICY"] = spec["omp_wait_policy"]
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.rss = {"imports": _rss_mib()}
        torch.set_num_threads(spec["threads"])
        torch.manual_seed(spec["seed"])
        t0 = time.perf_counter()
        path = spec["model_path"]
        dtype = getattr(torch, spec.get("dtype", "float32"))
        self.device = torch.device("cuda" if spec.get("device") == "gpu" else "cpu")
        kw = {"dtype": dtype, "attn_implementation": "sdpa"}
        if spec["mode"] == "qlora":  # bitsandbytes NF4 (CUDA only), as HF QLoRA recipes do
            from transformers import BitsAndBytesConfig

            kw["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
            )
            kw["device_map"] = {"": 0}
        if path.endswith(".gguf"):
            d, name = os.path.split(path)
            model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, **kw)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kw)
        if spec["mode"] != "qlora":
            model = model.to(self.device)
        if spec["mode"] in ("lora", "qlora"):
            from peft import LoraConfig, get_peft_model

            lc = LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.0,
                            target_modules=LORA_TARGETS, task_type="CAUSAL_LM")  # fmt: skip
            model = get_peft_model(model, lc)
        self.rss["model"] = _rss_mib()
        model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        o = spec["optim"]
        self.opt = torch.optim.AdamW(
            self.params, lr=o["lr"], betas=(o["b1"], o["b2"]), eps=o["eps"], weight_decay=o["wd"]
        )
        self.clip = o["clip"]
        self.info = {
            "trainable": sum(p.numel() for p in self.params),
            "total": sum(p.numel() for p in model.parameters()),
            "load_s": time.perf_counter() - t0,
            "compile_s": None,
        }
        self.model = model
        if spec.get("torch_compile"):
            self.model = torch.compile(model)
        b = make_batch(spec)
        self.ids = torch.from_numpy(b["input_ids"]).long().to(self.device)
        self.mask = torch.from_numpy(b["attention_mask"]).long().to(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def step(self) -> float:
        out = self.model(input_ids=self.ids, attention_mask=self.mask, labels=self.ids)
        out.loss.backward()
        if self.clip:
            self.torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    def finish(self) -> dict:
        out = {"threads": self.torch.get_num_threads()}
        if self.device.type == "cuda":
            out["peak_device_bytes"] = int(self.torch.cuda.max_memory_allocated())
        return out

    @staticmethod
    def matmul_gflops(n: int, reps: int, dtype: str = "float32") -> float:
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g).to(dev, getattr(torch, dtype))
        b = torch.randn(n, n, generator=g).to(dev, getattr(torch, dtype))

        def mm():
            torch.mm(a, b)
            if dev == "cuda":
                torch.cuda.synchronize()

        mm()
        best = min(_timed(mm) for _ in range(reps))
        return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def serve(argv: list[str], sides: dict) -> int:
    """Runs side ``argv[0]`` (a class of ``sides``) with spec ``argv[1]`` (JSON) under the
    JSON-lines protocol of ``bench_train.Worker``; the sides of ``bench_dpo.py`` use it too."""
    side_name, spec = argv[0], json.loads(argv[1])
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from libraries land on stderr, not in the protocol

    def reply(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")

    os.environ.update(spec.get("env", {}))  # bench_train.py --variant NAME:env.VAR=VALUE
    if side_name == "jax":
        # What the `jaxtune` command does at start-up, before jax starts its threads.
        from jaxtune.malloc import keep_freed_memory

        spec["malloc_kept"] = keep_freed_memory()
    side = sides[side_name](spec)
    t0 = time.perf_counter()
    first_loss = side.step()  # jax: compiles again only if lower().compile() was not reused
    first = time.perf_counter() - t0
    warm = [_timed(side.step) for _ in range(spec["warmup"])]
    side.rss["warm"] = _rss_mib()
    reply({**side.info, "rss_stages_mib": side.rss, "first_step_s": first, "warmup_s": warm, "first_loss": first_loss,
           "rss_after_warmup_kib": vm_kib("VmRSS")})  # fmt: skip
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "run":
            times, cpu, losses = [], [], []
            for _ in range(msg["steps"]):
                t0, c0 = time.perf_counter(), time.process_time()
                losses.append(side.step())
                times.append(time.perf_counter() - t0)
                # CPU seconds of all this process's threads: less sensitive than wall
                # time to other tenants of a shared machine (when nothing busy-waits).
                cpu.append(time.process_time() - c0)
            reply({"times": times, "cpu": cpu, "losses": losses})
        elif msg["cmd"] == "finish":
            out = {**side.finish(), "peak_rss_kib": vm_kib("VmHWM")}
            if "matmul_n" in spec:
                n, reps = spec["matmul_n"], spec["matmul_reps"]
                out["matmul_gflops"] = side.matmul_gflops(n, reps, spec.get("dtype", "float32"))
            reply(out)
            return 0
    return 1


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1:], {"jax": JaxSide, "torch": TorchSide}))
