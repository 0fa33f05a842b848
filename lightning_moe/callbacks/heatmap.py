"""The layer x expert load heatmap: a matplotlib chart (Agg canvas, no pyplot) with axes, labels, the share in
each cell and a colour bar, drawn by :class:`~lightning_moe.callbacks.RoutingMonitor` and ``lightning-moe report``.

Legend: ``L`` layers, ``E`` experts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from lightning_moe._validate import check_non_negative_int, check_positive_int

if TYPE_CHECKING:  # matplotlib is imported when a heatmap is drawn, not with the callback
    from matplotlib.axes import Axes
    from matplotlib.colorbar import Colorbar
    from matplotlib.colors import Colormap
    from matplotlib.image import AxesImage

# Load heatmap: relative share share * E, coloured on [0, HEATMAP_CLIP] (neutral at 1, the fair share).
HEATMAP_COLORMAP = "coolwarm"
HEATMAP_CLIP = 2.0
HEATMAP_LABEL = "load share / fair share (1/E)"
# Its size in pixels at HEATMAP_DPI: margins (left, right, top, bottom) for the labels, title and
# colour bar, plus (height, width) per cell, clipped to 2.5-10 x 4-14 inches.
HEATMAP_DPI = 80
HEATMAP_MARGINS_PX = (64, 110, 30, 44)
HEATMAP_CELL_PX = (24, 26)
HEATMAP_HEIGHT_PX = (200, 800)
HEATMAP_WIDTH_PX = (320, 1120)
# Shares are printed in the cells up to this many experts and cells, in a font of at least this size.
HEATMAP_MAX_TEXT_COLUMNS = 32
HEATMAP_MAX_TEXT_CELLS = 1000
HEATMAP_MIN_FONT_PT = 5.0


@dataclass(frozen=True)
class HeatmapRender:
    """A rendered load heatmap and where its cells lie, for callers that sample or crop it."""

    image_HW3: np.ndarray  # uint8 RGB
    centres_LE2: np.ndarray  # (row, column) pixel of each cell's centre, row 0 at the top of the image
    cell_hw: tuple[float, float]  # a cell's height and width in pixels


def heatmap_size_px(num_layers: int, num_experts: int) -> tuple[int, int]:
    """``(height, width)`` in pixels of :func:`load_heatmap`'s image of ``num_layers`` x ``num_experts`` cells.

    It grows with the cells (``HEATMAP_CELL_PX`` each, plus the margins) and is clipped to
    ``HEATMAP_HEIGHT_PX`` / ``HEATMAP_WIDTH_PX``: 2.5-10 by 4-14 inches at ``HEATMAP_DPI``.
    """
    check_positive_int("num_layers", num_layers)
    check_positive_int("num_experts", num_experts)
    left, right, top, bottom = HEATMAP_MARGINS_PX
    cell_h, cell_w = HEATMAP_CELL_PX
    height = min(max(top + bottom + cell_h * num_layers, HEATMAP_HEIGHT_PX[0]), HEATMAP_HEIGHT_PX[1])
    width = min(max(left + right + cell_w * num_experts, HEATMAP_WIDTH_PX[0]), HEATMAP_WIDTH_PX[1])
    return height, width


def load_heatmap(shares: Sequence[Tensor | np.ndarray], layer_labels: Sequence[int | str] | None = None,
                 step: int | None = None, *, title: str = "expert load", annotate: bool | None = None) -> np.ndarray:
    """A layer x expert heatmap of load shares with axes, values and a colour bar, ``(H, W, 3)`` uint8 RGB.

    Cell ``(l, e)`` is coloured by the relative share ``share * E_l`` (``coolwarm``: blue = no
    load, neutral grey = the fair share ``1/E_l``, red = twice it or more) and, while the cells are
    few and large enough to read (at most ``HEATMAP_MAX_TEXT_COLUMNS`` experts and
    ``HEATMAP_MAX_TEXT_CELLS`` cells), labelled with its share in percent. Layers with fewer experts
    than the widest are padded with hatched blank cells. The size is :func:`heatmap_size_px`.
    Rendered with matplotlib's Agg canvas (no pyplot: no global figure state, no GUI).

    Args:
        shares: one ``(E_l,)`` load-share vector per layer (each sums to 1, or is all zeros).
        layer_labels: the row labels, one per layer (e.g. the ``i`` of ``routing/layer{i}``);
            default ``0 .. L-1``.
        step: the global step, shown in the title; ``None`` for none.
        title: the title's text, before the step.
        annotate: print the shares in the cells: ``None`` when legible, or always / never.
    """
    return render_load_heatmap(shares, layer_labels, step, title=title, annotate=annotate).image_HW3


def render_load_heatmap(shares: Sequence[Tensor | np.ndarray], layer_labels: Sequence[int | str] | None = None,
                        step: int | None = None, *, title: str = "expert load",
                        annotate: bool | None = None) -> HeatmapRender:
    """:func:`load_heatmap`, also returning where each cell lies in the image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if step is not None:
        check_non_negative_int("step", step)
    share_LE = _share_grid(shares)
    num_layers, num_experts = share_LE.shape
    height, width = heatmap_size_px(num_layers, num_experts)
    left, right, top, bottom = HEATMAP_MARGINS_PX
    figure = Figure(figsize=(width / HEATMAP_DPI, height / HEATMAP_DPI), dpi=HEATMAP_DPI)
    # Fixed margins, not a layout engine: the cells' size is known before drawing (it sets the font).
    ax = figure.add_axes((left / width, bottom / height, 1 - (left + right) / width, 1 - (top + bottom) / height))
    cax = figure.add_axes(((width - right + 12) / width, bottom / height, 14 / width, 1 - (top + bottom) / height))
    image = draw_load_heatmap(ax, share_LE, layer_labels, annotate=annotate)
    heatmap_colorbar(image, cax)
    ax.set_title(title if step is None else f"{title} at step {step}", fontsize=10)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    image_HW3 = np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])
    rows_L, cols_E = np.meshgrid(np.arange(num_layers), np.arange(num_experts), indexing="ij")
    xy_N2 = ax.transData.transform(np.stack([cols_E.ravel(), rows_L.ravel()], axis=1))
    # Display coordinates count pixels up from the bottom edge; image rows count down from the top.
    centres_LE2 = np.stack([image_HW3.shape[0] - xy_N2[:, 1], xy_N2[:, 0]], axis=1).reshape(num_layers, num_experts, 2)
    box = ax.get_window_extent()
    return HeatmapRender(image_HW3, centres_LE2, (box.height / num_layers, box.width / num_experts))


