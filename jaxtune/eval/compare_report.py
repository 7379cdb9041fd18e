"""What ``jaxtune compare`` writes for people: ``results.md``, ``compare.html``, ``ratings.png``.

Inputs are the ``results.json`` dict of :func:`jaxtune.eval.compare.summarize` (plus
``judge``), the sample records and the judgment records.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path


def _interval(m: dict) -> str:
    if m["low"] is None:
        return ""
    return f"[{m['low']:.0f}, {m['high']:.0f}]"


def markdown(results: dict) -> str:
    """The ratings table and the win / tie / loss matrix as Markdown."""
    models = results["models"]
    e = results["elo"]
    lines = [
        "# jaxtune compare",
        "",
        f"- judge: `{results.get('judge')}`",
        f"- prompts: {results['n_prompts']}",
        f"- Elo: {e['anchor']}; 95% intervals from {e['bootstrap']} bootstrap resamples of "
        f"the prompts (seed {e['seed']})",
        "",
        "| rank | model | Elo | 95% interval | score |",
        "|---:|---|---:|---|---:|",
    ]
    for rank, m in enumerate(e["models"], 1):
        lines.append(
            f"| {rank} | `{m['model']}` | {m['rating']:.0f} | {_interval(m)} | {m['score']:.3f} |"
        )
    lines += [
        "",
        "Wins / ties / losses of the row model against the column model:",
        "",
        "| | " + " | ".join(f"`{m}`" for m in models) + " |",
        "|---|" + "---|" * len(models),
    ]
    mat = results["matrix"]
    for i, a in enumerate(models):
        cells = [
            "-" if i == j else f"{mat['wins'][i][j]} / {mat['ties'][i][j]} / {mat['losses'][i][j]}"
            for j in range(len(models))
        ]
        lines.append(f"| `{a}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, results: dict) -> None:
    """Writes :func:`markdown` to ``path``."""
    Path(path).write_text(markdown(results), encoding="utf-8")


def _judgment_text(j: dict, models: Sequence[str]) -> str:
    a, b = models[j["pair"][0]], models[j["pair"][1]]
    winner = {"a": a, "b": b}.get(j["outcome"])
    detail = ""
    if "scores" in j:
        detail = f" (scores {j['scores'][0]:.3f} vs {j['scores'][1]:.3f})"
    elif "verdicts" in j:
        detail = (
            f" (verdicts: {a} first -> {j['verdicts']['ab']}, {b} first -> {j['verdicts']['ba']})"
        )
    return f"{a} vs {b}: " + (f"{winner} wins" if winner else "tie") + detail


def html_page(results: dict, samples: Sequence[dict], judgments: Sequence[dict]) -> str:
    """A self-contained page: the ratings, then each prompt with every model's answer.

    Every text from the prompts, the references and the models is HTML-escaped.
    """
    esc = html.escape
    models = results["models"]
    by_prompt: dict[int, list[dict]] = {}
    for j in judgments:
        by_prompt.setdefault(j["id"], []).append(j)
    head = (
        "<!doctype html><html><head><meta charset='utf-8'><title>jaxtune compare</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}"
        "pre{white-space:pre-wrap;margin:0}.answers td{width:WIDTH%}"
        ".item{margin:1.5em 0;border-top:2px solid #888}</style></head><body>"
    ).replace("WIDTH", str(100 // max(len(models), 1)))
    parts = [
        head,
        f"<h1>jaxtune compare</h1><p>judge: <code>{esc(str(results.get('judge')))}</code>"
        f", {results['n_prompts']} prompts; Elo: {esc(results['elo']['anchor'])}</p>",
    ]
    parts.append(
        "<table><tr><th>rank</th><th>model</th><th>Elo</th><th>95% interval</th><th>score</th></tr>"
    )
    for rank, m in enumerate(results["elo"]["models"], 1):
        parts.append(
            f"<tr><td>{rank}</td><td><code>{esc(m['model'])}</code></td><td>{m['rating']:.0f}</td>"
            f"<td>{esc(_interval(m))}</td><td>{m['score']:.3f}</td></tr>"
        )
    parts.append("</table>")
    for s in samples:
        ref = s["reference"]
        ref = " | ".join(ref) if isinstance(ref, list) else ref
        parts.append(f"<div class='item'><h3>prompt {s['id']}</h3><pre>{esc(s['prompt'])}</pre>")
        if ref is not None:
            parts.append(f"<p><b>reference:</b></p><pre>{esc(ref)}</pre>")
        parts.append("<table class='answers'><tr>")
        parts += [f"<th><code>{esc(m)}</code></th>" for m in models]
        parts.append("</tr><tr>")
        parts += [f"<td><pre>{esc(s['outputs'][m])}</pre></td>" for m in models]
        parts.append("</tr></table><ul>")
        parts += [f"<li>{esc(_judgment_text(j, models))}</li>" for j in by_prompt.get(s["id"], [])]
        parts.append("</ul></div>")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_html(
    path: Path, results: dict, samples: Sequence[dict], judgments: Sequence[dict]
) -> None:
    """Writes :func:`html_page` to ``path``."""
    Path(path).write_text(html_page(results, samples, judgments), encoding="utf-8")


def write_plot(path: Path, results: dict) -> None:
    """A horizontal bar of each model's Elo rating with its 95% interval, as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training hosts
    import matplotlib.pyplot as plt

    ms = results["elo"]["models"][::-1]  # best at the top
    y = range(len(ms))
    r = [m["rating"] for m in ms]
    labels = [m["model"] if len(m["model"]) <= 48 else "..." + m["model"][-45:] for m in ms]
    width = 4.0 + 0.075 * max(len(t) for t in labels)  # room for the longest label
    fig, ax = plt.subplots(figsize=(width, 0.5 * len(ms) + 1.4))
    if all(m["low"] is not None for m in ms):
        err = [[m["rating"] - m["low"] for m in ms], [m["high"] - m["rating"] for m in ms]]
        ax.errorbar(r, y, xerr=err, fmt="o", capsize=4)
    else:
        ax.plot(r, y, "o")
    ax.axvline(1000, color="#aaa", lw=0.8)
    ax.set_yticks(list(y))
    ax.set_yticklabels(labels)
    ax.set_ylim(-0.6, len(ms) - 0.4)
    ax.set_xlabel("Elo (mean 1000), 95% bootstrap interval")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
