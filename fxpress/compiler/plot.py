"""``fxpress.plot_memory``: the arena of a memory plan as a picture.

Time (kernel position in the plan's order) runs along x, arena offset along y; every planned
buffer is a rectangle from the kernel that writes it to the last that reads it. The dashed line is
the lower bound (most bytes live at once). Needs matplotlib (``pip install fxpress[plot]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from fxpress.codegen.plan_memory import MemoryPlan

MiB = float(1 << 20)


def plot_memory(plan: MemoryPlan, path: str | Path, values: Mapping[str, int] | None = None,
                title: str = "fxpress memory plan") -> Path:
    """Draw ``plan`` (at symbol ``values``, the hints by default) to a PNG at ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
    except ImportError as e:
        raise ImportError("plot_memory needs matplotlib: pip install 'fxpress[plot]'") from e

    arena = plan.evaluate(plan.arena_bytes, values) / MiB
    lower = plan.evaluate(plan.lower_bound_bytes, values) / MiB
    fig, ax = plt.subplots(figsize=(12, 6))
    colors = plt.get_cmap("tab20")
    for i, slot in enumerate(sorted(plan.slots.values(), key=lambda s: (s.start, s.buffer))):
        offset = plan.evaluate(slot.offset, values) / MiB
        size = plan.evaluate(slot.nbytes, values) / MiB
        width = slot.end - slot.start + 1
        ax.add_patch(Rectangle((slot.start, offset), width, size, facecolor=colors(i % 20),
                               edgecolor="black", linewidth=0.3))
        if arena and size / arena > 0.04 and width > len(plan.order) / 60:
            ax.text(slot.start + width / 2, offset + size / 2, slot.buffer, ha="center",
                    va="center", fontsize=6, clip_on=True)
    ax.axhline(lower, linestyle="--", color="black", linewidth=1, label=f"lower bound {lower:.2f} MiB")
    ax.set_xlim(0, max(len(plan.order), 1))
    ax.set_ylim(0, max(arena, 1e-6) * 1.05)
    ax.set_xlabel(f"kernel position ({plan.order_chosen} order)")
    ax.set_ylabel("arena offset (MiB)")
    ax.set_title(f"{title}: arena {arena:.2f} MiB, {len(plan.slots)} buffers")
    ax.legend(loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
