"""Scale-out: 2 gloo ranks (torch.multiprocessing.spawn, file:// rendezvous) against one process.

- the sharded cross-entropy and its gradient equal ``F.cross_entropy`` on the full logits, and the
  merged per-shard top-k equal the full top-k;
- sharded (and replicated) data-parallel training takes the same steps as one process: losses,
  parameters and logits' top-k after several steps, with the real loader and augmentation;
- checkpoints re-shard 2 -> 1 and 1 -> 2 exactly (weights and SGD momentum);
- ``train()`` on 2 ranks started as torchrun starts them (env://; ``train()`` joins and leaves the
  group itself) with a sharded classifier writes a run that one process evaluates to the
  same numbers (distributed top-k merge + re-sharding on load);
- 3 classes on 2 ranks: a world size that does not divide the classes;
- ``model.mixed_trains_classifier = false`` with a sharded classifier, and the batch-normalised
  title embedding (``model.semantic_norm``) under DDP: per-rank statistics, as documented.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import tiny_recipe
from torch import nn

pytestmark = pytest.mark.dist

WORLD = 2


def _spawn(fn, tmp: Path, *args) -> None:  # noqa: ANN001
    rendezvous = tmp / f"rendezvous-{next(_COUNTER)}"  # a file:// rendezvous file serves one group only
    mp.spawn(_entry, args=(fn, str(tmp), str(rendezvous), args), nprocs=WORLD, join=True)


_COUNTER = itertools.count()


def _entry(rank: int, fn, tmp: str, rendezvous: str, args: tuple) -> None:  # noqa: ANN001
    torch.set_num_threads(1)
    from sicot_cli.distributed import DistContext, shutdown

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    clean = False
    try:
        fn(rank, Path(tmp), *args)
        clean = True
    finally:  # the product's teardown: collect DDP wrappers and barrier after a clean finish
        shutdown(DistContext(rank, WORLD, initialised_here=True), clean)
    _exit_without_teardown()


def _exit_without_teardown() -> None:
    """Leave a worker whose results are on disk and whose group is gone.

    CI saw one rank abort in interpreter teardown ("terminate called without an active exception",
    about 1 run in 150 here): skip the teardown of C++ statics, which checks nothing of ours. A
    failing worker raises before this and is reported by ``mp.spawn``.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _ctx(rank: int):  # noqa: ANN202
    from sicot_cli.distributed import DistContext

    return DistContext(rank, WORLD)


# --- the sharded cross-entropy and top-k -----------------------------------------------------


def _ce_worker(rank: int, tmp: Path) -> None:
    from sicot_cli.distributed import local_targets, shard_range, sharded_cross_entropy_rows, sharded_topk

    data = torch.load(tmp / "ce.pt")
    lo, hi = shard_range(data["logits"].shape[1], WORLD, rank)
    local = data["logits"][:, lo:hi].clone().requires_grad_(True)
    loss = sharded_cross_entropy_rows(local, local_targets(data["labels"], lo, hi)).mean()  # as classifier_step uses it
    loss.backward()
    scores, ids = sharded_topk(data["logits"][:, lo:hi], 3, lo, _ctx(rank))
    torch.save(
        {"loss": loss.detach(), "grad": local.grad, "lo": lo, "hi": hi, "scores": scores, "ids": ids},
        tmp / f"ce-{rank}.pt",
    )


def test_sharded_cross_entropy_and_topk_equal_the_full_ones(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 7, generator=g) * 4  # 7 classes on 2 ranks: 4 + 3
    labels = torch.tensor([0, 3, 4, 6, 2, 5])
    torch.save({"logits": logits, "labels": labels}, tmp_path / "ce.pt")
    _spawn(_ce_worker, tmp_path)
    full = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(full, labels)
    ref.backward()
    ref_p, ref_i = torch.softmax(logits, 1).topk(3, dim=1)
    ranges = []
    for r in range(WORLD):
        out = torch.load(tmp_path / f"ce-{r}.pt")
        torch.testing.assert_close(out["loss"], ref.detach())
        torch.testing.assert_close(out["grad"], full.grad[:, out["lo"] : out["hi"]])
        assert torch.equal(out["ids"], ref_i)
        torch.testing.assert_close(out["scores"], ref_p)
        ranges.append((out["lo"], out["hi"]))
    assert ranges == [(0, 4), (4, 7)]


# --- Eq. 1 from the streams' features: sharded one pass (and sampled) == one process --------------


