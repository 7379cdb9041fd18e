"""What an accelerator can hold and compute: HBM per chip, peak FLOP/s, MFU.

Tables, not probes: ``jaxtune plan`` compiles for *abstract* TPU devices on a CPU host,
which report a device kind but no memory, and MFU needs the vendor's peak rate.
Peaks are dense bf16 matmul FLOP/s per chip from the vendors' spec sheets; MFU is
therefore relative to bf16 even for a float32 run (the usual convention).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GiB = 1024**3


@dataclass(frozen=True)
class Chip:
    """One accelerator chip.

    Attributes:
      name: short name used in topologies (``v5p``) or a GPU model (``H100``).
      hbm_bytes: high-bandwidth memory per chip.
      peak_flops: dense bf16 FLOP/s per chip.
    """

    name: str
    hbm_bytes: int
    peak_flops: float


# Matched in order against ``device.device_kind`` (case-insensitive): the more specific
# pattern first ("TPU v5 lite" is v5e, plain "TPU v5" is v5p).
CHIPS: list[tuple[str, Chip]] = [
    (r"tpu v5 ?lite|tpu v5e", Chip("v5e", 16 * GiB, 197e12)),
    (r"tpu v6 ?lite|tpu v6e|trillium", Chip("v6e", 32 * GiB, 918e12)),
    (r"tpu v5p|tpu v5$", Chip("v5p", 95 * GiB, 459e12)),
    (r"tpu v4", Chip("v4", 32 * GiB, 275e12)),
    (r"tpu v3", Chip("v3", 32 * GiB, 123e12)),
    (r"h200", Chip("H200", 141 * 10**9, 989e12)),
    (r"h100.*pcie", Chip("H100 PCIe", 80 * 10**9, 756e12)),
    (r"h100", Chip("H100", 80 * 10**9, 989e12)),
    (r"b200", Chip("B200", 192 * 10**9, 2250e12)),
    (r"a100.*40", Chip("A100 40GB", 40 * 10**9, 312e12)),
    (r"a100", Chip("A100", 80 * 10**9, 312e12)),
    (r"l4$|nvidia l4", Chip("L4", 24 * 10**9, 121e12)),
]

# Topology prefixes accepted by ``jaxtune plan --topology NAME:AxBxC``.
TOPOLOGY_CHIPS = {
    "v3": "tpu v3",
    "v4": "tpu v4",
    "v5e": "tpu v5 lite",
    "v5p": "tpu v5",
    "v6e": "tpu v6 lite",
}


def chip_for(device_kind: str) -> Chip | None:
    """The :class:`Chip` for a ``device.device_kind`` string; None if unknown (CPU)."""
    kind = device_kind.strip().lower()
    for pattern, chip in CHIPS:
        if re.search(pattern, kind):
            return chip
    return None


def devices_per_chip(devices) -> int:
    """How many JAX devices share one chip: 2 where a TPU exposes each TensorCore as a
    device (v3; v4 without megacore), else 1. TPU devices report their chip's ``coords``.
    """
    devices = list(devices)
    if not devices or devices[0].platform != "tpu":
        return 1
    chips = {tuple(getattr(d, "coords", (d.id,))) for d in devices}
    return max(1, len(devices) // max(len(chips), 1))


def peak_flops(devices) -> float | None:
    """Summed dense bf16 peak FLOP/s of ``devices`` (None on CPU or an unknown kind)."""
    devices = list(devices)
    if not devices or devices[0].platform == "cpu":
        return None
    chip = chip_for(devices[0].device_kind)
    if chip is None:
        return None
    return chip.peak_flops * len(devices) / devices_per_chip(devices)


def hbm_bytes_per_device(devices) -> int | None:
    """Memory one device may use: the chip's HBM over the devices sharing it.

    Real GPUs/TPUs report it (``memory_stats()["bytes_limit"]``, what XLA's allocator
    may really use); abstract TPU devices of a topology fall back to the table.
    """
    devices = list(devices)
    try:
        stats = devices[0].memory_stats() or {}
    except Exception:  # abstract (compile-only) and CPU devices have no stats
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    chip = chip_for(devices[0].device_kind) if devices else None
    if chip is None:
        return None
    return chip.hbm_bytes // devices_per_chip(devices)


def flops_per_token(n_total: int, n_trainable: int) -> float:
    """Training FLOPs per token: 6 N for full fine-tuning, 4 N_frozen + 6 N_trainable.

    Forward costs 2 FLOPs per parameter and token. The backward pass computes input
    gradients through every layer (2 more) but weight gradients only for trainable
    parameters (2 more), so frozen weights cost 4 and trainable ones 6. Attention's
    sequence-length-dependent FLOPs are left out, as in the usual 6N estimate.
    """
    frozen = max(int(n_total) - int(n_trainable), 0)
    return 6.0 * int(n_trainable) + 4.0 * frozen


def mfu(flops_per_sec: float, devices) -> float | None:
    """Model FLOPs utilisation over ``devices`` (None when the peak is unknown, e.g. CPU)."""
    peak = peak_flops(devices)
    return None if not peak else flops_per_sec / peak
