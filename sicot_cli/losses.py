"""The training loss of both terms of Eq. 1: cross-entropy or a long-tail loss, with per-class terms.

Every loss here is a cross-entropy over adjusted logits, optionally weighted per row by class:

- ``ce``: plain cross-entropy (the paper).
- ``logit_adjusted`` (Menon et al., ICLR 2021, Eq. 10): CE on ``logits + tau * log(prior)``,
  ``prior`` the training class frequencies.
- ``balanced_softmax`` (Ren et al., NeurIPS 2020): CE on ``logits + log(prior)``; the same
  function as ``logit_adjusted`` at ``tau = 1`` (``log n_j`` and ``log prior_j`` differ by a
  constant, which the softmax ignores), kept under its own name because users look for it.
- ``ldam`` (Cao et al., NeurIPS 2019): the true class's logit lowered by ``Delta_j = C / n_j^(1/4)``,
  ``C`` such that the largest margin is ``train.ldam_max_margin``. Cao et al. put the margin on a
  cosine classifier scaled by s = 30; sicot's shared classifier is the paper's plain linear one,
  so the margin is in logit units and ``ldam_max_margin`` is its size.
- ``train.reweight = "drw"`` (deferred re-weighting, Cao et al.): from epoch
  ``floor(drw_start * epochs)`` on, each row is weighted by its class's
  ``(1 - beta) / (1 - beta^n_j)`` (the "effective number" of Cui et al. 2019), normalised to mean 1
  over the classes; the loss is the weighted mean ``sum(w_i ce_i) / sum(w_i)``, as
  ``F.cross_entropy(weight=...)`` computes it.

Co-training applies the chosen loss to BOTH terms of Eq. 1 with the same prior, margins and weights:
x_m is scored by the same classifier against the same labels, so the same prior holds for both.

Everything per class is a vector over ALL classes; a step that scores only some columns (this
rank's shard of a class-sharded classifier, or the sampled classes of ``train.class_sample_rate``)
passes the global class ids of its columns, and the offsets are exact there too: the softmax over a
shard's columns is completed by the sharded cross-entropy's all-reduces, and offsets are per column.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from sicot_cli.config import TrainConfig
from sicot_cli.metrics import per_class_accuracy


class Criterion:
    """The loss of one epoch: per-class logit offsets, LDAM margins and row weights over all classes."""

    def __init__(
        self,
        offset: torch.Tensor | None = None,
        margin: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> None:
        self.offset = offset  # [C] added to every row's logits
        self.margin = margin  # [C] subtracted from the true class's logit
        self.weight = weight  # [C] per-row weight by label
        self._rank_mean: Callable[[torch.Tensor], torch.Tensor] | None = None

    def across_ranks(self, rank_mean: Callable[[torch.Tensor], torch.Tensor]) -> Criterion:
        """The same loss for data-parallel ranks that each hold a slice of the batch.

        DDP averages the ranks' gradients, which is exact for a plain mean over equal slices but not
        for a weighted mean (DRW): each rank divides its ``sum(w_i ce_i)`` by the MEAN over ranks of
        the slices' weight sums (``rank_mean``, an all-reduce), so the averaged gradient is that of
        the global batch's ``sum(w_i ce_i) / sum(w_i)``.
        """
        out = Criterion(self.offset, self.margin, self.weight)
        out._rank_mean = rank_mean
        return out

    @property
    def plain(self) -> bool:
        """Plain cross-entropy: nothing to adjust."""
        return self.offset is None and self.margin is None and self.weight is None

    def to(self, device: torch.device) -> Criterion:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Criterion(move(self.offset), move(self.margin), move(self.weight))

    def adjust(self, logits: torch.Tensor, targets: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        """The adjusted logits (float32).

        Args:
            logits: ``[N, K]`` scores of the columns ``cols``.
            targets: ``[N]`` each row's column index of its true class, -1 when not among the columns
                (a class on another rank's shard, or a non-sampled class).
            cols: ``[K]`` the global class ids of the columns; None: all classes, in order.
        """
        logits = logits.float()
        if self.offset is not None:
            offset = self.offset if cols is None else self.offset[cols]
            logits = logits + offset
        if self.margin is not None:
            margin = self.margin if cols is None else self.margin[cols]
            here = targets >= 0
            col = targets.clamp(min=0)
            delta = torch.where(here, margin[col], torch.zeros_like(margin[col]))
            logits = logits.scatter_add(1, col.unsqueeze(1), -delta.unsqueeze(1).to(logits.dtype))
        return logits

    def reduce(self, rows_loss: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The mean of per-row losses, weighted by class (``labels``: global class ids) under DRW."""
        if self.weight is None:
            return rows_loss.mean()
        w = self.weight[labels].to(rows_loss.dtype)
        total = w.sum() if self._rank_mean is None else self._rank_mean(w.sum().detach())
        return (rows_loss * w).sum() / total

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss over all classes (an unsharded, unsampled classifier)."""
        if self.plain:
            return F.cross_entropy(logits.float(), labels)
        rows = F.cross_entropy(self.adjust(logits, labels), labels, reduction="none")
        return self.reduce(rows, labels)


def prior(train_counts: np.ndarray) -> np.ndarray:
    """The training class prior (float64); a class without training rows counts as one."""
    counts = np.maximum(np.asarray(train_counts, dtype=np.float64), 1.0)
    return counts / counts.sum()


def ldam_margins(train_counts: np.ndarray, max_margin: float) -> np.ndarray:
    """``C / n_j^(1/4)`` with the largest margin ``max_margin`` (Cao et al.'s ``m_list``)."""
    m = 1.0 / np.maximum(np.asarray(train_counts, dtype=np.float64), 1.0) ** 0.25
    return m * (max_margin / m.max())


def drw_weights(train_counts: np.ndarray, beta: float) -> np.ndarray:
    """Class-balanced weights ``(1 - beta) / (1 - beta^n_j)``, normalised to mean 1 (Cao et al.'s DRW)."""
    counts = np.maximum(np.asarray(train_counts, dtype=np.float64), 1.0)
    w = (1.0 - beta) / (1.0 - np.power(beta, counts))
    return w / w.sum() * len(counts)


def criterion(cfg: TrainConfig, train_counts: np.ndarray, epoch: int) -> Criterion:
    """The loss ``cfg`` asks for at ``epoch`` (0-based), from the training class counts."""

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a, dtype=np.float32))

    offset = margin = weight = None
    if cfg.loss == "logit_adjusted":
        offset = t(cfg.loss_tau * np.log(prior(train_counts)))
    elif cfg.loss == "balanced_softmax":
        offset = t(np.log(prior(train_counts)))
    elif cfg.loss == "ldam":
        margin = t(ldam_margins(train_counts, cfg.ldam_max_margin))
    if cfg.reweight == "drw" and epoch >= cfg.drw_epoch:
        weight = t(drw_weights(train_counts, cfg.drw_beta))
    return Criterion(offset, margin, weight)