def _eq1_case(rate: float) -> dict:
    g = torch.Generator().manual_seed(4)
    return {
        "x_v": torch.randn(6, 5, generator=g),
        "x_m": torch.randn(6, 5, generator=g),
        "labels": torch.tensor([0, 9, 4, 4, 17, 2]),
        "weight": torch.randn(19, 5, generator=g),
        "bias": torch.randn(19, generator=g),
        "rate": rate,
    }


def _eq1(case: dict, rank: int, world: int) -> dict:
    from types import SimpleNamespace

    from sicot_cli.classifier_step import eq1_from_streams
    from sicot_cli.data.loader import slice_range
    from sicot_cli.distributed import DistContext, ShardedLinear, shard_range

    ctx = DistContext(rank, world)
    num_classes = case["weight"].shape[0]
    lo, hi = shard_range(num_classes, world, rank) if world > 1 else (0, num_classes)
    a, b = slice_range(6, world, rank)
    clf = ShardedLinear(5, num_classes, lo, hi) if world > 1 else nn.Linear(5, num_classes)
    with torch.no_grad():
        clf.weight.copy_(case["weight"][lo:hi])
        clf.bias.copy_(case["bias"][lo:hi])
    x_v = case["x_v"][a:b].clone().requires_grad_(True)
    x_m = case["x_m"][a:b].clone().requires_grad_(True)
    model = SimpleNamespace(classifier=clf, mixed_trains_classifier=True)
    crit = None
    if case.get("loss"):  # a long-tail loss with per-class terms (sicot_cli.losses)
        from sicot_cli.config import TrainConfig
        from sicot_cli.losses import criterion

        counts = (torch.arange(num_classes) * 7 % 23 + 1).numpy()
        crit = criterion(TrainConfig(loss=case["loss"], reweight="drw", drw_start=0.0), counts, 0)
    loss, loss_v, loss_m, sampled = eq1_from_streams(
        model,
        x_v,
        x_m,
        case["labels"][a:b],
        6,
        0.7,
        False,
        ctx,
        world > 1,
        case["rate"],
        torch.Generator().manual_seed(9),
        crit,
    )
    loss.backward()
    w = clf.weight if sampled is None else sampled.weight
    return {
        "losses": torch.stack([loss, loss_v, loss_m]).detach(),
        "x_v": x_v.grad / world,
        "x_m": x_m.grad / world,
        "lo": lo,
        "slice": (a, b),
        "rows": None if sampled is None else sampled.rows + lo,
        "w_grad": w.grad,
    }


def _eq1_worker(rank: int, tmp: Path, rate: float) -> None:
    torch.save(_eq1(_eq1_case(rate), rank, WORLD), tmp / f"eq1-{rank}.pt")


@pytest.mark.parametrize("rate", [1.0, 0.3], ids=["exact", "sampled"])
def test_sharded_one_pass_equals_one_process(tmp_path: Path, rate: float) -> None:
    """The one-GEMM sharded Eq. 1 (one gather of both streams, one sharded CE over 2B rows) against one process.

    Exact: against the two passes of Eq. 1 written out. Sampled: the ranks' sampled rows are the
    one process's sample, split by shard, with its loss and gradients.
    """
    case = _eq1_case(rate)
    one = _eq1(case, 0, 1)
    if rate == 1.0:  # Eq. 1 as written: two passes, two cross-entropies over all classes
        w = case["weight"].clone().requires_grad_(True)
        x_v, x_m = case["x_v"].clone().requires_grad_(True), case["x_m"].clone().requires_grad_(True)
        ce_v, ce_m = (
            F.cross_entropy(x_v @ w.T + case["bias"], case["labels"]),
            F.cross_entropy(x_m @ w.T + case["bias"], case["labels"]),
        )
        (ce_v + 0.7 * ce_m).backward()
        torch.testing.assert_close(one["losses"], torch.stack([ce_v + 0.7 * ce_m, ce_v, ce_m]).detach())
        torch.testing.assert_close(one["w_grad"], w.grad)
        torch.testing.assert_close(one["x_v"], x_v.grad)
        torch.testing.assert_close(one["x_m"], x_m.grad)
    else:
        assert len(one["rows"]) == 6 and set(case["labels"].tolist()) <= set(one["rows"].tolist())  # ceil(0.3 * 19) = 6
    _spawn(_eq1_worker, tmp_path, rate)
    outs = [torch.load(tmp_path / f"eq1-{r}.pt") for r in range(WORLD)]
    if rate < 1.0:
        assert torch.equal(torch.cat([o["rows"] for o in outs]), one["rows"]), (
            "the shards' samples are not the one process's sample"
        )
        assert all(len(o["rows"]) for o in outs)
    start = 0
    for o in outs:
        torch.testing.assert_close(o["losses"], one["losses"])
        a, b = o["slice"]
        torch.testing.assert_close(o["x_v"], one["x_v"][a:b])
        torch.testing.assert_close(o["x_m"], one["x_m"][a:b])
        n = o["w_grad"].shape[0]
        torch.testing.assert_close(o["w_grad"], one["w_grad"][start : start + n])
        start += n
    assert start == one["w_grad"].shape[0]


