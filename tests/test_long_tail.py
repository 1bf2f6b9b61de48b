"""The long-tail toolbox: losses, samplers, second stages and the methods grid, against hand computations."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_recipe
from typer.testing import CliRunner

from sicot_cli import methods, runs
from sicot_cli.config import TrainConfig
from sicot_cli.errors import SicotError
from sicot_cli.losses import criterion, drw_weights, ldam_margins

COUNTS = np.array([100, 30, 10, 3, 1])


def _case(seed: int = 0, n: int = 12, c: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 3, torch.randint(0, c, (n,), generator=g)


# --- losses ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_logit_adjusted_loss_is_cross_entropy_on_shifted_logits(tau: float) -> None:
    z, y = _case()
    got = criterion(TrainConfig(loss="logit_adjusted", loss_tau=tau), COUNTS, 0)(z, y)
    prior = torch.tensor(COUNTS / COUNTS.sum(), dtype=torch.float32)
    torch.testing.assert_close(got, F.cross_entropy(z + tau * prior.log(), y))


def test_balanced_softmax_is_the_count_weighted_softmax() -> None:
    z, y = _case(1)
    got = criterion(TrainConfig(loss="balanced_softmax"), COUNTS, 0)(z, y)
    # Ren et al.: p_y = n_y exp(z_y) / sum_j n_j exp(z_j)
    n = torch.tensor(COUNTS, dtype=torch.float32)
    p = n * z.exp() / (n * z.exp()).sum(1, keepdim=True)
    torch.testing.assert_close(got, -p[torch.arange(len(y)), y].log().mean())
    torch.testing.assert_close(got, criterion(TrainConfig(loss="logit_adjusted", loss_tau=1.0), COUNTS, 0)(z, y))


def test_ldam_margins_per_class_and_loss() -> None:
    m = ldam_margins(COUNTS, 0.5)
    np.testing.assert_allclose(m, 0.5 * (1 / COUNTS**0.25) / (1 / 1**0.25))
    assert m.argmax() == 4 and m[4] == pytest.approx(0.5) and m[0] == pytest.approx(0.5 / 100**0.25)
    z, y = _case(2)
    got = criterion(TrainConfig(loss="ldam", ldam_max_margin=0.5), COUNTS, 0)(z, y)
    shifted = z.clone()
    for i, label in enumerate(y.tolist()):
        shifted[i, label] -= float(m[label])
    torch.testing.assert_close(got, F.cross_entropy(shifted, y))


def test_deferred_reweighting_starts_at_its_epoch_and_weights_rows_by_class() -> None:
    cfg = TrainConfig(loss="ldam", reweight="drw", drw_start=0.5, epochs=4, drw_beta=0.999)
    assert criterion(cfg, COUNTS, 1).weight is None
    w = drw_weights(COUNTS, 0.999)
    expected = (1 - 0.999) / (1 - 0.999 ** COUNTS.astype(float))
    np.testing.assert_allclose(w, expected / expected.sum() * len(COUNTS))
    crit = criterion(cfg, COUNTS, 2)
    z, y = _case(3)
    shifted = z - F.one_hot(y, 5) * torch.tensor(ldam_margins(COUNTS, 0.5), dtype=torch.float32)
    torch.testing.assert_close(crit(z, y), F.cross_entropy(shifted, y, weight=torch.tensor(w, dtype=torch.float32)))


@pytest.mark.parametrize("loss", ["logit_adjusted", "balanced_softmax", "ldam"])
def test_offsets_on_a_subset_of_columns_are_those_of_all_columns(loss: str) -> None:
    """What a classifier shard (or a class sample) scores: its columns get exactly their classes' terms."""
    z, y = _case(4, n=20)
    crit = criterion(TrainConfig(loss=loss, reweight="drw", drw_start=0.0), COUNTS, 0)
    full = crit.adjust(z, y)
    cols = torch.tensor([1, 3, 4])
    column = torch.full((5,), -1)
    column[cols] = torch.arange(3)
    local = column[y]  # -1: the true class is on another shard
    part = crit.adjust(z[:, cols], local, cols)
    here = local >= 0
    torch.testing.assert_close(part[here], full[here][:, cols])
    if crit.offset is not None:  # rows whose class is elsewhere get the offsets but no margin
        torch.testing.assert_close(part[~here], z[~here][:, cols] + crit.offset[cols])


