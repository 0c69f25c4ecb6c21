"""The report's figures: matplotlib (Agg) charts of each stage's own records, returned as PNG bytes."""

from __future__ import annotations

import io
from typing import Any


def _figure(width: float = 7.0, height: float = 3.6) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")  # no display, no network: the report is written on any machine
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    return fig, ax


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def data_funnel(stats: dict[str, Any]) -> bytes:
    """Documents in, drops per reason, duplicates, documents out: one horizontal bar each."""
    bars = [("documents in", stats.get("documents_in", 0))]
    bars += [(f"dropped: {k}", v) for k, v in (stats.get("dropped") or {}).items() if v]
    bars += [("exact duplicates", stats.get("exact_duplicates", 0)),
             ("fuzzy duplicates", stats.get("fuzzy_duplicates", 0)), ("documents out", stats.get("documents_out", 0))]
    fig, ax = _figure(7.0, 0.6 + 0.32 * len(bars))
    labels, values = zip(*bars, strict=True)
    colors = ["#4c72b0"] + ["#dd8452"] * (len(bars) - 2) + ["#55a868"]
    ax.barh(range(len(bars)), values, color=colors)
    ax.set_yticks(range(len(bars)), labels)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:,}", va="center", fontsize=8)
    tokens = stats.get("tokens_train", 0) + stats.get("tokens_val", 0)
    ax.set_title(f"data funnel: {stats.get('documents_out', 0):,} documents, {tokens:,} tokens out")
    ax.set_xlabel("documents")
    return _png(fig)


def training_curves(records: list[dict[str, Any]], name: str) -> bytes:
    """Train loss and validation loss against step, learning rate on a second axis."""
    fig, ax = _figure()
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["loss"] for r in records], label="train loss", color="#4c72b0")
    vals = [r for r in records if "val_loss" in r]
    if vals:
        ax.plot([r["step"] for r in vals], [r["val_loss"] for r in vals], "o-", label="val loss", color="#c44e52")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    lr = ax.twinx()
    lr.plot(steps, [r["lr"] for r in records], "--", color="#8c8c8c", label="lr")
    lr.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    ax.set_title(f"{name}: loss and learning rate")
    return _png(fig)


def sweep_curves(trials: list[dict[str, Any]], curves: dict[str, list[tuple[int, float]]], best: str | None) -> bytes:
    """Validation loss against step per trial; the winner drawn thick."""
    fig, ax = _figure()
    for trial in trials:
        tid = str(trial.get("trial_id", trial.get("trial", "")))
        points = curves.get(tid) or []
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, lw=3 if tid == best else 1, label=f"{tid}{' (best)' if tid == best else ''}")
    ax.set_xlabel("step")
    ax.set_ylabel("val loss")
    ax.set_title("sweep: validation loss per trial (stopped trials end early)")
    ax.legend(fontsize=7)
    return _png(fig)


def size_vs_ppl(rows: list[dict[str, Any]], chosen: str | None) -> bytes:
    """Size on disk against perplexity per model of the compression table; the chosen one marked."""
    fig, ax = _figure(6.0, 3.6)
    for r in rows:
        size, ppl = r.get("disk_mb"), r.get("val_ppl")
        if size is None or ppl is None:
            continue
        mark = r.get("model") == chosen
        ax.scatter([size], [ppl], s=120 if mark else 40, marker="*" if mark else "o")
        ax.annotate(f"{r.get('model')}{' (chosen)' if mark else ''}", (size, ppl), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("val perplexity")
    ax.set_title("compression: size against perplexity")
    return _png(fig)


def model_comparison(rows: list[dict[str, Any]], title: str,
                     keys: tuple[str, ...] = ("sft_loss", "val_loss", "rouge_l", "bleu")) -> bytes:
    """One panel per figure present (assistant-token loss, val loss, ROUGE-L, BLEU), a bar per model."""
    present = [k for k in keys if any(r.get(k) is not None for r in rows)] or ["params"]
    _figure()  # selects the Agg backend
    import matplotlib.pyplot as plt

    plt.close("all")
    fig, axes = plt.subplots(1, len(present), figsize=(2.6 * len(present), 3.0), dpi=100, squeeze=False)
    names = [str(r.get("model")) for r in rows]
    for ax, key in zip(axes[0], present, strict=True):
        values = [float(r.get(key) or 0.0) for r in rows]
        ax.bar(range(len(rows)), values, color=["#8c8c8c"] + ["#4c72b0"] * (len(rows) - 1))
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(key, fontsize=9)
    fig.suptitle(title)
    return _png(fig)
