"""The shared classifier's part of a training step: Eq. 1 in one pass, sharded or not, over all classes or a sample.

**One pass.** Eq. 1 scores x_v and x_m with the same classifier. Both are scored in ONE matrix
product over ``cat([x_v, x_m])`` (:func:`sicot_cli.model.score_cat`), and the two cross-entropies
are one per-row cross-entropy over the ``2B`` rows whose halves are averaged: one forward GEMM, one
weight-gradient GEMM and one input-gradient GEMM instead of two of each plus the addition of two
full-size weight gradients. The loss and the gradients are those of the two passes (up to float
summation order: the weight gradient's sum over both streams' rows happens inside one GEMM).
Class-sharded, the features of both streams are all-gathered in one collective and the sharded
cross-entropy runs once over the ``2B`` rows (two all-reduces instead of four).

**Class sampling** (``train.class_sample_rate`` < 1, opt-in; Partial FC, An et al., ICCV
workshops 2021, insightface's ``arcface_torch``). Per step the softmax of BOTH terms of Eq. 1 runs
over the same classes: every class of the global batch's labels plus a uniform sample of the
others, ``ceil(rate * classes)`` in all (more when the batch holds more distinct labels). The
sample is drawn for ALL classes from the step's seeded generator, identically on every rank, and
each rank of a sharded classifier keeps the part that falls in its shard, so the union over ranks
is exactly the sample one process would draw: sharded and unsharded training take the same steps,
and an interrupted run resumes exactly (the generator is seeded per batch). The ``[classes]``
random keys cost ``8 * classes`` bytes per step (8 MB at 1M classes), drawn on the device.

Only the sampled rows take part in the step, as in Partial FC: they are copied into leaf tensors
(:class:`SampledRows`), the GEMMs and the softmax run over them, their gradient is ``[sample, dim]``
(never the full ``[classes, dim]``), and :meth:`SampledRows.step` applies the SGD update of the
optimiser's parameter group (weight decay, momentum, learning rate of the scheduler) to those rows
and their momentum rows only. A class not sampled keeps its weights AND its momentum: plain
``torch.optim.SGD`` would keep moving it by its momentum and decaying it. The momentum of a row
never sampled before starts at zero, which equals SGD's first step (``buf = grad``, dampening 0).
The momentum lives in the optimiser's own state, so checkpoints, re-sharding and resume are those
of exact training. Evaluation always scores all classes.

Memory with sampling: weights and momentum stay full size (as in Partial FC); the weight gradient
and the logits shrink to the sample. A replicated classifier (data-parallel, not sharded) averages
the sampled rows' gradients over ranks itself, as DDP would.

**bf16 storage** (``train.classifier_dtype = "bfloat16"``, with ``class_sample_rate`` < 1): the
classifier's weights and momentum are stored in bfloat16, half the bytes. The sampled rows are
copied into fp32 leaves (the step's fp32 master rows), the GEMMs and softmax run as for an fp32
classifier (fp32, or bf16 autocast with ``train.amp`` on CUDA), the SGD update in fp32, and the
updated rows and momentum rows are written back with stochastic rounding (:func:`round_bf16`). Rounding to nearest would lose every update smaller than
half a bf16 step (8 significant bits): at a learning rate of 0.03 most classifier updates are. The
rounding noise is drawn from the step's seeded generator, so resume stays exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sicot_cli.distributed import (
    DistContext,
    _all_gather_rows,
    gather_rows,
    local_targets,
    reduce_mean,
    sharded_cross_entropy_rows,
)
from sicot_cli.losses import Criterion
from sicot_cli.model import combine_losses, score_cat


def sample_classes(labels: torch.Tensor, num_classes: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """The classes of one sampled step: all of ``labels`` plus a uniform sample of the others.

    Args:
        labels: the GLOBAL batch's labels (every rank passes the same ones).
        num_classes: all classes (not a shard's).
        rate: the fraction of classes kept, ``ceil(rate * num_classes)`` in all, or more when the
            labels alone are more.
        generator: the step's seeded CPU generator (the same on every rank); one number is drawn
            from it and seeds the keys' generator on the labels' device.

    Returns:
        The sampled class ids, sorted, on the labels' device.
    """
    device = labels.device
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    keys = torch.rand(
        num_classes, generator=torch.Generator(device=device).manual_seed(seed), device=device, dtype=torch.float64
    )
    keys[labels] = -1.0  # the positives always win
    n = max(math.ceil(rate * num_classes), int((keys < 0).sum()))
    if n >= num_classes:
        return torch.arange(num_classes, device=device)
    threshold = keys.kthvalue(n).values  # float64 keys: a tie at the threshold is practically impossible
    return (keys <= threshold).nonzero().squeeze(1)


def rounding_noise(shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Uniform integers in ``[0, 2^16)``: the noise of :func:`round_bf16`."""
    return torch.randint(0, 1 << 16, shape, generator=generator, dtype=torch.int32, device=device)


def round_bf16(x: torch.Tensor, generator: torch.Generator, noise: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 -> bfloat16 with stochastic rounding: up with probability (the dropped bits) / 2^16.

    Adds uniform noise to the 16 bits bf16 drops and truncates them, so ``E[round_bf16(x)] = x``
    for every finite ``x`` away from the largest finite values. On the raw bit pattern the addition
    moves the magnitude (the sign bit is untouched below the overflow), so negative values round
    symmetrically; NaN stays NaN. ``noise``: reuse :func:`rounding_noise` of ``x``'s shape (each rounding stays
    unbiased; the weight and momentum rows of a step share one draw, half the random numbers).
    """
    x = x.float().contiguous()
    if noise is None:
        noise = rounding_noise(x.shape, generator, x.device)
    rounded = (x.view(torch.int32) + noise).bitwise_and_(-65536).view(torch.float32)
    return torch.where(x.isnan(), x, rounded).to(torch.bfloat16)  # a NaN's payload could carry into inf or 0


class SampledRows:
    """Rows of the (possibly sharded) classifier taking part in one step, and their SGD update.

    The rows are fp32 leaves whatever the classifier's storage dtype; a bf16 classifier gets them
    back with stochastic rounding drawn from ``generator`` (the step's; required for bf16).
    """

    def __init__(self, classifier: nn.Module, rows: torch.Tensor, generator: torch.Generator | None = None) -> None:
        self.classifier = classifier
        self.rows = rows  # local row ids, sorted
        self.rounding = None
        if classifier.weight.dtype != torch.float32:
            if generator is None:
                raise ValueError("a bf16 classifier's rows need the step's generator for stochastic rounding")
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            self.rounding = torch.Generator(device=rows.device).manual_seed(seed)
        with torch.no_grad():
            self.weight = classifier.weight.index_select(0, rows).float().requires_grad_(True)
            self.bias = classifier.bias.index_select(0, rows).float().requires_grad_(True)

    def _store(self, target: torch.Tensor, values: torch.Tensor, noise: dict) -> None:
        if self.rounding is not None:
            if "noise" not in noise:  # one draw for the weight (bias) rows and their momentum rows
                noise["noise"] = rounding_noise(values.shape, self.rounding, values.device)
            values = round_bf16(values, self.rounding, noise["noise"])
        target.index_copy_(0, self.rows, values.to(target.dtype))

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer, average: DistContext | None = None) -> None:
        """``torch.optim.SGD``'s update, applied to the sampled rows of the weights and momentum only.

        Args:
            optimizer: the SGD optimiser holding the classifier's parameters (its group's lr,
                momentum, dampening, weight decay and nesterov are used; its state keeps the momentum,
                in the classifier's storage dtype).
            average: a replicated classifier's context: the rows' gradients are averaged over ranks.
        """
        for param, sub in ((self.classifier.weight, self.weight), (self.classifier.bias, self.bias)):
            if sub.grad is None:
                continue
            group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
            grad = sub.grad if average is None else reduce_mean(sub.grad, average)
            noise: dict = {}
            if group.get("maximize", False):
                grad = -grad
            if group["weight_decay"]:
                grad = grad.add(sub, alpha=group["weight_decay"])
            if group["momentum"]:
                state = optimizer.state[param]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buf = state["momentum_buffer"]
                rows = buf.index_select(0, self.rows).float().mul_(group["momentum"])
                rows.add_(grad, alpha=1 - group["dampening"])
                self._store(buf, rows, noise)
                grad = grad.add(rows, alpha=group["momentum"]) if group["nesterov"] else rows
            self._store(param, sub.add(grad, alpha=-group["lr"]), noise)


def eq1_from_streams(
    model: nn.Module,
    x_v: torch.Tensor,
    x_m: torch.Tensor | None,
    labels: torch.Tensor,
    total: int,
    lam: float,
    normalize: bool,
    ctx: DistContext,
    sharded: bool,
    rate: float,
    generator: torch.Generator,
    criterion: Criterion | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, SampledRows | None]:
    """Eq. 1 from this rank's stream features: the shared classifier (sharded or not, sampled or not) and the loss.

    Args:
        model: the :class:`~sicot_cli.model.SICoT` (its ``classifier`` is a ``Linear`` or a ``ShardedLinear``).
        x_v, x_m: this rank's features (x_m None for the baseline).
        labels: this rank's labels.
        total: the global batch's size.
        lam, normalize: Eq. 1's lambda and its normalisation.
        ctx: the distributed context.
        sharded: the classifier holds the classes ``[lo, hi)`` of this rank only.
        rate: ``train.class_sample_rate``; 1 scores all classes.
        generator: the step's seeded generator (used only when sampling).
        criterion: a long-tail loss for both terms (sicot_cli.losses); its per-class offsets and
            margins are taken at the global class ids of this step's columns (shard, sample).

    Returns:
        (total loss, CE(x_v), CE(x_m) or None, the sampled rows to step or None). Sharded, the loss
        is the global batch's mean; otherwise this rank's.
    """
    clf = model.classifier
    lo, hi = (clf.lo, clf.hi) if sharded else (0, clf.weight.shape[0])
    if sharded:
        labels = _all_gather_rows(labels, ctx.world, total)
        if x_m is None:
            x_v = gather_rows(x_v, ctx, total)
        else:  # both streams in one collective: [rows, 2 * dim]
            both = gather_rows(torch.cat([x_v, x_m], dim=1), ctx, total)
            x_v, x_m = both[:, : x_v.shape[1]], both[:, x_v.shape[1] :]
    weight, bias, sampled = clf.weight, clf.bias, None
    targets = local_targets(labels, lo, hi)
    cols = None if lo == 0 and hi == getattr(clf, "num_classes", hi) else torch.arange(lo, hi, device=labels.device)
    if rate < 1.0 or clf.weight.dtype != torch.float32:  # sampled, or bf16 storage: the rows path (all at rate 1)
        everyone = labels if sharded or not ctx.enabled else _all_gather_rows(labels, ctx.world, total)
        chosen = sample_classes(everyone, getattr(clf, "num_classes", hi), rate, generator)
        rows = chosen[(chosen >= lo) & (chosen < hi)] - lo
        sampled = SampledRows(clf, rows, generator)
        weight, bias = sampled.weight, sampled.bias
        column = torch.full((hi - lo,), -1, dtype=torch.long, device=labels.device)
        column[rows] = torch.arange(len(rows), device=labels.device)
        targets = torch.where(targets >= 0, column[targets.clamp(min=0)], targets)
        cols = rows + lo
    n = x_v.shape[0]
    logits = score_cat(x_v, x_m, weight, bias, getattr(model, "mixed_trains_classifier", True))
    targets = targets if x_m is None else torch.cat([targets, targets])
    criterion = criterion or Criterion()  # plain cross-entropy
    if not criterion.plain:
        logits = criterion.adjust(logits, targets, cols)
    if sharded:
        rows_loss = sharded_cross_entropy_rows(logits, targets)
    else:
        rows_loss = F.cross_entropy(logits.float(), targets, reduction="none")
    loss_v = criterion.reduce(rows_loss[:n], labels)
    loss_m = None if x_m is None else criterion.reduce(rows_loss[n:], labels)
    return combine_losses(loss_v, loss_m, lam, normalize), loss_v, loss_m, sampled