@pytest.mark.parametrize("loss", ["logit_adjusted", "ldam"])
def test_eq1_with_a_long_tail_loss_sampled_at_rate_one_equals_the_full_loss(loss: str) -> None:
    from sicot_cli.classifier_step import eq1_from_streams
    from sicot_cli.distributed import DistContext
    from sicot_cli.model import sicot_loss

    torch.manual_seed(0)
    clf = torch.nn.Linear(4, 5)
    model = torch.nn.Module()
    model.classifier = clf
    x_v, x_m = torch.randn(8, 4), torch.randn(8, 4)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 0, 1])
    crit = criterion(TrainConfig(loss=loss, reweight="drw", drw_start=0.0), COUNTS, 0)
    args = (model, x_v, x_m, y, 8, 0.7, True, DistContext(), False)
    exact = eq1_from_streams(*args, 1.0, torch.Generator(), crit)[0]
    ref = sicot_loss(clf(x_v), clf(x_m), y, 0.7, True, crit)[0]
    torch.testing.assert_close(exact, ref)
    # a sample that happens to hold every class (the labels cover all 5): the same loss
    sampled = eq1_from_streams(*args, 0.5, torch.Generator().manual_seed(1), crit)[0]
    torch.testing.assert_close(sampled, ref)


# --- samplers ----------------------------------------------------------------------------------


def test_class_probabilities_follow_their_formulas() -> None:
    from sicot_cli.data.sampler import class_probabilities

    c = np.array([90, 9, 1, 0])
    np.testing.assert_allclose(class_probabilities("instance", c), c / 100)
    np.testing.assert_allclose(class_probabilities("class_balanced", c), [1 / 3, 1 / 3, 1 / 3, 0])
    np.testing.assert_allclose(class_probabilities("sqrt", c), np.sqrt(c) / np.sqrt(c).sum())
    # progressive, epoch 1 of 4: (1 - 1/4) n_j/n + (1/4) / C
    np.testing.assert_allclose(
        class_probabilities("progressive", c, 1, 4), 0.75 * c / 100 + 0.25 * np.array([1, 1, 1, 0]) / 3
    )
    np.testing.assert_allclose(class_probabilities("progressive", c, 0, 4), c / 100)


@pytest.mark.parametrize("kind", ["class_balanced", "sqrt", "progressive"])
def test_an_epoch_draws_classes_at_the_formula_frequencies(kind: str) -> None:
    from sicot_cli.data.sampler import class_probabilities, draw_rows

    counts = np.array([4000, 1500, 300, 150, 40, 10])
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(6), counts))
    rows = draw_rows(kind, labels, 6, np.random.default_rng(1), epoch=2, epochs=5)
    assert len(rows) == len(labels) and rows.min() >= 0 and rows.max() < len(labels)
    got = np.bincount(labels[rows], minlength=6)
    expected = len(labels) * class_probabilities(kind, counts, 2, 5)
    sd = np.sqrt(expected * (1 - expected / len(labels)))
    assert np.all(np.abs(got - expected) < 5 * sd), (got, expected)
    # within a class, the rows are drawn uniformly: every row of the rarest class is drawn
    assert set(rows[labels[rows] == 5]) == set(np.flatnonzero(labels == 5))


def test_streamed_class_balanced_epoch_reads_each_block_once(tiny_prepared: Path) -> None:
    from sicot_cli.data.dataset import open_prepared
    from sicot_cli.data.loader import BatchLoader

    p = open_prepared(tiny_prepared)
    kw = {"shuffle": True, "seed": 3, "sampler": "class_balanced", "block_rows": 4, "shuffle_blocks": 2}
    ram = BatchLoader(p, 5, 0, p.n_train, in_memory=True, **kw).order(1)
    stream_loader = BatchLoader(p, 5, 0, p.n_train, in_memory=False, **kw)
    stream = stream_loader.order(1)
    assert sorted(ram) == sorted(stream) and len(stream) == p.n_train  # the same drawn rows
    groups = (stream // 4).tolist()
    reads = []
    real = stream_loader._stream

    def counting(plan):  # noqa: ANN001, ANN202
        import h5py

        orig = h5py.Dataset.__getitem__

        def get(self, key):  # noqa: ANN001, ANN202
            reads.append(key)
            return orig(self, key)

        h5py.Dataset.__getitem__ = get
        try:
            yield from real(plan)
        finally:
            h5py.Dataset.__getitem__ = orig

    stream_loader._stream = counting
    batches = list(stream_loader.epoch(1))
    assert np.array_equal(np.concatenate([b.rows for b in batches]), stream)
    assert all(isinstance(k, slice) for k in reads)  # contiguous slices only
    assert len(reads) == len(set(groups))  # each block read once


def test_class_balanced_training_resumes_exactly_mid_epoch(tiny_prepared: Path, tmp_path: Path) -> None:
    from sicot_cli.train import TIMING_KEYS, train

    recipe = tiny_recipe(tiny_prepared, "model.encoder=mean", "train.epochs=2", "train.sampler=class_balanced")
    full = train(recipe, tmp_path / "full")

    def hook(epoch: int, batch: int) -> None:
        if (epoch, batch) == (1, 1):
            raise KeyboardInterrupt

    cut = train(recipe, tmp_path / "cut", hook=hook)
    assert cut.interrupted
    resumed = train(recipe, tmp_path / "cut", resume=True)
    strip = lambda h: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)
    a = runs.load_checkpoint(tmp_path / "cut" / runs.LAST)["model"]
    b = runs.load_checkpoint(full.run_dir / runs.LAST)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- second stages -----------------------------------------------------------------------------


