"""Every PNG plot dogtl draws: training runs, range tests, confusion among classes
(matplotlib's Agg backend: no display needed), written atomically through core.files."""

from __future__ import annotations

import numpy as np

from dogtl.core.files import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(rows: int, width: float = 6.0):
    """Panels stacked over one shared x axis."""
    plt = _pyplot()
    fig, axes = plt.subplots(rows, 1, figsize=(width, 2.6 * rows), sharex=True, squeeze=False)
    return plt, fig, axes[:, 0]


def _save(plt, fig, path) -> None:
    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)  # pyplot keeps every open figure alive


def plot_history(history, path, title: str | None = None, best_epoch: int | None = None,
                 start: dict | None = None) -> None:
    """Per-epoch loss, accuracy (train and val) and learning rate, one panel each.
    `history` is a DataFrame with columns epoch, loss, accuracy, val_loss, val_accuracy, lr
    (missing columns are left out). `title` names the run; `best_epoch` is the epoch whose
    weights were kept (a dashed line and a star on its validation points); `start` holds the
    validation scores the run started from (fine-tuning's head: val_log_loss, val_accuracy),
    drawn at epoch 0 with a dotted line to compare against."""
    panels = [("log loss", ["loss", "val_loss"], False, "val_log_loss"),
              ("accuracy", ["accuracy", "val_accuracy"], False, "val_accuracy"), ("learning rate", ["lr"], True, None)]
    panels = [(t, [c for c in cols if c in history.columns], log, key) for t, cols, log, key in panels]
    panels = [p for p in panels if p[1]]
    from matplotlib.ticker import MaxNLocator

    plt, fig, axes = _figure(max(1, len(panels)))
    x = history["epoch"] if "epoch" in history.columns else range(1, len(history) + 1)
    for ax, (name, cols, log, key) in zip(axes, panels):
        for c in cols:
            ax.plot(x, history[c], marker="." if len(history) < 30 else None,
                    label=c.replace("_", " ").replace("val", "validation"))
        if start and key in start:
            ax.axhline(start[key], linestyle=":", color="tab:green", linewidth=1)
            ax.plot([0], [start[key]], marker="o", color="tab:green", linestyle="none", label="start (the head)")
        if best_epoch is not None:
            ax.axvline(best_epoch, linestyle="--", color="grey", linewidth=0.8,
                       label=f"kept: epoch {best_epoch}" if best_epoch else "kept: the start")
            kept = start.get(key) if best_epoch == 0 and start else _at_epoch(history, x, cols[-1], best_epoch)
            if kept is not None and cols[-1].startswith("val_"):
                ax.plot([best_epoch], [kept], marker="*", markersize=12, color="tab:red", linestyle="none")
        ax.set_ylabel(name)
        if log and (history[cols[0]] > 0).all():
            ax.set_yscale("log")
        if name == "accuracy":  # a fraction: never an axis past 1 (or below 0)
            low, high = ax.get_ylim()
            ax.set_ylim(max(low, 0.0), min(high, 1.0))
        if len(cols) > 1 or best_epoch is not None:
            ax.legend(loc="best", fontsize="small")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("epoch")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title, fontsize="medium")
    _save(plt, fig, path)


def _at_epoch(history, x, column: str, epoch: int):
    rows = [k for k, e in enumerate(x) if e == epoch]
    return float(history[column].iloc[rows[0]]) if rows else None


def plot_lr_find(lrs, losses, smoothed, path, base_lr: float | None = None, max_lr: float | None = None,
                 title: str | None = None) -> None:
    """Training loss against learning rate (log scale) of a range test, with the suggested rates."""
    plt, fig, axes = _figure(1, width=7.0)
    ax = axes[0]
    if title:
        ax.set_title(title, fontsize="medium")
    ax.plot(lrs, losses, alpha=0.3, label="loss per step")
    ax.plot(lrs, smoothed, label="smoothed loss")
    finite = [v for v in smoothed if v == v and abs(v) != float("inf")]
    if finite:  # single exploding steps would squash the curve that matters
        ax.set_ylim(min(0.0, min(finite)), 1.1 * max(finite))
    for value, name in ((base_lr, "suggested base"), (max_lr, "suggested max")):
        if value:
            ax.axvline(value, linestyle="--", color="grey")
            ax.text(value, ax.get_ylim()[1], f" {name} {value:.0e}", rotation=90, va="top", fontsize="small")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training log loss")
    ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    _save(plt, fig, path)


