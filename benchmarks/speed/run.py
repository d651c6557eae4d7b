"""Time alloykit and MergeKit on the same recipes, alternating A B A B; print a Markdown table.

For every recipe in ``configs/`` (``${MODELS}`` and ``${DTYPE}`` filled in) and every repeat,
each tool merges into a fresh folder under ``--work``; the runs alternate between the tools so
that a slow phase of the machine hits both. Per run: wall time, peak RSS (the child's
``ru_maxrss``) and peak anonymous RSS (``RssAnon`` polled from /proc every 20 ms; file-backed
pages of memory-mapped inputs are not counted). The floor of a recipe is the time to read and
sum every input tensor it names with ``safetensors`` plus the time to write an output of the
same size, measured in a child process right before the recipe's runs.

MergeKit is never a dependency of alloykit: ``--mergekit`` names its ``mergekit-yaml``; with
``--install-mergekit DIR`` the script creates that environment first (torch==2.13.0, then
mergekit==0.1.5 constrained to that torch).

    python benchmarks/speed/make_models.py --size medium --out bench-data/models
    python benchmarks/speed/run.py --size medium --models bench-data/models \\
        --install-mergekit bench-data/mk --repeat 2 --csv bench-data/speed.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DTYPES = {"tiny": "float32", "small": "bfloat16", "medium": "bfloat16"}
FLOOR_SCRIPT = r"""
import sys, time, json, os
from safetensors import safe_open
import torch
files, out_bytes, out_dir = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
start = time.perf_counter()
total = 0.0
for file in files:
    with safe_open(file, "pt") as handle:
        for name in handle.keys():
            total += float(handle.get_tensor(name).float().sum())
read = time.perf_counter() - start
start = time.perf_counter()
block = b"\0" * (64 << 20)
with open(os.path.join(out_dir, "floor.bin"), "wb") as out:
    left = out_bytes
    while left > 0:
        out.write(block[: min(left, len(block))])
        left -= len(block)
