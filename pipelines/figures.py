"""Plots people would rather look at than read: the probe's feature scatter and a run's training curves."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from d4ir.shards.io import atomic_write_bytes, read_jsonl
from d4ir.shards.layout import LOG_FILE
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def probe_plot(result: dict, path: str | Path) -> Path:
    """The prompt encoder's features (first two principal components), one colour per degradation type."""
    fig = Figure(figsize=(5, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    points, labels = np.asarray(result["points"]), np.asarray(result["labels"])
    for t, name in enumerate(result["types"]):
        sel = labels == t
        ax.scatter(points[sel, 0], points[sel, 1], s=10, alpha=0.7, label=name)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(f"prompt-encoder features, PCA; NN accuracy {result['accuracy']:.2f} "
                 f"(chance {result['chance']:.2f})", fontsize=9)
    ax.legend(fontsize=8, markerscale=1.5)
    fig.tight_layout()
    atomic_write_bytes(path, _png(fig))
    return Path(path)


def curves_png(run: Path, out: Path) -> Path:
    """Training curves: each teacher's and student's loss, validation PSNR, and PSNR against the teacher."""
    fig = Figure(figsize=(14, 4), dpi=90)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    logs = {p.parent.name: read_jsonl(p) for p in sorted(Path(run).rglob(LOG_FILE)) if p.parent.name != "prompts"}
    for name, rows in logs.items():
        epochs = [r["epoch"] for r in rows if "epoch" in r]
        if not epochs:
            continue
        loss_key = "loss_kd" if "loss_kd" in rows[0] else "loss"
        axes[0].plot(epochs, [r[loss_key] for r in rows], marker="o", label=f"{name} ({loss_key})")
        if "val_psnr" in rows[0]:
            axes[1].plot(epochs, [r["val_psnr"] for r in rows], marker="o", label=name)
        if "val_ref_psnr" in rows[0]:
            axes[2].plot(epochs, [r["val_ref_psnr"] for r in rows], marker="o", label=name)
    titles = ("training loss", "val PSNR vs ground truth (dB)", "val PSNR vs teacher (dB)")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if ax.lines:
            ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    fig.tight_layout()
    atomic_write_bytes(out, _png(fig))
    return Path(out)
