"""Which training rows an epoch draws: instance, class-balanced, square-root or progressive sampling.

``train.sampler = "instance"`` is the paper's epoch: every training row once (the loader's
permutation). The others draw ``n`` rows (the number of training rows, so an epoch has as many
steps as an instance epoch) WITH replacement, in two stages (Kang et al., ICLR 2020, Eq. 1): a
class ``j`` with probability ``p_j``, then one of its rows uniformly.

- ``class_balanced``: ``p_j = 1 / C``;
- ``sqrt``: ``p_j`` proportional to ``sqrt(n_j)``;
- ``progressive``: ``p_j(t) = (1 - t/T) n_j / n + (t/T) / C`` at epoch ``t`` of ``T`` (C: the classes with rows; 0-based:
  the first epoch is instance-balanced, the last nearly class-balanced).

The draw is a pure function of (seed, epoch): the per-class counts are one multinomial, each draw's
row one uniform number, from the epoch's generator. The loader then orders the drawn rows as it
orders an instance epoch (block-grouped when streaming: every block is read in one contiguous slice
once per epoch, never single rows), so a run resumed in the middle of an epoch continues exactly.
"""

from __future__ import annotations

import numpy as np

SAMPLERS = ("instance", "class_balanced", "sqrt", "progressive")


def class_probabilities(kind: str, counts: np.ndarray, epoch: int = 0, epochs: int = 1) -> np.ndarray:
    """``p_j``, the probability that a draw of ``kind`` picks class ``j`` (classes without rows: 0).

    Args:
        kind: one of :data:`SAMPLERS`.
        counts: ``[C]`` training rows per class.
        epoch: the 0-based epoch (``progressive`` only).
        epochs: the run's epochs (``progressive`` only).
    """
    counts = np.asarray(counts, dtype=np.float64)
    present = (counts > 0).astype(np.float64)
    if kind == "instance":
        q = counts
    elif kind == "class_balanced":
        q = present
    elif kind == "sqrt":
        q = np.sqrt(counts)
    elif kind == "progressive":
        t = epoch / max(epochs, 1)
        q = (1.0 - t) * counts / counts.sum() + t * present / present.sum()
    else:
        raise ValueError(f"unknown sampler {kind!r} (known: {', '.join(SAMPLERS)})")
    return q / q.sum()


def draw_rows(
    kind: str, labels: np.ndarray, num_classes: int, rng: np.random.Generator, epoch: int = 0, epochs: int = 1
) -> np.ndarray:
    """``len(labels)`` row indices into ``labels`` drawn by ``kind`` with replacement, sorted ascending.

    Args:
        kind: a sampler other than ``instance``.
        labels: ``[n]`` the training rows' labels.
        num_classes: C.
        rng: the epoch's generator (one multinomial and ``n`` uniforms are drawn from it).
        epoch, epochs: for ``progressive``.
    """
    n = len(labels)
    counts = np.bincount(labels, minlength=num_classes)
    p = class_probabilities(kind, counts, epoch, epochs)
    per_class = rng.multinomial(n, p)
    by_class = np.argsort(labels, kind="stable")  # the rows of class 0, then of class 1, ...
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    drawn_class = np.repeat(np.arange(num_classes), per_class)
    pick = np.minimum((rng.random(n) * counts[drawn_class]).astype(np.int64), counts[drawn_class] - 1)
    return np.sort(by_class[starts[drawn_class] + pick])
