"""Evaluation metrics: top-k accuracy, overall and per class-frequency group (pure numpy).

The paper (SICoT, CIKM'20, §4.2 and Tables 2 and 4) reports top-1 and top-3 accuracy over all test
images, and "averaged" top-1/top-3 accuracy over the head and the tail classes, where head and tail
are split by a threshold on each class's number of TRAINING images ("Head 200 - max, Tail 1 - 200").
We also report the many/medium/few split common in the long-tail literature (Liu et al. 2019, OLTR).

Everything here is a pure function of numpy arrays, with no torch import, so that the report code
can load it cheaply and re-score saved predictions anywhere. Accuracies are in percent (0..100), as
in the paper's tables.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "topk_hits",
    "per_class_accuracy",
    "head_tail_groups",
    "many_medium_few_groups",
    "evaluate",
]


def topk_hits(topk: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Whether each sample's true label is among its first ``k`` predictions.

    Args:
        topk: ``[N, K]`` predicted class indices, best first.
        labels: ``[N]`` true class indices.
        k: How many leading columns count, ``1 <= k <= K``.

    Returns:
        ``[N]`` bool array.

    Raises:
        ValueError: On mismatched shapes or ``k`` outside ``[1, K]``.
    """
    topk = np.asarray(topk)
    labels = np.asarray(labels)
    if topk.ndim != 2:
        raise ValueError(f"topk must be 2-D [N, K], got shape {topk.shape}")
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D [N], got shape {labels.shape}")
    if topk.shape[0] != labels.shape[0]:
        raise ValueError(f"topk has {topk.shape[0]} rows but labels has {labels.shape[0]} entries")
    if not 1 <= k <= topk.shape[1]:
        raise ValueError(f"k must be in [1, {topk.shape[1]}] (columns of topk), got {k}")
    return (topk[:, :k] == labels[:, None]).any(axis=1)


