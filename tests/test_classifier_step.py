"""The shared classifier in a step: Eq. 1 in one GEMM, and class sampling (Partial FC), in one process.

The 2-rank counterparts (sharded one pass, the same sample on every rank, sharded sampled training
equal to one process) are in ``tests/test_distributed.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_recipe
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sicot_cli import runs
from sicot_cli.classifier_step import SampledRows, eq1_from_streams, sample_classes
from sicot_cli.config import TrainConfig
from sicot_cli.data.loader import Batch
from sicot_cli.distributed import DistContext
from sicot_cli.model import SICoT, sicot_loss
from sicot_cli.train import TIMING_KEYS, step_forward, train, train_step

CLASSES = 40


def _model(
    num_classes: int = CLASSES, dtype: torch.dtype = torch.float32, mixed_trains_classifier: bool = True
) -> SICoT:
    """A small SICoT without batch-norm: conv backbone, mean encoder."""
    from encoders import create_encoder

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = SICoT(net, 8, num_classes, mixed_trains_classifier=mixed_trains_classifier)
    with torch.random.fork_rng(devices=[]):
        vectors = torch.randn(30, 6, generator=torch.Generator().manual_seed(3))
        model.attach_encoder(create_encoder("mean", vectors=vectors, out_dim=8))
    return model.to(dtype)


def _batch(seed: int, n: int = 12, num_classes: int = CLASSES) -> Batch:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 30, (n, 5), generator=g)
    tokens[:, 4] = 0
    return Batch(
        torch.randint(0, 256, (n, 3, 12, 12), generator=g, dtype=torch.uint8),
        tokens,
        tokens != 0,
        torch.randint(0, num_classes, (n,), generator=g),
        np.arange(n),
    )


class _ClassifierGemms(TorchDispatchMode):
    """Records the matrix products whose output is as wide as the classes, or the weight's gradient."""

    def __init__(self, classes: int, dim: int) -> None:
        super().__init__()
        self.classes, self.dim, self.ops = classes, dim, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if isinstance(out, torch.Tensor) and out.dim() == 2 and name in ("mm", "addmm", "add", "add_"):
            if out.shape[1] == self.classes or tuple(out.shape) == (self.classes, self.dim):
                self.ops.append((name, tuple(out.shape)))
        return out


@pytest.mark.parametrize("mixed_trains_classifier", [True, False], ids=["paper", "mixed-does-not-train-classifier"])
def test_one_pass_equals_two_passes(mixed_trains_classifier: bool) -> None:
    model = _model(dtype=torch.float64, mixed_trains_classifier=mixed_trains_classifier)
    b = _batch(1)
    x = model.normalize(b.images).double()
    # today's one pass
    loss, loss_v, loss_m = sicot_loss(*model(x, b.tokens, b.mask), b.labels, lam=0.7)
    loss.backward()
    one = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    # the two passes of Eq. 1 as written
    x_v, x_m = model.streams(x, b.tokens, b.mask)
    w, bias = model.classifier.weight, model.classifier.bias
    logits_m = F.linear(x_m, w, bias) if mixed_trains_classifier else F.linear(x_m, w.detach(), bias.detach())
    ref, ref_v, ref_m = sicot_loss(F.linear(x_v, w, bias), logits_m, b.labels, lam=0.7)
    ref.backward()
    torch.testing.assert_close(
        torch.stack([loss, loss_v, loss_m]), torch.stack([ref, ref_v, ref_m]), rtol=1e-12, atol=1e-12
    )
    for k, p in model.named_parameters():
        torch.testing.assert_close(one[k], p.grad, rtol=1e-10, atol=1e-12, msg=k)
    assert one["classifier.weight"].abs().sum() > 0 and one["encoder.proj.weight"].abs().sum() > 0


def test_one_pass_is_one_gemm_per_direction() -> None:
    model = _model()
    b = _batch(2)
    x = model.normalize(b.images)
    rec = _ClassifierGemms(CLASSES, 8)
    with rec:
        sicot_loss(*model(x, b.tokens, b.mask), b.labels, lam=1.0)[0].backward()
    # forward: one addmm over 2B rows; backward: one weight-gradient mm, no sum of two weight gradients
    assert sorted(rec.ops) == sorted([("addmm", (2 * len(b.labels), CLASSES)), ("mm", (CLASSES, 8))]), rec.ops


