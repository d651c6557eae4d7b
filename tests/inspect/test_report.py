"""The HTML report: self-contained, each plot present, and rendered by headless Chromium with no
console errors (Debian's `chromium`, which .ci/run installs)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from alloykit.inspect.collect import Inspection, inspect_config, inspect_models
from alloykit.inspect.report import (
    PLOTS_WITH_RECIPE,
    PLOTS_WITHOUT_RECIPE,
    plot_series,
    write_report,
)

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)


@pytest.fixture(scope="module")
def with_recipe(constructed: dict[str, Path]) -> Inspection:
    config = {
        "merge_method": "ties",
        "base_model": str(constructed["base"]),
        "models": [
            {"model": str(constructed[m]), "parameters": {"weight": 1.0, "density": 0.5}}
            for m in ("ft", "small", "negated")
        ],
    }
    return inspect_config(config)


def render(path: Path, profile: Path) -> tuple[str, list[str]]:
    """Chromium's DOM after load, and the console messages it logged."""
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        "--dump-dom",
        path.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


def plots_in(text: str) -> list[str]:
    return re.findall(r'<img data-plot="(\w+)"[^>]*src="data:image/png;base64,', text)


def test_series_are_the_per_layer_figures(with_recipe: Inspection) -> None:
    series = plot_series(with_recipe)
    assert tuple(series) == PLOTS_WITH_RECIPE
    layer1 = with_recipe.layer(1)
    assert series["relative_norm"]["small"][1] == layer1.relative_norm()[1]
    assert series["cosine"]["ft · negated"][1] == layer1.cosine()[0, 2]
    assert series["sign_conflict"]["ft · negated"].tolist() == [1.0, 1.0, 1.0]
    assert series["retained"]["negated"][1] == layer1.retained()[2]
    assert series["interference"]["interference"][2] == with_recipe.layer(2).interference()
    assert all(np.isfinite(v).all() for plot in series.values() for v in plot.values())


def test_report_is_self_contained(with_recipe: Inspection, tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    write_report(with_recipe, path)
    text = path.read_text()
    assert plots_in(text) == list(PLOTS_WITH_RECIPE)
    assert not re.search(r'(src|href)="(https?:|//)', text)  # nothing fetched from elsewhere
    assert "ft and negated: cosine -1.00" in text


@needs_chromium
def test_report_renders_in_chromium_without_console_errors(
    with_recipe: Inspection, constructed: dict[str, Path], tmp_path: Path
) -> None:
    path = tmp_path / "recipe.html"
    write_report(with_recipe, path)
    dom, console = render(path, tmp_path / "profile")
    assert console == []
    assert plots_in(dom) == list(PLOTS_WITH_RECIPE)
    # the report's own check: every image decoded (naturalWidth > 0) once the page loaded
    assert f'data-plots-decoded="{len(PLOTS_WITH_RECIPE)}"' in dom

    models = inspect_models(str(constructed["base"]), [str(constructed["ft"])])  # no pairs
    path = tmp_path / "models.html"
    write_report(models, path)
    dom, console = render(path, tmp_path / "profile")
    assert console == []
    assert plots_in(dom) == list(PLOTS_WITHOUT_RECIPE)
    assert f'data-plots-decoded="{len(PLOTS_WITHOUT_RECIPE)}"' in dom


@needs_chromium
def test_chromium_check_catches_a_broken_plot(with_recipe: Inspection, tmp_path: Path) -> None:
    """The test above would fail on a broken report: a plot that does not decode is reported."""
    path = tmp_path / "broken.html"
    write_report(with_recipe, path)
    text = path.read_text()
    path.write_text(
        text.replace('src="data:image/png;base64,', 'src="data:image/png;base64,AAAA', 1)
    )
    dom, console = render(path, tmp_path / "profile")
    assert any("plot did not decode: relative_norm" in line for line in console), console
    assert f'data-plots-decoded="{len(PLOTS_WITH_RECIPE) - 1}"' in dom


def test_missing_matplotlib_is_a_clear_error(
    with_recipe: Inspection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    from alloykit.errors import AlloyError

    real_import = builtins.__import__

    def without_matplotlib(name: str, *args: object, **kwargs: object) -> object:
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", without_matplotlib)
    with pytest.raises(AlloyError, match=r"pip install 'alloykit\[plots\]'"):
        write_report(with_recipe, tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()
