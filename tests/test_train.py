"""The model, the loss, the loop, checkpoints and resume."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_recipe
from torch import nn
from typer.testing import CliRunner

from encoders import create_encoder
from sicot_cli import runs
from sicot_cli.cli import app
from sicot_cli.data.dataset import open_prepared
from sicot_cli.data.loader import BatchLoader
from sicot_cli.errors import SicotError
from sicot_cli.model import SICoT, build_backbone, orthogonal_backward, sicot_loss
from sicot_cli.provenance import package_versions
from sicot_cli.train import TIMING_KEYS, train

runner = CliRunner()


def _toy_model(semantic_norm: str = "none") -> SICoT:
    torch.manual_seed(0)
    visual = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.ReLU())
    enc = create_encoder("mean", vectors=torch.randn(6, 3), out_dim=4)
    return SICoT(visual, 4, 5, enc, semantic_norm=semantic_norm)


def test_loss_is_eq1_by_hand():
    model = _toy_model()
    x = torch.randn(3, 3, 2, 2)
    tokens = torch.tensor([[1, 2, 0], [3, 0, 0], [4, 5, 1]])
    mask = tokens != 0
    y = torch.tensor([0, 3, 4])
    logits_v, logits_m = model(x, tokens, mask)
    loss, _, _ = sicot_loss(logits_v, logits_m, y, lam=0.7)
    # by hand: x_v, s, x_m = max(x_v, s), one classifier W, b, cross-entropy as -log softmax
    x_v = model.visual(x)
    s = model.encoder(tokens, mask)
    x_m = torch.where(x_v > s, x_v, s)
    W, b = model.classifier.weight, model.classifier.bias

    def ce(feat):
        z = feat @ W.T + b
        return -(z.gather(1, y[:, None]).squeeze(1) - torch.log(torch.exp(z).sum(1))).mean()

    assert torch.allclose(loss, ce(x_v) + 0.7 * ce(x_m), atol=1e-6)
    normalized, _, _ = sicot_loss(logits_v, logits_m, y, lam=0.7, normalize=True)
    assert torch.allclose(normalized, (ce(x_v) + 0.7 * ce(x_m)) / 1.7, atol=1e-6)
    # the baseline (no x_m) is not rescaled
    assert torch.allclose(sicot_loss(logits_v, None, y, lam=0.7, normalize=True)[0], ce(x_v), atol=1e-6)


def test_distill_term_by_hand_and_teacher_detached():
    """train.distill: Eq. 1 + beta * T^2 * KL(softmax(z_m/T) || softmax(z_v/T)), z_m a fixed teacher."""
    torch.manual_seed(1)
    z_v = torch.randn(4, 5, requires_grad=True)
    z_m = torch.randn(4, 5, requires_grad=True)
    y = torch.tensor([0, 1, 2, 4])
    plain, _, _ = sicot_loss(z_v, z_m, y, lam=0.7, normalize=True)
    total, _, _ = sicot_loss(z_v, z_m, y, lam=0.7, normalize=True, distill=0.5, temperature=3.0)
    p = torch.softmax(z_m / 3.0, dim=1)
    kl = (p * (torch.log(p) - torch.log_softmax(z_v / 3.0, dim=1))).sum(1).mean() * 9.0
    assert torch.allclose(total, plain + 0.5 * kl, atol=1e-5)
    # the teacher gets no gradient from the distillation term
    (g_plain,) = torch.autograd.grad(plain, z_m)
    (g_total,) = torch.autograd.grad(total, z_m)
    assert torch.allclose(g_plain, g_total)
    # identical scores: nothing to distil; the baseline (no z_m) has no term at all
    same, _, _ = sicot_loss(z_v, z_v.detach().clone(), y, lam=0.7, distill=2.0)
    assert torch.allclose(same, sicot_loss(z_v, z_v.detach().clone(), y, lam=0.7)[0], atol=1e-6)
    assert torch.equal(sicot_loss(z_v, None, y, lam=0.7, distill=2.0)[0], sicot_loss(z_v, None, y, lam=0.7)[0])


def test_distill_trains_co_training_only(tiny_prepared, tmp_path):
    """train.distill changes a co-training run, leaves the baseline bit-identical, waits for cotrain_after."""
    base = train(tiny_recipe(tiny_prepared, "model.encoder=none"), tmp_path / "base")
    base_d = train(tiny_recipe(tiny_prepared, "model.encoder=none", "train.distill=1"), tmp_path / "base_d")
    assert [_image_side(r) for r in base.history] == [_image_side(r) for r in base_d.history]
    co = train(tiny_recipe(tiny_prepared, "model.encoder=mean"), tmp_path / "co")
    co_d = train(tiny_recipe(tiny_prepared, "model.encoder=mean", "train.distill=1"), tmp_path / "co_d")
    assert co_d.history[0]["loss"] != co.history[0]["loss"]
    late = train(
        tiny_recipe(tiny_prepared, "model.encoder=mean", "train.distill=1", "train.cotrain_after=0.5"),
        tmp_path / "late",
    )
    late_plain = train(tiny_recipe(tiny_prepared, "model.encoder=mean", "train.cotrain_after=0.5"), tmp_path / "lp")
    assert _image_side(late.history[0]) == _image_side(base.history[0])  # no teacher in the image-only epoch
    assert late.history[1]["loss_v"] != late_plain.history[1]["loss_v"]  # the teacher from epoch 2 on


@pytest.mark.parametrize(
    "extra", [["train.class_sample_rate=0.5"], ["train.class_sample_rate=0.5", "train.classifier_dtype=bfloat16"]]
)
def test_distill_refused_where_the_step_scores_a_part_of_the_classes(tiny_prepared, extra):
    with pytest.raises(SicotError, match="train.distill needs every class"):
        tiny_recipe(tiny_prepared, "model.encoder=mean", "train.distill=1", *extra)
    tiny_recipe(tiny_prepared, "model.encoder=none", "train.distill=1", *extra)  # the baseline distils nothing


def test_distill_refused_without_co_training(tiny_prepared):
    with pytest.raises(SicotError, match="train.lam = 0 never trains"):
        tiny_recipe(tiny_prepared, "model.encoder=mean", "train.distill=1", "train.lam=0")


def _shared_and_text(model: SICoT) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    shared = [*model.visual.parameters(), *model.classifier.parameters()]
    return shared, [p for p in model.parameters() if all(p is not q for q in shared)]


def test_orthogonal_step_keeps_the_image_step_and_adds_the_rest_by_hand():
    """train.mixed_step = orthogonal: shared grad = g_v + lam (g_m - proj_{g_v} g_m), text grad = lam g_m."""
    model = _toy_model("batchnorm")
    x = torch.randn(6, 3, 2, 2)
    tokens = torch.tensor([[1, 2, 0], [3, 0, 0], [4, 5, 1], [2, 2, 0], [5, 0, 0], [1, 3, 4]])
    y = torch.tensor([0, 3, 4, 1, 2, 0])
    shared, text = _shared_and_text(model)

    def losses():
        z_v, z_m = model(x, tokens, tokens != 0)
        return F.cross_entropy(z_v, y), F.cross_entropy(z_m, y)

    loss_v, loss_m = losses()
    g_v = torch.cat([g.flatten() for g in torch.autograd.grad(loss_v, shared, retain_graph=True)])
    g_m_all = torch.autograd.grad(loss_m, shared + text)
    g_m = torch.cat([g.flatten() for g in g_m_all[: len(shared)]])
    assert abs(float(F.cosine_similarity(g_v, g_m, dim=0))) > 0.05  # a real projection, not a no-op
    expected = g_v + 0.7 * (g_m - (g_m @ g_v) / (g_v @ g_v) * g_v)
    model.zero_grad()
    orthogonal_backward(model, *losses(), lam=0.7)
    got = torch.cat([p.grad.flatten() for p in shared])
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got @ g_v, g_v @ g_v, rtol=1e-5)  # along g_v: exactly the baseline's step
    for p, g in zip(text, g_m_all[len(shared) :], strict=True):
        assert torch.allclose(p.grad, 0.7 * g, atol=1e-7)
    # a title loss whose gradient is the image loss's adds nothing to the shared parameters
    model.zero_grad()
    loss_v, _ = losses()
    orthogonal_backward(model, loss_v, 2 * loss_v, lam=0.5)
    assert torch.allclose(torch.cat([p.grad.flatten() for p in shared]), g_v, atol=1e-6)


def test_orthogonal_step_trains_co_training_only(tiny_prepared, tmp_path):
    """The baseline is bit-identical under it; co-training changes; lam 0 epochs are the plain step."""
    base = train(tiny_recipe(tiny_prepared, "model.encoder=none"), tmp_path / "base")
    orth = ("train.mixed_step=orthogonal", "train.normalize_loss=false")
    base_o = train(tiny_recipe(tiny_prepared, "model.encoder=none", *orth), tmp_path / "base_o")
    assert [_image_side(r) for r in base.history] == [_image_side(r) for r in base_o.history]
    co = train(tiny_recipe(tiny_prepared, "model.encoder=mean", "train.normalize_loss=false"), tmp_path / "co")
    co_o = train(tiny_recipe(tiny_prepared, "model.encoder=mean", *orth), tmp_path / "co_o")
    first = co_o.history[0]  # the logged loss is Eq. 1's sum (lam 1), whatever the step does with it
    assert first["loss"] == pytest.approx(first["loss_v"] + first["loss_m"], rel=1e-5)
    assert _image_side(co_o.history[-1]) != _image_side(co.history[-1])
    late = train(tiny_recipe(tiny_prepared, "model.encoder=mean", *orth, "train.cotrain_after=0.5"), tmp_path / "late")
    assert _image_side(late.history[0]) == _image_side(base.history[0])  # image-only epoch: the plain step


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ([], "set train.normalize_loss = false"),
        (["train.normalize_loss=false", "train.class_sample_rate=0.5"], "whole classifier in one step"),
        (["train.normalize_loss=false", "train.distill=1"], "whole classifier in one step"),
    ],
)
def test_orthogonal_step_refused_where_it_cannot_hold(tiny_prepared, extra, match):
    with pytest.raises(SicotError, match=match):
        tiny_recipe(tiny_prepared, "model.encoder=mean", "train.mixed_step=orthogonal", *extra)
    tiny_recipe(tiny_prepared, "model.encoder=none", "train.mixed_step=orthogonal", *extra)  # the baseline: no x_m


def test_semantic_norm_batch_normalises_the_title_embedding():
    model = _toy_model("batchnorm")
    x, tokens = torch.randn(4, 3, 2, 2), torch.tensor([[1, 2], [3, 0], [4, 5], [2, 2]])
    _, logits_m = model(x, tokens, tokens != 0)
    s = model.encoder(tokens, tokens != 0)
    s_hat = (s - s.mean(0)) / torch.sqrt(s.var(0, unbiased=False) + 1e-5)
    expected = model.classifier(torch.maximum(model.visual(x), s_hat))
    assert torch.allclose(logits_m, expected, atol=1e-5)


def test_classifier_is_shared_and_gets_both_gradients():
    model = _toy_model()
    assert sum(1 for n, _ in model.named_parameters() if n.startswith("classifier")) == 2  # one weight, one bias
    x, tokens, y = torch.randn(4, 3, 2, 2), torch.tensor([[1, 2], [3, 0], [4, 5], [2, 2]]), torch.tensor([0, 1, 2, 3])
    grads = []
    for term in ("v", "m"):
        model.zero_grad()
        lv, lm = model(x, tokens, tokens != 0)
        (F.cross_entropy(lv, y) if term == "v" else F.cross_entropy(lm, y)).backward()
        grads.append(model.classifier.weight.grad.clone())
    model.zero_grad()
    lv, lm = model(x, tokens, tokens != 0)
    sicot_loss(lv, lm, y, 1.0)[0].backward()
    assert grads[1].abs().sum() > 0
    assert torch.allclose(model.classifier.weight.grad, grads[0] + grads[1], atol=1e-6)


def test_mixed_loss_can_leave_the_classifier_to_the_image_loss():
    model = _toy_model()
    x, tokens, y = torch.randn(4, 3, 2, 2), torch.tensor([[1, 2], [3, 0], [4, 5], [2, 2]]), torch.tensor([0, 1, 2, 3])
    lv, _ = model(x, tokens, tokens != 0)
    F.cross_entropy(lv, y).backward()
    image_only = {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith("classifier")}
    model.zero_grad()
    model.mixed_trains_classifier = False
    lv, lm = model(x, tokens, tokens != 0)
    lv_ref, lm_ref = _toy_model()(x, tokens, tokens != 0)
    assert torch.allclose(lm, lm_ref) and torch.allclose(lv, lv_ref)  # same scores, other gradients
    sicot_loss(lv, lm, y, 1.0)[0].backward()
    for n, g in image_only.items():
        assert torch.allclose(dict(model.named_parameters())[n].grad, g, atol=1e-7), n
    assert model.encoder.proj.weight.grad.abs().sum() > 0  # the text stream still learns from CE(x_m)


def test_backbone_head_is_removed():
    net, dim = build_backbone("resnet18")
    assert dim == 512 and isinstance(net.fc, nn.Identity)
    net, dim = build_backbone("mobilenet_v3_small")
    assert dim == 1024
    with pytest.raises(SicotError, match="not a torchvision classification model"):
        build_backbone("resnet9000")


def test_missing_pretrained_weights_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(SicotError, match=r"ImageNet weights for resnet18 not found at .*never downloads"):
        build_backbone("resnet18", "imagenet")
    with pytest.raises(SicotError, match="model.pretrained: .*nope.pt not found"):
        build_backbone("resnet18", str(tmp_path / "nope.pt"))


def test_pretrained_from_local_file(tmp_path):
    net, _ = build_backbone("resnet18")
    torch.save(net.state_dict(), tmp_path / "w.pt")
    other, _ = build_backbone("resnet18", str(tmp_path / "w.pt"))
    assert torch.equal(other.conv1.weight, net.conv1.weight)


@pytest.mark.parametrize("in_memory", [True, False])
def test_loader_orders_are_permutations_and_seeded(tiny_prepared, in_memory):
    p = open_prepared(tiny_prepared)

    def mk(seed: int) -> BatchLoader:
        return BatchLoader(
            p, 5, 0, p.n_train, shuffle=True, seed=seed, in_memory=in_memory, block_rows=7, shuffle_blocks=2
        )

    a = mk(0)
    rows0 = np.concatenate([b.rows for b in a.epoch(0)])
    assert sorted(rows0) == list(range(p.n_train))
    assert np.array_equal(rows0, np.concatenate([b.rows for b in mk(0).epoch(0)]))
    assert not np.array_equal(rows0, np.concatenate([b.rows for b in a.epoch(1)]))
    assert not np.array_equal(rows0, np.concatenate([b.rows for b in mk(1).epoch(0)]))
    b = next(a.epoch(0))
    with __import__("h5py").File(tiny_prepared) as f:
        assert np.array_equal(b.images.numpy(), f["images"][np.sort(b.rows)][np.argsort(np.argsort(b.rows))])
    assert np.array_equal(b.labels.numpy(), p.labels[b.rows])
    assert b.mask.shape == b.tokens.shape and (b.tokens[~b.mask] == 0).all()
    skipped = np.concatenate([x.rows for x in a.epoch(0, skip=2)])
    assert np.array_equal(skipped, rows0[10:])


@pytest.mark.parametrize(("block_rows", "shuffle_blocks"), [(1, 1), (2, 1), (3, 2), (4, 1)])
def test_a_streamed_batch_spanning_more_blocks_than_the_cache_keeps_is_read(tiny_prepared, block_rows, shuffle_blocks):
    """A batch of 8 over blocks of 1-4 rows spans more blocks than 2 x shuffle_blocks: one was evicted
    before it was read, and the KeyError was reported as a damaged file ("rebuild it --force")."""
    p = open_prepared(tiny_prepared)
    kw = {"shuffle": True, "seed": 0, "block_rows": block_rows, "shuffle_blocks": shuffle_blocks}
    streamed = list(BatchLoader(p, 8, 0, p.n_train, in_memory=False, **kw).epoch(0))
    with __import__("h5py").File(tiny_prepared) as f:
        images = f["images"][: p.n_train]
    assert sorted(np.concatenate([b.rows for b in streamed]).tolist()) == list(range(p.n_train))
    for b in streamed:
        assert np.array_equal(b.images.numpy(), images[b.rows])


def test_a_finite_but_exploding_loss_is_warned(tiny_prepared, tmp_path, monkeypatch, caplog):
    """lr 100 gave a loss of 1.8e14 (8 classes: a guess is 2.1) and a run that finished like any other."""
    import sicot_cli.train as train_mod

    monkeypatch.setattr(train_mod, "LOSS_ALARM", 1e-6)  # every loss is "exploding" here: the check is wired
    train_mod.train(tiny_recipe(tiny_prepared, "model.encoder=none", "train.epochs=1"), tmp_path / "run")
    assert (
        "epoch 1: loss" in caplog.text and "times a guess's (ln 3 classes = 1.10): the run is diverging" in caplog.text
    )


def test_lambda_zero_cotraining_steps_like_the_baseline(tiny_prepared, tmp_path):
    base = train(tiny_recipe(tiny_prepared, "model.encoder=none"), tmp_path / "base")
    co = train(tiny_recipe(tiny_prepared, "model.encoder=mean", "train.lam=0"), tmp_path / "co")
    sb = runs.load_checkpoint(base.run_dir / runs.LAST)["model"]
    sc = runs.load_checkpoint(co.run_dir / runs.LAST)["model"]
    shared = [k for k in sb]
    assert shared and all(k in sc for k in shared)
    for k in shared:
        assert torch.equal(sb[k], sc[k]), k

    assert [_image_side(r) for r in base.history] == [_image_side(r) for r in co.history]


def _image_side(record: dict) -> dict:
    """An epoch record without timings and without what only co-training has (its loss, CE(x_m), lambda)."""
    return {k: v for k, v in record.items() if k not in (*TIMING_KEYS, "loss", "loss_m", "lam")}


def test_cotrain_after_trains_image_only_first(tiny_prepared, tmp_path):
    """train.cotrain_after = 0.5 of 2 epochs: epoch 1 is the baseline's epoch 1 exactly, epoch 2 co-trains."""
    base = train(tiny_recipe(tiny_prepared, "model.encoder=none"), tmp_path / "base")
    late = train(tiny_recipe(tiny_prepared, "model.encoder=mean", "train.cotrain_after=0.5"), tmp_path / "late")
    assert [r["lam"] for r in late.history] == [0.0, 1.0] and base.history[0]["lam"] is None
    assert _image_side(late.history[0]) == _image_side(base.history[0])
    assert late.history[1]["loss_v"] != base.history[1]["loss_v"]  # from epoch 2 on, CE(x_m) moves the weights
    sb = runs.load_checkpoint(base.run_dir / runs.LAST)["model"]
    sl = runs.load_checkpoint(late.run_dir / runs.LAST)["model"]
    assert not all(torch.equal(sb[k], sl[k]) for k in sb)


