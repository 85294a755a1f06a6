"""matplotlib, shared by a run's pictures and a sweep's plots: no torch here, so `aelab report` loads none."""
from __future__ import annotations

from pathlib import Path

from ..runs import GRID_PAD, write_whole


def pyplot():
    """matplotlib without a display, and without its INFO chatter in the run log."""
    import logging

    import matplotlib
    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path, dpi: int) -> None:
    """A matplotlib figure as a PNG file, written whole (runs.write_whole), then closed."""
    try:
        write_whole(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        pyplot().close(fig)


def label_rows(ax, height: int, labels: list[str], fontsize: float) -> None:
    """Name each row of images of a metrics.grid picture `height` pixels tall, shown on `ax`, at its
    left; no frame, no other ticks."""
    row = (height - GRID_PAD) / len(labels)  # a row's images and the margin above them
    ax.set_yticks([i * row + GRID_PAD + (row - GRID_PAD) / 2 - 0.5 for i in range(len(labels))], labels,
                  fontsize=fontsize)
    ax.set_xticks([])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
