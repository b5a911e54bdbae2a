"""The scores every stage reports: accuracy and the Kaggle metric, multi-class log loss.

One definition for train-head, sweeps, fine-tuning and evaluate: scikit-learn's log loss on
rows clipped to [1e-15, 1] and renormalised (what Kaggle does with a submission). A model
whose outputs are not finite (diverged training) scores an infinitely bad log loss, so it
is never kept as the best.
"""

from __future__ import annotations

import numpy as np

CLIP = 1e-15
TEMPERATURES = (0.05, 20.0)  # the range fit_temperature searches


def clip_rows(probs: np.ndarray) -> np.ndarray:
    """Rows clipped to [1e-15, 1] and renormalised to sum to 1 (safe for log loss)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), CLIP, 1.0)
    return p / p.sum(axis=1, keepdims=True)


def accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Fraction of rows whose most probable class is the label; rows with non-finite outputs count as wrong."""
    probs = np.asarray(probs)
    finite = np.isfinite(probs).all(axis=1)
    return float(np.mean((np.argmax(np.nan_to_num(probs, nan=-1.0), axis=1) == np.asarray(labels)) & finite))


def log_loss(labels: np.ndarray, probs: np.ndarray, num_classes: int | None = None) -> float:
    """Multi-class log loss, Kaggle's way; inf when any output is not finite."""
    from sklearn.metrics import log_loss as sklearn_log_loss

    probs = np.asarray(probs)
    if not np.isfinite(probs).all():
        return float("inf")
    num_classes = probs.shape[1] if num_classes is None else num_classes
    return float(sklearn_log_loss(labels, clip_rows(probs), labels=list(range(num_classes))))


def tempered(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) from the probabilities softmax(logits): rows of p ** (1 / T), renormalised
    (the log-probabilities are the logits up to a per-row constant)."""
    logits = np.log(clip_rows(probs)) / temperature
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def fit_temperature(labels: np.ndarray, probs: np.ndarray) -> float:
    """The temperature T in [TEMPERATURES] whose `tempered` probabilities have the lowest log loss
    (temperature scaling, Guo et al. 2017: one number that leaves every prediction's class as it is
    and undoes a network's over- or underconfidence); 1.0 when the outputs are not finite."""
    from scipy.optimize import minimize_scalar  # local: scipy (from scikit-learn) loads in ~0.3 s

    if not np.isfinite(np.asarray(probs)).all():
        return 1.0
    low, high = np.log(TEMPERATURES)
    best = minimize_scalar(lambda log_t: log_loss(labels, tempered(probs, np.exp(log_t)), np.shape(probs)[1]),
                           bounds=(low, high), method="bounded", options={"xatol": 1e-3})
    return float(np.exp(best.x))


def scores(labels: np.ndarray, probs: np.ndarray, num_classes: int | None = None) -> dict:
    """{"val_accuracy", "val_log_loss"} of predictions on validation rows."""
    return {"val_accuracy": accuracy(labels, probs), "val_log_loss": log_loss(labels, probs, num_classes)}


# A head whose validation log loss is above this fraction of the chance level learned ~nothing.
CHANCE_MARGIN = 0.95


def chance_scores(train_labels: np.ndarray, val_labels: np.ndarray, num_classes: int) -> dict:
    """The scores of a model that knows only the training split's class frequencies (the same
    probabilities for every image): the chance level a model must beat."""
    frequencies = np.bincount(np.asarray(train_labels), minlength=num_classes) / len(train_labels)
    return scores(val_labels, np.tile(frequencies, (len(val_labels), 1)), num_classes)


def at_chance(metrics: dict, chance: dict) -> bool:
    return metrics["val_log_loss"] > CHANCE_MARGIN * chance["val_log_loss"]