def plot_sweep(frame, names: list[str], path) -> None:
    """One panel per searched parameter: its value against validation log loss (mean, with the
    spread over folds as error bars). Categorical values get one column each."""
    plt = _pyplot()
    ok = frame[np.isfinite(frame["val_log_loss"].astype(float))]
    names = names or ["trial"]
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        values = ok[name].astype(str) if name in ok else ok["trial"].astype(str)
        numeric = _numeric(values)
        y = ok["val_log_loss"].astype(float).to_numpy()
        err = ok["val_log_loss_std"].astype(float).fillna(0).to_numpy()
        if numeric is not None:
            ax.errorbar(numeric, y, yerr=err if err.any() else None, fmt="o", alpha=0.75, capsize=2)
            positive = numeric[numeric > 0]
            if len(positive) == len(numeric) and len(numeric) and positive.max() / positive.min() >= 20:
                ax.set_xscale("log")
        else:
            labels = sorted(set(values), key=_natural)
            x = np.array([labels.index(v) for v in values], float)
            jitter = (np.random.default_rng(0).random(len(x)) - 0.5) * 0.15
            ax.errorbar(x + jitter, y, yerr=err if err.any() else None, fmt="o", alpha=0.75, capsize=2)
            ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 3 else 0)
        if len(y):
            best = int(np.argmin(y))
            ax.plot([numeric[best] if numeric is not None else x[best]], [y[best]], marker="*", markersize=14,
                    color="tab:red", linestyle="none", label="best")
        ax.set_xlabel(name)
        ax.set_ylabel("validation log loss")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(f"{len(ok)} trials" + (f" ({len(frame) - len(ok)} diverged)" if len(frame) > len(ok) else ""))
    _save(plt, fig, path)


def _natural(text: str):
    try:
        return (0, float(text.split("x")[0]), text)
    except ValueError:
        return (1, 0.0, text)


def _numeric(values):
    try:
        return np.array([float(v) for v in values], float)
    except ValueError:
        return None


LABEL_POINTS = 10  # class names on the confusion plot: readable at 100 dpi


def _short(name: str, most: int = 28) -> str:
    return name if len(name) <= most else name[: most - 1] + "…"


def plot_confusion(matrix: np.ndarray, classes: list[str], confused: list[dict], path,
                   max_classes: int = 12, title: str | None = None) -> None:
    """Row-normalised confusion among the classes of the most confused pairs (`confused`:
    dicts with "true" and "predicted" class names), or among the first classes when none is."""
    chosen = []
    for pair in confused:
        for name in (pair["true"], pair["predicted"]):
            if name not in chosen and len(chosen) < max_classes:
                chosen.append(name)
    if not chosen:
        chosen = classes[:max_classes]
    idx = [classes.index(c) for c in chosen]
    sub = matrix[np.ix_(idx, idx)].astype(float)
    rows = matrix[idx].sum(axis=1, keepdims=True).astype(float)
    sub = np.divide(sub, rows, out=np.zeros_like(sub), where=rows > 0)
    names = [_short(c) for c in chosen]
    size = 3.0 + 0.6 * len(chosen)
    plt = _pyplot()
    labels = 0.06 * max(map(len, names))  # inches for the longest class name
    fig, ax = plt.subplots(figsize=(size + 1 + labels, size + labels))
    im = ax.imshow(sub, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(chosen)), names, rotation=45, ha="right", rotation_mode="anchor", fontsize=LABEL_POINTS)
    ax.set_yticks(range(len(chosen)), names, fontsize=LABEL_POINTS)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title((f"{title}: " if title else "") + "most confused classes\n(fraction of each true class)")
    for i in range(len(chosen)):
        for j in range(len(chosen)):
            if sub[i, j] > 0:
                ax.text(j, i, f"{sub[i, j]:.2f}", ha="center", va="center", fontsize=LABEL_POINTS - 1,
                        color="white" if sub[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    _save(plt, fig, path)