def _eq1_loss_worker(rank: int, tmp: Path, rate: float, loss: str) -> None:
    torch.save(_eq1(_eq1_case(rate) | {"loss": loss}, rank, WORLD), tmp / f"eq1-{rank}.pt")


@pytest.mark.parametrize("rate", [1.0, 0.3], ids=["exact", "sampled"])
@pytest.mark.parametrize("loss", ["logit_adjusted", "balanced_softmax", "ldam"])
def test_sharded_long_tail_losses_equal_one_process(tmp_path: Path, rate: float, loss: str) -> None:
    """Each offset/margin loss (with DRW weights) on the class-sharded classifier: the one process's loss and gradients."""
    case = _eq1_case(rate) | {"loss": loss}
    one = _eq1(case, 0, 1)
    if rate == 1.0:  # against the loss written on the full logits
        from sicot_cli.config import TrainConfig
        from sicot_cli.losses import criterion

        counts = (torch.arange(19) * 7 % 23 + 1).numpy()
        crit = criterion(TrainConfig(loss=loss, reweight="drw", drw_start=0.0), counts, 0)
        w = case["weight"].clone().requires_grad_(True)
        ce_v = crit(case["x_v"] @ w.T + case["bias"], case["labels"])
        ce_m = crit(case["x_m"] @ w.T + case["bias"], case["labels"])
        (ce_v + 0.7 * ce_m).backward()
        torch.testing.assert_close(one["losses"], torch.stack([ce_v + 0.7 * ce_m, ce_v, ce_m]).detach())
        torch.testing.assert_close(one["w_grad"], w.grad)
    _spawn(_eq1_loss_worker, tmp_path, rate, loss)
    outs = [torch.load(tmp_path / f"eq1-{r}.pt") for r in range(WORLD)]
    start = 0
    for o in outs:
        torch.testing.assert_close(o["losses"], one["losses"])
        a, b = o["slice"]
        torch.testing.assert_close(o["x_v"], one["x_v"][a:b])
        n = o["w_grad"].shape[0]
        torch.testing.assert_close(o["w_grad"], one["w_grad"][start : start + n])
        start += n
    assert start == one["w_grad"].shape[0]


# --- training steps: 2 ranks == 1 process ----------------------------------------------------


def _tiny_model(
    num_classes: int,
    vectors: torch.Tensor,
    shard: tuple[int, int] | None,
    mixed: bool = True,
    semantic_norm: bool = False,
):  # noqa: ANN202
    """A SICoT without dropout, and without batch-norm unless ``semantic_norm`` (BatchNorm statistics are per rank in any DDP setup).

    ``mixed``: ``model.mixed_trains_classifier``; ``semantic_norm``: the title embedding batch-normalised (``model.semantic_norm = "batchnorm"``).
    """
    from encoders import create_encoder
    from sicot_cli.model import SICoT

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = SICoT(net, 8, num_classes, shard=shard, mixed_trains_classifier=mixed)
    with torch.random.fork_rng(devices=[]):
        model.attach_encoder(
            create_encoder("mean", vectors=vectors, out_dim=8), "batchnorm" if semantic_norm else "none"
        )
    return model


