"""Diagnostics before and after a merge: task-vector statistics, conflicts, report, warnings.

``alloykit inspect`` streams the models once, tensor by tensor, and reports per layer and module
kind how large each task vector is, how the task vectors agree (cosine, sign conflicts), how
concentrated they are, and whether each model shares the base; given a recipe, also how much of
each task vector the method keeps and how far the merge is from plain task arithmetic.
``alloykit merge`` runs the cheap checks of :mod:`alloykit.inspect.merge_checks` on its way.

(A package named ``inspect`` inside alloykit does not shadow the standard library's: imports
are absolute, so ``import inspect`` anywhere still gets the standard module.)
"""