def test_resume_after_interrupt_reproduces_the_run(tiny_prepared, tmp_path):
    # epoch 1 image-only (train.cotrain_after), so the cut at epoch 2 resumes into co-training
    recipe = tiny_recipe(tiny_prepared, "model.encoder=bilinear", "train.epochs=3", "train.cotrain_after=0.34")
    full = train(recipe, tmp_path / "full")
    assert [r["lam"] for r in full.history] == [0.0, 1.0, 1.0]

    for stop_at in [(1, 0), (1, 2)]:  # at the start of epoch 2, and in its middle

        def hook(epoch, batch, stop_at=stop_at):
            if (epoch, batch) == stop_at:
                raise KeyboardInterrupt

        run_dir = tmp_path / f"cut{stop_at[1]}"
        cut = train(recipe, run_dir, hook=hook)
        assert cut.interrupted and len(cut.history) == 1
        assert not (run_dir / runs.SUMMARY).exists()
        with pytest.raises(SicotError, match="run directory exists"):
            train(recipe, run_dir)
        resumed = train(recipe, run_dir, resume=True)
        strip = lambda h: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in h]  # noqa: E731
        assert strip(resumed.history) == strip(full.history)
        assert strip(runs.read_metrics(run_dir)) == strip(runs.read_metrics(full.run_dir))
        a = runs.load_checkpoint(run_dir / runs.LAST)["model"]
        b = runs.load_checkpoint(full.run_dir / runs.LAST)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)
    again = train(recipe, tmp_path / "full", resume=True)
    assert again.skipped