def test_tau_norm_and_posthoc_adjustment_follow_their_formulas() -> None:
    from sicot_cli.decouple import adjusted_classifier

    torch.manual_seed(0)
    w, b = torch.randn(5, 3), torch.randn(5)
    wt, bt = adjusted_classifier("tau_norm", w, b, 0.7, COUNTS)
    torch.testing.assert_close(wt, w / w.norm(dim=1, keepdim=True) ** 0.7)
    assert torch.equal(bt, torch.zeros(5))
    wl, bl = adjusted_classifier("logit_adjust", w, b, 1.5, COUNTS)
    assert torch.equal(wl, w)
    torch.testing.assert_close(bl, b - 1.5 * torch.tensor(np.log(COUNTS / COUNTS.sum()), dtype=torch.float32))


@pytest.fixture(scope="module")
def val_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny prepared set WITH validation rows (2 per class)."""
    from conftest import KEEP_ALL, make_manifest

    from sicot_cli.config import load_recipe
    from sicot_cli.data.prepare import prepare

    root = tmp_path_factory.mktemp("ltdata")
    m = make_manifest(root / "raw", per_class=10)
    data = root / "val.h5"
    keys = ["data.source=manifest", f"data.manifest={m}", "data.image_size=16", "data.val_fraction=0.25", *KEEP_ALL]
    prepare(load_recipe(None, keys), data)
    return data


@pytest.fixture(scope="module")
def first_run(val_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished co-trained run on :func:`val_data`."""
    from sicot_cli.train import train

    return train(tiny_recipe(val_data, "model.encoder=mean"), tmp_path_factory.mktemp("lt") / "mean-s0").run_dir


def test_a_diverging_second_stage_stops_unfinished(first_run: Path, tmp_path: Path, monkeypatch) -> None:
    """A NaN loss (lr 100, batch 1 on real features) was written to metrics.jsonl and the stage
    "finished" with the score of a NaN classifier's argmax."""
    import torch.nn.functional as F

    from sicot_cli.decouple import decouple

    real = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(SicotError, match=r"the loss diverged \(not finite\) in crt epoch 1: lower decouple.lr"):
        decouple(first_run, ["decouple.method=crt", "decouple.epochs=2"], tmp_path / "crt")
    assert not runs.is_finished(tmp_path / "crt")


def test_crt_changes_only_the_classifier(first_run: Path, tmp_path: Path) -> None:
    from sicot_cli.decouple import decouple

    result = decouple(first_run, ["decouple.method=crt", "decouple.epochs=2"], tmp_path / "crt")
    old = runs.load_checkpoint(first_run / runs.LAST)["model"]
    new = runs.load_checkpoint(result.run_dir / runs.LAST)["model"]
    visual = [k for k in new if k.startswith("visual.")]
    assert visual and all(torch.equal(new[k], old[k]) for k in visual)  # bit-identical visual stream
    assert not any(k.startswith(("encoder.", "semantic_norm.")) for k in new)  # image-only
    assert not torch.equal(new["classifier.weight"], old["classifier.weight"])
    config = runs.read_config(result.run_dir)
    assert config["stage"] == {"method": "crt", "from_run": str(first_run.resolve())}
    assert methods.label(config) == "mean+crt" and runs.is_finished(result.run_dir)
    with pytest.raises(SicotError, match="run directory exists"):
        decouple(first_run, ["decouple.method=crt"], tmp_path / "crt")
    assert decouple(first_run, ["decouple.method=crt", "decouple.epochs=2"], tmp_path / "crt", resume=True).skipped
    # used unfinished, a second stage is named as one, with the command that finishes it
    from sicot_cli.cli import app

    (result.run_dir / runs.SUMMARY).unlink()
    out = " ".join(CliRunner().invoke(app, ["evaluate", "--run", str(result.run_dir)]).output.split())
    assert "unfinished (2 of 2 decouple epochs trained)" in out, out
    assert f"sicot decouple {first_run.resolve()} --method crt --run-dir {result.run_dir} --resume" in out, out


