"""Git Re-Basin on scikit-learn's digits: the loss barrier between two MLPs, before and after.

Two MLPs (64 -> 256 -> 256 -> 256 -> 10, ReLU) are trained from different seeds on the same
training split of the 8x8 digits that ship inside scikit-learn (no download). Along the linear
path theta(t) = (1 - t) * theta_A + t * theta_B we measure test loss and accuracy at 25 points,
three times: the raw models, B aligned to A by ``alloykit align`` (weight matching, Ainsworth et
al. 2023, arXiv:2209.04836), and the aligned path with REPAIR (Jordan et al. 2023,
arXiv:2211.08403) at each point. The barrier is the worst loss on the path minus the mean of
the endpoints' losses.

Run (two to seven minutes on a shared two-core CPU machine):

    PYTHONPATH=src .venv/bin/python benchmarks/rebasin/run.py

Writes ``benchmarks/rebasin/results.md`` (the table) and ``benchmarks/rebasin/path.png``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from alloykit.rebasin.repair import batches, repair

HERE = Path(__file__).resolve().parent
WIDTH = 256  # hidden units per layer; the paper's MNIST MLP has 512
EPOCHS = 40  # Adam 1e-3, batch 64: both models reach ~97% test accuracy
POINTS = 25  # interpolation points, as in the paper's plots


def build() -> nn.Sequential:
    """The MLP both models share (``alloykit align --module run.py:build`` could load it)."""
    return nn.Sequential(
        nn.Linear(64, WIDTH),
        nn.ReLU(),
        nn.Linear(WIDTH, WIDTH),
        nn.ReLU(),
        nn.Linear(WIDTH, WIDTH),
        nn.ReLU(),
        nn.Linear(WIDTH, 10),
    )


def digits(split_seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Train and test tensors of scikit-learn's digits (pixels scaled to [0, 1]), 80/20."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    cut = int(0.8 * len(x))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def train(seed: int, x: torch.Tensor, y: torch.Tensor) -> nn.Sequential:
    """An MLP trained from initialisation ``seed`` (also seeds the batch order)."""
    torch.manual_seed(seed)
    model = build()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(EPOCHS):
        for index in torch.randperm(len(x), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on (x, y)."""
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, y).item()
    return loss, (logits.argmax(1) == y).float().mean().item()


def interpolate(a: nn.Module, b: nn.Module, t: float) -> nn.Sequential:
    """The model with parameters (1 - t) * a + t * b."""
    mixed = build()
    state_b = b.state_dict()
    mixed.load_state_dict({k: (1 - t) * v + t * state_b[k] for k, v in a.state_dict().items()})
    return mixed.eval()


def path(
    a: nn.Module, b: nn.Module, x: torch.Tensor, y: torch.Tensor, calibration: torch.Tensor | None
) -> list[tuple[float, float, float]]:
    """(t, loss, accuracy) at POINTS values of t; REPAIRed on ``calibration`` when given."""
    rows = []
    for t in np.linspace(0, 1, POINTS):
        model = interpolate(a, b, float(t))
        if calibration is not None and 0 < t < 1:
            repair(model, [a, b], [1 - float(t), float(t)], batches(calibration, 512))
        rows.append((float(t), *evaluate(model, x, y)))
    return rows


def barrier(rows: list[tuple[float, float, float]]) -> float:
    """Worst loss on the path minus the mean of the endpoints' losses."""
    return max(r[1] for r in rows) - (rows[0][1] + rows[-1][1]) / 2


def align_with_cli(a: nn.Module, b: nn.Module, seed: int) -> nn.Sequential:
    """B aligned to A by the ``alloykit align`` command, read back from its output folder."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        torch.save(a.state_dict(), root / "a.pt")
        torch.save(b.state_dict(), root / "b.pt")
        command = [sys.executable, "-m", "alloykit.cli", "align", "--reference", str(root / "a.pt")]
        command += [str(root / "b.pt"), str(root / "aligned"), "--seed", str(seed)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(done.stderr)
        print(done.stdout.strip())
        aligned = build()
        aligned.load_state_dict(load_file(root / "aligned" / "model.safetensors"))
    return aligned.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs=2, default=(1, 2), help="the two init seeds")
    parser.add_argument("--out", type=Path, default=HERE, help="where results.md and path.png go")
    args = parser.parse_args()
    torch.set_num_threads(2)
    x_train, y_train, x_test, y_test = digits()
    a = train(args.seeds[0], x_train, y_train)
    b = train(args.seeds[1], x_train, y_train)
    aligned = align_with_cli(a, b, seed=0)
    check = torch.randn(32, 64)
    with torch.no_grad():  # alignment never changes the function
        torch.testing.assert_close(aligned(check), b(check), rtol=1e-5, atol=1e-5)
    curves = {
        "naive": path(a, b, x_test, y_test, None),
        "aligned": path(a, aligned, x_test, y_test, None),
        "aligned + REPAIR": path(a, aligned, x_test, y_test, x_train),
    }
    report(curves, args.out, args.seeds)


def report(
    curves: dict[str, list[tuple[float, float, float]]], out: Path, seeds: tuple[int, int]
) -> None:
    """Write the table (results.md) and the plot (path.png); print the summary."""
    names = list(curves)
    lines = [
        "# Git Re-Basin on scikit-learn digits: the linear path between two MLPs",
        "",
        f"MLP 64-{WIDTH}-{WIDTH}-{WIDTH}-10, ReLU; Adam 1e-3, batch 64, {EPOCHS} epochs; init seeds "
        f"{seeds[0]} and {seeds[1]}; test split 360 images. Produced by "
        "`PYTHONPATH=src .venv/bin/python benchmarks/rebasin/run.py`.",
        "",
        "| path | barrier (loss) | loss at t=0.5 | accuracy at t=0.5 | endpoint accuracies |",
        "|---|---|---|---|---|",
    ]
    middle = POINTS // 2
    for name in names:
        rows = curves[name]
        lines.append(
            f"| {name} | {barrier(rows):.4f} | {rows[middle][1]:.4f} | {rows[middle][2]:.3f} | "
            f"{rows[0][2]:.3f} / {rows[-1][2]:.3f} |"
        )
    before, after = barrier(curves["naive"]), barrier(curves["aligned"])
    lines += [
        "",
        f"Barrier after alignment: {after / before:.1%} of the naive barrier.",
        "",
        "| t | " + " | ".join(f"{n} loss | {n} acc" for n in names) + " |",
        "|---|" + "---|---|" * len(names),
    ]
    for i in range(POINTS):
        cells = " | ".join(f"{curves[n][i][1]:.4f} | {curves[n][i][2]:.3f}" for n in names)
        lines.append(f"| {curves[names[0]][i][0]:.3f} | {cells} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4 : 8 + len(names)]))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for name in names:
        t = [r[0] for r in curves[name]]
        loss_axis.plot(t, [r[1] for r in curves[name]], marker=".", label=name)
        accuracy_axis.plot(t, [r[2] for r in curves[name]], marker=".", label=name)
    loss_axis.set(xlabel="t  (model A at 0, model B at 1)", ylabel="test loss")
    accuracy_axis.set(xlabel="t  (model A at 0, model B at 1)", ylabel="test accuracy")
    loss_axis.legend()
    figure.suptitle("Linear interpolation between two MLPs trained from different seeds (digits)")
    figure.tight_layout()
    figure.savefig(out / "path.png", dpi=110)


if __name__ == "__main__":
    main()
