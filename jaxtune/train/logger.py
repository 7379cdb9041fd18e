"""Run logging: progress bar, ``metrics.jsonl``, TensorBoard, W&B, loss curve PNG.

``metrics.jsonl`` holds one JSON object per optimizer step (``step``, ``loss``, ``lr``,
``tokens_per_sec``, ``flops_per_sec``, ``mfu``, ...; eval rows carry ``eval/...`` keys).
On resume, rows past the restored step are dropped so the file always describes one
consistent run. Only process 0 writes.

MFU counts 4 FLOPs per frozen and 6 per trainable parameter and token (see
:func:`jaxtune.train.hardware.flops_per_token`) against the devices' bf16 peak; it is
``null`` where the peak is unknown (CPU).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path

import jax
from tqdm.auto import tqdm

from jaxtune.config import config_to_dict
from jaxtune.train.hardware import flops_per_token, mfu


class MetricsLogger:
    """Writes one row per optimizer step to every configured sink.

    Args:
      run_dir: the run directory.
      cfg: the run ``Config`` (``logging`` section, run name).
      total_steps: steps of the whole run (progress bar).
      start_step: step the run resumes at (rows after it are dropped).
      params: ``peft.trainable.summary`` dict (``total``/``trainable`` counts) for MFU.
      devices: the devices the step runs on (their peak FLOP/s for MFU).
    """

    def __init__(
        self,
        run_dir: Path,
        cfg,
        total_steps: int,
        start_step: int,
        params=None,
        devices=None,
    ):
        self.closed = False
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.main = jax.process_index() == 0
        self.total = total_steps
        self.last: dict = {}
        self.rows: list[dict] = []
        self.flops_per_token = _flops_per_token(params)
        self.devices = list(devices) if devices is not None else jax.devices()
        if self.main and self.path.exists():
            kept = [r for r in _read(self.path) if r.get("step", 0) <= start_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            self.rows = kept
        self.file = open(self.path, "a") if self.main else None  # noqa: SIM115
        self.tb = (
            _tensorboard(self.run_dir / "tensorboard")
            if (self.main and cfg.logging.tensorboard)
            else None
        )
        self.wandb = _start_wandb(cfg, self.run_dir, self.warn) if self.main else None
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            disable=not (self.main and cfg.logging.progress),
            file=sys.stderr,
            dynamic_ncols=True,
        )
        self.t_last = time.perf_counter()

    def log(self, row: dict) -> None:
        now = time.perf_counter()
        dt = max(now - self.t_last, 1e-9)
        self.t_last = now
        row["tokens_per_sec"] = row.get("seq_tokens", 0) / dt
        if self.flops_per_token:
            row["flops_per_sec"] = self.flops_per_token * row["tokens_per_sec"]
            row["mfu"] = mfu(row["flops_per_sec"], self.devices)
        self.last = {**self.last, **row}
        self.rows.append(row)
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        scalars = {k: v for k, v in row.items() if k != "step" and v is not None}
        if self.tb:
            for tag, v in scalars.items():
                if isinstance(v, int | float) and not isinstance(v, bool) and v == v:
                    self.tb.add_scalar(tag, float(v), row["step"])
        if self.wandb:
            self.wandb.log(scalars, step=row["step"])
        post = {
            "loss": f"{row['loss']:.4f}",
            "lr": f"{row['lr']:.2e}",
            "tok/s": f"{row['tokens_per_sec']:.0f}",
        }
        if "eval/loss" in row:
            post["eval"] = f"{row['eval/loss']:.4f}"
        if row.get("mfu") is not None:
            post["mfu"] = f"{100 * row['mfu']:.1f}%"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def warn(self, msg: str) -> None:
        if self.main:
            tqdm.write(f"warning: {msg}", file=sys.stderr)

    def _close_sinks(self, **wandb_finish) -> bool:
        """Closes bar, file, TensorBoard and W&B once; False if already closed."""
        if self.closed:
            return False
        self.closed = True
        self.bar.close()
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish(**wandb_finish)
        return True

    def abort(self) -> None:
        """Closes the sinks on an error path (no loss curve, no summary line)."""
        self._close_sinks(exit_code=1)

    def close(self, reason: str) -> None:
        if not self._close_sinks():
            return
        if self.main:
            plot_loss_curve(_read(self.path), self.run_dir / "loss_curve.png")
            print(
                f"{reason}; metrics in {self.path}, loss curve in {self.run_dir / 'loss_curve.png'}"
            )


_TB_WRITERS = itertools.count()


def _summary_writer_class():
    """``tensorboardX.SummaryWriter``, imported without importing torch.

    tensorboardX imports torch at import time wherever torch is installed, only to accept
    torch tensors (jaxtune logs Python floats); jaxtune never imports torch at run time,
    so torch is hidden while tensorboardX loads, unless the process already imported it.
    Deferred to the first run that writes TensorBoard files.
    """
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _tensorboard(log_dir: Path):
    """A ``tensorboardX.SummaryWriter`` on a new ``events.out.tfevents.*`` file in ``log_dir``.

    tensorboardX names its file by the second and host and truncates an existing one, so a
    writer reopened within the same second (a resume) would wipe the previous file: the pid
    and a per-process counter follow, as in ``torch.utils.tensorboard``'s file names. Events
    are written by tensorboardX's worker thread and reach the disk at least every second
    and at ``close``.
    """
    SummaryWriter = _summary_writer_class()
    suffix = f".{os.getpid()}.{next(_TB_WRITERS)}"
    return SummaryWriter(str(log_dir), flush_secs=1, filename_suffix=suffix)


def _flops_per_token(info) -> float | None:
    """LoRA-aware training FLOPs per token: 6 N_trainable + 4 N_frozen (2 fwd + 2 bwd-input)."""
    if not isinstance(info, dict) or "trainable" not in info or "total" not in info:
        return None
    return flops_per_token(info["total"], info["trainable"])


def _start_wandb(cfg, run_dir: Path, warn):
    """A W&B run when ``logging.wandb`` is on and ``wandb`` is installed, else None.

    The W&B run id is kept in ``run_dir/wandb_id`` so a resumed run continues the same
    W&B run instead of starting a new one.
    """
    if not cfg.logging.wandb:
        return None
    try:
        import wandb
    except ImportError:
        warn("logging.wandb is true but the wandb package is not installed (pip install wandb)")
        return None

    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else None
    run = wandb.init(
        project=cfg.logging.wandb_project,
        name=cfg.run.name or run_dir.name,
        dir=str(run_dir),
        config=config_to_dict(cfg),
        id=run_id,
        resume="allow",
    )
    if run is not None and getattr(run, "id", None):
        id_file.write_text(str(run.id))
    return run


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(rows: list[dict], out: Path) -> None:
    """Train (and validation) loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
    if not train:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train, strict=True), label="train", lw=1.2)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