def test_more_epochs_on_resume_say_where_the_schedules_move(tiny_prepared, tmp_path, monkeypatch):
    """train.cotrain_after / drw_start are fractions of train.epochs: --allow-changes train.epochs=N
    re-draws them over N for the epochs still to train, and says so (co-training switched off again)."""

    def stop(epoch, batch):
        if (epoch, batch) == (1, 0):
            raise KeyboardInterrupt

    extra = (
        "model.encoder=mean",
        "train.epochs=2",
        "train.cotrain_after=0.5",
        "train.reweight=drw",
        "train.drw_start=0.5",
    )
    run_dir = train(tiny_recipe(tiny_prepared, *extra), tmp_path / "run", hook=stop).run_dir
    args = ["train", "--resume", "--allow-changes", "--run-dir", str(run_dir), "train.epochs=4"]
    r = runner.invoke(app, args)
    flat = " ".join(r.output.split())
    assert r.exit_code == 0, flat
    for key, what in (("train.cotrain_after", "co-training"), ("train.drw_start", "re-weighting")):
        assert (
            f"train.epochs 2 -> 4 moves {key}'s start of {what} from epoch 2 to epoch 3; the 1 epoch(s) trained keep "
            f"the schedule they had (epoch 2 trains without {what} again)"
        ) in flat
    assert [m["lam"] for m in runs.read_metrics(run_dir)] == [0.0, 0.0, 1.0, 1.0]  # what the line said
    assert "progressive sampler" not in flat
    from sicot_cli import resume

    old, new = (tiny_recipe(tiny_prepared, "train.sampler=progressive", f"train.epochs={n}") for n in (2, 6))
    seen: list[str] = []
    monkeypatch.setattr(resume.log, "warning", lambda msg, *args: seen.append(msg % args))
    resume._warn_moved_schedules(run_dir, old, new)
    assert seen == [
        f"{run_dir}: train.epochs 2 -> 6 stretches the progressive sampler: epoch t now draws at t/6 of the way to "
        "class-balanced (the 4 epoch(s) trained drew at t/2)"
    ]