def test_lws_resumes_exactly_after_an_interrupt(first_run: Path, tmp_path: Path) -> None:
    from sicot_cli.decouple import decouple
    from sicot_cli.progress import NullProgress

    args = ["decouple.method=lws", "decouple.epochs=3", "decouple.batch_size=4"]
    full = decouple(first_run, args, tmp_path / "full")

    class Stop(NullProgress):
        def task(self, description: str, total: int):  # noqa: ANN201
            if description.endswith("epoch 2/3"):
                raise KeyboardInterrupt
            return super().task(description, total)

    with pytest.raises(KeyboardInterrupt):
        decouple(first_run, args, tmp_path / "cut", progress=Stop())
    assert not runs.is_finished(tmp_path / "cut")
    resumed = decouple(first_run, args, tmp_path / "cut", resume=True)
    assert resumed.history == full.history
    a = runs.load_checkpoint(tmp_path / "cut" / runs.LAST)["model"]
    b = runs.load_checkpoint(full.run_dir / runs.LAST)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    old = runs.load_checkpoint(first_run / runs.LAST)["model"]
    scale = runs.load_checkpoint(full.run_dir / runs.LAST)["head"]["scale"]
    torch.testing.assert_close(b["classifier.weight"], scale[:, None] * old["classifier.weight"])
    assert torch.equal(b["classifier.bias"], old["classifier.bias"])


