"""``alloykit search`` for the search files that are not one weighted score (wiring only).

A search file with ``objective: {pareto: true}`` runs :mod:`alloykit.search.pareto`; one with a
``layer_path:`` section runs :mod:`alloykit.search.layer_path`. Everything else goes to
:func:`alloykit.search.run_search`.
"""

from __future__ import annotations

from pathlib import Path

from alloykit.search.study import SearchOptions, Trial


def dispatch(search_file: Path, out: Path, options: SearchOptions, *, quiet: bool) -> bool:
    """Run a Pareto or layer-path search when the file asks for one; False otherwise."""
    from alloykit import _output
    from alloykit.search.spec import load_search

    spec = load_search(search_file).spec
    if not spec.objective.pareto and spec.layer_path is None:
        return False

    def report(trial: Trial, total: int) -> None:
        if quiet:
            return
        outcome = trial.outcome
        if outcome is None:
            _output.out.print(f"  trial {trial.slot + 1}/{total}  failed: {trial.error}")
            return
        scores = "  ".join(f"{name} {value:.4f}" for name, value in outcome.tasks.items())
        flag = "" if outcome.feasible else "  (infeasible)"
        _output.out.print(
            f"  trial {trial.slot + 1}/{total}  {scores}{flag}  ({trial.seconds:.2f}s)"
        )

    if spec.objective.pareto:
        from rich.table import Table

        from alloykit.search.pareto import front_table, run_pareto_search

        result = run_pareto_search(search_file, out, options, on_trial=report)
        rows = front_table(result)
        table = Table(box=None, header_style="bold", title=f"Pareto front ({len(rows) - 1} points)")
        for name in rows[0]:
            table.add_column(name, justify="right")
        for row in rows[1:]:
            table.add_row(*row)
        _output.out.print(table)
        _output.out.print(
            f"  {len(result.trials)} trials, {result.candidates_per_minute:.1f} "
            f"candidates/minute; wrote {', '.join(result.files)} in {out}"
        )
        return True
    from alloykit.search.layer_path import run_layer_path_search

    layered = run_layer_path_search(search_file, out, options, on_trial=report)
    if layered.best is None or layered.best.outcome is None:
        _output.out.print(f"no feasible layer path in {len(layered.trials)} trials; see {out}")
    else:
        line = f"best: trial {layered.best.slot}, validation {layered.best.outcome.score:.4f}"
        if layered.test is not None:
            line += f", test {layered.test.score:.4f}"
        path = " ".join(
            f"{Path(s['sources'][0]['model']).name}[{s['sources'][0]['layer_range'][0]}:"
            f"{s['sources'][0]['layer_range'][1]}]"
            for s in layered.best.config.get("slices", [])
        )
        _output.out.print(f"{line}; path {path}")
    _output.out.print(f"  {len(layered.trials)} trials; wrote {', '.join(layered.files)} in {out}")
    return True