def val_balanced_top1(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float | None:
    """Top-1 averaged over the classes that have rows in ``labels`` (None without rows): how tau is chosen."""
    if len(labels) == 0:
        return None
    hits = (logits.argmax(1) == labels).numpy()
    return float(np.nanmean(per_class_accuracy(hits, labels.numpy(), num_classes)))  # NaN: no row of the class


def adjusted_bias(bias: torch.Tensor, tau: float, train_counts: np.ndarray) -> torch.Tensor:
    """Post-hoc logit adjustment (Menon et al. 2021): ``b_j - tau * log prior_j``."""
    return bias - tau * torch.from_numpy(np.log(prior(train_counts))).to(bias.dtype).to(bias.device)


def choose_tau(
    logits: torch.Tensor, labels: torch.Tensor, taus: list[float], train_counts: np.ndarray
) -> tuple[float, list[float | None]]:
    """The tau of ``taus`` whose adjustment (``logits - tau * log prior``) has the best :func:`val_balanced_top1`.

    Ties go to the first listed. Returns the tau and every tau's score.
    """
    log_prior = torch.from_numpy(np.log(prior(train_counts))).to(logits.dtype)
    scores = [val_balanced_top1(logits - tau * log_prior, labels, logits.shape[1]) for tau in taus]
    best = int(np.argmax([-1.0 if s is None else s for s in scores]))
    return taus[best], scores
