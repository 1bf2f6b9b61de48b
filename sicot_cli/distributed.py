"""Scale-out with torch.distributed: data parallelism and a class-sharded shared classifier.

The paper trains 1M SKUs on 60 GPUs with a hybrid framework (§4.3): the backbone data-parallel, the
last FC layer split by classes. sicot does the same with ``torchrun`` (no launcher of its own):

- **Data parallel.** The global batch (``train.batch_size``) is cut into one contiguous slice per
  rank (``BatchLoader(rank=, world=)``); the visual and text streams run under
  ``DistributedDataParallel``. NCCL on GPUs, gloo on CPU.
- **Class-sharded classifier** (``train.classifier_parallel``, automatic from
  ``train.classifier_parallel_min_classes`` classes). Rank ``r`` holds the contiguous block of classes
  :func:`shard_range` gives it. Features (x_v and x_m: SICoT scores both with the same classifier)
  are all-gathered (:func:`gather_rows`), each rank scores the whole global batch against its own
  classes, and the softmax cross-entropy is computed exactly across shards
  (:func:`sharded_cross_entropy_rows`: all-reduce of the max, then of the sum of exponentials and of the
  target logit, as Megatron-LM's vocab-parallel cross-entropy and insightface's Partial FC do). At
  evaluation each rank keeps its own top-k and the top-k are merged (:func:`sharded_topk`), so no
  rank ever holds the full ``[B, num_classes]`` logits.

Gradient bookkeeping: the loss is the mean over the GLOBAL batch and every rank computes the same
value. The classifier shard's gradient is then exact on its own rank (never all-reduced). The
gradient of a rank's own features is the sum over shards of the gathered features' gradients
(all-reduce in :func:`gather_rows`' backward); DDP then AVERAGES the stream gradients over ranks,
so the backward multiplies the feature gradient by the world size to turn DDP's average into the
exact sum. With the same seed and data, sharded training on N ranks therefore takes the same steps
as one process (up to float summation order; ``tests/test_distributed.py`` checks it), for models
without batch-norm: BatchNorm statistics are per rank, as in every DDP setup without SyncBatchNorm.

Memory arithmetic for 1M classes x 2048 dims (fp32): weights 8.2 GB, + gradient 8.2 GB + SGD
momentum 8.2 GB = 24.6 GB unsharded; 1/N of it per rank sharded (8 GPUs: 3.1 GB; 60: 0.41 GB), plus
the local logits ``[global batch, classes/N]`` of x_v and x_m.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sicot_cli.data.loader import slice_range

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job (``world == 1``: not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def env_world_size() -> int:
    """The world size torchrun announced (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group torchrun set up (env:// rendezvous), or use one that exists.

    NCCL when the run uses CUDA, gloo otherwise. Returns a world-1 context when the process was
    not launched by torchrun.
    """
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if env_world_size() <= 1:
        return DistContext()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), local_rank, initialised_here=True)
    log.info("rank %d of %d (%s)", ctx.rank, ctx.world, dist.get_backend())
    return ctx


def shutdown(ctx: DistContext, clean: bool = True) -> None:
    """Leave the process group if :func:`init_distributed` created it.

    After a clean finish (``clean``), the DDP wrappers (whose reducers hold the group) are collected
    and every rank waits at a barrier, so no rank tears its connections down while a peer still
    talks to it. After an error there is no barrier: the peers may be inside another collective and
    a barrier would hang them; they see the closed connections and fail instead.
    """
    if ctx.initialised_here and dist.is_initialized():
        if clean:
            import gc

            gc.collect()
            dist.barrier()
        dist.destroy_process_group()


def shard_range(num_classes: int, world: int, rank: int) -> tuple[int, int]:
    """The contiguous classes ``[lo, hi)`` of ``rank``: the same near-equal blocks as a batch's rows."""
    return slice_range(num_classes, world, rank)


# --- collectives with autograd ------------------------------------------------------------------


def _all_gather_rows(x: torch.Tensor, world: int, total: int) -> torch.Tensor:
    """Concatenate every rank's rows (ranks may hold one row more or less: padded for gloo/NCCL)."""
    sizes = [slice_range(total, world, r) for r in range(world)]
    width = max(hi - lo for lo, hi in sizes)
    pad = torch.zeros((width, *x.shape[1:]), dtype=x.dtype, device=x.device)
    pad[: x.shape[0]] = x
    parts = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(parts, pad.contiguous())
    return torch.cat([p[: hi - lo] for p, (lo, hi) in zip(parts, sizes, strict=True)])


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, world: int, rank: int, total: int, grad_scale: float) -> torch.Tensor:  # noqa: ANN001
        ctx.world, ctx.rank, ctx.total, ctx.grad_scale = world, rank, total, grad_scale
        return _all_gather_rows(x, world, total)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # every shard's contribution to every row
        lo, hi = slice_range(ctx.total, ctx.world, ctx.rank)
        return grad[lo:hi] * ctx.grad_scale, None, None, None, None


def gather_rows(x: torch.Tensor, ctx: DistContext, total: int, grad_scale: float | None = None) -> torch.Tensor:
    """All-gather the ranks' slices of a global batch of ``total`` rows, differentiably.

    The backward sums the gradient over ranks and returns this rank's slice times ``grad_scale``
    (default: the world size, which turns DDP's gradient average into the exact sum).
    """
    if not ctx.enabled:
        return x
    return _GatherRows.apply(x, ctx.world, ctx.rank, total, float(ctx.world if grad_scale is None else grad_scale))


class _ShardedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        logits = logits.float()
        m = (
            logits.max(dim=1).values
            if logits.shape[1]
            else torch.full((logits.shape[0],), -torch.inf, device=logits.device)
        )
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        shifted = logits - m[:, None]
        e = shifted.exp()
        s = e.sum(dim=1)
        inside = targets >= 0
        local = targets.clamp(0, max(logits.shape[1] - 1, 0))
        target = shifted.gather(1, local[:, None]).squeeze(1) * inside if logits.shape[1] else torch.zeros_like(s)
        both = torch.stack([s, target])
        dist.all_reduce(both, op=dist.ReduceOp.SUM)
        s, target = both[0], both[1]
        ctx.save_for_backward(e / s[:, None], inside, local)
        return s.log() - target

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        softmax, inside, local = ctx.saved_tensors
        g = softmax.clone()
        rows = torch.arange(g.shape[0], device=g.device)
        if g.shape[1]:
            g[rows, local] -= inside.to(g.dtype)
        return g * grad[:, None], None


def sharded_cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row softmax cross-entropy over the columns of every rank together.

    Each rank holds some columns of the ``[rows, columns]`` logits; ``targets[i]`` is the column of
    row i's class on THIS rank, or -1 where another rank holds it. Two all-reduces whatever the
    number of rows, so both terms of Eq. 1 go through one call.
    """
    return _ShardedCE.apply(logits, targets)


def local_targets(labels: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The column of each label in the shard ``[lo, hi)``, -1 outside it."""
    inside = (labels >= lo) & (labels < hi)
    return torch.where(inside, labels - lo, torch.full_like(labels, -1))


@torch.no_grad()
def sharded_topk(logits: torch.Tensor, k: int, lo: int, ctx: DistContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k softmax probabilities and global class ids, merged from every shard's own top-k.

    Ties go to the lower class id. Each rank exchanges ``[B, k]`` values, never its logits.
    """
    logits = logits.float()
    neg = torch.full((logits.shape[0],), -torch.inf, device=logits.device)
    m = logits.max(dim=1).values if logits.shape[1] else neg
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    s = (logits - m[:, None]).exp().sum(dim=1)
    dist.all_reduce(s, op=dist.ReduceOp.SUM)
    logp = logits - m[:, None] - s.log()[:, None]
    kk = min(k, logits.shape[1])
    v, i = (
        logp.topk(kk, dim=1)
        if kk
        else (logp[:, :0], torch.zeros((logp.shape[0], 0), dtype=torch.long, device=logp.device))
    )
    vals = torch.full((logits.shape[0], k), -torch.inf, device=logits.device)
    ids = torch.full((logits.shape[0], k), torch.iinfo(torch.int64).max, dtype=torch.long, device=logits.device)
    vals[:, :kk], ids[:, :kk] = v, i + lo
    all_v = [torch.empty_like(vals) for _ in range(ctx.world)]
    all_i = [torch.empty_like(ids) for _ in range(ctx.world)]
    dist.all_gather(all_v, vals)
    dist.all_gather(all_i, ids)
    v, i = torch.cat(all_v, dim=1), torch.cat(all_i, dim=1)  # ranks in class order
    order = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :k]
    return v.gather(1, order).exp(), i.gather(1, order)


def reduce_mean(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The mean of a tensor over ranks (a per-rank loss -> the global batch's loss)."""
    if not ctx.enabled:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / ctx.world


# --- the sharded classifier ---------------------------------------------------------------------


def linear_in(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, rows: int = 1 << 16) -> torch.Tensor:
    """``torch.nn.functional.linear`` in ``x``'s dtype; a classifier stored in another dtype is converted ``rows`` classes at a time.

    So a bf16-stored classifier scored in fp32 never holds an fp32 copy of all its rows (8 GB at
    1M x 2048); an fp32 classifier scored in fp32 is one plain ``torch.nn.functional.linear``.
    """
    if weight.dtype == x.dtype:
        return torch.nn.functional.linear(x, weight, bias)
    if weight.shape[0] <= rows:
        return torch.nn.functional.linear(x, weight.to(x.dtype), bias.to(x.dtype))
    return torch.cat(
        [
            torch.nn.functional.linear(x, weight[i : i + rows].to(x.dtype), bias[i : i + rows].to(x.dtype))
            for i in range(0, weight.shape[0], rows)
        ],
        dim=1,
    )


class ShardedLinear(torch.nn.Module):
    """Rows ``[lo, hi)`` of the shared ``Linear(dim, num_classes)``.

    Initialised exactly as those rows of ``nn.Linear(dim, num_classes)`` created under the same
    seed (the full weight is drawn in chunks and only this rank's rows are kept, so memory stays
    1/N), which is what makes sharded and unsharded training comparable step by step.
    """

    def __init__(self, dim: int, num_classes: int, lo: int, hi: int, chunk: int = 8192) -> None:
        super().__init__()
        self.in_features, self.num_classes, self.lo, self.hi = dim, num_classes, lo, hi
        bound = 1.0 / dim**0.5 if dim > 0 else 0.0  # nn.Linear: kaiming_uniform(a=sqrt(5)) and its bias rule
        weight = torch.empty(hi - lo, dim)
        with torch.no_grad():
            for start in range(0, num_classes, chunk):
                stop = min(start + chunk, num_classes)
                block = torch.empty(stop - start, dim).uniform_(-bound, bound)
                a, b = max(start, lo), min(stop, hi)
                if a < b:
                    weight[a - lo : b - lo] = block[a - start : b - start]
            bias = torch.empty(num_classes).uniform_(-bound, bound)[lo:hi].clone()
        self.weight = torch.nn.Parameter(weight)
        self.bias = torch.nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # in the input's dtype: the rows may be stored in bf16
        return linear_in(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, classes=[{self.lo}, {self.hi}) of {self.num_classes}"
