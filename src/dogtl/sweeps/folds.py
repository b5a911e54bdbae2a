"""Where a sweep validates: the cache's own split, or K stratified folds of every labelled image."""

from __future__ import annotations

import numpy as np

from dogtl.core.errors import DogtlError


def make_folds(labels: np.ndarray, is_val: np.ndarray, folds: int | None,
               seed: int, train_only: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, validation rows) per fold: the cache's own split, or K stratified,
    disjoint folds covering every labelled row once (`train_only`: every row of the cache's
    training split, so the validation split stays unseen by the search)."""
    from sklearn.model_selection import StratifiedKFold

    labels, is_val = np.asarray(labels), np.asarray(is_val, bool)
    if not folds:
        return [(np.flatnonzero(~is_val), np.flatnonzero(is_val))]
    if train_only:
        rows = np.flatnonzero(~is_val)
        return [(rows[tr], rows[va]) for tr, va in make_folds(labels[rows], np.zeros(len(rows), bool), folds, seed)]
    counts = np.bincount(labels)
    present = counts[counts > 0]
    if present.min() < folds:
        k = int(np.flatnonzero(counts == present.min())[0])
        raise DogtlError(f"--folds {folds}: class #{k} has only {present.min()} labelled image(s); "
                         f"every class needs at least one per fold (use --folds {max(2, present.min())} or fewer)"
                         if present.min() >= 2 else
                         f"--folds {folds}: class #{k} has a single labelled image; cross-validation needs "
                         "at least 2 per class (leave out --folds to use the cache's validation split)")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(np.sort(tr), np.sort(va)) for tr, va in splitter.split(np.zeros(len(labels)), labels)]