def test_sample_holds_the_labels_and_its_size() -> None:
    labels = torch.tensor([3, 3, 17, 999, 0])
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    chosen = sample_classes(labels, 1000, 0.1, g(0))
    assert len(chosen) == 100 and set(labels.tolist()) <= set(chosen.tolist())
    assert torch.equal(chosen, chosen.sort().values) and len(set(chosen.tolist())) == 100
    assert torch.equal(chosen, sample_classes(labels, 1000, 0.1, g(0))), (
        "the same generator state gives the same sample"
    )
    assert not torch.equal(chosen, sample_classes(labels, 1000, 0.1, g(1)))
    many = torch.arange(0, 1000, 5)  # 200 distinct labels > 10 % of the classes: all of them, nothing else
    assert torch.equal(sample_classes(many, 1000, 0.1, g(0)), many)
    assert torch.equal(sample_classes(labels % 10, 10, 0.99, g(0)), torch.arange(10))
    # uniform over the negatives: every class is drawn about rate of the time
    counts = torch.zeros(1000)
    for s in range(200):
        counts[sample_classes(labels, 1000, 0.1, g(s))] += 1
    negatives = torch.ones(1000, dtype=torch.bool)
    negatives[labels] = False
    assert (
        counts[~negatives].eq(200).all()
        and 0.07 < counts[negatives].mean() / 200 < 0.13
        and counts[negatives].max() < 45
    )


def _cfg(rate: float) -> TrainConfig:
    return TrainConfig(
        batch_size=12,
        amp=False,
        channels_last=False,
        lam=0.7,
        class_sample_rate=rate,
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-3,
    )