write = time.perf_counter() - start
print(json.dumps({"read_s": read, "write_s": write}))
"""


@dataclass
class Run:
    recipe: str
    tool: str
    repeat: int
    wall_s: float
    max_rss_mb: float
    max_anon_mb: float
    returncode: int


def render(template: Path, models: Path, dtype: str, work: Path) -> Path:
    text = template.read_text().replace("${MODELS}", str(models)).replace("${DTYPE}", dtype)
    path = work / template.name
    path.write_text(text)
    return path


def _anon_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(command: list[str], env: dict[str, str], log: Path) -> tuple[float, float, float, int]:
    """Wall seconds, peak RSS MB, peak anonymous RSS MB and the exit code of ``command``
    (its output goes to ``log``). Dirty pages of earlier runs (the floor's file, the previous
    tool's output) are written back first, so no run pays for another's writes."""
    os.sync()
    start = time.perf_counter()
    with log.open("w") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    peak_anon = 0
    done = threading.Event()

    def poll() -> None:
        nonlocal peak_anon
        while not done.is_set():
            peak_anon = max(peak_anon, _anon_kb(process.pid))
            done.wait(0.02)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    watcher.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss / 1024, peak_anon / 1024, process.returncode


def input_files(config: Path) -> list[str]:
    import yaml

    data = yaml.safe_load(config.read_text())
    folders = {m["model"] for m in data.get("models", [])}
    if data.get("base_model"):
        folders.add(data["base_model"])
    return sorted(str(f) for folder in folders for f in Path(folder).glob("*.safetensors"))


def floor(config: Path, work: Path, python: str) -> float:
    files = input_files(config)
    import json

    per_model: dict[Path, int] = {}
    for file in files:
        per_model[Path(file).parent] = (
            per_model.get(Path(file).parent, 0) + Path(file).stat().st_size
        )
    out_bytes = max(per_model.values())  # the output is one model's size
    result = subprocess.run(
        [python, "-c", FLOOR_SCRIPT, json.dumps(files), str(out_bytes), str(work)],
        check=True,
        capture_output=True,
        text=True,
    )
    times = json.loads(result.stdout)
    (work / "floor.bin").unlink(missing_ok=True)
    return float(times["read_s"] + times["write_s"])


def install_mergekit(folder: Path) -> Path:
    """A separate venv with torch==2.13.0 and mergekit==0.1.5 (never alloykit's own)."""
    binary = folder / "bin" / "mergekit-yaml"
    if binary.exists():
        return binary
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    pip = [str(folder / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    constraints = folder / "constraints.txt"
    constraints.write_text("torch==2.13.0\n")
    subprocess.run([*pip, "-c", str(constraints), "mergekit==0.1.5"], check=True)
    return binary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(DTYPES), required=True)
    parser.add_argument("--models", type=Path, default=Path("bench-data/models"))
    parser.add_argument(
        "--recipes", default="linear,task_arithmetic,ties,dare_ties,breadcrumbs,della,slerp"
    )
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--alloykit", default=shutil.which("alloykit") or "alloykit")
    parser.add_argument("--mergekit", help="path of mergekit-yaml; omit to time alloykit only")
    parser.add_argument("--install-mergekit", type=Path, help="create MergeKit's venv here first")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder for outputs")
    parser.add_argument("--csv", type=Path, help="append every run here")
    args = parser.parse_args()

    mergekit = args.mergekit
    if args.install_mergekit:
        mergekit = str(install_mergekit(args.install_mergekit))
    tools = {"alloykit": [args.alloykit, "merge", "{config}", "{out}", "--seed", "42", "--quiet"]}
    if mergekit:
        tools["mergekit"] = [mergekit, "{config}", "{out}", "--random-seed", "42"]
    work = args.work or Path(tempfile.mkdtemp(prefix="alloykit-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    models = (args.models / args.size).resolve()
    # the caller's environment, as users run the tools (OMP_WAIT_POLICY=PASSIVE, set here
    # before, made every short parallel region wake its threads: 12% slower SLERP merges)
    env = dict(os.environ)
    runs: list[Run] = []
    floors: dict[str, float] = {}
    for recipe in args.recipes.split(","):
        config = render(HERE / "configs" / f"{recipe}.yml", models, DTYPES[args.size], work)
        floors[recipe] = floor(config, work, sys.executable)
        for repeat in range(args.repeat):
            order = list(tools) if repeat % 2 == 0 else list(reversed(tools))
            for tool in order:
                out = work / f"out-{tool}"
                shutil.rmtree(out, ignore_errors=True)
                command = [part.format(config=config, out=out) for part in tools[tool]]
                log = work / f"{recipe}-{tool}-{repeat}.log"
                wall, rss, anon, code = measure(command, env, log)
                runs.append(Run(recipe, tool, repeat, wall, rss, anon, code))
                status = "" if code == 0 else f"  FAILED (exit {code}; see {log})"
                print(
                    f"{recipe} {tool} #{repeat}: {wall:.1f} s, {rss:.0f} MB{status}",
                    file=sys.stderr,
                )
                shutil.rmtree(out, ignore_errors=True)
    if args.csv:
        new = not args.csv.exists()
        with args.csv.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[*asdict(runs[0]), "size", "floor_s"])
            if new:
                writer.writeheader()
            for run in runs:
                writer.writerow({**asdict(run), "size": args.size, "floor_s": floors[run.recipe]})
    print(table(runs, floors, list(tools)))


def table(runs: list[Run], floors: dict[str, float], tools: list[str]) -> str:
    """Median wall time per recipe and tool, peaks, ratio to the floor and the speed-up."""
    header = "| recipe | floor s | " + " | ".join(
        f"{t} wall s | {t} peak RSS MB | {t} anon MB | {t} x floor" for t in tools
    )
    if len(tools) == 2:
        header += f" | {tools[0]} speed-up vs {tools[1]}"
    lines = [header + " |", "|" + "---|" * (header.count("|"))]
    for recipe, floor_s in floors.items():
        cells = [recipe, f"{floor_s:.1f}"]
        medians = []
        for tool in tools:
            mine = [r for r in runs if r.recipe == recipe and r.tool == tool]
            if any(r.returncode for r in mine):
                cells += ["failed", "", "", ""]
                medians.append(float("nan"))
                continue
            wall = statistics.median(r.wall_s for r in mine)
            medians.append(wall)
            cells += [
                f"{wall:.1f}",
                f"{max(r.max_rss_mb for r in mine):.0f}",
                f"{max(r.max_anon_mb for r in mine):.0f}",
                f"{wall / floor_s:.1f}",
            ]
        if len(tools) == 2:
            cells.append(f"{medians[1] / medians[0]:.1f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
