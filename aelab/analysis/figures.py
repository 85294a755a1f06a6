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


KEPT: dict[str, object] = {}  # the figures every run's end draws again, by name: made once per process
MAX_KEPT = 16  # a long process (a test session, `aelab eval` over many sizes) keeps the latest made only


def kept_figure(name: str, make):
    """The figure `name` (a matplotlib Figure, made by `make()` the first time), cleared of what its last
    use drew: its axes, scales, ticks and fonts stay laid out, so a sweep's next job draws it for about
    half a fresh figure's cost (the histograms: 0.1 s instead of 0.2). A use sets everything it shows
    but what `make` sets; the pixels are a fresh figure's (tested). Not pyplot's, so pyplot's close (in
    save_figure, figure_pixels) leaves it as it is."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.transforms import Bbox

    fig = KEPT.get(name)
    if fig is None:
        pyplot()  # matplotlib set up as for every picture
        if len(KEPT) == MAX_KEPT:
            KEPT.pop(next(iter(KEPT)))  # the first made
        fig = KEPT[name] = make()
        FigureCanvasAgg(fig)
        return fig
    for ax in fig.axes:
        for artist in [*ax.lines, *ax.patches, *ax.collections, *ax.images]:  # a new legend replaces the old
            artist.remove()
        ax.dataLim.set(Bbox.null())  # the limits found afresh from what the next use draws
    return fig


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
