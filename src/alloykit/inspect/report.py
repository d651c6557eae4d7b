"""The HTML report: one self-contained file, the plots embedded as PNG images.

Plots (each an ``<img data-plot=NAME>``): ``relative_norm`` (heatmap, models × layers, of
‖δ‖/‖base‖), ``cosine`` (per layer, each pair of task vectors), ``sign_conflict`` (per layer,
each pair), and with a recipe ``retained`` (per layer, each model) and ``interference`` (per
layer). A small inline script checks on load that every image decoded, and reports any that did
not as a console error, so a headless browser can verify the file.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from alloykit.errors import AlloyError
from alloykit.inspect.collect import Inspection
from alloykit.inspect.summary import short_names, summarize
from alloykit.io.writer import write_text_atomically

PLOTS_WITHOUT_RECIPE = ("relative_norm", "cosine", "sign_conflict")
PLOTS_WITH_RECIPE = (*PLOTS_WITHOUT_RECIPE, "retained", "interference")

_CHECK_SCRIPT = """
window.addEventListener("load", function () {
  var images = document.querySelectorAll("img[data-plot]");
  var decoded = 0;
  images.forEach(function (image) {
    if (image.complete && image.naturalWidth > 0) { decoded += 1; }
    else { console.error("plot did not decode: " + image.dataset.plot); }
  });
  document.body.setAttribute("data-plots-decoded", String(decoded));
});
"""
_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
li.detail { list-style: none; margin-left: 1.2em; color: #444; }
img { max-width: 100%; } code { background: #f3f3f3; padding: 0 .2em; }
"""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise AlloyError("the HTML report needs matplotlib: pip install 'alloykit[plots]'") from e
    matplotlib.use("Agg")  # no display; the figures only become PNG bytes
    import matplotlib.pyplot as plt

    return plt


def _ticker() -> Any:
    import matplotlib.ticker

    return matplotlib.ticker


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    figure.clf()
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_series(inspection: Inspection) -> dict[str, dict[str, np.ndarray]]:
    """The per-layer series each plot draws: ``{plot: {series label: values per layer}}``."""
    names = short_names(inspection.models)
    layers = inspection.layers
    per_layer = [inspection.layer(layer) for layer in layers]
    k = len(names)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    series: dict[str, dict[str, np.ndarray]] = {
        "relative_norm": {
            name: np.array([s.relative_norm()[i] for s in per_layer])
            for i, name in enumerate(names)
        },
        "cosine": {
            f"{names[i]} · {names[j]}": np.array([s.cosine()[i, j] for s in per_layer])
            for i, j in pairs
        },
        "sign_conflict": {
            f"{names[i]} · {names[j]}": np.array([s.conflict()[i, j] for s in per_layer])
            for i, j in pairs
        },
    }
    if inspection.total().recipe:
        series["retained"] = {
            name: np.array([s.retained()[i] for s in per_layer]) for i, name in enumerate(names)
        }
        series["interference"] = {"interference": np.array([s.interference() for s in per_layer])}
    return series


def _figures(inspection: Inspection) -> dict[str, tuple[str, str]]:
    """``{plot: (title, base64 PNG)}``."""
    if not inspection.layers:
        raise AlloyError(
            f"--html: no tensor of '{inspection.base}' belongs to a numbered layer, so there is "
            "nothing to plot per layer; use --json for the figures"
        )
    plt = _pyplot()
    ticker = _ticker()
    layers = inspection.layers
    series = plot_series(inspection)
    images: dict[str, tuple[str, str]] = {}
    width = max(6.0, min(14.0, 0.25 * len(layers) + 4))

    heat = series["relative_norm"]
    figure, axes = plt.subplots(figsize=(width, 0.45 * len(heat) + 1.6))
    matrix = np.array(list(heat.values()))
    shown = axes.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap="viridis")
    axes.set_yticks(range(len(heat)), list(heat))
    axes.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    axes.set_xlabel("layer")
    figure.colorbar(shown, ax=axes, label="‖δ‖ / ‖base‖")
    title = "Relative task-vector norm per layer"
    axes.set_title(title)
    images["relative_norm"] = (title, _png(figure))

    labels = {
        "cosine": ("Cosine between task vectors per layer", "cosine", (-1.05, 1.05)),
        "sign_conflict": (
            "Sign conflict among both models' top-20% entries per layer",
            "share of signs that disagree",
            (-0.02, 1.02),
        ),
        "retained": (
            "Share of each task vector surviving sparsify and elect per layer",
            "retained share of ‖δ‖²",
            (-0.02, 1.02),
        ),
        "interference": (
            "Interference per layer: ‖merged δ − Σ c·δ‖ / ‖Σ c·δ‖",
            "interference",
            None,
        ),
    }
    for plot, (title, ylabel, limits) in labels.items():
        if plot not in series:
            continue
        figure, axes = plt.subplots(figsize=(width, 3.4))
        for label, values in series[plot].items():
            axes.plot(layers, values, marker="o", markersize=3, label=label)
        if not series[plot]:
            axes.text(0.5, 0.5, "one model: no pairs", ha="center", transform=axes.transAxes)
        axes.set_xlabel("layer")
        axes.set_ylabel(ylabel)
        if limits is not None:
            axes.set_ylim(*limits)
        axes.set_title(title)
        if series[plot]:
            axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        axes.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        images[plot] = (title, _png(figure))
    plt.close("all")
    return images


def render_report(inspection: Inspection) -> str:
    """The report as one HTML document."""
    images = _figures(inspection)
    names = short_names(inspection.models)
    items = []
    for line in summarize(inspection):
        detail = ' class="detail"' if line.startswith(" ") else ""
        items.append(f"<li{detail}>{html.escape(line.strip())}</li>")
    models = "".join(
        f"<li><b>{html.escape(n)}</b>: <code>{html.escape(m)}</code></li>"
        for n, m in zip(names, inspection.models, strict=True)
    )
    method = f" with <b>{html.escape(inspection.method)}</b>" if inspection.method else ""
    sections = "".join(
        f'<h2>{html.escape(title)}</h2>\n<img data-plot="{plot}" alt="{html.escape(title)}" '
        f'src="data:image/png;base64,{data}">\n'
        for plot, (title, data) in images.items()
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>alloykit inspect</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>Task vectors against <code>{html.escape(inspection.base)}</code>{method}</h1>
<ul>{models}</ul>
<h2>Summary</h2>
<ul>{"".join(items)}</ul>
{sections}<script>{_CHECK_SCRIPT}</script>
</body>
</html>
"""


def write_report(inspection: Inspection, path: Path) -> None:
    """Write the HTML report to ``path`` (replaced only once complete)."""
    write_text_atomically(path, render_report(inspection))
