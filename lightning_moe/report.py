"""``lightning-moe report RUN_DIR``: a run's losses and routing health as one PNG and an HTML page.

Legend: ``E`` experts, ``L`` MoE layers.

Reads the TensorBoard events files of one run (a Lightning ``version_N`` folder) and draws:

- the losses: ``train/loss``, ``train/lm_loss``, ``val/loss`` and the final ``test/loss``;
- per MoE layer, from :class:`~lightning_moe.callbacks.RoutingMonitor`'s scalars
  (``{prefix}/layer{i}/...``): load CV, normalised load entropy, min and max expert share;
- per layer, the dead experts of :class:`~lightning_moe.callbacks.DeadExpertDetector`
  (``dead_experts/layer{i}``);
- the expert-load heatmap at the first, middle and last steps that logged one.

The heatmaps are recomputed from the per-expert load histograms (``{prefix}/layer{i}/expert_load``),
which the monitor writes at the same steps as its ``{prefix}/load_heatmap`` images: they hold the
tokens each expert kept, so the shares are exact, and the report draws them in one layout with one
colour bar whatever version of the monitor drew the images (the scalars hold only each layer's
min and max share). The logged images are shown, decoded, only for a run with images and no
histograms.

Every events file of the folder is read: a resumed run, or ``trainer.test`` after ``fit``, adds
one. Values are merged by step; where two files hold the same step, the file that started later
wins. Panels with nothing logged are left out and named in the HTML page's notes.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_moe.callbacks.heatmap import draw_load_heatmap, heatmap_colorbar

__all__ = ["ReportError", "RunLogs", "find_run_dir", "main", "read_run", "write_report"]

REPORT_DPI = 100
REPORT_WIDTH_IN = 14.0
REPORT_ROW_IN = 3.4  # height of a row of curve panels, with its titles and tick labels
REPORT_HEATMAPS = 3  # heatmaps drawn by default: the first, middle and last logged steps
REPORT_LEGEND_LAYERS = 10  # up to this many layers get a legend; more get a colour bar of layer indices
DEAD_PREFIX = "dead_experts"  # DeadExpertDetector's fixed tag prefix
_EVENTS = "events.out.tfevents.*"


class ReportError(ValueError):
    """A bad report request: no such folder, no events files in it, an unknown prefix, a bad argument."""


@dataclass
class RunLogs:
    """What a run's events files hold, merged over the files: ``{tag: {step: value}}`` per kind."""

    run_dir: Path
    event_files: list[Path]
    scalars: dict[str, dict[int, float]] = field(default_factory=dict)
    histograms: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)  # bucket counts, (E,) per step
    images: dict[str, dict[int, bytes]] = field(default_factory=dict)  # encoded PNG per step

    def series(self, tag: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of scalar ``tag``, by step; empty when not logged."""
        points = sorted(self.scalars.get(tag, {}).items())
        return np.array([s for s, _ in points], dtype=np.int64), np.array([v for _, v in points], dtype=np.float64)

    def last(self, tag: str) -> float | None:
        """The value of scalar ``tag`` at its last step, or ``None``."""
        points = self.scalars.get(tag)
        return points[max(points)] if points else None


def find_run_dir(path: str | Path) -> Path:
    """The folder of events files that ``path`` names: ``path`` itself, or its newest version folder.

    Newest is the highest ``version_N`` among the subfolders with events files, or, when none is
    named so, the one whose latest events file was modified last.
    """
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path} is not a folder (expected a run's version folder, or a folder of them).")
    if any(path.glob(_EVENTS)):
        return path
    runs = [sub for sub in path.iterdir() if sub.is_dir() and any(sub.glob(_EVENTS))]
    if not runs:
        raise ReportError(f"{path} holds no TensorBoard events files ({_EVENTS}), nor do its subfolders.")

    def newness(run: Path) -> tuple[int, float]:
        match = re.fullmatch(r"version_(\d+)", run.name)
        return (int(match.group(1)) if match else -1, max(f.stat().st_mtime for f in run.glob(_EVENTS)))

    return max(runs, key=newness)


def read_run(run_dir: str | Path) -> RunLogs:
    """Read every events file of ``run_dir`` (a folder that holds them) and merge them by step."""
    run_dir = Path(run_dir)
    accumulators = []
    for path in sorted(run_dir.glob(_EVENTS)):
        # purge_orphaned_data=False: the merge below decides which file's values stand.
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0, "images": 0},
                                       purge_orphaned_data=False)
        accumulator.Reload()
        accumulators.append((_first_wall_time(accumulator), path, accumulator))
    if not accumulators:
        raise ReportError(f"{run_dir} holds no TensorBoard events files ({_EVENTS}).")
    accumulators.sort(key=lambda item: item[:2])  # files that started later overwrite earlier ones
    logs = RunLogs(run_dir, [path for _, path, _ in accumulators])
    for _, _, accumulator in accumulators:
        tags = accumulator.Tags()
        for tag in tags["scalars"]:
            logs.scalars.setdefault(tag, {}).update((e.step, e.value) for e in accumulator.Scalars(tag))
        for tag in tags["histograms"]:
            logs.histograms.setdefault(tag, {}).update(
                (e.step, np.array(e.histogram_value.bucket, dtype=np.float64)) for e in accumulator.Histograms(tag))
        for tag in tags["images"]:
            logs.images.setdefault(tag, {}).update((e.step, e.encoded_image_string) for e in accumulator.Images(tag))
    return logs


def write_report(run_dir: str | Path, out: str | Path | None = None, prefix: str | None = None,
                 heatmaps: int = REPORT_HEATMAPS) -> dict[str, Path]:
    """Write the report of the run in ``run_dir``; return ``{"png": ..., "html": ...}``, the paths written.

    Args:
        run_dir: a run's version folder, or a folder of them (the newest is read: :func:`find_run_dir`).
        out: the PNG's path, ending in ``.png``; the HTML page goes beside it with the suffix
            ``.html``. Default: ``report.png`` in the run's version folder.
        prefix: the :class:`~lightning_moe.callbacks.RoutingMonitor`'s prefix; default: found in
            the tags (``routing`` when several monitors logged).
        heatmaps: heatmaps drawn, >= 0, spread evenly over the steps that logged one.
    """
    if isinstance(heatmaps, bool) or not isinstance(heatmaps, int) or heatmaps < 0:
        raise ReportError(f"`heatmaps` must be an integer >= 0, got {heatmaps!r}.")
    if out is not None and Path(out).suffix.lower() != ".png":
        raise ReportError(f"`out` must be a path ending in .png, got {str(out)!r}.")
    run = find_run_dir(run_dir)
    png = run / "report.png" if out is None else Path(out)
    logs = read_run(run)
    report = _Report(logs, _find_prefix(logs, prefix), heatmaps)
    figure = report.figure()
    png.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    png.write_bytes(buffer.getvalue())
    page = png.with_suffix(".html")
    page.write_text(report.html(buffer.getvalue()), encoding="utf-8")
    return {"png": png, "html": page}


def main(argv: list[str]) -> int:
    """``lightning-moe report RUN_DIR [--out PNG] [--prefix P] [--heatmaps N]``; exits 2 on a bad folder."""
    parser = argparse.ArgumentParser(
        prog="lightning-moe report",
        description="Draw a run's losses, per-layer routing balance, dead experts and expert-load heatmaps from its "
                    "TensorBoard logs into one PNG and an HTML page with the key numbers.")
    parser.add_argument("run_dir", type=Path, help="a run's version folder (runs/tiny/version_0), or a folder of "
                                                   "them (runs/tiny: the newest is read)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the PNG to write (default: report.png in the run's version folder); the HTML page goes "
                             "beside it")
    parser.add_argument("--prefix", default=None, help="RoutingMonitor's tag prefix (default: found in the tags)")
    parser.add_argument("--heatmaps", type=int, default=REPORT_HEATMAPS,
                        help=f"heatmaps drawn, spread over the logged steps (default {REPORT_HEATMAPS})")
    args = parser.parse_args(argv)
    try:
        run = find_run_dir(args.run_dir)
        if run != args.run_dir:
            print(f"reporting the newest run in {args.run_dir}: {run.name}")
        paths = write_report(run, args.out, args.prefix, args.heatmaps)
    except ReportError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    for path in paths.values():
        print(f"wrote {path}")
    return 0


def _first_wall_time(accumulator: EventAccumulator) -> float:
    try:
        return accumulator.FirstEventTimestamp()
    except ValueError:  # an empty file: it changes nothing, wherever it sorts
        return -math.inf


def _find_prefix(logs: RunLogs, prefix: str | None) -> str | None:
    """The monitor's prefix: ``prefix`` if it has tags, else the one found (``routing`` first), else ``None``."""
    found = sorted({m.group(1) for tag in [*logs.scalars, *logs.histograms, *logs.images]
                    if (m := re.fullmatch(r"(.+?)/(?:layer\d+/)?(?:load_cv|expert_load|load_heatmap)", tag))
                    and not m.group(1).startswith("val_")})
    if prefix is None:
        return "routing" if "routing" in found else (found[0] if found else None)
    if prefix not in found:
        raise ReportError(f"{logs.run_dir} has no routing tags under prefix {prefix!r}; prefixes found: "
                          f"{', '.join(found) or 'none'}.")
    return prefix


class _Report:
    """The panels and the HTML page of one run, from its merged logs."""

    def __init__(self, logs: RunLogs, prefix: str | None, heatmaps: int) -> None:
        self.logs = logs
        self.prefix = prefix
        self.notes: list[str] = []
        layer_tags = [*logs.scalars, *logs.histograms]
        pattern = re.compile(rf"(?:{re.escape(prefix or '')}|{DEAD_PREFIX})/layer(\d+)(?:/.*)?")
        self.layers = sorted({int(m.group(1)) for tag in layer_tags if (m := pattern.fullmatch(tag))})
        self.experts = {i: len(next(iter(h.values()))) for i in self.layers
                        if (h := logs.histograms.get(f"{prefix}/layer{i}/expert_load"))}
        steps = sorted({s for i in self.layers for s in logs.histograms.get(f"{prefix}/layer{i}/expert_load", {})})
        self.heatmap_steps = _spread(steps, heatmaps)
        self.image_steps = [] if steps or prefix is None else _spread(sorted(logs.images.get(
            self.tag(None, "load_heatmap"), {})), heatmaps)  # the logged pictures, only without histograms
        if heatmaps and not self.heatmap_steps and not self.image_steps and prefix is not None:
            self.notes.append(f"No {prefix}/layer{{i}}/expert_load histograms nor {prefix}/load_heatmap images "
                              "(image_every_n_steps=0, or no TensorBoardLogger): heatmaps left out.")
        if prefix is None:
            self.notes.append("No RoutingMonitor tags (…/load_cv, …/expert_load): routing panels left out.")

    def tag(self, layer: int | None, name: str) -> str:
        return f"{self.prefix}/{name}" if layer is None else f"{self.prefix}/layer{layer}/{name}"

    # ------------------------------------------------------------------ figure

    def figure(self) -> Figure:
        curves = [draw for draw in (self._loss_panel(), self._cv_panel(), self._entropy_panel(), self._share_panel(),
                                    self._dead_panel()) if draw is not None]
        heatmap_rows = 1 if self.heatmap_steps or self.image_steps else 0
        heatmap_in = min(max(1.4 + 0.28 * max(len(self.layers), 1), 2.8), 8.0)
        rows_in = [REPORT_ROW_IN] * math.ceil(len(curves) / 2) + [heatmap_in + 0.9] * heatmap_rows
        height_in = max(sum(rows_in), 2.0) + 0.7  # + the title
        figure = Figure(figsize=(REPORT_WIDTH_IN, height_in), dpi=REPORT_DPI)
        figure.suptitle(f"{self.logs.run_dir}  (last step {self._last_step()})", fontsize=12, y=1 - 0.15 / height_in)
        if not rows_in:
            figure.text(0.5, 0.5, "Nothing to draw: none of the report's tags was logged.", ha="center")
            return figure
        grid = figure.add_gridspec(len(rows_in), 2, height_ratios=rows_in, left=0.06, right=0.94, wspace=0.22,
                                   top=1 - 0.7 / height_in, bottom=0.55 / height_in, hspace=0.9 / REPORT_ROW_IN)
        for k, panel in enumerate(curves):
            ax = figure.add_subplot(grid[k // 2, k % 2])
            panel(ax)
            ax.set_xlabel("step", fontsize=9)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
        if heatmap_rows:
            self._draw_heatmaps(figure, grid[len(rows_in) - 1, :])
        return figure

    def _loss_panel(self):  # noqa: ANN202 - the drawing function, or None when nothing was logged
        losses = [t for t in ("train/loss", "train/lm_loss", "val/loss", "test/loss") if t in self.logs.scalars]
        if not losses:
            self.notes.append("No train/loss, val/loss or test/loss: loss panel left out.")
            return None

        def draw(ax: Axes) -> None:
            for tag, style in (("train/loss", "-"), ("train/lm_loss", ":"), ("val/loss", "o-")):
                if tag in self.logs.scalars:
                    ax.plot(*self.logs.series(tag), style, label=tag, markersize=4, linewidth=1.2)
            if "test/loss" in self.logs.scalars:
                steps, values = self.logs.series("test/loss")
                ax.plot(steps[-1:], values[-1:], "k*", markersize=10, label=f"test/loss {values[-1]:.4g}")
            ax.set_title("loss", fontsize=10)
            ax.legend(fontsize=8)
        return draw

    def _per_layer_panel(self, name: str, title: str):  # noqa: ANN202
        if self.prefix is None:
            return None
        layers = [i for i in self.layers if self.tag(i, name) in self.logs.scalars]
        if not layers and self.tag(None, name) not in self.logs.scalars:
            self.notes.append(f"No {self.prefix}/layer{{i}}/{name} scalars: '{title}' left out.")
            return None

        def draw(ax: Axes) -> None:
            if layers:
                for i in layers:
                    ax.plot(*self.logs.series(self.tag(i, name)), color=self._colour(i), linewidth=1.2,
                            label=f"layer {i}")
                self._name_layers(ax, layers)
            else:  # per_layer=False: the overall value only
                overall = self.tag(None, name)
                ax.plot(*self.logs.series(overall), color="k", label=f"{overall} (all layers)")
                ax.legend(fontsize=8)
            ax.set_title(title, fontsize=10)
        return draw

    def _cv_panel(self):  # noqa: ANN202
        return self._per_layer_panel("load_cv", "load CV per layer (0 = balanced)")

    def _entropy_panel(self):  # noqa: ANN202
        return self._per_layer_panel("load_entropy", "normalised load entropy per layer (1 = balanced)")

    def _share_panel(self):  # noqa: ANN202
        max_draw = self._per_layer_panel("max_share", "max (solid) and min (dashed) expert share per layer")
        if max_draw is None:
            return None

        def draw(ax: Axes) -> None:
            max_draw(ax)
            for i in self.layers:
                if self.tag(i, "min_share") in self.logs.scalars:
                    ax.plot(*self.logs.series(self.tag(i, "min_share")), "--", color=self._colour(i), linewidth=1.2)
            if len(set(self.experts.values())) == 1:
                fair = 1 / next(iter(self.experts.values()))
                ax.axhline(fair, color="0.4", linewidth=0.8, linestyle=":")
                ax.annotate(f"fair share 1/E = {fair:.3g}", (0.01, fair), xycoords=("axes fraction", "data"),
                            fontsize=8, color="0.3", va="bottom")
        return draw

    def _dead_panel(self):  # noqa: ANN202
        layers = [i for i in self.layers if f"{DEAD_PREFIX}/layer{i}" in self.logs.scalars]
        if not layers and f"{DEAD_PREFIX}/count" not in self.logs.scalars:
            self.notes.append(f"No {DEAD_PREFIX}/* scalars (no DeadExpertDetector, or its first window had not "
                              "ended): dead-expert panel left out.")
            return None

        def draw(ax: Axes) -> None:
            for i in layers:
                ax.step(*self.logs.series(f"{DEAD_PREFIX}/layer{i}"), where="post", color=self._colour(i),
                        label=f"layer {i}")
            if f"{DEAD_PREFIX}/count" in self.logs.scalars:
                ax.step(*self.logs.series(f"{DEAD_PREFIX}/count"), "k:", where="post", label="all layers")
            self._name_layers(ax, layers)
            ax.set_title("dead experts", fontsize=10)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            top = max((self.logs.series(f"{DEAD_PREFIX}/{t}")[1].max(initial=0.0) for t in ["count"] + [
                f"layer{i}" for i in layers]), default=0.0)
            ax.set_ylim(-0.3, max(top, 1.0) + 0.3)  # all zeros is the common case: show 0 and 1
        return draw

    def _draw_heatmaps(self, figure: Figure, cell) -> None:  # noqa: ANN001 - a SubplotSpec
        if not self.heatmap_steps:  # images only: show the logged pictures
            import matplotlib.image

            grid = cell.subgridspec(1, len(self.image_steps), wspace=0.05)
            for k, step in enumerate(self.image_steps):
                ax = figure.add_subplot(grid[0, k])
                ax.imshow(matplotlib.image.imread(io.BytesIO(self.logs.images[self.tag(None, "load_heatmap")][step])))
                ax.set_axis_off()
            return
        count = len(self.heatmap_steps)
        grid = cell.subgridspec(1, count + 1, width_ratios=[1.0] * count + [0.03], wspace=0.25)
        image = None
        for k, step in enumerate(self.heatmap_steps):
            ax = figure.add_subplot(grid[0, k])
            layers = [i for i in self.layers if step in self.logs.histograms.get(self.tag(i, "expert_load"), {})]
            counts = [self.logs.histograms[self.tag(i, "expert_load")][step] for i in layers]
            image = draw_load_heatmap(ax, [c / max(c.sum(), 1.0) for c in counts], layers)
            ax.set_title(f"expert load at step {step}", fontsize=10)
        heatmap_colorbar(image, figure.add_subplot(grid[0, count]))

    def _colour(self, layer: int) -> tuple[float, ...]:
        position = self.layers.index(layer)
        if len(self.layers) <= REPORT_LEGEND_LAYERS:
            return colormaps["tab10"](position)
        return colormaps["viridis"](position / (len(self.layers) - 1))

    def _name_layers(self, ax: Axes, layers: list[int]) -> None:
        """A legend naming each layer's line or, for many layers, a colour bar of layer indices."""
        if len(self.layers) <= REPORT_LEGEND_LAYERS:
            ax.legend(fontsize=8, ncols=2 if len(layers) > 5 else 1)
            return
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        colorbar = ax.figure.colorbar(ScalarMappable(Normalize(0, len(self.layers) - 1), colormaps["viridis"]), ax=ax,
                                      pad=0.01, fraction=0.04)
        ticks = list(range(0, len(self.layers), math.ceil(len(self.layers) / 8)))
        colorbar.set_ticks(ticks, labels=[str(self.layers[t]) for t in ticks])
        colorbar.set_label("layer", fontsize=8)
        colorbar.ax.tick_params(labelsize=7)

    def _last_step(self) -> int | None:
        steps = [max(points) for points in self.logs.scalars.values() if points]
        return max(steps) if steps else None

    # ------------------------------------------------------------------ page

    def html(self, png: bytes) -> str:
        logs, esc = self.logs, html.escape
        numbers = [("run folder", str(logs.run_dir)), ("events files", ", ".join(f.name for f in logs.event_files)),
                   ("routing prefix", self.prefix or "none found"), ("last step", str(self._last_step()))]
        for tag in ("train/loss", "train/lm_loss", "val/loss", "test/loss"):
            if (value := logs.last(tag)) is not None:
                numbers.append((f"{tag} (last)", f"{value:.4f}"))
        if "val/loss" in logs.scalars:
            steps, values = logs.series("val/loss")
            numbers.append(("val/loss (best)", f"{values.min():.4f} at step {steps[values.argmin()]}"))
        for name in ("load_cv", "load_entropy", "max_share", "min_share", "dropped_fraction", "collapsed_layers"):
            if self.prefix and (value := logs.last(self.tag(None, name))) is not None:
                numbers.append((f"{self.tag(None, name)} (last)", f"{value:.4g}"))
        if (dead := logs.last(f"{DEAD_PREFIX}/count")) is not None:
            numbers.append((f"{DEAD_PREFIX}/count (last)", f"{dead:g}"))
        if self.heatmap_steps:
            numbers.append(("heatmaps at steps", ", ".join(map(str, self.heatmap_steps))))
        rows = "\n".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in numbers)
        columns = ["load_cv", "load_entropy", "min_share", "max_share", "dropped_fraction", "token_entropy"]
        layer_rows = []
        for i in self.layers:
            cells = [f"layer {i}", str(self.experts.get(i, "?"))]
            cells += [_format(logs.last(self.tag(i, name)) if self.prefix else None, name) for name in columns]
            cells.append(_format(logs.last(f"{DEAD_PREFIX}/layer{i}"), "dead"))
            layer_rows.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
        header = "".join(f"<th>{esc(c)}</th>" for c in ["layer", "experts", *columns, "dead experts"])
        layers_html = (f"<table><tr>{header}</tr>\n" + "\n".join(layer_rows) + "</table>" if self.layers
                       else "<p>No MoE layer found in the tags.</p>")
        notes = "".join(f"<li>{esc(note)}</li>" for note in self.notes) or "<li>Every panel was drawn.</li>"
        return _PAGE.format(title=esc(str(logs.run_dir)), png=base64.b64encode(png).decode("ascii"), numbers=rows,
                            layers=layers_html, notes=notes, prefix=esc(self.prefix or "routing"))


def _spread(steps: list[int], count: int) -> list[int]:
    """``count`` of ``steps`` spread evenly from the first to the last (the last alone for one)."""
    if count == 1 and steps:
        return steps[-1:]
    return sorted({steps[round(k * (len(steps) - 1) / (count - 1))] for k in range(count)}) if steps and count else []


def _format(value: float | None, name: str) -> str:
    if value is None:
        return "not logged"
    if name in ("min_share", "max_share", "dropped_fraction"):
        return f"{value:.2%}"
    return f"{value:g}" if name == "dead" else f"{value:.4f}"


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>lightning-moe report: {title}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse;margin-bottom:1.5em}}
th,td{{border:1px solid #ccc;padding:3px 8px;text-align:left}} img{{max-width:100%}}</style></head>
<body><h1>lightning-moe report</h1><p><code>{title}</code></p>
<img src="data:image/png;base64,{png}" alt="losses, routing balance per layer, dead experts and expert-load heatmaps">
<h2>Key numbers</h2><table>
{numbers}
</table>
<h2>MoE layers</h2><p>Last value of each layer's <code>{prefix}/layer{{i}}/…</code> and
<code>dead_experts/layer{{i}}</code> scalars; experts counted from the load histograms.</p>
{layers}
<h2>Notes</h2><ul>{notes}
<li>Heatmap steps are <code>trainer.global_step</code> after the batch, as in TensorBoard's images and
histograms; Lightning logs the same batch's scalars one step earlier.</li></ul>
</body></html>
"""


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