@pytest.mark.parametrize("method", ["tau_norm", "logit_adjust"])
def test_tau_is_chosen_on_validation_and_test_is_scored_once(
    first_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    from sicot_cli import decouple as stage

    scored = []
    real = stage.evaluate_model
    monkeypatch.setattr(stage, "evaluate_model", lambda *a, **k: scored.append(k.get("split", "test")) or real(*a, **k))
    chosen = []
    real_score = stage.val_balanced_top1

    def score(logits, labels, c):  # noqa: ANN001, ANN202
        chosen.append(len(labels))
        return real_score(logits, labels, c)

    monkeypatch.setattr(stage, "val_balanced_top1", score)
    result = stage.decouple(first_run, [f"decouple.method={method}", "decouple.taus=[0.0, 1.0, 3.0]"], tmp_path / "s")
    record = runs.read_metrics(result.run_dir)[0]
    assert scored == ["test"]  # the test rows: once, at the end
    from sicot_cli.data.dataset import open_prepared

    n_val = open_prepared(runs.read_config(first_run)["data"]).n_val
    assert chosen == [n_val] * 3  # every tau scored on the validation rows, nothing else
    best = int(np.argmax(record["val_scores"]))
    assert record["tau"] == [0.0, 1.0, 3.0][best] and result.final["tau"] == record["tau"]
    assert result.final["selected_on"] == "val" and result.final["stage"] == method


def test_decouple_refuses_an_unfinished_run_and_recipe_changes(first_run: Path, tmp_path: Path) -> None:
    from sicot_cli.decouple import decouple

    with pytest.raises(SicotError, match="not a finished run"):
        decouple(tmp_path, ["decouple.method=crt"])
    with pytest.raises(SicotError, match="keeps its first run's recipe"):
        decouple(first_run, ["train.lr=3"])
    with pytest.raises(SicotError, match="decouple.method must be"):
        decouple(first_run, ["decouple.method=magic"], tmp_path / "x")


def test_decouple_refuses_another_dataset(first_run: Path, tiny_prepared: Path, tmp_path: Path) -> None:
    from sicot_cli.decouple import decouple

    with pytest.raises(SicotError, match="use the dataset the run was trained on"):
        decouple(first_run, ["decouple.method=crt"], tmp_path / "x", data=tiny_prepared)
    assert not (tmp_path / "x").exists()


# --- the methods grid --------------------------------------------------------------------------


def test_method_names_parse_combine_and_label() -> None:
    assert methods.parse("ce") == ({}, None)
    assert methods.parse("ldam-drw+cb-sampler+crt") == (
        {"train.loss": "ldam", "train.reweight": "drw", "train.sampler": "class_balanced"},
        "crt",
    )
    assert methods.canonical("cb-sampler+la-loss") == "la-loss+cb-sampler"
    with pytest.raises(SicotError, match="unknown method 'focal'"):
        methods.parse("focal")
    with pytest.raises(SicotError, match="at most one second stage"):
        methods.parse("crt+lws")
    with pytest.raises(SicotError, match="two parts set train.loss"):
        methods.parse("la-loss+ldam-drw")
    recipe = {"train": {"loss": "ldam", "reweight": "drw"}}
    assert methods.label({"encoder": "none", "recipe": recipe}) == "ldam-drw"
    assert methods.label({"encoder": "bilinear", "recipe": recipe}) == "bilinear+ldam-drw"
    assert methods.label({"encoder": "none", "recipe": {}}) == "none"
    assert methods.label({"encoder": "none", "recipe": {}, "stage": {"method": "tau_norm"}}) == "tau-norm"


def test_ablate_methods_grid_and_report_table(tiny_prepared: Path, tmp_path: Path) -> None:
    from sicot_cli.cli import app

    out = tmp_path / "abl"
    args = ["ablate", "--data", str(tiny_prepared), "--encoders", "mean", "--methods", "balanced-softmax,crt"]
    args += ["--out", str(out), "--no-figures", *[f"{k}" for k in _fast_overrides()]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert names == [
        "mean-balanced-softmax-s0", "mean-crt-s0", "mean-s0", "none-balanced-softmax-s0", "none-crt-s0", "none-s0"
    ]  # fmt: skip
    assert json.loads((out / "ablation.json").read_text())["methods"] == ["ce", "balanced-softmax", "crt"]
    assert runs.read_config(out / "mean-crt-s0")["stage"]["from_run"] == str((out / "mean-s0").resolve())
    report = json.loads((out / "report.json").read_text())
    table = report["tables"][
        "Long-tail methods: top-1 over all images, class-averaged top-1 by group, tail gain over CE"
    ]
    rows = {r["method"]: r for r in table}
    assert set(rows) == {"CE (baseline)", "balanced-softmax", "crt", "mean", "mean+balanced-softmax", "mean+crt"}
    assert rows["mean+crt"]["titles"] == "yes" and rows["crt"]["titles"] == "no"
    gain = report["gains"]["crt"]["tail_top1"]["values"][0]
    assert rows["crt"]["tail gain"] == f"{gain:+.2f}"
    # what the titles add: mean+crt against crt alone, mean against CE, on tail top-1
    tail = {m: json.loads((out / d / "summary.json").read_text())["final"]["tail_top1"] for m, d in
            [("mean+crt", "mean-crt-s0"), ("crt", "none-crt-s0"), ("mean", "mean-s0"), ("ce", "none-s0")]}  # fmt: skip
    assert rows["mean+crt"]["titles add (tail)"] == f"{tail['mean+crt'] - tail['crt']:+.2f}"
    assert rows["mean"]["titles add (tail)"] == f"{tail['mean'] - tail['ce']:+.2f}"
    assert rows["crt"]["titles add (tail)"] == "-"


def test_ctrl_c_in_an_ablations_second_stage_says_how_to_go_on(
    tiny_prepared: Path, tmp_path: Path, monkeypatch
) -> None:
    """It ended with a bare "interrupted" (a training run's Ctrl-C gives the table and the command)."""
    import sicot_cli.decouple as decouple_mod
    from sicot_cli.cli import app

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(decouple_mod, "decouple", stopped)
    out = tmp_path / "abl"
    args = ["ablate", "--data", str(tiny_prepared), "--encoders", "none", "--methods", "ce,crt", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--no-figures", *_fast_overrides()])
    flat = " ".join(result.output.split())
    assert result.exit_code == 130 and "interrupted: run the same command again to continue" in flat, result.output
    assert "none-crt-s0" in flat  # the table names the run that stopped


def _fast_overrides() -> list[str]:
    from conftest import TRAIN_FAST

    return [*TRAIN_FAST, "train.epochs=1", "decouple.epochs=1"]


def test_a_fixed_tau_is_a_method_of_its_own(first_run: Path, tmp_path: Path) -> None:
    """``posthoc-la(tau=1)``: Menon et al.'s tau, not chosen on anything; labelled apart from the chosen one."""
    from sicot_cli.decouple import decouple

    assert methods.parse("posthoc-la(tau=1)") == ({"decouple.taus": [1.0]}, "logit_adjust")
    assert methods.canonical("balanced-softmax+tau-norm(tau=0.5)") == "balanced-softmax+tau-norm(tau=0.5)"
    result = decouple(first_run, ["decouple.method=logit_adjust", "decouple.taus=[1.0]"], tmp_path / "la1")
    assert result.final["tau"] == 1.0
    assert methods.label(runs.read_config(result.run_dir)) == "mean+posthoc-la(tau=1)"
    with pytest.raises(SicotError, match="unknown method 'crt\\(tau=1\\)'"):
        methods.parse("crt(tau=1)")


def test_decouple_command(first_run: Path, tmp_path: Path) -> None:
    from sicot_cli.cli import app

    out = tmp_path / "tn"
    args = ["decouple", str(first_run), "--method", "tau_norm", "--run-dir", str(out), "decouple.taus=[0.5]"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "second stage tau_norm, tau 0.5 fixed" in " ".join(result.output.split())
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "run directory exists" in again.output
    best = CliRunner().invoke(app, ["evaluate", "--run", str(out), "--checkpoint", "best"])  # said "it was removed"
    assert best.exit_code == 2 and "a second stage (tau_norm) keeps only checkpoint-last.pt" in best.output
    # its export names the stage, the run it started from, its tau and the encoder that trained the
    # visual stream (it said encoder "none" and nothing of the stage: a plain image-only baseline)
    exported = CliRunner().invoke(app, ["export", "--run", str(out), "--out", str(tmp_path / "tn.pt")])
    assert exported.exit_code == 0, exported.output
    assert f"second stage tau_norm on {first_run}" in " ".join(exported.output.split())
    sicot = json.loads((tmp_path / "tn.pt.json").read_text())["sicot"]
    assert sicot["encoder"] == "mean" and sicot["stage"] == {
        "method": "tau_norm",
        "from_run": str(first_run),
        "tau": 0.5,
    }
    bad = CliRunner().invoke(app, ["decouple", str(tmp_path), "--method", "crt"])
    assert bad.exit_code == 2 and "not a finished run" in bad.output
    # the method as an override, without --method (refused as a clash with --method's default crt)
    tn2 = tmp_path / "tn2"
    r = CliRunner().invoke(app, ["decouple", str(first_run), "--run-dir", str(tn2), "decouple.method=tau_norm"])
    assert r.exit_code == 0, r.output
    assert runs.read_config(tn2)["stage"]["method"] == "tau_norm"


def test_a_second_stage_is_not_chained_nor_resumed_as_training(first_run: Path, tmp_path: Path) -> None:
    from sicot_cli.decouple import decouple
    from sicot_cli.train import train

    stage = decouple(first_run, ["decouple.method=logit_adjust"], tmp_path / "la").run_dir
    with pytest.raises(SicotError, match="is itself a second stage; start from the run it was made from"):
        decouple(stage, ["decouple.method=crt"], tmp_path / "again")
    recipe = tiny_recipe(Path(runs.read_config(first_run)["data"]), "model.encoder=none")
    with pytest.raises(SicotError, match="is a second stage .sicot decouple., not a training run"):
        train(recipe, stage, resume=True)


def test_ablate_refuses_a_tau_choice_without_validation_rows_before_training(
    tiny_prepared: Path, tmp_path: Path
) -> None:
    from sicot_cli.ablate import ablate

    with pytest.raises(SicotError, match="chooses tau on the validation rows.*has none"):
        ablate(
            tiny_recipe(tiny_prepared), ["mean"], [0], tmp_path / "a", data=tiny_prepared, method_names=["posthoc-la"]
        )
    assert not (tmp_path / "a").exists()  # nothing trained, nothing written


def test_eval_logit_adjust_chooses_tau_on_validation_and_keeps_the_adjusted_classifier(
    first_run: Path, val_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``eval.logit_adjust = "val"``: the same adjustment as the second stage, made at the end of training."""
    from sicot_cli import train as training
    from sicot_cli.data.dataset import open_prepared
    from sicot_cli.decouple import decouple
    from sicot_cli.losses import prior

    splits = []
    real = training.evaluate_model
    monkeypatch.setattr(training, "evaluate_model", lambda *a, **k: splits.append(k.get("split")) or real(*a, **k))
    taus = "eval.logit_adjust_taus=[0.0, 1.0, 3.0]"
    adjusted = training.train(
        tiny_recipe(val_data, "model.encoder=mean", "eval.logit_adjust=val", taus), tmp_path / "a"
    )
    assert splits == ["val", "val", "test"]  # two epochs on validation, the test rows once
    final = adjusted.final
    tau = final["logit_adjust_tau"]
    assert tau == [0.0, 1.0, 3.0][int(np.argmax(final["logit_adjust_val_scores"]))]
    # the same training without the adjustment: identical weights but the bias, shifted by -tau log prior
    plain = runs.load_checkpoint(first_run / runs.LAST)["model"]
    adj = runs.load_checkpoint(adjusted.run_dir / runs.LAST)["model"]
    assert all(torch.equal(plain[k], adj[k]) for k in plain if k != "classifier.bias")
    counts = open_prepared(val_data).train_counts
    log_prior = torch.tensor(np.log(prior(counts)), dtype=torch.float32)
    torch.testing.assert_close(adj["classifier.bias"], plain["classifier.bias"] - tau * log_prior)
    # and the second stage on the plain run chooses the same tau and scores the same
    stage = decouple(first_run, ["decouple.method=logit_adjust", "decouple.taus=[0.0, 1.0, 3.0]"], tmp_path / "s")
    assert stage.final["tau"] == tau and stage.final["top1"] == final["top1"]
    assert methods.label(runs.read_config(adjusted.run_dir)) == "mean+posthoc-la"
    from sicot_cli.export import export

    export(adjusted.run_dir, tmp_path / "a.pt")  # the adjusted classifier ships, and its JSON says with which tau
    assert json.loads((tmp_path / "a.pt.json").read_text())["sicot"]["logit_adjust_tau"] == tau
    assert f"post-hoc logit adjustment tau {tau:g} chosen on validation" in runs.selection_line(final)
    # one candidate is a fixed tau, not a choice (it said "chosen on validation", with no validation row)
    one = {**final, "logit_adjust_tau": 1.0, "logit_adjust_val_scores": [None]}
    assert "post-hoc logit adjustment tau 1 fixed" in runs.selection_line(one)


def test_eval_logit_adjust_needs_validation_rows(tiny_prepared: Path, tmp_path: Path) -> None:
    from sicot_cli.train import train

    with pytest.raises(SicotError, match="eval.logit_adjust = val chooses tau on validation rows"):
        train(tiny_recipe(tiny_prepared, "eval.logit_adjust=val"), tmp_path / "r")
    assert not (tmp_path / "r").exists()


# --- found in review: resume, double adjustment, presets, fixed tau, odd paths ------------------


def test_a_stage_resumed_after_its_last_epoch_scores_its_own_classifier(first_run: Path, tmp_path: Path) -> None:
    from sicot_cli.decouple import decouple

    args = ["decouple.method=crt", "decouple.epochs=2"]
    done = decouple(first_run, args, tmp_path / "crt")
    (tmp_path / "crt" / runs.SUMMARY).unlink()  # killed while the test rows were scored
    again = decouple(first_run, args, tmp_path / "crt", resume=True)
    assert not again.skipped and again.final["top1"] == done.final["top1"]
    assert again.final["tail_top1"] == done.final["tail_top1"]


@pytest.mark.parametrize(
    ("first", "then"),
    [
        (["decouple.method=crt", "decouple.epochs=2"], ["decouple.method=lws", "decouple.epochs=2"]),
        (["decouple.method=crt", "decouple.epochs=2"], ["decouple.method=crt"]),
    ],
    ids=["another-method", "another-setting"],
)
def test_a_stage_resumes_only_as_it_was_started(first_run: Path, tmp_path: Path, first: list, then: list) -> None:
    from sicot_cli.decouple import decouple

    decouple(first_run, first, tmp_path / "s")
    (tmp_path / "s" / runs.SUMMARY).unlink()
    with pytest.raises(SicotError, match="holds another second stage"):
        decouple(first_run, then, tmp_path / "s", resume=True)


def test_a_stage_moved_with_its_first_run_is_the_same_stage(first_run: Path, tmp_path: Path) -> None:
    """An ablation folder moved or copied elsewhere: its finished stage is skipped, not refused; a first
    run of the same name that is not beside the stage is still another run."""
    import shutil

    from sicot_cli.decouple import decouple

    shutil.copytree(first_run, tmp_path / "a" / "none-s0")
    decouple(tmp_path / "a" / "none-s0", ["decouple.method=crt", "decouple.epochs=1"], tmp_path / "a" / "none-crt-s0")
    (tmp_path / "a").rename(tmp_path / "b")
    again = decouple(
        tmp_path / "b" / "none-s0",
        ["decouple.method=crt", "decouple.epochs=1"],
        tmp_path / "b" / "none-crt-s0",
        resume=True,
    )
    assert again.skipped
    shutil.copytree(tmp_path / "b" / "none-s0", tmp_path / "elsewhere" / "none-s0")
    with pytest.raises(SicotError, match="holds another second stage"):
        decouple(
            tmp_path / "elsewhere" / "none-s0",
            ["decouple.method=crt", "decouple.epochs=1"],
            tmp_path / "b" / "none-crt-s0",
            resume=True,
        )


def test_an_adjusted_run_is_adjusted_once(val_data: Path, first_run: Path, tmp_path: Path) -> None:
    from sicot_cli.decouple import decouple
    from sicot_cli.train import train

    recipe = tiny_recipe(val_data, "model.encoder=mean", "eval.logit_adjust=val", "eval.logit_adjust_taus=[1.0, 2.0]")
    done = train(recipe, tmp_path / "a")
    bias = runs.load_checkpoint(tmp_path / "a" / runs.LAST)["model"]["classifier.bias"]
    (tmp_path / "a" / runs.SUMMARY).unlink()  # killed after the adjusted checkpoint, before summary.json
    again = train(recipe, tmp_path / "a", resume=True)
    assert again.final["logit_adjust_tau"] == done.final["logit_adjust_tau"]
    assert torch.equal(runs.load_checkpoint(tmp_path / "a" / runs.LAST)["model"]["classifier.bias"], bias)
    assert again.final["top1"] == done.final["top1"]
    with pytest.raises(SicotError, match="already adjusted at the end of training"):
        decouple(tmp_path / "a", ["decouple.method=logit_adjust"], tmp_path / "twice")


def test_a_fixed_tau_needs_no_validation_rows(tiny_prepared: Path, tmp_path: Path) -> None:
    from sicot_cli.decouple import decouple
    from sicot_cli.train import train

    run = train(tiny_recipe(tiny_prepared, "model.encoder=none", "train.epochs=1"), tmp_path / "r").run_dir
    with pytest.raises(SicotError, match="has no validation rows"):
        decouple(run, ["decouple.method=logit_adjust"], tmp_path / "chosen")
    assert not (tmp_path / "chosen").exists()  # refused before anything was written
    fixed = decouple(run, ["decouple.method=logit_adjust", "decouple.taus=[1.0]"], tmp_path / "fixed")
    assert fixed.final["tau"] == 1.0 and fixed.final["selected_on"] is None


def test_decouple_of_the_current_directory_goes_beside_it(first_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from sicot_cli.decouple import decouple

    monkeypatch.chdir(first_run)
    result = decouple(".", ["decouple.method=tau_norm", "decouple.taus=[0.5]"])
    try:
        assert result.run_dir == first_run.parent / f"{first_run.name}-tau-norm"
    finally:
        shutil.rmtree(result.run_dir)


def test_titles_add_compares_with_the_same_method_under_a_preset() -> None:
    from sicot_cli.report import Run, _title_gains

    def run(encoder: str, label: str, loss: str, tail: float, seed: int) -> Run:
        config = {"encoder": encoder, "recipe": {"preset": "paper", "train": {"loss": loss}}}
        return Run(Path(label), label, seed, config, {"tail_top1": tail}, [])

    rows = [
        run("none", "none", "ce", 10.0, s) for s in (0, 1)
    ] + [run("none", "la-loss", "logit_adjusted", 20.0 + s, s) for s in (0, 1)] + [
        run("bilinear", "bilinear[paper]+la-loss", "logit_adjusted", 30.0, s) for s in (0, 1)
    ]  # fmt: skip
    gains = _title_gains(rows)
    assert gains["bilinear[paper]+la-loss"].values == [10.0, 9.0]  # against la-loss alone, not CE


def test_ablate_methods_refuse_a_method_key_in_the_recipe(tiny_prepared: Path, tmp_path: Path) -> None:
    from sicot_cli.ablate import ablate

    recipe = tiny_recipe(tiny_prepared, "train.loss=ldam")
    with pytest.raises(SicotError, match="train.loss is set by --methods"):
        ablate(recipe, ["mean"], [0], tmp_path / "a", data=tiny_prepared, method_names=["ce", "crt"])
    assert methods.canonical("posthoc-la(tau=1.000001)") != methods.canonical("posthoc-la(tau=1)")


def test_a_ctrl_c_while_a_stage_saves_waits_for_its_checkpoint(first_run: Path, tmp_path: Path, monkeypatch) -> None:
    """As in train: a Ctrl-C that lands inside an epoch's checkpoint write stops after it, never inside it."""
    import os
    import signal

    from sicot_cli import decouple as stage

    real = stage._save

    def save_with_a_ctrl_c(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        os.kill(os.getpid(), signal.SIGINT)  # delivered while the checkpoint is being written
        real(*args, **kwargs)

    monkeypatch.setattr(stage, "_save", save_with_a_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        stage.decouple(first_run, ["decouple.method=crt", "decouple.epochs=3"], tmp_path / "s")
    assert runs.load_checkpoint(tmp_path / "s" / runs.LAST)["epoch"] == 1  # complete, and the stop came after it
    monkeypatch.setattr(stage, "_save", real)
    assert (
        len(
            stage.decouple(first_run, ["decouple.method=crt", "decouple.epochs=3"], tmp_path / "s", resume=True).history
        )
        == 3
    )


@pytest.mark.parametrize("poison", ["shape", "labels", "nan", "keys", "list"])
def test_a_features_cache_that_is_not_this_runs_is_computed_again(first_run: Path, tmp_path: Path, poison: str) -> None:
    """`decouple --resume` trusted features.pt whatever it held: wrong shapes or labels were
    tracebacks (IndexError, broadcasting), NaN features "the loss diverged: lower decouple.lr"."""
    import torch

    from sicot_cli.decouple import FEATURES, decouple

    ref = decouple(first_run, ["decouple.method=crt", "decouple.epochs=1"], tmp_path / "ref").run_dir
    cut = Path(shutil.copytree(ref, tmp_path / "cut"))
    (cut / runs.SUMMARY).unlink()
    feats = torch.load(cut / FEATURES, weights_only=True)
    if poison == "shape":
        feats["train_x"] = feats["train_x"][:, :3]
    elif poison == "labels":
        feats["train_y"] = feats["train_y"] + 79
    elif poison == "nan":
        feats["train_x"] = torch.full_like(feats["train_x"], float("nan"))
    elif poison == "keys":
        del feats["weight"]
    else:
        feats = [1, 2]
    torch.save(feats, cut / FEATURES)
    decouple(first_run, ["decouple.method=crt", "decouple.epochs=1"], cut, resume=True)
    want = json.loads((ref / runs.SUMMARY).read_text())["final"]["top1"]
    assert json.loads((cut / runs.SUMMARY).read_text())["final"]["top1"] == want
