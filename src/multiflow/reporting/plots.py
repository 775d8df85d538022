"""The Step 1 chart: per-layer sparsity in model order, coloured by modality, with the target line."""

from __future__ import annotations

import io
from pathlib import Path

from multiflow.distribution.distribute import Distribution
from multiflow.storage.outputs import write_atomic

COLOURS = {"vision": "#1f77b4", "text": "#2ca02c", "fusion": "#d62728"}


def plot_distribution(dist: Distribution, path: str | Path) -> Path:
    """Write a PNG atomically and return its path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = list(dist.layers)
    fig, ax = plt.subplots(figsize=(max(8.0, min(24.0, len(names) * 0.06)), 4.5), dpi=110)
    try:
        for m in dist.modalities:
            xs = [i for i, n in enumerate(names) if dist.layers[n].modality == m]
            if xs:
                ys = [100 * dist.layers[names[i]].sparsity for i in xs]
                ax.bar(xs, ys, width=1.0, color=COLOURS.get(m, "grey"), label=f"{m} ({len(xs)} layers)")
        ax.axhline(100 * dist.target_sparsity, color="black", linestyle="--", linewidth=1,
                   label=f"target {100 * dist.target_sparsity:g}%")
        ax.set_xlabel("layer (model order)")
        ax.set_ylabel("sparsity (%)")
        ax.set_ylim(0, 100)
        ax.set_xlim(-1, len(names))
        ax.set_title(f"MULTIFLOW Step 1: per-layer sparsity at target {100 * dist.target_sparsity:g}%")
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    return write_atomic(Path(path), buffer.getvalue())