def _steps(
    rate: float, steps: int = 3, num_classes: int = CLASSES
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.optim.Optimizer, SICoT]:
    model = _model(num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    cfg = _cfg(rate)
    forward = step_forward(model, cfg, False)
    losses = []
    for i in range(steps):
        gen = torch.Generator().manual_seed(100 + i)
        losses.append(
            torch.stack(
                [
                    t
                    for t in train_step(
                        model, forward, opt, _batch(10 + i, num_classes=num_classes), torch.device("cpu"), cfg, gen
                    )
                    if t is not None
                ]
            )
        )
    return torch.stack(losses), {k: v.detach().clone() for k, v in model.state_dict().items()}, opt, model


def test_sampling_every_class_takes_the_exact_steps() -> None:
    """The sampled path (own rows, own SGD update) with every class sampled == torch's SGD on the exact softmax."""
    exact_losses, exact, exact_opt, exact_model = _steps(1.0, num_classes=10)
    losses, sampled, opt, model = _steps(0.999, num_classes=10)  # ceil(0.999 * 10) = all 10 classes, sampled path
    torch.testing.assert_close(losses, exact_losses, rtol=1e-6, atol=1e-7)
    for k, v in exact.items():
        torch.testing.assert_close(sampled[k], v, rtol=1e-6, atol=1e-7, msg=k)
    for (name, p), q in zip(model.named_parameters(), exact_model.parameters(), strict=True):
        torch.testing.assert_close(
            opt.state[p]["momentum_buffer"], exact_opt.state[q]["momentum_buffer"], rtol=1e-6, atol=1e-7, msg=name
        )
    assert not torch.equal(exact["classifier.weight"], _model(10).classifier.weight), "the steps changed nothing"


def test_only_sampled_rows_change_and_both_terms_share_them() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    cfg = _cfg(1.0)
    train_step(
        model, model, opt, _batch(5), torch.device("cpu"), cfg, torch.Generator().manual_seed(0)
    )  # every row gets momentum
    clf = model.classifier
    w0, b0 = clf.weight.detach().clone(), clf.bias.detach().clone()
    m0 = opt.state[clf.weight]["momentum_buffer"].clone()
    b = _batch(6)
    x_v, x_m = model.streams(model.normalize(b.images), b.tokens, b.mask)
    loss, _, loss_m, sampled = eq1_from_streams(
        model,
        x_v,
        x_m,
        b.labels,
        len(b.labels),
        0.7,
        False,
        DistContext(),
        False,
        0.5,
        torch.Generator().manual_seed(7),
    )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    # both terms score the same sampled rows: x_m alone reaches the sampled weights and nothing else
    assert isinstance(sampled, SampledRows) and sampled.weight.grad.shape == (len(sampled.rows), 8)
    assert clf.weight.grad is None, "the full weight got a gradient: the sample is not what the step scores"
    (g_m,) = torch.autograd.grad(
        F.cross_entropy(F.linear(x_m.detach(), sampled.weight), torch.searchsorted(sampled.rows, b.labels)),
        [sampled.weight],
    )
    assert g_m.abs().sum() > 0
    opt.step()
    sampled.step(opt)
    rows = sampled.rows
    assert len(rows) == 20 and set(b.labels.tolist()) <= set(rows.tolist())
    others = torch.ones(CLASSES, dtype=torch.bool)
    others[rows] = False
    m1 = opt.state[clf.weight]["momentum_buffer"]
    # not sampled: weights, bias and momentum untouched (plain SGD would move them by momentum and decay)
    assert (
        torch.equal(clf.weight[others], w0[others])
        and torch.equal(clf.bias[others], b0[others])
        and torch.equal(m1[others], m0[others])
    )
    # sampled: SGD with weight decay and momentum on those rows
    want_m = m0[rows] * 0.9 + (sampled.weight.grad + 1e-3 * w0[rows])
    torch.testing.assert_close(m1[rows], want_m)
    torch.testing.assert_close(clf.weight[rows], w0[rows] - 0.1 * want_m)


def test_class_sample_rate_is_checked() -> None:
    from sicot_cli.config import load_recipe
    from sicot_cli.errors import SicotError

    for bad, bound in (("0", "> 0"), ("1.5", "<= 1"), ("-0.1", "> 0"), ("nan", "finite")):
        with pytest.raises(SicotError, match=rf"train.class_sample_rate must be .*{bound}"):
            load_recipe(None, [f"train.class_sample_rate={bad}"])


def test_resume_with_sampling_reproduces_the_run(many_classes: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(many_classes, "model.encoder=mean", "train.class_sample_rate=0.5", "train.epochs=1")
    full = train(recipe, tmp_path / "full")
    exact = train(tiny_recipe(many_classes, "model.encoder=mean", "train.epochs=1"), tmp_path / "exact")
    strip = lambda h: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in h]  # noqa: E731
    assert strip(full.history) != strip(exact.history), (
        "sampling changed nothing: the test would not see a resume that samples differently"
    )

    def hook(epoch: int, batch: int) -> None:
        if (epoch, batch) == (0, 3):
            raise KeyboardInterrupt

    run = tmp_path / "cut"
    assert train(recipe, run, hook=hook).interrupted
    resumed = train(recipe, run, resume=True)
    assert strip(resumed.history) == strip(full.history)
    a, b = runs.load_checkpoint(run / runs.LAST), runs.load_checkpoint(full.run_dir / runs.LAST)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"]), k


def test_round_bf16_keeps_representable_values_and_is_unbiased() -> None:
    from sicot_cli.classifier_step import round_bf16

    g = torch.Generator().manual_seed(0)
    exact = torch.tensor([1.0, -2.5, 0.0, 3.140625, -0.0078125])  # representable in bf16
    assert torch.equal(round_bf16(exact, g).float(), exact)
    step = 2.0**-7  # bf16's spacing in [1, 2)
    for x in (1.0 + step / 8, -(1.0 + step / 8), 1.0 + 5 * step / 8):
        out = round_bf16(torch.full((200_000,), x), g).float()
        low = math.copysign(1.0 + step * math.floor((abs(x) - 1) / step), x)
        assert set(out.unique().tolist()) <= {low, low + math.copysign(step, x)}, "not one of the two neighbours"
        assert abs(out.mean().item() - x) < 3e-5, f"biased: {out.mean().item()} for {x}"
        nearest = torch.tensor([x]).to(torch.bfloat16).float().item()
        assert nearest != x, "the value must not be representable, or the test shows nothing"


def test_bf16_rows_keep_updates_below_half_a_bf16_step() -> None:
    """200 updates of 1/16 bf16 step each: stochastic rounding moves the weights by 12.5 steps on average.

    Rounding to nearest would leave every weight at 1.0 (each update is below half a step). With
    momentum the buffer (rounded with the same noise) converges to grad / (1 - momentum) on average.
    """
    from sicot_cli.model import SharedLinear

    clf = SharedLinear(8, CLASSES).to(torch.bfloat16)
    with torch.no_grad():
        clf.weight.fill_(1.0)
        clf.bias.fill_(1.0)
    opt = torch.optim.SGD(clf.parameters(), lr=1.0, momentum=0.0)
    g = torch.Generator().manual_seed(0)
    rows = torch.arange(CLASSES)
    step = 2.0**-7
    for _ in range(200):
        sampled = SampledRows(clf, rows, g)
        assert sampled.weight.dtype == torch.float32 and sampled.weight.requires_grad
        sampled.weight.grad = torch.full_like(sampled.weight, -step / 16)
        sampled.bias.grad = torch.full_like(sampled.bias, -step / 16)
        sampled.step(opt)
    assert clf.weight.dtype == torch.bfloat16
    moved = (clf.weight.float().mean().item() - 1.0) / step
    assert 12.5 * 0.9 < moved < 12.5 * 1.1, f"moved {moved:.2f} bf16 steps, expected 12.5"
    with pytest.raises(ValueError, match="generator"):
        SampledRows(clf, rows)

    opt = torch.optim.SGD(clf.parameters(), lr=1e-30, momentum=0.5)  # the buffer alone: the weights stay put
    grad = 1.0 + step / 8  # not representable in bf16: the buffer's fixed point 2 * grad is not either
    for _ in range(60):
        sampled = SampledRows(clf, rows, g)
        sampled.weight.grad = torch.full_like(sampled.weight, grad)
        sampled.bias.grad = torch.full_like(sampled.bias, grad)
        sampled.step(opt)
    buf = opt.state[clf.weight]["momentum_buffer"]
    assert buf.dtype == torch.bfloat16
    assert abs(buf.float().mean().item() - 2 * grad) < 2 * step / 16, buf.float().mean().item()
    assert torch.tensor([2 * grad]).to(torch.bfloat16).item() != 2 * grad


def test_bf16_classifier_trains_resumes_exactly_and_evaluates_in_fp32(many_classes: Path, tmp_path: Path) -> None:
    from sicot_cli.evaluate import evaluate_run, load_run_model

    rate = "train.class_sample_rate=0.5"
    recipe = tiny_recipe(many_classes, "model.encoder=mean", "train.classifier_dtype=bfloat16", rate, "train.epochs=1")
    full = train(recipe, tmp_path / "full")
    ckpt = runs.load_checkpoint(full.run_dir / runs.LAST)
    assert ckpt["model"]["classifier.weight"].dtype == torch.bfloat16
    momentum = [v["momentum_buffer"] for v in ckpt["optimizer"]["state"].values()]
    assert sum(m.dtype == torch.bfloat16 for m in momentum) == 2, "the classifier's weight and bias momentum"
    fp32 = train(tiny_recipe(many_classes, "model.encoder=mean", rate, "train.epochs=1"), tmp_path / "fp32")
    w16 = ckpt["model"]["classifier.weight"].float()
    w32 = runs.load_checkpoint(fp32.run_dir / runs.LAST)["model"]["classifier.weight"]
    assert not torch.equal(w16, w32) and torch.allclose(w16, w32, atol=0.05), "bf16 storage trains like fp32"

    def hook(epoch: int, batch: int) -> None:
        if (epoch, batch) == (0, 3):
            raise KeyboardInterrupt

    run = tmp_path / "cut"
    assert train(recipe, run, hook=hook).interrupted
    train(recipe, run, resume=True)
    a = runs.load_checkpoint(run / runs.LAST)
    for k, v in a["model"].items():
        assert torch.equal(v, ckpt["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], ckpt["optimizer"]["state"][k]["momentum_buffer"]), k
    _, _, model, _ = load_run_model(full.run_dir)
    assert model.classifier.weight.dtype == torch.float32  # evaluation, export and serving score in fp32
    final = runs.read_summary(full.run_dir)["final"]
    assert final["checkpoint"] == "last"
    again = evaluate_run(full.run_dir, device="cpu")
    assert again.metrics["top1"] == pytest.approx(final["top1"])
    assert again.metrics["top3"] == pytest.approx(final["top3"])


def test_bf16_classifier_needs_sampling_and_keeps_nan() -> None:
    from sicot_cli.classifier_step import round_bf16
    from sicot_cli.config import load_recipe
    from sicot_cli.errors import SicotError

    with pytest.raises(SicotError, match=r"classifier_dtype = \"bfloat16\" needs train.class_sample_rate < 1"):
        load_recipe(None, ["train.classifier_dtype=bfloat16"])
    load_recipe(None, ["train.classifier_dtype=bfloat16", "train.class_sample_rate=0.1"])
    nans = torch.tensor([0x7FFFFFFF, -1, 0x7F800001, 0x7FC00000], dtype=torch.int32).view(torch.float32)
    assert round_bf16(nans, torch.Generator().manual_seed(0)).isnan().all()  # not inf, not 0


def test_a_bf16_classifier_scores_in_the_input_dtype_in_blocks() -> None:
    from sicot_cli.distributed import linear_in

    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    clf = nn.Linear(8, 70).to(torch.bfloat16)
    whole = F.linear(x, clf.weight.float(), clf.bias.float())
    got = linear_in(x, clf.weight, clf.bias, rows=16)  # 5 blocks of classes
    assert got.dtype == torch.float32 and torch.allclose(got, whole, atol=1e-6)
    model = _model()
    model.classifier.to(torch.bfloat16)
    logits_v, logits_m = model(model.normalize(_batch(0).images.float()), _batch(0).tokens, _batch(0).mask)
    assert logits_v.dtype == torch.float32 and logits_m is not None
