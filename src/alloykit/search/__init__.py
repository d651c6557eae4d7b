"""Recipe search: evolutionary and Bayesian optimisation of merge recipes on a validation set.

A search file names a merge config template, the values to search (``space``) and the tasks
to score on (``objective``); see docs/search.md. Modules: ``space`` (dimensions and how they are
written into the template), ``spec`` (the search file), ``objective`` (validation scores,
constraints, the test split scored once) and ``study`` (optimisers, the SQLite study, resume,
outputs). The approach follows Akiba et al. 2024, "Evolutionary Optimization of Model Merging
Recipes" (arXiv:2403.13187); the optimisers come from optuna (Akiba et al. 2019) and cma.
"""

from __future__ import annotations

from alloykit.search.objective import Objective, Outcome
from alloykit.search.space import SearchError, Space
from alloykit.search.spec import Search, load_search
from alloykit.search.study import SearchOptions, SearchResult, Trial, run_search

__all__ = [
    "Objective",
    "Outcome",
    "Search",
    "SearchError",
    "SearchOptions",
    "SearchResult",
    "Space",
    "Trial",
    "load_search",
    "run_search",
]