def _per_rank_batchnorm(bn: nn.BatchNorm1d, world: int) -> dict[int, dict[str, torch.Tensor]]:
    """Make ``bn``, in one process, normalise as it does on ``world`` DDP ranks without SyncBatchNorm.

    Each rank's slice of the batch (the loader's :func:`slice_range`) is normalised with its own
    mean and variance. The running statistics are rank 0's: DDP broadcasts rank 0's buffers before
    every forward, and each rank then updates them from its own slice. Returns, filled at every
    forward, what each rank's running statistics are after it (torch's own batch_norm update).
    """
    from sicot_cli.data.loader import slice_range

    real = bn.forward
    views: dict[int, dict[str, torch.Tensor]] = {}

    def forward(s: torch.Tensor) -> torch.Tensor:
        assert bn.training
        parts, before = [], (bn.running_mean.clone(), bn.running_var.clone())
        for r in range(world):
            lo, hi = slice_range(s.shape[0], world, r)
            mean, var = before[0].clone(), before[1].clone()
            F.batch_norm(
                s[lo:hi].detach(), mean, var, None, None, True, bn.momentum, bn.eps
            )  # rank r's update of rank 0's buffers
            views[r] = {"running_mean": mean, "running_var": var}
            parts.append(
                real(s[lo:hi]) if r == 0 else F.batch_norm(s[lo:hi], None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
            )
        return torch.cat(parts)

    bn.forward = forward
    return views


STEPS = 3


def _steps(
    data: Path,
    rank: int,
    world: int,
    sharded: bool,
    rate: float = 1.0,
    mixed: bool = True,
    semantic_norm: bool = False,
    emulate_world: int = 1,
    loss: str | None = None,
    bf16: bool = False,
) -> dict:
    """``STEPS`` training steps of rank ``rank`` of ``world``; ``emulate_world`` > 1 (one process): the semantic BatchNorm as on that many ranks."""
    from sicot_cli.config import TrainConfig
    from sicot_cli.data.dataset import open_prepared
    from sicot_cli.data.loader import BatchLoader, epoch_seed
    from sicot_cli.distributed import DistContext, gather_rows, shard_range, sharded_topk
    from sicot_cli.train import step_forward, train_step

    p = open_prepared(data)
    ctx = DistContext(rank, world)
    shard = shard_range(p.num_classes, world, rank) if sharded else None
    model = _tiny_model(p.num_classes, torch.from_numpy(p.vectors), shard, mixed, semantic_norm)
    bn_views = _per_rank_batchnorm(model.semantic_norm, emulate_world) if emulate_world > 1 else {}
    dtype = "bfloat16" if bf16 else "float32"
    if bf16:  # as sicot_cli.train does for train.classifier_dtype = "bfloat16"
        model.classifier.to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    cfg = TrainConfig(batch_size=8, amp=False, channels_last=False, class_sample_rate=rate, classifier_dtype=dtype)
    forward = step_forward(model, cfg, sharded)
    if ctx.enabled:
        forward = nn.parallel.DistributedDataParallel(forward)
    loader = BatchLoader(p, 8, 0, p.n_train, shuffle=True, seed=0, drop_last=True, rank=rank, world=world)
    crit = None
    if loss is not None:  # a long-tail loss with DRW row weights from the first step (sicot_cli.losses)
        from sicot_cli.losses import criterion

        crit = criterion(TrainConfig(loss=loss, reweight="drw", drw_start=0.0), p.train_counts, 0)
    losses = []
    for i, batch in enumerate(loader.epoch(0)):
        if i == STEPS:
            break
        gen = torch.Generator().manual_seed(epoch_seed(0, 0, 1 + i))
        args = (model, forward, opt, batch, torch.device("cpu"), cfg, gen, ctx, sharded, crit)
        loss, loss_v, loss_m = train_step(*args)
        losses.append(torch.stack([loss, loss_v, loss_m]))
    with torch.no_grad():  # the scores of one batch after training, merged across shards
        batch = next(iter(BatchLoader(p, 6, p.n_train, p.n, shuffle=False, rank=rank, world=world).epoch(0)))
        feats = model.features(model.normalize(batch.images))
        if ctx.enabled:
            feats = gather_rows(feats, ctx, batch.global_size)
        logits = model.classifier(feats)
        if sharded:
            _, top = sharded_topk(logits, 2, model.classifier.lo, ctx)
        else:
            top = logits.topk(2, dim=1).indices
    return {
        "losses": torch.stack(losses),
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "top": top,
        "shard": shard,
        "bn_views": bn_views,
    }


def _train_worker(rank: int, tmp: Path, data: str, sharded: bool, rate: float, options: dict | None = None) -> None:
    torch.save(_steps(Path(data), rank, WORLD, sharded, rate, **(options or {})), tmp / f"steps-{rank}.pt")


@pytest.mark.parametrize(
    ("sharded", "rate"),
    [(True, 1.0), (False, 1.0), (True, 0.4), (False, 0.4)],
    ids=["class-sharded", "replicated", "class-sharded-sampled", "replicated-sampled"],
)
def test_two_ranks_take_the_same_steps_as_one_process(
    tiny_prepared: Path, many_classes: Path, tmp_path: Path, sharded: bool, rate: float
) -> None:
    """Also with class sampling: every rank draws the same sample, each shard steps its part of it."""
    torch.set_num_threads(1)
    data = tiny_prepared if rate == 1.0 else many_classes  # 24 classes: more than a batch of 8 holds
    ref = _steps(data, 0, 1, False, rate)
    _spawn(_train_worker, tmp_path, str(data), sharded, rate)
    for r in range(WORLD):
        out = torch.load(tmp_path / f"steps-{r}.pt")
        torch.testing.assert_close(out["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
        assert torch.equal(out["top"], ref["top"])
        lo, hi = out["shard"] or (0, None)
        for k, v in ref["params"].items():
            want = v[lo:hi] if k.startswith("classifier.") and sharded else v
            torch.testing.assert_close(out["params"][k], want, rtol=1e-5, atol=1e-6, msg=f"rank {r}: {k}")
    num_classes = ref["params"]["classifier.weight"].shape[0]
    assert not torch.equal(
        ref["params"]["classifier.weight"], _tiny_model(num_classes, torch.zeros(1, 1), None).classifier.weight
    ), "the steps changed nothing"
    if rate < 1.0:  # some classes were never sampled in the 3 steps: their rows kept their initial weights
        init = _tiny_model(num_classes, torch.zeros(1, 1), None).classifier.weight
        assert (ref["params"]["classifier.weight"] == init).all(dim=1).any()


@pytest.mark.parametrize("sharded", [True, False], ids=["class-sharded", "replicated"])
def test_two_ranks_train_a_bf16_classifier(many_classes: Path, tmp_path: Path, sharded: bool) -> None:
    """``train.classifier_dtype = "bfloat16"`` with class sampling on 2 ranks.

    Replicated, every rank rounds all rows with the noise one process draws: the same steps.
    Class-sharded, each rank draws the noise of its own rows, so after the first rounding the ranks
    differ from one process by bf16's resolution (a few units in the last place), no more.
    """
    torch.set_num_threads(1)
    ref = _steps(many_classes, 0, 1, False, 0.4, bf16=True)
    fp32 = _steps(many_classes, 0, 1, False, 0.4)
    _spawn(_train_worker, tmp_path, str(many_classes), sharded, 0.4, {"bf16": True})
    for r in range(WORLD):
        out = torch.load(tmp_path / f"steps-{r}.pt")
        assert out["params"]["classifier.weight"].dtype == torch.bfloat16
        lo, hi = out["shard"] or (0, None)
        if sharded:
            torch.testing.assert_close(out["losses"][0], ref["losses"][0], rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(out["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
        for k, v in ref["params"].items():
            want = v[lo:hi] if k.startswith("classifier.") and sharded else v
            tol = {"rtol": 2e-2, "atol": 2e-3} if sharded else {"rtol": 1e-5, "atol": 1e-6}
            torch.testing.assert_close(out["params"][k], want, **tol, msg=f"rank {r}: {k}")
        if sharded:  # the tolerance is far below what the steps moved: a shard that kept its rows would fail
            init = _tiny_model(ref["params"]["classifier.weight"].shape[0], torch.zeros(1, 1), None).classifier.weight
            want = ref["params"]["classifier.weight"][lo:hi].float()
            moved = (init[lo:hi].detach() - want).abs().max()
            assert (out["params"]["classifier.weight"].float() - want).abs().max() < moved / 4
    w16, w32 = ref["params"]["classifier.weight"].float(), fp32["params"]["classifier.weight"]
    assert not torch.equal(w16, w32) and torch.allclose(w16, w32, atol=2e-2), "bf16 storage steps like fp32"


@pytest.mark.parametrize("sharded", [True, False], ids=["class-sharded", "replicated"])
def test_two_ranks_take_the_same_long_tail_steps_as_one_process(
    many_classes: Path, tmp_path: Path, sharded: bool
) -> None:
    """LDAM with DRW weights: the margins per shard, and the weighted mean over the global batch under DDP."""
    torch.set_num_threads(1)
    ref = _steps(many_classes, 0, 1, False, loss="ldam")
    _spawn(_train_worker, tmp_path, str(many_classes), sharded, 1.0, {"loss": "ldam"})
    for r in range(WORLD):
        out = torch.load(tmp_path / f"steps-{r}.pt")
        torch.testing.assert_close(out["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
        lo, hi = out["shard"] or (0, None)
        for k, v in ref["params"].items():
            want = v[lo:hi] if k.startswith("classifier.") and sharded else v
            torch.testing.assert_close(out["params"][k], want, rtol=1e-5, atol=1e-6, msg=f"rank {r}: {k}")


def test_sharded_steps_keep_the_classifier_to_the_image_loss(tiny_prepared: Path, tmp_path: Path) -> None:
    """``model.mixed_trains_classifier = false`` on a class-sharded classifier: the steps of one process with it.

    One process scores both streams with ``SICoT.forward`` (x_m against the detached weights); the
    2 sharded ranks go through the one-GEMM sharded Eq. 1: if that path let CE(x_m) train the
    classifier shards, their weights would be the paper's, which differ.
    """
    torch.set_num_threads(1)
    ref = _steps(tiny_prepared, 0, 1, False, mixed=False)
    paper = _steps(tiny_prepared, 0, 1, False, mixed=True)
    assert not torch.allclose(ref["params"]["classifier.weight"], paper["params"]["classifier.weight"], atol=1e-4), (
        "the setting changed nothing"
    )
    torch.testing.assert_close(
        ref["losses"][0, :], paper["losses"][0, :]
    )  # the same first step's loss: only the gradients differ
    _spawn(_train_worker, tmp_path, str(tiny_prepared), True, 1.0, {"mixed": False})
    for r in range(WORLD):
        out = torch.load(tmp_path / f"steps-{r}.pt")
        torch.testing.assert_close(out["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
        assert torch.equal(out["top"], ref["top"])
        lo, hi = out["shard"]
        for k, v in ref["params"].items():
            torch.testing.assert_close(
                out["params"][k],
                v[lo:hi] if k.startswith("classifier.") else v,
                rtol=1e-5,
                atol=1e-6,
                msg=f"rank {r}: {k}",
            )


def test_semantic_batchnorm_statistics_are_per_rank(tiny_prepared: Path, tmp_path: Path) -> None:
    """``model.semantic_norm = "batchnorm"`` under DDP, as documented (no SyncBatchNorm): 2 ranks take the
    steps of one process that normalises each rank's half of the batch with that half's statistics.

    The weights (BatchNorm's affine ones too) are the same on both ranks; the running statistics are
    rank 0's, broadcast before each forward and updated by each rank from its own half.
    """
    torch.set_num_threads(1)
    ref = _steps(tiny_prepared, 0, 1, False, semantic_norm=True, emulate_world=WORLD)
    whole = _steps(
        tiny_prepared, 0, 1, False, semantic_norm=True
    )  # statistics over the whole batch (what SyncBatchNorm gives)
    assert not torch.allclose(ref["losses"], whole["losses"], rtol=1e-4), (
        "per-rank and whole-batch statistics agree: the test cannot tell them apart"
    )
    _spawn(_train_worker, tmp_path, str(tiny_prepared), False, 1.0, {"semantic_norm": True})
    for r in range(WORLD):
        out = torch.load(tmp_path / f"steps-{r}.pt")
        torch.testing.assert_close(out["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
        assert torch.equal(out["top"], ref["top"])
        for k, v in ref["params"].items():
            want = (
                ref["bn_views"][r][k.removeprefix("semantic_norm.")]
                if k in ("semantic_norm.running_mean", "semantic_norm.running_var")
                else v
            )
            torch.testing.assert_close(out["params"][k], want, rtol=1e-5, atol=1e-6, msg=f"rank {r}: {k}")
    assert int(ref["params"]["semantic_norm.num_batches_tracked"]) == STEPS
    assert not torch.allclose(ref["bn_views"][0]["running_mean"], ref["bn_views"][1]["running_mean"]), (
        "both halves have the same statistics"
    )


# --- re-sharding checkpoints -----------------------------------------------------------------


def _trained_state(model: nn.Module) -> torch.optim.Optimizer:
    """One SGD step on random data, so the momentum buffers are not zero."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    return opt


def _reshard_worker(rank: int, tmp: Path, direction: str) -> None:
    from sicot_cli import checkpoints, runs
    from sicot_cli.distributed import shard_range

    shard = shard_range(3, WORLD, rank)
    model = _tiny_model(3, torch.randn(5, 4, generator=torch.Generator().manual_seed(2)), shard)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if direction == "2to1":
        with torch.no_grad():  # the shards of a known full classifier
            full = torch.load(tmp / "full.pt")
            model.load_state_dict(
                {
                    **full["model"],
                    "classifier.weight": full["model"]["classifier.weight"][shard[0] : shard[1]],
                    "classifier.bias": full["model"]["classifier.bias"][shard[0] : shard[1]],
                }
            )
        opt = _trained_state(model)
        checkpoints.save(tmp / "ck.pt", {"meta": {}}, model, opt, _ctx(rank), True, "e1")
        torch.save(
            {"params": model.state_dict(), "momentum": [opt.state[p]["momentum_buffer"] for p in model.parameters()]},
            tmp / f"saved-{rank}.pt",
        )
    else:
        state = runs.load_checkpoint(tmp / "ck.pt")
        checkpoints.restore(state, tmp / "ck.pt", model, opt)
        torch.save(
            {
                "params": model.state_dict(),
                "momentum": [opt.state[p]["momentum_buffer"] for p in model.parameters()],
                "shard": shard,
            },
            tmp / f"loaded-{rank}.pt",
        )


def test_checkpoints_reshard_two_to_one_and_one_to_two_exactly(tmp_path: Path) -> None:
    from sicot_cli import checkpoints, runs
    from sicot_cli.distributed import DistContext

    vectors = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    full = _tiny_model(3, vectors, None)
    torch.save({"model": full.state_dict()}, tmp_path / "full.pt")
    # 2 -> 1: two shards saved, loaded into one full model
    _spawn(_reshard_worker, tmp_path, "2to1")
    saved = [torch.load(tmp_path / f"saved-{r}.pt") for r in range(WORLD)]
    parts = sorted(f.name for f in tmp_path.glob("ck.e1.classifier-*"))
    assert parts == ["ck.e1.classifier-000-of-002.pt", "ck.e1.classifier-001-of-002.pt"]
    one = _tiny_model(3, vectors, None)
    opt = torch.optim.SGD(one.parameters(), lr=0.1, momentum=0.9)
    checkpoints.restore(runs.load_checkpoint(tmp_path / "ck.pt"), tmp_path / "ck.pt", one, opt)
    for k, v in one.state_dict().items():
        want = torch.cat([s["params"][k] for s in saved]) if k.startswith("classifier.") else saved[0]["params"][k]
        assert torch.equal(v, want), k
    index = checkpoints.param_index(one)
    sliced = {index["classifier.weight"], index["classifier.bias"]}
    for i, p in enumerate(one.parameters()):
        want = torch.cat([s["momentum"][i] for s in saved]) if i in sliced else saved[0]["momentum"][i]
        assert torch.equal(opt.state[p]["momentum_buffer"], want), i
    # 1 -> 2: the full model saved by one process, loaded as two shards
    (tmp_path / "ck.pt").unlink()
    for f in tmp_path.glob("ck.*.classifier-*"):
        f.unlink()
    checkpoints.save(tmp_path / "ck.pt", {"meta": {}}, one, opt, DistContext(), False, "e1")
    _spawn(_reshard_worker, tmp_path, "1to2")
    for r in range(WORLD):
        out = torch.load(tmp_path / f"loaded-{r}.pt")
        lo, hi = out["shard"]
        for k, v in one.state_dict().items():
            assert torch.equal(out["params"][k], v[lo:hi] if k.startswith("classifier.") else v), k
        index = checkpoints.param_index(one)
        sliced = {index["classifier.weight"], index["classifier.bias"]}
        for i, p in enumerate(one.parameters()):
            m = opt.state[p]["momentum_buffer"]
            assert torch.equal(out["momentum"][i], m[lo:hi] if i in sliced else m), i


# --- the whole train() on 2 ranks --------------------------------------------------------------


def _torchrun_entry(rank: int, tmp: str, port: int, data: str) -> None:
    """A rank as ``torchrun`` starts it: env:// variables only, ``train()`` joins and leaves the group."""
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(WORLD),
        }
    )
    torch.set_num_threads(1)
    from sicot_cli.train import train

    recipe = tiny_recipe(Path(data), "model.encoder=bilinear", "train.classifier_parallel=yes", "train.epochs=1")
    result = train(recipe, Path(tmp) / "run", data=data)
    assert not dist.is_initialized(), "train() left the process group it created"
    (Path(tmp) / f"result-{rank}.json").write_text(json.dumps(result.final))
    _exit_without_teardown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_train_on_two_ranks_with_a_sharded_classifier(tiny_prepared: Path, tmp_path: Path) -> None:
    from sicot_cli import runs
    from sicot_cli.evaluate import evaluate_run

    mp.spawn(_torchrun_entry, args=(str(tmp_path), _free_port(), str(tiny_prepared)), nprocs=WORLD, join=True)
    finals = [json.loads((tmp_path / f"result-{r}.json").read_text()) for r in range(WORLD)]
    assert finals[0]["top1"] == finals[1]["top1"]
    run = tmp_path / "run"
    assert runs.is_finished(run)
    assert sorted(f.name for f in run.glob("checkpoint-last.*.classifier-*")) == [
        "checkpoint-last.e1.classifier-000-of-002.pt",
        "checkpoint-last.e1.classifier-001-of-002.pt",
    ]
    state = runs.load_checkpoint(run / runs.LAST)
    assert "classifier.weight" not in state["model"] and [(p["lo"], p["hi"]) for p in state["classifier_parts"]] == [
        (0, 2),
        (2, 3),
    ]
    records = runs.read_metrics(run)
    assert len(records) == 1 and records[0]["train_images"] == 24  # the global batches, counted once
    # One process re-assembles the classifier and scores the test set as the 2 ranks did.
    final = runs.read_summary(run)["final"]
    assert final["split"] == "test" and final["checkpoint"] == "last"
    again = evaluate_run(run, device="cpu")
    assert again.metrics["top1"] == pytest.approx(final["top1"])
    assert again.metrics["top3"] == pytest.approx(final["top3"])


def _jpeg_loader_worker(rank: int, tmp: Path, data: str, rank_shards: bool = False) -> None:
    from sicot_cli.data.dataset import open_prepared
    from sicot_cli.data.loader import BatchLoader

    p = open_prepared(data)
    loader = BatchLoader(p, 6, 0, p.n_train, shuffle=True, seed=2, in_memory=False, drop_last=True, rank=rank,
                         world=WORLD, workers=1, crop=(0.35, 1.0), rank_shards=rank_shards)  # fmt: skip
    batches = list(loader.epoch(1))
    torch.save({"rows": [b.rows for b in batches], "images": [b.images for b in batches]}, tmp / f"jpeg-{rank}.pt")


def test_two_ranks_decode_disjoint_rows_of_format_2_shards_that_cover_the_epoch(tmp_path: Path) -> None:
    """Under torchrun-style ranks, each decodes its own rows of every global batch; together, one process's epoch."""
    from conftest import KEEP_ALL, make_manifest

    from sicot_cli.config import load_recipe
    from sicot_cli.data.dataset import open_prepared
    from sicot_cli.data.loader import BatchLoader
    from sicot_cli.data.prepare import prepare

    m = make_manifest(tmp_path / "raw", per_class=10)
    data = tmp_path / "j.h5"
    prepare(load_recipe(None, ["data.source=manifest", f"data.manifest={m}", "data.image_size=16", "data.images=jpeg",
                               "data.shard_rows=5", *KEEP_ALL]), data)  # fmt: skip
    p = open_prepared(data)
    one = list(BatchLoader(p, 6, 0, p.n_train, shuffle=True, seed=2, in_memory=False, drop_last=True,
                           crop=(0.35, 1.0)).epoch(1))  # fmt: skip
    _spawn(_jpeg_loader_worker, tmp_path, str(data))
    got = [torch.load(tmp_path / f"jpeg-{r}.pt", weights_only=False) for r in range(WORLD)]
    seen = []
    for j, whole in enumerate(one):
        r0, r1 = got[0]["rows"][j], got[1]["rows"][j]
        assert not set(r0.tolist()) & set(r1.tolist())
        assert np.array_equal(np.concatenate([r0, r1]), whole.rows)
        assert torch.equal(torch.cat([got[0]["images"][j], got[1]["images"][j]]), whole.images)
        seen += whole.rows.tolist()
    assert len(seen) == len(set(seen)) == len(one) * 6 and len(one) == p.n_train // 6
    # train.rank_shards: each rank reads only its own shards
    _spawn(_jpeg_loader_worker, tmp_path, str(data), True)
    got = [torch.load(tmp_path / f"jpeg-{r}.pt", weights_only=False) for r in range(WORLD)]
    shards = [set(p.store.shard[np.concatenate(g["rows"])].tolist()) for g in got]
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    assert len(got[0]["rows"]) == len(got[1]["rows"]) > 0
