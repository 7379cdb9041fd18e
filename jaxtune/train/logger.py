"""Run logging: a progress bar (loss, lr, tokens/s, ETA), ``metrics.jsonl``, loss curve PNG.

``metrics.jsonl`` holds one JSON object per optimizer step (``step``, ``loss``, ``lr``,
``tokens_per_sec``, ...; eval rows carry ``eval/...`` keys). On resume, rows past the
restored step are dropped so the file always describes one consistent run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
from tqdm.auto import tqdm


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg, total_steps: int, start_step: int, params=None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.main = jax.process_index() == 0
        self.total = total_steps
        self.last: dict = {}
        self.rows: list[dict] = []
        self.flops_per_token = _flops_per_token(params)
        if self.main and self.path.exists():
            kept = [r for r in _read(self.path) if r.get("step", 0) <= start_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            self.rows = kept
        self.file = open(self.path, "a") if self.main else None  # noqa: SIM115
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
        self.last = {**self.last, **row}
        self.rows.append(row)
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        post = {
            "loss": f"{row['loss']:.4f}",
            "lr": f"{row['lr']:.2e}",
            "tok/s": f"{row['tokens_per_sec']:.0f}",
        }
        if "eval/loss" in row:
            post["eval"] = f"{row['eval/loss']:.4f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def warn(self, msg: str) -> None:
        if self.main:
            tqdm.write(f"warning: {msg}", file=sys.stderr)

    def close(self, reason: str) -> None:
        self.bar.close()
        if self.file:
            self.file.close()
        if self.main:
            plot_loss_curve(_read(self.path), self.run_dir / "loss_curve.png")
            print(
                f"{reason}; metrics in {self.path}, loss curve in {self.run_dir / 'loss_curve.png'}"
            )


def _flops_per_token(info) -> float | None:
    """LoRA-aware training FLOPs per token: 6 N_trainable + 4 N_frozen (2 fwd + 2 bwd-input)."""
    if not isinstance(info, dict) or "trainable" not in info or "total" not in info:
        return None
    t, n = info["trainable"], info["total"]
    return 6.0 * t + 4.0 * (n - t)


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
