"""``jaxtune plan``: compile the real train step for a pod ahead of time, on this host.

The step is compiled exactly as ``jaxtune train`` compiles it (same model code, PEFT
filter, optimizer, shardings and donation), but over *abstract* devices and abstract
arrays, so an 8B model is never allocated and no accelerator is needed:

- ``--topology v5p:2x2x2``: TPU devices described by libtpu (``pip install jax[tpu]``);
  XLA's TPU compiler runs on the CPU host (MaxText's ``train_compile.py`` idea).
- ``--devices N``: the first N devices of the local platform (GPUs on a GPU host; fake
  CPU devices elsewhere, where there is no memory limit to check against).

XLA's own memory analysis of the compiled program gives per-device bytes of
arguments (weights, optimizer state, batch), outputs, temporaries (activations,
gradients, collectives' buffers) and code; the total is checked against the chip's HBM.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxtune.checkpoint import MARKER
from jaxtune.config import Config, validate_against_devices
from jaxtune.errors import ConfigError, JaxtuneError
from jaxtune.gguf import load as gguf
from jaxtune.hf.families import hf_module
from jaxtune.hf.io import read_hf_config
from jaxtune.loading import model_kind, run_model_source, scan_layers_for
from jaxtune.models import FAMILIES, config_from_dict, family_for_model_type
from jaxtune.quant import quantized_stats
from jaxtune.resources import resolve_path
from jaxtune.sharding import make_mesh
from jaxtune.train.hardware import (
    TOPOLOGY_CHIPS,
    GiB,
    chip_for,
    flops_per_token,
    hbm_bytes_per_device,
    peak_flops,
)
from jaxtune.train.measure import measure_steps
from jaxtune.train.state import abstract_state, setup_step
from jaxtune.train.tasks import task_for

_ADVICE = (
    "Try a smaller train.batch_size (with train.grad_accum), model.remat=full (or offload: "
    "layer inputs in host memory), model.quantize=nf4 with a PEFT method, a larger "
    "mesh.fsdp, or a bigger topology"
)


class DoesNotFit(JaxtuneError):
    """The compiler itself refused the step for lack of device memory (exit code 1)."""

    exit_code = 1


_TOPOLOGY = re.compile(r"^(v\d+[a-z]*):(\d+(?:x\d+){1,2})$")


@dataclass
class Plan:
    """What one compiled train step needs per device.

    Attributes:
      target: ``v5p:2x2x2`` or ``4 x cuda`` etc.
      device_kind: ``device_kind`` of the devices compiled for.
      num_devices: devices in the mesh.
      mesh: resolved ``{"data", "fsdp", "tensor"}``.
      params: ``peft.trainable.summary`` (``total``, ``trainable`` counts).
      argument_bytes: inputs per device (state, frozen weights, batch).
      output_bytes: outputs per device (new state, metrics).
      alias_bytes: outputs that reuse donated inputs (counted once).
      temp_bytes: temporaries per device (activations, gradients, buffers).
      code_bytes: generated code.
      peak_bytes: XLA's own peak estimate (``peak_memory_in_bytes``): the bytes live at
        the worst point of the compiled schedule, arguments included; None where the
        compiler does not report it. ``total_bytes`` (every temporary allocation at
        once) is the bound ``fits`` uses; this is the figure comparable to an
        allocator's high-water mark (``torch.cuda.max_memory_allocated``).
      host_bytes: temporaries the step keeps in host memory (``model.remat: offload``).
      measured: with ``--measure``: ``step_s``, ``step_s_min``, ``losses``,
        ``peak_bytes_in_use`` (None on CPU) and ``mfu`` (None if the chip is unknown).
      hbm_bytes: memory a device may use; None if unknown (CPU).
      flops_per_device: FLOPs of one step on one device from XLA's cost analysis, which
        counts the body of a loop once: with scanned layers it sees one layer, not all.
      model_flops: model FLOPs of one step on all devices, 4 per frozen and 6 per
        trainable parameter and token (the MFU numerator; no attention, no remat).
      tokens_per_step: batch size x sequence length x grad accumulation.
      step_time_at_peak: seconds per step if every device ran the model FLOPs at its
        bf16 peak (a lower bound).
      scanned: the layers are scanned (see ``flops_per_device``).
      notes: remarks for the report.
    """

    target: str
    device_kind: str
    num_devices: int
    mesh: dict
    params: dict
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    hbm_bytes: int | None
    flops_per_device: float | None
    model_flops: float
    tokens_per_step: int
    step_time_at_peak: float | None = None
    peak_bytes: int | None = None
    host_bytes: int = 0
    measured: dict | None = None
    scanned: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """Peak bytes per device: inputs + outputs not aliased to inputs + temporaries."""
        return (
            self.argument_bytes
            + self.output_bytes
            - self.alias_bytes
            + self.temp_bytes
            + self.code_bytes
        )

    @property
    def fits(self) -> bool | None:
        return None if self.hbm_bytes is None else self.total_bytes <= self.hbm_bytes

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "params"}
        out["params"] = {k: self.params[k] for k in ("total", "trainable") if k in self.params}
        out.update(total_bytes=self.total_bytes, fits=self.fits)
        return out


# ------------------------------------------------------------------------- devices


def topology_devices(spec: str) -> list:
    """Abstract TPU devices of a topology such as ``v5p:2x2x2`` or ``v5e:4x4``.

    Raises:
      ConfigError: malformed name, unknown generation, or libtpu not installed.
    """
    m = _TOPOLOGY.match(spec.strip())
    if not m or m[1] not in TOPOLOGY_CHIPS:
        raise ConfigError(
            f"--topology {spec!r}: expected GENERATION:AxB[xC] with a generation in "
            f"{', '.join(TOPOLOGY_CHIPS)} (e.g. v5p:2x2x2, v5e:4x4)"
        )
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(
            f"--topology {spec}: compiling for TPUs needs libtpu; install it with "
            f"pip install 'jax[tpu]=={jax.__version__}' (works on a CPU-only host)"
        )
    # libtpu probes the GCE metadata server and takes a machine-wide lock unless told
    # it is compiling only: keep it quiet, fast and able to run beside other jobs.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    dims = [int(x) for x in m[2].split("x")]
    chips = 1
    for d in dims:
        chips *= d
    # Accelerator type names count TensorCores on v3/v4/v5p (2 per chip), chips on v5e/v6e.
    cores = chips * (2 if m[1] in ("v3", "v4", "v5p") else 1)
    gen = {"v5e": "v5litepod", "v6e": "v6e"}.get(m[1], m[1])
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{gen}-{cores}")
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology_name=spec, platform="tpu").devices)
    except Exception as e:  # small slices: the default 2x2 chips per host does not divide
        if "chips_per_host_bounds" not in str(e):
            raise ConfigError(f"--topology {spec}: libtpu cannot describe it ({e})") from None
    bounds = [min(d, 2) for d in dims] + [1] * (3 - len(dims))
    try:
        desc = topologies.get_topology_desc(
            topology_name=spec, platform="tpu", chips_per_host_bounds=bounds
        )
    except Exception as e:
        raise ConfigError(f"--topology {spec}: libtpu cannot describe it ({e})") from None
    return list(desc.devices)


def local_devices(n: int) -> list:
    """The first ``n`` devices of the default platform."""
    devices = jax.devices()
    if not 0 < n <= len(devices):
        raise ConfigError(
            f"--devices {n}: this host has {len(devices)} {devices[0].platform} device(s)"
        )
    return devices[:n]


# --------------------------------------------------------------------------- model


def presets() -> dict:
    """``{name: config factory}`` of the architecture presets of every LM family."""

    out = {}
    for fam in FAMILIES.values():
        try:
            cls = fam.model_class().config_class
        except (ImportError, AttributeError):
            continue
        for name, attr in vars(cls).items():
            if isinstance(attr, classmethod) and not name.startswith(("_", "from")):
                out.setdefault(name, getattr(cls, name))
    return out


def model_config(cfg: Config, preset: str | None = None):
    """The architecture to plan for: ``preset`` / ``model.preset`` or ``model.path``'s.

    An existing ``model.path`` wins over ``model.preset`` (which names the architecture
    of weights not downloaded yet); ``--preset`` wins over both.
    """

    name = preset
    path = resolve_path(cfg.model.path) if cfg.model.path else None
    if name is None and path is not None and path.exists():
        model_cfg = _config_from_path(path)
    else:
        name = name or cfg.model.preset
        if not name:
            where = f"model.path {cfg.model.path} does not exist" if path else "no model.path"
            raise ConfigError(
                f"{where}; set model.preset (e.g. llama31_8b) or pass --preset to plan "
                "without the weights"
            )
        table = presets()
        if name not in table:
            raise ConfigError(f"model.preset {name!r}: expected one of {', '.join(sorted(table))}")
        model_cfg = table[name]()

    opts = {"scan_layers": scan_layers_for(cfg), "remat": cfg.model.remat}
    if hasattr(model_cfg, "attention_impl"):
        opts["attention_impl"] = cfg.model.attention
    if hasattr(model_cfg, "mlp_chunks"):
        opts["mlp_chunks"] = cfg.model.mlp_chunks
    return model_cfg.replace(**opts)


def _config_from_path(path: Path):

    kind = model_kind(path)
    if kind == "hf":
        return read_hf_config(path)[1]
    if kind == "gguf":
        meta = gguf.read_gguf_config(path)
        fam = family_for_model_type(meta.get("model_type"))
        return hf_module(fam).config_from_hf(meta, str(path))
    if kind == "jaxtune":
        return config_from_dict(json.loads((path / MARKER).read_text())["model_config"])

    return _config_from_path(resolve_path(run_model_source(path)))


# ---------------------------------------------------------------------------- plan


def plan(
    cfg: Config,
    devices: list,
    *,
    target: str,
    preset: str | None = None,
    hbm_bytes: int | None = None,
    measure: int = 0,
) -> Plan:
    """Compiles ``cfg``'s train step for ``devices`` and measures it.

    Args:
      cfg: the run config (model, peft, optim, train.batch_size / seq_len / grad_accum,
        mesh).
      devices: concrete or abstract (topology) devices; the mesh is built over them.
      target: label for the report.
      preset: architecture preset overriding the config's.
      hbm_bytes: memory per device to check against; default: the chip's.
      measure: run the compiled step this many times on made-up inputs (concrete
        devices only; see ``jaxtune.train.measure``) and add the timings and the
        allocator's peak to the plan.

    Raises:
      ConfigError: the mesh or batch does not fit the devices, or no architecture.
    """

    processes = len({d.process_index for d in devices})
    data, fsdp, tensor = validate_against_devices(cfg, len(devices), processes)
    mesh = make_mesh(data, fsdp, tensor, devices)
    model_cfg = model_config(cfg, preset)
    if getattr(model_cfg, "attention_impl", None) == "auto" and devices[0].platform == "tpu":
        # ``auto`` follows the backend running the code, and a TPU plan runs on a CPU host.
        model_cfg = model_cfg.replace(attention_impl="flash")
    # The trainer's own task and setup: same model (a classifier's head included),
    # trainable filter, optimizer, loss, shardings and donation.
    task = task_for(cfg)
    model = task.abstract_model(model_cfg)
    if cfg.model.compute_dtype:
        model.compute_dtype = jnp.dtype(cfg.model.compute_dtype)
    setup = setup_step(task, model, mesh, int(cfg.train.steps or 1000), abstract=True)
    info, params, frozen, opt_state = setup.info, setup.params, setup.frozen, setup.opt_state
    step_fn = setup.step_fn
    t = cfg.train
    batch = task.abstract_batch(t.batch_size, t.seq_len, t.grad_accum)
    lowered = step_fn.lower(abstract_state(params, opt_state), frozen, batch)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        # TPU compilers stop at buffer assignment when the step cannot fit; that is the
        # answer `plan` is asked for, not a crash.
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        why = str(e).split("RESOURCE_EXHAUSTED:", 1)[-1].strip().splitlines()[0]
        raise DoesNotFit(
            f"the train step does not fit {target} ({len(devices)} x "
            f"{devices[0].device_kind}): {why} {_ADVICE}"
        ) from None
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    tokens = t.batch_size * t.seq_len * t.grad_accum
    flops = float(cost["flops"]) if cost and cost.get("flops") else None
    peak = peak_flops(devices)
    out = Plan(
        target=target,
        device_kind=devices[0].device_kind,
        num_devices=len(devices),
        mesh={"data": data, "fsdp": fsdp, "tensor": tensor},
        params=info,
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes),
        hbm_bytes=hbm_bytes if hbm_bytes is not None else hbm_bytes_per_device(devices),
        flops_per_device=flops,
        model_flops=flops_per_token(info["total"], info["trainable"]) * tokens,
        tokens_per_step=tokens,
        scanned=bool(getattr(model_cfg, "scan_layers", False)),
        peak_bytes=int(getattr(mem, "peak_memory_in_bytes", 0)) or None,
        host_bytes=int(getattr(mem, "host_temp_size_in_bytes", 0)),
    )
    if peak:
        out.step_time_at_peak = out.model_flops / peak
    if measure:
        args = (abstract_state(params, opt_state), frozen, batch)
        out.measured = measure_steps(
            compiled, args, steps=measure, vocab=model_cfg.vocab_size, devices=devices
        )
        if peak:
            out.measured["mfu"] = out.model_flops / len(devices) / peak / out.measured["step_s"]
    if cfg.model.quantize:
        q = quantized_stats(model)
        out.notes.append(
            f"base kernels stored as {cfg.model.quantize}: {q['params']:,} weights in "
            f"{_gib(q['bytes'])} (all devices together)"
        )
    if chip_for(devices[0].device_kind) is None and hbm_bytes is None:
        out.notes.append(f"no memory size known for {devices[0].device_kind!r}; pass --hbm-gib")
    return out


def _gib(n: int | float | None) -> str:
    if n is None:
        return "unknown"
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 1024**2:.2f} MiB"


def format_plan(p: Plan) -> str:
    """The human-readable report ``jaxtune plan`` prints."""
    mesh = " x ".join(f"{k}={v}" for k, v in p.mesh.items())
    lines = [
        f"target      {p.target}: {p.num_devices} x {p.device_kind}, mesh {mesh}",
        f"params      {p.params['total']:,} total, {p.params['trainable']:,} trainable",
        "memory per device (XLA memory analysis of the compiled step):",
        f"  arguments     {_gib(p.argument_bytes)}  (weights, optimizer state, batch)",
        f"  outputs       {_gib(p.output_bytes)}  ({_gib(p.alias_bytes)} reuse donated inputs)",
        f"  temporaries   {_gib(p.temp_bytes)}  (activations, gradients, buffers)",
        f"  code          {_gib(p.code_bytes)}",
        f"  total         {_gib(p.total_bytes)} of {_gib(p.hbm_bytes)} HBM",
    ]
    if p.peak_bytes:
        lines.append(
            f"  XLA peak      {_gib(p.peak_bytes)}  (live at the worst point of the schedule, "
            "arguments included)"
        )
    if p.host_bytes:
        lines.append(f"  host memory   {_gib(p.host_bytes)}  (offloaded activations, per device)")
    lines.append(
        f"FLOPs/step   {p.model_flops:.3e} model FLOPs ({p.tokens_per_step:,} tokens x "
        f"(4 N_frozen + 6 N_trainable)), {p.model_flops / p.num_devices:.3e} per device"
    )
    if p.flops_per_device:
        scanned = " (counts a scanned layer stack as one layer)" if p.scanned else ""
        lines.append(f"  XLA cost analysis: {p.flops_per_device:.3e} per device{scanned}")
    if p.step_time_at_peak:
        lines.append(
            f"step time    >= {p.step_time_at_peak * 1e3:.1f} ms at 100% of bf16 peak "
            f"({p.tokens_per_step / p.step_time_at_peak:,.0f} tokens/s at most)"
        )
    if p.measured:
        m = p.measured
        mfu = f", MFU {m['mfu']:.1%}" if m.get("mfu") else ""
        lines.append(
            f"measured     {m['step_s'] * 1e3:.1f} ms/step (median of {m['steps']}), "
            f"{p.tokens_per_step / m['step_s']:,.0f} tokens/s{mfu}; made-up weights and batch"
        )
        peak_in_use = m.get("peak_bytes_in_use")
        lines.append(
            f"  allocator peak {_gib(peak_in_use)}  (peak_bytes_in_use, busiest device)"
            if peak_in_use
            else "  allocator peak not reported by this backend"
        )
    lines += [f"note: {n}" for n in p.notes]
    if p.fits is None:
        lines.append("fits        unknown (no memory limit for this device kind)")
    elif p.fits:
        lines.append(f"fits        yes ({100 * p.total_bytes / p.hbm_bytes:.0f}% of HBM)")
    else:
        lines.append(
            f"fits        NO: needs {_gib(p.total_bytes)} per device, the chip has "
            f"{_gib(p.hbm_bytes)}. {_ADVICE}"
        )
    return "\n".join(lines)
