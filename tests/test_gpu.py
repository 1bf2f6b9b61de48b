"""The CUDA training path: bf16 autocast (``train.amp``), ``train.channels_last`` and pinned batches.

Marked ``gpu`` and skipped without CUDA. On a GPU: the options are in effect where the loop says
they are (the first convolution of the visual stream sees channels-last bf16 work, the loader's
batches are page-locked), a short run finishes with finite losses, and its AMP results stay close
to the fp32 ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_recipe
from torch import nn

from sicot_cli import runs
from sicot_cli.data.dataset import open_prepared
from sicot_cli.data.loader import BatchLoader

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = (
    "model.encoder=bilinear",
    "model.backbone=resnet18",
    "train.device=cuda",
    "train.channels_last=true",
    "train.lr=0.001",
)


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.visual.modules() if isinstance(m, nn.Conv2d))


def test_pinned_batches_are_the_unpinned_ones(tiny_prepared: Path) -> None:
    p = open_prepared(tiny_prepared)
    pinned = list(BatchLoader(p, 8, 0, p.n_train, shuffle=True, seed=3, pin_memory=True).epoch(0))
    plain = list(BatchLoader(p, 8, 0, p.n_train, shuffle=True, seed=3).epoch(0))
    assert len(pinned) == len(plain) == 3
    for a, b in zip(pinned, plain, strict=True):
        for name in ("images", "tokens", "mask", "labels"):
            assert getattr(a, name).is_pinned() and not getattr(b, name).is_pinned(), name
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert np.array_equal(a.rows, b.rows)


def test_amp_step_is_close_to_the_fp32_step(tiny_prepared: Path) -> None:
    """One training step on one batch (same weights, same augmentation): bf16 autocast against fp32."""
    from sicot_cli.model import make_model
    from sicot_cli.train import train_step

    p = open_prepared(tiny_prepared)
    batch = next(iter(BatchLoader(p, 8, 0, p.n_train, shuffle=False, pin_memory=True).epoch(0)))
    device = torch.device("cuda")
    out = {}
    for amp in (False, True):
        recipe = tiny_recipe(tiny_prepared, *CUDA, f"train.amp={str(amp).lower()}")
        model = make_model(recipe, p).to(memory_format=torch.channels_last).to(device)
        opt = torch.optim.SGD(
            model.parameters(),
            lr=recipe.train.lr,
            momentum=recipe.train.momentum,
            weight_decay=recipe.train.weight_decay,
        )
        dtypes = []
        _first_conv(model).register_forward_hook(lambda m, i, o, seen=dtypes: seen.append(o.dtype))
        losses = train_step(model, model, opt, batch, device, recipe.train, torch.Generator().manual_seed(1))
        out[amp] = (
            torch.stack(losses).float().cpu(),
            {k: v.detach().float().cpu() for k, v in model.named_parameters()},
        )
        assert dtypes == [torch.bfloat16 if amp else torch.float32]
    (amp_losses, amp_params), (fp32_losses, fp32_params) = out[True], out[False]
    assert torch.isfinite(amp_losses).all() and torch.isfinite(fp32_losses).all()
    torch.testing.assert_close(amp_losses, fp32_losses, rtol=0.03, atol=0)  # total, CE(x_v), CE(x_m)
    # after the SGD step the weights differ by lr x (the gradients' bf16 rounding) only
    for k, v in fp32_params.items():
        torch.testing.assert_close(amp_params[k], v, rtol=0, atol=1e-3, msg=k)


def test_short_cuda_run_with_amp_channels_last_and_pinned_memory(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sicot_cli.train as train_mod

    seen: list[
        tuple[bool, str, bool, torch.dtype]
    ] = []  # (training, device, channels-last input, output dtype) of the first conv
    pinned: list[bool] = []
    real_make_model = train_mod.make_model

    def spied_model(*args, **kwargs):
        model = real_make_model(*args, **kwargs)
        _first_conv(model).register_forward_hook(
            lambda m, i, o: seen.append(
                (m.training, i[0].device.type, i[0].is_contiguous(memory_format=torch.channels_last), o.dtype)
            )
        )
        return model

    class SpiedLoader(BatchLoader):
        def epoch(self, *args, **kwargs):
            for b in super().epoch(*args, **kwargs):
                pinned.append(all(t.is_pinned() for t in (b.images, b.tokens, b.mask, b.labels)))
                yield b

    monkeypatch.setattr(train_mod, "make_model", spied_model)
    monkeypatch.setattr(train_mod, "BatchLoader", SpiedLoader)
    results = {}
    for amp in ("true", "false"):
        seen.clear()
        pinned.clear()
        result = train_mod.train(
            tiny_recipe(tiny_prepared, *CUDA, f"train.amp={amp}", "train.epochs=2"), tmp_path / f"amp-{amp}"
        )
        assert runs.is_finished(result.run_dir) and len(result.history) == 2
        assert all(np.isfinite([h["loss"], h["loss_v"], h["loss_m"]]).all() for h in result.history), result.history
        assert pinned == [True] * 6  # 24 training images, batch 8, 2 epochs: every training batch page-locked
        dtype = torch.bfloat16 if amp == "true" else torch.float32
        training = [s for s in seen if s[0]]
        scoring = [s for s in seen if not s[0]]
        assert len(training) == 6 and scoring, seen  # 6 steps, then the test images scored
        assert set(training) == {(True, "cuda", True, dtype)} and set(scoring) == {(False, "cuda", True, dtype)}, seen
        results[amp] = result
    amp, fp32 = results["true"], results["false"]
    # the same steps up to bf16 rounding, which grows with every step: epoch losses and test scores
    # close to the fp32 run's (a step that broke under autocast would be far off; tolerances not yet
    # calibrated on a GPU: the one-step test above is the tight one)
    for a, b, rtol in zip(amp.history, fp32.history, (0.05, 0.1), strict=True):
        np.testing.assert_allclose(
            [a["loss"], a["loss_v"], a["loss_m"]], [b["loss"], b["loss_v"], b["loss_m"]], rtol=rtol
        )
    import h5py

    with h5py.File(amp.run_dir / runs.PREDICTIONS) as fa, h5py.File(fp32.run_dir / runs.PREDICTIONS) as fb:
        assert np.array_equal(fa["rows"][()], fb["rows"][()])
        top_a, top_b = fa["topk_scores"][()], fb["topk_scores"][()]
    assert np.abs(top_a - top_b).max() < 0.1, (top_a, top_b)
    # the fp32 CUDA run's checkpoint scores on the CPU as it did on the GPU (cuDNN convolutions may
    # use TF32, ~1e-3 relative: hence not 1e-6)
    from sicot_cli.evaluate import evaluate_run

    again = evaluate_run(fp32.run_dir, device="cpu")
    np.testing.assert_allclose(again.topk_scores, top_b, atol=5e-3, rtol=0)


def test_recorded_scores_are_the_shipped_models_under_amp(tiny_prepared: Path, tmp_path: Path) -> None:
    """train.amp trains under bf16 autocast, but the scores a run records (and evaluate) are float32,
    as predict, serve and export run the model: the same probabilities, not up to 1e-2 apart."""
    from sicot_cli.evaluate import evaluate_run
    from sicot_cli.predict import load_recognizer
    from sicot_cli.train import train

    run = train(tiny_recipe(tiny_prepared, *CUDA, "train.amp=true"), tmp_path / "run").run_dir
    result = evaluate_run(run, device="cuda")
    p = open_prepared(tiny_prepared)
    lo, hi = p.split_range("test")
    images = next(iter(BatchLoader(p, hi - lo, lo, hi, shuffle=False, in_memory=False).epoch(0))).images.numpy()
    probs = load_recognizer(run, device="cuda").probabilities(images)
    order = np.argsort(result.rows)  # the evaluation's rows, in file order
    shipped = np.take_along_axis(probs, result.topk_labels[order], axis=1)
    result.topk_scores = result.topk_scores[order]
    np.testing.assert_allclose(shipped, result.topk_scores, atol=1e-5)
    assert runs.read_summary(run)["final"]["top1"] == pytest.approx(result.metrics["top1"])