def test_changed_dataset_is_refused(tiny_prepared, tmp_path):
    from conftest import KEEP_ALL, make_manifest

    from sicot_cli.config import load_recipe
    from sicot_cli.data.prepare import prepare
    from sicot_cli.evaluate import evaluate_run

    result = train(tiny_recipe(tiny_prepared, "model.encoder=none", "train.epochs=1"), tmp_path / "r")
    m = make_manifest(tmp_path / "raw2", per_class=6)
    other = tmp_path / "other.h5"
    prepare(
        load_recipe(
            None, ["data.source=manifest", f"data.manifest={m}", "data.image_size=16", *KEEP_ALL, "text.min_count=2"]
        ),
        other,
    )
    with pytest.raises(SicotError, match="trained on a dataset with .* use the dataset the run was trained on"):
        evaluate_run(result.run_dir, data=other)


def test_cli_train_evaluate_predict_export(tiny_prepared, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "train",
        "--encoder",
        "bilinear",
        "--data",
        str(tiny_prepared),
        "--run-dir",
        str(run_dir),
        "model.backbone=mobilenet_v3_small",
        "train.batch_size=8",
        "train.epochs=4",
        "train.lr=0.005",
        "train.device=cpu",
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    history = runs.read_metrics(run_dir)
    assert len(history) == 4
    assert history[-1]["loss"] < history[0]["loss"]
    for key in ("epoch", "lr", "loss", "loss_v", "loss_m", "train_images_per_s", "epoch_seconds"):
        assert key in history[-1], key
    # 8 training images per class spare none for validation (floor(0.1 * 8) = 0): no per-epoch
    # scores at all, and the test split is scored once at the end.
    assert not any(k.startswith("val_") or k == "top1" for k in history[-1])
    final = runs.read_summary(run_dir)["final"]
    for key in ("top1", "top3", "head_top1", "tail_top1", "many_top1", "medium_top1", "few_top1", "n_test"):
        assert key in final, key
    assert (
        final["split"],
        final["checkpoint"],
        final["checkpoint_epoch"],
        final["test_images"],
        final["val_images"],
    ) == ("test", "last", 4, 6, 0)
    assert "test split (6 images), checkpoint last (epoch 4, no selection)" in " ".join(r.output.split())
    assert history[1]["lr"] == pytest.approx(0.005 * 0.8)
    config = json.loads((run_dir / "config.json").read_text())
    assert (
        config["encoder"] == "bilinear"
        and config["recipe"]["train"]["epochs"] == 4
        and config["versions"] == package_versions()
    )
    for name in ("checkpoint-last.pt", "predictions.h5", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "checkpoint-best.pt").exists()  # nothing to choose it on
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "run directory exists" in r.output
    r = runner.invoke(app, ["evaluate", "--run", str(run_dir), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["top1"] == pytest.approx(final["top1"])
    assert (json.loads(r.output)["split"], json.loads(r.output)["n_images"]) == ("test", 6)
    r = runner.invoke(app, ["evaluate", "--run", str(run_dir), "--split", "val"])
    assert (
        r.exit_code == 2
        and "has no val rows" in r.output
        and "score --split test, or its data.val_fraction = 0.1 spared none" in " ".join(r.output.split())
    )
    r = runner.invoke(app, ["evaluate", "--run", str(run_dir), "--checkpoint", "best"])
    assert r.exit_code == 2 and "its data has no validation rows" in r.output and "use --checkpoint last" in r.output
    config["recipe"]["train"]["keep_best"] = False  # what the message says when the run kept no best
    (run_dir / "config.json").write_text(json.dumps(config))
    r = runner.invoke(app, ["export", "--run", str(run_dir), "--out", str(tmp_path / "b.pt"), "--checkpoint", "best"])
    assert r.exit_code == 2 and "train.keep_best = false, which keeps only checkpoint-last.pt" in r.output, r.output
    img = tiny_prepared.parent / "raw" / "cat3.png"
    r = runner.invoke(app, ["predict", "--run", str(run_dir), "--json", "-k", "2", str(img)])
    assert r.exit_code == 0, r.output
    top = json.loads(r.output)[0]["top"]
    assert len(top) == 2 and top[0]["score"] >= top[1]["score"] and top[0]["title"]
    out = tmp_path / "m.pt"
    r = runner.invoke(app, ["export", "--run", str(run_dir), "--out", str(out)])
    assert r.exit_code == 0, r.output
    scripted = torch.jit.load(str(out))
    probs = scripted(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(1), torch.ones(2))
    r = runner.invoke(app, ["evaluate", "--run", str(tmp_path)])
    assert r.exit_code == 2 and "not a run directory" in r.output


def test_pretrained_from_a_sicot_run(tiny_prepared, tmp_path):
    """model.pretrained = a run directory (or its checkpoint): its visual stream, not its classifier or text stream."""
    recipe = tiny_recipe(tiny_prepared)
    recipe.model.encoder = "none"
    train(recipe, tmp_path / "pre", data=tiny_prepared)
    state = runs.load_checkpoint(tmp_path / "pre" / runs.LAST)["model"]
    visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    for source in (tmp_path / "pre", tmp_path / "pre" / runs.LAST):
        net, _ = build_backbone(recipe.model.backbone, str(source))
        mine = net.state_dict()
        assert len(visual) > 100 and set(visual) <= set(mine)
        assert all(torch.equal(mine[k], v) for k, v in visual.items())
    fresh = build_backbone(recipe.model.backbone)[0].state_dict()
    assert not all(torch.equal(fresh[k], v) for k, v in visual.items())
    # a run fine-tuned from it starts from those weights and records where they came from
    recipe.model.encoder = "mean"
    recipe.model.pretrained = str(tmp_path / "pre")
    recipe.train.epochs = 1
    train(recipe, tmp_path / "fine", data=tiny_prepared)
    assert runs.read_config(tmp_path / "fine")["recipe"]["model"]["pretrained"] == str(tmp_path / "pre")


def test_pretrained_run_refusals(tiny_prepared, tmp_path):
    recipe = tiny_recipe(tiny_prepared)
    backbone = recipe.model.backbone
    (tmp_path / "folder").mkdir()
    with pytest.raises(SicotError, match=r"folder is a folder but not a sicot run directory"):
        build_backbone(backbone, str(tmp_path / "folder"))
    recipe.model.encoder = "none"
    train(recipe, tmp_path / "pre", data=tiny_prepared)
    other = "resnet18"
    with pytest.raises(SicotError, match=rf"holds a {backbone} visual stream, model.backbone is {other}"):
        build_backbone(other, str(tmp_path / "pre"))
    (tmp_path / "pre" / runs.SUMMARY).unlink()  # as if interrupted
    with pytest.raises(SicotError, match=r"has not finished .*sicot train --resume"):
        build_backbone(backbone, str(tmp_path / "pre"))
    damaged = tmp_path / "pre" / runs.LAST
    damaged.write_bytes(damaged.read_bytes()[:-10])
    with pytest.raises(SicotError, match="corrupt checkpoint"):
        build_backbone(backbone, str(damaged))


def test_distill_refused_when_the_classifier_is_sharded(tiny_prepared, tmp_path, monkeypatch):
    """Sharding is decided when the run starts (torchrun, many classes): refused there, before a run directory."""
    import sicot_cli.train as train_module

    monkeypatch.setattr(train_module, "use_sharding", lambda *a: True)
    with pytest.raises(SicotError, match="shards the classifier"):
        train(tiny_recipe(tiny_prepared, "model.encoder=mean", "train.distill=1"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # the baseline of the same ablation is not refused (it gets past the check, then fails for want of ranks)
    with pytest.raises(Exception) as caught:
        train(tiny_recipe(tiny_prepared, "model.encoder=none", "train.distill=1"), tmp_path / "base")
    assert "shards the classifier" not in str(caught.value)


def test_a_run_continues_only_on_the_data_it_started_with(tmp_path):
    """Resume refuses a prepared file that holds other data than the run started on (a baseline: other
    labels or splits only); evaluate refuses another image size; an unfinished run is named as such."""
    from conftest import KEEP_ALL, make_manifest

    from sicot_cli.config import load_recipe
    from sicot_cli.data.prepare import prepare

    m = make_manifest(tmp_path / "raw", per_class=10)
    data = tmp_path / "d.h5"
    base = ["data.source=manifest", f"data.manifest={m}", "data.image_size=16", *KEEP_ALL]
    prepare(load_recipe(None, base), data)
    base_run = train(tiny_recipe(data, "model.encoder=none", "train.epochs=2"), tmp_path / "base").run_dir
    text_run = train(tiny_recipe(data, "model.encoder=mean", "train.epochs=2"), tmp_path / "text").run_dir
    sums = json.loads((text_run / runs.CONFIG).read_text())["content"]
    assert sums == {"data": open_prepared(data).data_checksum(), "labels": open_prepared(data).data_checksum(False)}
    for run in (base_run, text_run):
        (run / runs.SUMMARY).unlink()  # as if killed before its end
    r = runner.invoke(app, ["evaluate", "--run", str(text_run)])
    assert r.exit_code == 0 and "unfinished (2 of 2 epochs trained): its last checkpoint is used" in r.output
    prepare(load_recipe(None, [*base, "embed.seed=1"]), data, force=True)  # same classes and words, other vectors
    r = runner.invoke(app, ["train", "--resume", "--run-dir", str(text_run)])
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and "d.h5 holds other data than the run started on (embed.seed: 0 -> 1)" in flat
    assert "a run continues on the data it started with" in flat and "--run-dir NEW_DIR" in flat
    # a baseline reads no title or vector: it continues (the copy-the-baselines workflow)
    assert runner.invoke(app, ["train", "--resume", "--run-dir", str(base_run)]).exit_code == 0
    # ... but it reads the images: one replaced in place and prepared again is other data
    (base_run / runs.SUMMARY).unlink()
    from conftest import write_image

    write_image(m.parent / "cat4.png", seed=999, channel=0)
    prepare(load_recipe(None, [*base, "embed.seed=1"]), data, force=True)
    r = runner.invoke(app, ["train", "--resume", "--run-dir", str(base_run)])
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and "(the same settings: the source's images or titles changed)" in flat, flat
    # the same data under another name (format 2: another shard folder) is the same data
    jpeg = [*base, "data.images=jpeg", "data.shard_rows=7"]
    prepare(load_recipe(None, jpeg), tmp_path / "a.h5")
    prepare(load_recipe(None, jpeg), tmp_path / "b.h5")
    run = train(tiny_recipe(tmp_path / "a.h5", "model.encoder=mean", "train.epochs=1"), tmp_path / "j").run_dir
    (run / runs.SUMMARY).unlink()
    r = runner.invoke(app, ["train", "--resume", "--run-dir", str(run), "--data", str(tmp_path / "b.h5")])
    assert r.exit_code == 0, r.output
    # same classes and vocabulary at another size: refused wherever a run meets a --data
    big = tmp_path / "d24.h5"
    prepare(load_recipe(None, [*base, "data.image_size=24"]), big)
    r = runner.invoke(app, ["evaluate", "--run", str(base_run), "--data", str(big)])
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and "trained on 16 px images, but" in flat and "d24.h5 holds 24 px images" in flat


def test_resume_with_allowed_changes_trains_with_the_new_optimiser_settings(tiny_prepared, tmp_path):
    """--allow-changes train.lr / momentum / weight_decay / step_size / gamma: the loaded optimiser and
    StepLR state took the old values back; the rest of the run follows the recipe as it now stands."""

    def stop(epoch, batch):
        if (epoch, batch) == (1, 0):
            raise KeyboardInterrupt

    recipe = tiny_recipe(tiny_prepared, "model.encoder=none", "train.epochs=3")
    run_dir = tmp_path / "run"
    assert train(recipe, run_dir, hook=stop).interrupted
    new = ["train.lr=0.02", "train.gamma=0.5", "train.momentum=0.5", "train.weight_decay=0.001"]
    r = runner.invoke(app, ["train", "--resume", "--allow-changes", "--run-dir", str(run_dir), *new])
    assert r.exit_code == 0, r.output
    lrs = [m["lr"] for m in runs.read_metrics(run_dir)]
    assert lrs == pytest.approx([0.005, 0.02 * 0.5, 0.02 * 0.25])  # the new schedule at epochs 2 and 3
    group = runs.load_checkpoint(run_dir / runs.LAST)["optimizer"]["param_groups"][0]
    assert (group["momentum"], group["weight_decay"], group["initial_lr"]) == (0.5, 0.001, 0.02)
    # step_size: the new one counts from the run's start (epoch 3 of step_size 2 is still in the first step)
    run_dir = tmp_path / "step"
    assert train(recipe, run_dir, hook=stop).interrupted
    r = runner.invoke(app, ["train", "--resume", "--allow-changes", "--run-dir", str(run_dir), "train.step_size=2"])
    assert r.exit_code == 0, r.output
    assert [m["lr"] for m in runs.read_metrics(run_dir)] == pytest.approx([0.005, 0.005, 0.005 * 0.8])


def test_a_run_folder_removed_and_made_again_while_training_stops_the_run(tiny_prepared, tmp_path):
    """`rm -rf RUN` and a second `train` into the same path while the first trained: both wrote by
    path into the new folder (epochs 1 1 2 2 ..., one config, the other's checkpoints), both exit 0."""
    run_dir = tmp_path / "run"

    def replace(epoch, batch):
        if (epoch, batch) == (1, 0):
            shutil.rmtree(run_dir)
            run_dir.mkdir()
            (run_dir / "config.json").write_text("{}")  # another run's

    with pytest.raises(SicotError, match=r"run: removed or replaced while this run was writing it: stopped"):
        train(tiny_recipe(tiny_prepared, "model.encoder=none", "train.epochs=2"), run_dir, hook=replace)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]  # nothing written into the other's


def test_a_prepared_file_replaced_while_training_stops_the_run(tiny_prepared, tmp_path):
    """`prepare --force` onto the file a run trains on: the next validation (or the test scoring)
    read the new file's images against the old file's labels, silently, and the run exited 0."""
    data = tmp_path / "d.h5"
    shutil.copy(tiny_prepared, data)

    def replace(epoch, batch):
        if (epoch, batch) == (1, 0):
            other = tmp_path / "other.h5"
            shutil.copy(tiny_prepared, other)
            os.replace(other, data)  # as prepare --force renames its finished file over the old one

    with pytest.raises(SicotError, match=r"d.h5: replaced or changed since this run opened it"):
        train(tiny_recipe(data, "model.encoder=none", "train.epochs=2"), tmp_path / "run", data=data, hook=replace)
    assert not (tmp_path / "run" / runs.SUMMARY).exists()


def test_a_run_recorded_before_pixel_checksums_resumes_on_the_same_data(tiny_prepared, tmp_path, caplog):
    """A run whose config.json holds the checksum an earlier sicot computed (no pixels) met the same
    data prepared again by this version and was refused: "the source's images or titles changed"."""
    import logging

    def stop(epoch, batch):
        if (epoch, batch) == (1, 0):
            raise KeyboardInterrupt

    recipe = tiny_recipe(tiny_prepared, "model.encoder=mean", "train.epochs=2")
    run_dir = train(recipe, tmp_path / "run", hook=stop).run_dir
    p = open_prepared(tiny_prepared)
    config = json.loads((run_dir / runs.CONFIG).read_text())
    config["content"] = {
        "data": p.checksum_without_pixels(),
        "labels": p.checksum_without_pixels(False),
    }  # as recorded before
    assert config["content"]["data"] != p.data_checksum()
    (run_dir / runs.CONFIG).write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        result = train(recipe, run_dir, resume=True)
    assert len(result.history) == 2 and "recorded before data checksums covered the images" in caplog.text