def draw_load_heatmap(ax: Axes, shares: Sequence[Tensor | np.ndarray] | np.ndarray,
                      layer_labels: Sequence[int | str] | None = None, *, annotate: bool | None = None) -> AxesImage:
    """Draw :func:`load_heatmap`'s cells, ticks and values (no title, no colour bar) on ``ax``; return the image.

    ``shares`` is as in :func:`load_heatmap`, or an ``(L, E)`` array of shares with NaN padding.
    The value font is sized from ``ax``'s current position, so place ``ax`` first.
    """
    import matplotlib
    from matplotlib.ticker import FixedLocator, MaxNLocator

    share_LE = shares if isinstance(shares, np.ndarray) and shares.ndim == 2 else _share_grid(shares)
    num_layers, num_experts = share_LE.shape
    labels = list(range(num_layers)) if layer_labels is None else list(layer_labels)
    if len(labels) != num_layers:
        raise ValueError(f"`layer_labels` must hold one label per layer ({num_layers}), got {len(labels)}.")
    relative_LE = share_LE * np.sum(np.isfinite(share_LE), axis=1, keepdims=True)
    # Padding is transparent and shows the axes' hatched background: no colour of the map means "no expert".
    colormap = matplotlib.colormaps[HEATMAP_COLORMAP].with_extremes(bad=(1.0, 1.0, 1.0, 0.0))
    image = ax.imshow(np.ma.masked_invalid(relative_LE), cmap=colormap, vmin=0.0, vmax=HEATMAP_CLIP, aspect="auto",
                      interpolation="nearest")
    ax.patch.set(facecolor="white", hatch="//", edgecolor="0.7")
    ax.set_xlabel("expert", fontsize=9)
    ax.set_ylabel("layer", fontsize=9)
    cell_h, cell_w = _cell_px(ax, num_layers, num_experts)
    # Tick labels at least ~28 px apart (3 digits at 8 pt), rows every 14 px.
    ax.xaxis.set_major_locator(MaxNLocator(nbins=max(min(num_experts, int(cell_w * num_experts / 28)), 1),
                                           integer=True))
    stride = math.ceil(num_layers / max(cell_h * num_layers / 14, 1))
    ax.yaxis.set_major_locator(FixedLocator(range(0, num_layers, stride)))
    ax.set_yticklabels([str(label) for label in labels[::stride]])
    ax.tick_params(labelsize=8, length=2)
    if min(cell_h, cell_w) >= 8:  # white lines between cells, while the cells are large enough to see them
        # Two line collections: minor-tick gridlines would build a Tick per line (slow).
        ax.vlines(np.arange(1, num_experts) - 0.5, -0.5, num_layers - 0.5, colors="white", linewidth=0.8)
        ax.hlines(np.arange(1, num_layers) - 0.5, -0.5, num_experts - 0.5, colors="white", linewidth=0.8)
    _annotate_cells(ax, share_LE, relative_LE, colormap, annotate)
    return image