def per_class_accuracy(hits: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Percentage of each class's test images that were hit.

    Computed as ``100 * hits / images`` rather than ``100 * fraction``, which keeps round cases
    exact (11 of 20 -> 55.0, not 55.00000000000001).

    Args:
        hits: ``[N]`` bool, from :func:`topk_hits`.
        labels: ``[N]`` true class indices in ``[0, num_classes)``.
        num_classes: ``C``.

    Returns:
        ``[C]`` float64 accuracies in ``[0, 100]``; NaN for classes with no test image.

    Raises:
        ValueError: On mismatched lengths or a label outside ``[0, num_classes)``.
    """
    hits = np.asarray(hits)
    labels = _check_labels(labels, num_classes)
    if hits.shape != labels.shape:
        raise ValueError(f"hits has shape {hits.shape} but labels has shape {labels.shape}")
    n_test = np.bincount(labels, minlength=num_classes)
    n_hit = np.bincount(labels, weights=hits.astype(np.float64), minlength=num_classes)
    acc = np.full(num_classes, np.nan)
    present = n_test > 0
    acc[present] = 100.0 * n_hit[present] / n_test[present]
    return acc


def head_tail_groups(train_counts: np.ndarray, head_threshold: int) -> dict[str, np.ndarray]:
    """The paper's head/tail split on per-class TRAINING image counts.

    "head" is ``count >= head_threshold`` and "tail" is ``1 <= count < head_threshold``: the
    paper's "Head 200 - max, Tail 1 - 200" (Table 4, thresholds 200/5000/100/200 for its four
    datasets), with the boundary value itself counted as head. A class with no training image is
    in neither group.

    Args:
        train_counts: ``[C]`` non-negative integer training images per class.
        head_threshold: Smallest training count of a head class, ``>= 1``.

    Returns:
        ``{"head": bool[C], "tail": bool[C]}``.

    Raises:
        ValueError: On negative or non-integer counts, or ``head_threshold < 1``.
    """
    counts = _check_counts(train_counts)
    if head_threshold < 1:
        raise ValueError(f"head_threshold must be >= 1, got {head_threshold}")
    return {"head": counts >= head_threshold, "tail": (counts >= 1) & (counts < head_threshold)}


def many_medium_few_groups(train_counts: np.ndarray, many: int = 100, few: int = 20) -> dict[str, np.ndarray]:
    """The many/medium/few-shot split of Liu et al. 2019 (OLTR, "Large-Scale Long-Tailed
    Recognition in an Open World", CVPR'19) on per-class TRAINING image counts.

    "many" is ``count > many``, "medium" is ``few <= count <= many``, "few" is ``count < few``
    (OLTR: more than 100, 20 to 100, fewer than 20). Unlike the head/tail split, a class with no
    training image falls in "few".

    Args:
        train_counts: ``[C]`` non-negative integer training images per class.
        many: Largest count of a medium class (``count > many`` is many-shot).
        few: Smallest count of a medium class (``count < few`` is few-shot); ``few <= many``.

    Returns:
        ``{"many": bool[C], "medium": bool[C], "few": bool[C]}``; the three partition the classes.

    Raises:
        ValueError: On negative or non-integer counts, or ``few > many``.
    """
    counts = _check_counts(train_counts)
    if few > many:
        raise ValueError(f"few ({few}) must be <= many ({many})")
    return {
        "many": counts > many,
        "medium": (counts >= few) & (counts <= many),
        "few": counts < few,
    }


def evaluate(
    topk: np.ndarray,
    labels: np.ndarray,
    train_counts: np.ndarray,
    head_threshold: int,
    many: int = 100,
    few: int = 20,
    ks: tuple[int, ...] = (1, 3),
) -> dict[str, Any]:
    """All accuracies of one model on one test set, as a JSON-serialisable dict.

    Accuracies are in PERCENT (0..100), like the paper's tables. ``top{k}`` is image-level (hits
    over all test images, the paper's Table 2). ``{group}_top{k}`` is CLASS-averaged: the mean of
    the per-class accuracies of the group's classes that have at least one test image (the paper's
    "averaged top1 and top3 classification accuracies of the head and tail classes", Table 4). The
    two differ whenever classes have unequal test counts. A group with no class with test images
    gets None.

    A ``k`` larger than ``topk``'s width is allowed only when ``topk`` already ranks every class
    (``K == C``), and then means top-``K``.

    Args:
        topk: ``[N, K]`` predicted class indices, best first.
        labels: ``[N]`` true class indices in ``[0, C)``.
        train_counts: ``[C]`` training images per class; defines ``C`` and the groups.
        head_threshold: See :func:`head_tail_groups`.
        many: See :func:`many_medium_few_groups`.
        few: See :func:`many_medium_few_groups`.
        ks: The top-k accuracies to report.

    Returns:
        A dict with ``n_test``, ``num_classes``; for each ``k`` in ``ks``: ``top{k}``,
        ``{group}_top{k}`` for group in head/tail/many/medium/few and ``per_class_top{k}`` (a list,
        None for classes without test images); ``{group}_classes`` (classes with test images in the
        group); and the echoed ``head_threshold``, ``many_threshold``, ``few_threshold``.

    Raises:
        ValueError: On mismatched shapes, labels or predictions outside ``[0, C)``, or a bad ``k``.
    """
    counts = _check_counts(train_counts)
    num_classes = counts.shape[0]
    topk = np.asarray(topk)
    labels = _check_labels(labels, num_classes)
    if topk.ndim != 2:
        raise ValueError(f"topk must be 2-D [N, K], got shape {topk.shape}")
    if topk.shape[0] != labels.shape[0]:
        raise ValueError(f"topk has {topk.shape[0]} rows but labels has {labels.shape[0]} entries")
    if topk.size and (topk.min() < 0 or topk.max() >= num_classes):
        raise ValueError(
            f"topk holds class indices outside [0, {num_classes}) "
            f"(min {topk.min()}, max {topk.max()}); does train_counts match the model?"
        )
    n_test, width = topk.shape

    groups = head_tail_groups(counts, head_threshold) | many_medium_few_groups(counts, many, few)
    present = np.bincount(labels, minlength=num_classes) > 0
    out: dict[str, Any] = {"n_test": int(n_test), "num_classes": int(num_classes)}
    for k in ks:
        if k < 1:
            raise ValueError(f"every k in ks must be >= 1, got {k}")
        if k > width and width != num_classes:
            raise ValueError(
                f"top{k} needs at least {k} predictions per image, topk has {width} (of {num_classes} classes)"
            )
        hits = topk_hits(topk, labels, min(k, width))
        out[f"top{k}"] = 100.0 * int(hits.sum()) / n_test if n_test else None
        per_class = per_class_accuracy(hits, labels, num_classes)
        for name, mask in groups.items():
            sel = per_class[mask & present]
            out[f"{name}_top{k}"] = float(sel.mean()) if sel.size else None
        out[f"per_class_top{k}"] = [None if np.isnan(v) else float(v) for v in per_class]
    for name, mask in groups.items():
        out[f"{name}_classes"] = int((mask & present).sum())
    out["head_threshold"] = int(head_threshold)
    out["many_threshold"] = int(many)
    out["few_threshold"] = int(few)
    return out


def _check_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D [N], got shape {labels.shape}")
    if labels.size == 0:
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"label {bad} is outside [0, {num_classes}) (num_classes={num_classes})")
    return labels.astype(np.int64, copy=False)


def _check_counts(train_counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(train_counts)
    if counts.ndim != 1:
        raise ValueError(f"train_counts must be 1-D [C], got shape {counts.shape}")
    if counts.size == 0:
        raise ValueError("train_counts is empty (C == 0)")
    if not np.issubdtype(counts.dtype, np.number) or np.any(counts != np.round(counts)):
        raise ValueError("train_counts must be whole numbers")
    if counts.min() < 0:
        raise ValueError(f"train_counts must be >= 0, got {counts.min()}")
    return counts.astype(np.int64, copy=False)