def heatmap_colorbar(image: AxesImage, cax: Axes) -> Colorbar:
    """The colour bar of a :func:`draw_load_heatmap` image, drawn in ``cax``."""
    colorbar = cax.figure.colorbar(image, cax=cax, extend="max")
    colorbar.set_ticks([0.0, 0.5, 1.0, 1.5, 2.0], labels=["0", "0.5", "1 fair", "1.5", "2+"])
    colorbar.ax.tick_params(labelsize=8)
    colorbar.set_label(HEATMAP_LABEL, fontsize=9)
    return colorbar


def _share_grid(shares: Sequence[Tensor | np.ndarray]) -> np.ndarray:
    """The shares as an ``(L, max E_l)`` float64 array, NaN where a layer has fewer experts."""
    if isinstance(shares, (Tensor, np.ndarray)) or not len(shares):
        raise ValueError("`shares` must be a non-empty sequence of (E,) load-share vectors, one per layer.")
    rows = [np.asarray(s.detach().cpu().double() if isinstance(s, Tensor) else s, dtype=np.float64) for s in shares]
    if any(row.ndim != 1 or row.size == 0 for row in rows):
        raise ValueError(f"`shares` must hold non-empty 1-D vectors, got shapes {[row.shape for row in rows]}.")
    share_LE = np.full((len(rows), max(row.size for row in rows)), np.nan)
    for i, row in enumerate(rows):
        share_LE[i, : row.size] = row
    return share_LE


def _cell_px(ax: Axes, num_layers: int, num_experts: int) -> tuple[float, float]:
    """A cell's height and width in pixels, from ``ax``'s position (before any layout engine moves it)."""
    figure, box = ax.figure, ax.get_position()
    return (box.height * figure.get_figheight() * figure.dpi / num_layers,
            box.width * figure.get_figwidth() * figure.dpi / num_experts)


def _annotate_cells(ax: Axes, share_LE: np.ndarray, relative_LE: np.ndarray, colormap: Colormap,
                    annotate: bool | None) -> None:
    """Print each cell's share in percent, in a font that fits the cell, dark or light against its colour.

    One ``PathCollection`` of cached text outlines, not a ``Text`` per cell: a thousand text
    artists take over a second to lay out and draw, the collection a few milliseconds.
    """
    from matplotlib.collections import PathCollection
    from matplotlib.font_manager import FontProperties
    from matplotlib.path import Path
    from matplotlib.textpath import TextPath
    from matplotlib.transforms import Affine2D

    num_layers, num_experts = share_LE.shape
    figure = ax.figure
    cell_h, cell_w = _cell_px(ax, num_layers, num_experts)
    fontsize = min(cell_h * 0.5, cell_w / 2.6, 12.0) * 72.0 / figure.dpi  # "100%" in 90% of the width
    legible = (num_experts <= HEATMAP_MAX_TEXT_COLUMNS and share_LE.size <= HEATMAP_MAX_TEXT_CELLS
               and fontsize >= HEATMAP_MIN_FONT_PT)
    if not (legible if annotate is None else annotate):
        return
    luminance_LE = colormap(np.clip(relative_LE / HEATMAP_CLIP, 0.0, 1.0))[..., :3] @ np.array([0.299, 0.587, 0.114])
    font = FontProperties(size=fontsize)
    outlines: dict[str, Path] = {}  # text -> its outline in points, centred on (0, 0)
    paths, offsets, colours = [], [], []
    for (row, col), share in np.ndenumerate(share_LE):
        if not np.isfinite(share):
            continue
        text = "<1%" if 0 < share < 0.005 else f"{share:.0%}"
        if text not in outlines:
            outline = TextPath((0.0, 0.0), text, prop=font)
            # The control points' box: close enough to centre on, and much cheaper than get_extents().
            points = outline.vertices[outline.codes != Path.CLOSEPOLY]
            centre = (points.min(axis=0) + points.max(axis=0)) / 2
            outlines[text] = outline.transformed(Affine2D().translate(-centre[0], -centre[1]))
        paths.append(outlines[text])
        offsets.append((col, row))
        colours.append("white" if luminance_LE[row, col] < 0.5 else "black")
    # Outlines in points, placed at the cells' centres (data coordinates); dpi_scale_trans follows savefig's dpi.
    ax.add_collection(PathCollection(paths, offsets=offsets, offset_transform=ax.transData, facecolors=colours,
                                     edgecolors="none", transform=Affine2D().scale(1 / 72) + figure.dpi_scale_trans))
