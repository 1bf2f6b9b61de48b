"""report on hand-made run directories with known metrics; ablate's skip/resume."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import assert_png, capture_figures, tiny_recipe
from typer.testing import CliRunner

from sicot_cli.cli import app
from sicot_cli.config import Recipe
from sicot_cli.errors import SicotError
from sicot_cli.report import bootstrap_ci, build_report, paired_t, to_markdown

runner = CliRunner()

# top1 per (encoder, seed): baseline 50/52/54, bilinear 53/54/58 -> gains 3, 2, 4
TOP1 = {
    ("none", 0): 50.0,
    ("none", 1): 52.0,
    ("none", 2): 54.0,
    ("bilinear", 0): 53.0,
    ("bilinear", 1): 54.0,
    ("bilinear", 2): 58.0,
    ("mean", 0): 51.0,
    ("mean", 1): 52.0,
    ("mean", 2): 53.0,
}


def make_run(
    root: Path, encoder: str, seed: int, top1: float | None, hits: np.ndarray, order: np.ndarray | None = None
) -> Path:
    """A finished run whose test row ``100 + i`` is a hit iff ``hits[i]``, stored in ``order`` (default: reversed).

    ``top1``: the hits' rate (None: computed), as report checks the predictions against the summary."""
    rate = 100.0 * int(hits.sum()) / len(hits)
    assert top1 is None or top1 == pytest.approx(rate), (top1, rate)
    top1 = rate if top1 is None else top1
    d = root / f"{encoder}-s{seed}"
    d.mkdir(parents=True)
    recipe = Recipe().to_dict()
    recipe["train"]["seed"] = seed
    recipe["model"]["encoder"] = encoder
    (d / "config.json").write_text(
        json.dumps(
            {
                "recipe": recipe,
                "encoder": encoder,
                "data": str(root / "none.h5"),
                "dataset": {"classes": 2, "vocab": 5, "sha256": "x"},
            }
        )
    )
    final = {
        "epoch": 1,
        "loss": 1.0,
        "loss_v": 1.0,
        "top1": top1,
        "top3": top1 + 10,
        "head_top1": top1 + 1,
        "head_top3": top1 + 11,
        "tail_top1": top1 - 1,
        "tail_top3": top1 + 9,
        "many_top1": None,
        "many_top3": None,
        "medium_top1": top1,
        "medium_top3": top1,
        "few_top1": top1,
        "few_top3": top1,
        "head_threshold": 40,
    }
    (d / "metrics.jsonl").write_text(json.dumps(final) + "\n")
    (d / "summary.json").write_text(json.dumps({"final": final, "epochs": 1, "per_class_top1": [0.5, 0.6]}))
    n = len(hits)
    order = np.arange(n)[::-1] if order is None else order
    labels = np.zeros(n, np.int64)
    topk = np.where(hits[:, None], 0, 1).repeat(2, axis=1)
    topk[:, 1] = 1 - topk[:, 0]
    with h5py.File(d / "predictions.h5", "w") as f:
        f["rows"] = order + 100  # stored out of order: report must align by row
        f["labels"] = labels
        f["topk_labels"] = topk[order]
        f["topk_scores"] = np.ones((n, 2), np.float32)
    return d


@pytest.fixture
def ablation(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for (enc, seed), top1 in TOP1.items():
        make_run(tmp_path / "abl", enc, seed, top1, _exact_hits(rng, top1))
    return tmp_path / "abl"


def _exact_hits(rng: np.random.Generator, top1: float, n: int = 100) -> np.ndarray:
    """``n`` test rows of which exactly ``top1`` % are hits, at random places."""
    hits = np.zeros(n, bool)
    hits[rng.permutation(n)[: round(top1 * n / 100)]] = True
    return hits


def test_report_numbers_gains_and_paired_test(ablation):
    rep = build_report([ablation], "bilinear")
    c = rep.cells["bilinear"]["top1"]
    assert c.values == [53.0, 54.0, 58.0]
    assert c.mean == pytest.approx(55.0) and c.std == pytest.approx(math.sqrt(7.0))  # var = (4+1+9)/2
    g = rep.gains["bilinear"]["top1"]
    assert g.values == [3.0, 2.0, 4.0] and g.mean == pytest.approx(3.0)
    # by hand: t = 3 / (1 / sqrt(3)) = 5.196, df 2, two-sided p = 0.0351
    assert g.p_value == pytest.approx(0.03513, abs=1e-4)
    assert rep.gains["mean"]["top1"].values == [1.0, 0.0, -1.0]
    assert rep.gains["mean"]["top1"].p_value == pytest.approx(1.0)
    assert rep.gains["bilinear"]["tail_top1"].values == [3.0, 2.0, 4.0]
    tables = rep.tables()
    t3 = tables["Table 3: encoders, top-1"]
    assert [r["method"] for r in t3] == ["baseline", "bilinear", "mean"]
    assert t3[1]["top-1"] == "55.00±2.65" and t3[1]["gain"] == "+3.00"
    t4 = tables["Table 4: head/tail and many/medium/few, class-averaged top-1 (top-3)"]
    assert t4[0]["#training samples"] == "40 - max" and t4[1]["#training samples"] == "1 - 40"
    assert t4[2]["baseline"] == "- (-)"  # many: no class


def _hand_paired_p(differences: list[float]) -> float:
    """The paired t-test by hand (what report.py computed before scipy.stats.ttest_rel)."""
    from scipy import stats

    n = len(differences)
    mean = sum(differences) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in differences) / (n - 1))
    return float(2 * stats.t.sf(abs(mean / (std / math.sqrt(n))), df=n - 1))


def _hand_percentile_ci(diff: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap by hand (what report.py computed before scipy.stats.bootstrap)."""
    idx = np.random.default_rng(seed).integers(0, len(diff), (n_boot, len(diff)))
    lo, hi = np.percentile(diff[idx].mean(axis=1) * 100.0, [2.5, 97.5])
    return float(lo), float(hi)


@pytest.mark.parametrize(
    "treated,reference",
    [
        ([53.0, 54.0, 58.0], [50.0, 52.0, 54.0]),
        ([51.0, 52.0, 53.0], [50.0, 52.0, 54.0]),
        ([0.7, 0.1, 0.35, 0.9, 0.2], [0.5, 0.4, 0.3, 0.6, 0.25]),
        ([12.5, -3.25], [10.0, -4.0]),
    ],
)
def test_paired_t_is_the_hand_computed_test(treated, reference):
    p = paired_t(treated, reference)
    assert p == pytest.approx(
        _hand_paired_p([a - b for a, b in zip(treated, reference, strict=True)]), rel=1e-12, abs=1e-12
    )
    assert 0.0 <= p <= 1.0


def test_a_gain_of_float_noise_is_no_negative_zero():
    from sicot_cli.report import Gain, differences

    # the same figure summed in another order: -4.4e-16 apart, shown as "-0.00" before
    assert 3.3 - (1.1 + 2.2) < 0 and differences([3.3], [1.1 + 2.2]) == [0.0]
    assert f"{Gain(differences([3.3, 0.0], [1.1 + 2.2, 0.0]), None).mean:+.2f}" == "+0.00"
    assert f"{Gain([-4.4e-16, 0.0], None).mean:+.2f}" == "+0.00"


def test_paired_t_degenerate_and_too_few():
    assert paired_t([1.0], [0.0]) is None
    assert math.isnan(paired_t([2.0, 2.0], [0.0, 0.0]))  # undefined, not p=0 (tests/test_protocol.py)
    # identical differences that a mean/std in floating point sees as a tiny spread: still undefined
    # (the hand-written test returned p ~ 1e-32 here, scipy alone returns p = 0)
    assert math.isnan(paired_t([0.1, 0.1, 0.1], [0.0, 0.0, 0.0]))
    assert math.isnan(paired_t([0.3] * 7, [0.2] * 7))
    # one more test image right on every seed (720 images): the same difference in exact arithmetic,
    # not in the last bit (0.13888888888889284 and 0.13888888888888573): scipy said p = 1.6e-14
    treated, reference = [100 * 301 / 720, 100 * 302 / 720], [100 * 300 / 720, 100 * 301 / 720]
    assert treated[0] - reference[0] != treated[1] - reference[1]
    assert math.isnan(paired_t(treated, reference))
    with pytest.raises(ValueError):
        paired_t([1.0, 2.0], [1.0])


def test_bootstrap_is_the_hand_computed_percentile_interval():
    rng = np.random.default_rng(7)
    for n in (2, 37, 250):
        diff = rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0], n)
        for seed in (0, 3):
            lo, hi = bootstrap_ci(diff, seed=seed)
            # the same resamples (default_rng(seed).integers); scipy's 0.025 quantile is 1 - 0.95 over 2
            # in floating point, hence not bit-for-bit
            assert (lo, hi) == pytest.approx(_hand_percentile_ci(diff, seed=seed), abs=1e-9)
            assert lo <= diff.mean() * 100 + 1e-9 and diff.mean() * 100 - 1e-9 <= hi
    assert bootstrap_ci(diff, seed=1) != bootstrap_ci(diff, seed=2)  # the seed is used...
    assert bootstrap_ci(diff, seed=1) == bootstrap_ci(diff, seed=1)  # ...and fixes the interval
    lo, hi = bootstrap_ci(np.ones(40))
    assert lo == hi == 100.0
    assert bootstrap_ci(np.array([-1.0])) == (-100.0, -100.0)  # one image: every resample is that image
    lo, hi = bootstrap_ci(np.r_[np.ones(50), np.zeros(50)])
    assert lo < 50 < hi and hi - lo < 25


def test_bootstrap_of_the_ablation_fixture_survives_a_row_shuffle(ablation):
    """Each run's predictions are matched by test row: shuffling one file's row order changes nothing."""
    rep = build_report([ablation], "bilinear")
    lo, hi = rep.gains["bilinear"]["top1"].ci
    # the fixture's hits, in row order, re-drawn the way the fixture drew them
    rng = np.random.default_rng(0)
    hits = {key: _exact_hits(rng, top1) for key, top1 in TOP1.items()}
    diff = np.mean([hits[("bilinear", s)].astype(float) - hits[("none", s)].astype(float) for s in (0, 1, 2)], axis=0)
    assert (lo, hi) == bootstrap_ci(diff)
    path = ablation / "bilinear-s1" / "predictions.h5"
    with h5py.File(path, "r+") as f:
        order = np.random.default_rng(5).permutation(100)
        for name in ("rows", "labels", "topk_labels", "topk_scores"):
            data = f[name][()]
            del f[name]
            f[name] = data[order]
    assert build_report([ablation], "bilinear").gains["bilinear"]["top1"].ci == (lo, hi)


def test_bootstrap_aligns_rows(tmp_path):
    """Every run stores its test rows in its own order: the per-image differences pair rows, not positions."""
    n = 40
    base = np.random.default_rng(1).random(n) < 0.5

    def perm(seed: int) -> np.ndarray:
        return np.random.default_rng(seed).permutation(n)

    # the same hits on every row: each aligned difference is 0, so every bootstrap mean is 0
    for seed in (0, 1):
        make_run(tmp_path / "same", "none", seed, None, base, perm(10 + seed))
        make_run(tmp_path / "same", "bilinear", seed, None, base, perm(20 + seed))
    assert build_report([tmp_path / "same"], "bilinear").gains["bilinear"]["top1"].ci == (0.0, 0.0)
    # bilinear hits rows 3 and 7 more on seed 0, row 3 more on seed 1 (both missed by the baseline):
    # the seed-averaged per-row difference is 1 on row 3, 0.5 on row 7 and 0 elsewhere
    base[[3, 7]] = False
    gained = {0: base.copy(), 1: base.copy()}
    gained[0][[3, 7]] = True
    gained[1][3] = True
    for seed in (0, 1):
        make_run(tmp_path / "diff", "none", seed, None, base, perm(30 + seed))
        make_run(tmp_path / "diff", "bilinear", seed, None, gained[seed], perm(40 + seed))
    want = np.zeros(n)
    want[3], want[7] = 1.0, 0.5
    ci = build_report([tmp_path / "diff"], "bilinear").gains["bilinear"]["top1"].ci
    assert ci == bootstrap_ci(want)
    assert ci[0] == 0.0 and ci[1] > 0.0  # resamples without rows 3 and 7 give 0; the upper end is positive
    # top-3: both classes are in every top-2, so every row is a hit for both runs
    assert build_report([tmp_path / "diff"], "bilinear").gains["bilinear"]["top3"].ci == (0.0, 0.0)


def test_markdown_parses_and_files(ablation):
    r = runner.invoke(app, ["report", str(ablation), "--format", "markdown", "--no-figures"])
    assert r.exit_code == 0, r.output
    tables, current = [], []
    for ln in r.output.splitlines() + [""]:
        if ln.startswith("|"):
            current.append([c.strip() for c in ln.strip().strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    assert len(tables) == 3
    for t in tables:
        assert all(len(row) == len(t[0]) for row in t)
        assert all(set(c) == {"-"} for c in t[1])
    assert "| baseline | 52.00±2.00 | - | - |" in r.output
    # the files hold what was printed: the Markdown tables, the CSV rows, the JSON numbers
    md = (ablation / "report.md").read_text(encoding="utf-8")
    assert "| baseline | 52.00±2.00 | - | - |" in md
    assert md.startswith("# sicot report: demo") and all(f"## Table {n}:" in md for n in (2, 3, 4))
    assert "bilinear,top1,55.0," in (ablation / "report.csv").read_text(encoding="utf-8")
    data = json.loads((ablation / "report.json").read_text())
    assert data["gains"]["bilinear"]["top1"]["mean"] == pytest.approx(3.0)
    r = runner.invoke(app, ["report", str(ablation), "--format", "csv", "--no-figures"])
    assert "bilinear,top1,55.0," in r.output
    # a report replaces its own earlier files (above), never a user's file of the same name
    notes = ablation / "notes"
    notes.mkdir()
    for name in ("report.md", "per_class.csv"):
        (notes / name).write_text("my own notes\n", encoding="utf-8")
        r = runner.invoke(app, ["report", str(ablation), "--no-figures", "--out", str(notes)])
        assert r.exit_code == 2 and f"{name}: exists and was not written by `sicot report`" in r.output, r.output
        assert (notes / name).read_text(encoding="utf-8") == "my own notes\n"
        assert not (notes / "report.json").exists()  # checked before anything is written
        (notes / name).unlink()


def test_report_replaces_its_own_figures_never_a_users_picture(ablation):
    """A report's PNGs carry its name (tEXt Software); a picture of the user's own at a figure's name
    is refused before anything is written, and left as it was."""
    from PIL import Image

    r = runner.invoke(app, ["report", str(ablation)])
    assert r.exit_code == 0, r.output
    assert b"tEXtSoftware\x00sicot report" in (ablation / "curves.png").read_bytes()[:512]
    assert runner.invoke(app, ["report", str(ablation)]).exit_code == 0  # its own figure: replaced
    for f in ("report.md", "report.json"):
        (ablation / f).unlink()
    Image.new("RGB", (4, 4), "red").save(ablation / "curves.png")
    mine = (ablation / "curves.png").read_bytes()
    r = runner.invoke(app, ["report", str(ablation)])
    assert r.exit_code == 2 and "curves.png: exists and was not written by `sicot report`" in r.output, r.output
    assert (ablation / "curves.png").read_bytes() == mine and not (ablation / "report.md").exists()
    r = runner.invoke(app, ["report", str(ablation), "--no-figures"])  # no figure written: nothing to refuse
    assert r.exit_code == 0 and (ablation / "curves.png").read_bytes() == mine


def test_report_refuses_non_runs(tmp_path):
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["report", str(tmp_path / "empty")])
    assert r.exit_code == 2 and "not a run directory and holds none" in r.output


def _edit_recipe(run: Path, section: str, key: str, value) -> None:
    cfg = json.loads((run / "config.json").read_text())
    cfg["recipe"][section][key] = value
    (run / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("train", "lr", 5.0),
        ("model", "backbone", "resnet34"),
        ("model", "pretrained", "runs/other"),
        ("eval", "head_threshold", 7),
    ],
)
def test_report_refuses_runs_trained_with_other_settings(ablation, section, key, value):
    # Pairing a baseline and a co-trained run by seed is only a gain when both trained the same
    # visual stream the same way: another lr/backbone/pretraining/group boundary is refused by name.
    _edit_recipe(ablation / "bilinear-s1", section, key, value)
    with pytest.raises(SicotError, match=rf"{section}\.{key} \(.*vs .*\).*report them separately") as e:
        build_report([ablation], "bilinear")
    assert "bilinear-s1" in str(e.value)


def test_report_keeps_runs_that_differ_only_in_what_an_ablation_varies(ablation):
    # lam, the preset's keys and the long-tail method are what an ablation compares (the same for
    # every seed of one row); threads and the device say how a run ran: not refused.
    for seed in (0, 1, 2):
        _edit_recipe(ablation / f"bilinear-s{seed}", "train", "lam", 0.5)
        _edit_recipe(ablation / f"bilinear-s{seed}", "train", "normalize_loss", False)
    _edit_recipe(ablation / "mean-s0", "train", "threads", 1)
    _edit_recipe(ablation / "none-s2", "train", "device", "cuda")
    rep = build_report([ablation], "bilinear")
    # ... but the rows say so: the encoders were co-trained differently, which "bilinear" and "mean" would hide
    bilinear, mean = "bilinear[lam=0.5, normalize_loss=false]", "mean[lam=1, normalize_loss=true]"
    assert rep.encoders == ["none", bilinear, mean] and rep.chosen == bilinear
    assert rep.gains[bilinear]["top1"].values == [3.0, 2.0, 4.0]
    assert f"| {bilinear} |" in to_markdown(rep)
    r = runner.invoke(
        app, ["report", str(ablation), "--encoder", "bilinear", "--no-figures"]
    )  # was "no run of it here"
    assert r.exit_code == 0 and "co-training (bilinear[lam=0.5, normalize_loss=false])" in r.output, r.output
    # a key only one row's preset sets differently is its preset's label, not a difference
    for seed in (0, 1, 2):
        _edit_recipe(ablation / f"mean-s{seed}", "train", "lam", 0.5)
        cfg = json.loads((ablation / f"bilinear-s{seed}" / "config.json").read_text())
        cfg["recipe"]["preset"] = "paper"
        (ablation / f"bilinear-s{seed}" / "config.json").write_text(json.dumps(cfg))
    assert build_report([ablation], "bilinear").encoders == ["none", "bilinear[paper]", "mean"]


def test_table_2_calls_a_method_on_the_baseline_by_its_name(ablation):
    """Ablations of long-tail methods alone (no titles): Table 2 said "co-training (lws)"."""
    for seed in (0, 1, 2):
        for enc in ("bilinear", "mean"):
            cfg = json.loads((ablation / f"{enc}-s{seed}" / "config.json").read_text())
            if enc == "mean":
                shutil.rmtree(ablation / f"{enc}-s{seed}")
                continue
            cfg["encoder"] = cfg["recipe"]["model"]["encoder"] = "none"
            cfg["recipe"]["train"]["loss"] = "balanced_softmax"
            (ablation / f"{enc}-s{seed}" / "config.json").write_text(json.dumps(cfg))
    rep = build_report([ablation], "bilinear")
    tables = rep.tables()
    label = rep.chosen
    assert label != "bilinear" and "co-training" not in json.dumps(tables)
    assert (
        f"Table 2: baseline vs {label}, top-1 (top-3)" in tables
        and label in tables[f"Table 2: baseline vs {label}, top-1 (top-3)"][0]
    )


@pytest.mark.parametrize(
    ("section", "key", "value"), [("train", "lam", 0.1), ("train", "distill", 1.0), ("decouple", "epochs", 3)]
)
def test_report_refuses_seeds_of_one_row_trained_differently(ablation, section, key, value):
    # Averaged as one row over seeds, they must be one setting: a lam of 1 on seed 0 and 0.1 on
    # seed 1 would be reported as "bilinear" with a mean over both.
    _edit_recipe(ablation / "bilinear-s1", section, key, value)
    with pytest.raises(
        SicotError, match=rf"are both 'bilinear' in the tables but were trained differently: {section}\.{key}"
    ):
        build_report([ablation], "bilinear")


def _with_validation(run: Path, val_top1: list[float], scored: int | None = None, sha: str | None = None) -> Path:
    """Give ``run`` one epoch record per ``val_top1`` value (val_tail_top1 = value - 2) and score epoch
    ``scored`` (default the last); ``sha``: another prepared file (another validation fold)."""
    recs = [
        {"epoch": e, "loss": 1.0, "val_top1": v, "val_top3": v + 5, "val_tail_top1": v - 2, "val_n_test": 30}
        for e, v in enumerate(val_top1, 1)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    summary = json.loads((run / "summary.json").read_text())
    summary["epochs"] = len(recs)
    summary["final"] |= {"split": "test", "checkpoint": "last", "checkpoint_epoch": scored or len(recs)}
    (run / "summary.json").write_text(json.dumps(summary))
    if sha is not None:
        cfg = json.loads((run / "config.json").read_text())
        cfg["dataset"]["sha256"] = sha
        cfg["recipe"]["data"]["val_fold"] = int(sha[-1])
        (run / "config.json").write_text(json.dumps(cfg))
    return run


def test_report_on_validation_reads_the_scored_epochs_validation_figures(ablation, tmp_path):
    """--split val: the val_* figures of the scored epoch (not the test ones), paired by seed, seeds p
    only; printed, nothing written; runs without them, or changed after training, refused by name."""
    for (enc, seed), top1 in TOP1.items():
        # epoch 2 holds test top-1 + 20; epoch 1 is a decoy, scored only by checkpoint-best below
        _with_validation(ablation / f"{enc}-s{seed}", [5.0, top1 + 20], scored=2)
    _with_validation(ablation / "mean-s1", [52.0 + 20, 5.0], scored=1)  # its best epoch: the first
    rep = build_report([ablation], "bilinear", split="val")
    assert rep.cells["bilinear"]["top1"].values == [73.0, 74.0, 78.0]
    assert rep.cells["mean"]["top1"].values == [71.0, 72.0, 73.0]
    g = rep.gains["bilinear"]["tail_top1"]
    assert g.values == [3.0, 2.0, 4.0] and g.ci is None and g.p_value == pytest.approx(0.03513, abs=1e-4)
    assert "val split (30 images)" in rep.protocol and "seeds p only" in rep.protocol
    before = sorted(p.name for p in ablation.iterdir())
    r = runner.invoke(app, ["report", str(ablation), "--split", "val", "--format", "markdown"])
    assert r.exit_code == 0, r.output
    assert "| bilinear | 75.00±2.65 | +3.00 | significant (seeds p=0.035) |" in r.output
    assert sorted(p.name for p in ablation.iterdir()) == before  # nothing written
    r = runner.invoke(app, ["report", str(ablation), "--split", "val", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "writes no file" in r.output and not (tmp_path / "o").exists()
    assert runner.invoke(app, ["report", str(ablation), "--split", "train"]).exit_code == 2
    (ablation / "none-s1" / "metrics.jsonl").write_text(json.dumps({"epoch": 2, "loss": 1.0}) + "\n")
    with pytest.raises(SicotError, match=r"none-s1/metrics.jsonl: no validation figures for epoch 2"):
        build_report([ablation], split="val")
    # the scored epoch's line torn off (epoch 1 alone left): a damaged record, not a file without validation rows
    (ablation / "none-s1" / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "loss": 1.0, "val_top1": 5.0}) + "\n")
    with pytest.raises(SicotError, match=r"none-s1/metrics.jsonl: no record of epoch 2, .*missing or damaged"):
        build_report([ablation], split="val")
    _with_validation(ablation / "none-s1", [5.0, 72.0])
    summary = json.loads((ablation / "none-s1" / "summary.json").read_text())
    summary["final"]["logit_adjust_tau"] = 1.0
    (ablation / "none-s1" / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(SicotError, match=r"none-s1: its post-hoc logit adjustment changed the classifier"):
        build_report([ablation], split="val")


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ({"val_tail_top1": "x"}, "val_tail_top1 must be a number or null, got 'x'"),
        ({"val_top1": True}, "val_top1 must be a number or null, got True"),
        ({"val_top1": [1]}, "val_top1 must be a number or null"),
        ({"val_tail_top1": "50"}, "val_tail_top1 must be a number or null, got '50'"),
        ({"epoch": 1}, "epoch 1 after epoch 1 (each epoch once, in order)"),
    ],
)
def test_report_on_validation_refuses_hand_edited_figures(ablation, edit, needle):
    """A string, a bool or a list where a validation figure goes crashed the report or was read as a
    number (true as 1.00); a repeated epoch was read once, silently."""
    for (enc, seed), top1 in TOP1.items():
        _with_validation(ablation / f"{enc}-s{seed}", [top1])
    path = ablation / "bilinear-s1" / "metrics.jsonl"
    record = json.loads(path.read_text())
    path.write_text(json.dumps(record) + "\n" + json.dumps({**record, **edit}) + "\n")
    r = runner.invoke(app, ["report", "--split", "val", str(ablation)])
    assert r.exit_code == 2 and needle in " ".join(r.output.split()), r.output
    path.unlink()
    r = runner.invoke(app, ["report", "--split", "val", str(ablation)])
    assert r.exit_code == 2 and "metrics.jsonl: missing, empty or not a file" in " ".join(r.output.split()), r.output


def test_report_warns_of_runs_without_their_pair(ablation, caplog):
    """bilinear's mean over seeds 0-1 and the baseline's over 0-2, the gain over 0-1: said, not hidden."""
    shutil.rmtree(ablation / "bilinear-s2")
    rep = build_report([ablation], "bilinear")
    assert rep.gains["bilinear"]["top1"].values == [3.0, 2.0]
    assert "none-s2: no run of the same seed to pair with (bilinear against the baseline)" in caplog.text
    assert "mean against the baseline" not in caplog.text  # "mean" has every seed


def test_report_csv_on_stdout_is_csv_and_views_need_the_table_format(ablation):
    import csv
    import io

    r = runner.invoke(app, ["report", str(ablation), "--format", "csv", "--no-figures"])
    rows = list(csv.DictReader(io.StringIO(r.output)))  # each line ended in a literal \u000d
    assert r.exit_code == 0 and list(rows[0])[-1] == "significant" and "\\u000d" not in r.output
    for extra in (["--attention"], ["--class", "cat"]):
        r = runner.invoke(app, ["report", str(ablation), "--format", "json", "--no-figures", *extra])
        assert r.exit_code == 2 and "use them with --format table" in r.output  # tables after the JSON
    r = runner.invoke(app, ["report", str(ablation), "--encoder", "none", "--no-figures"])
    assert r.exit_code == 2 and "--encoder none is the baseline" in r.output


def test_report_on_validation_pairs_seeds_within_each_fold(tmp_path, monkeypatch):
    """Runs on two validation folds (two prepared files, data.val_fold differs), seed 0 on each: four
    pairs' worth of runs give two gains, each against its own fold's baseline. On test they are refused,
    and so are files that are not folds of one dataset (other test rows, other classes), or unreadable."""
    from types import SimpleNamespace

    import sicot_cli.data.dataset as dataset_mod

    files = {  # path -> (classes, ids in file order: train, val, test); fold 2 trades a train and a val row
        "fold1.h5": (["a", "b"], ["t1", "t2", "v1", "x1", "x2"]),
        "fold2.h5": (["a", "b"], ["v1", "t2", "t1", "x1", "x2"]),
    }

    def fake_open(path):
        if str(path) not in files:
            raise SicotError(f"{path}: prepared dataset not found")
        classes, ids = files[str(path)]
        return SimpleNamespace(class_names=classes, ids=lambda: list(ids), split_range=lambda split: (3, 5))

    monkeypatch.setattr(dataset_mod, "open_prepared", fake_open)
    rng = np.random.default_rng(0)
    for fold, (base, co) in enumerate(((50.0, 53.0), (60.0, 61.0)), 1):
        for enc, top1 in (("none", base), ("bilinear", co)):
            run = make_run(tmp_path / f"f{fold}", enc, 0, None, _exact_hits(rng, 50.0))
            _with_validation(run, [top1], sha=f"fold{fold}")
            cfg = json.loads((run / "config.json").read_text())
            (run / "config.json").write_text(json.dumps({**cfg, "data": f"fold{fold}.h5"}))
    dirs = [tmp_path / "f1", tmp_path / "f2"]
    rep = build_report(dirs, split="val")
    assert sorted(rep.gains["bilinear"]["top1"].values) == [1.0, 3.0]
    assert "2 validation folds" in rep.protocol
    with pytest.raises(SicotError, match="different datasets"):
        build_report(dirs)
    for changed in ((["a", "b"], ["v1", "t2", "t1", "x1", "x3"]), (["a", "c"], files["fold2.h5"][1])):
        files["fold2.h5"] = changed  # another test row; another class
        with pytest.raises(SicotError, match="different datasets \\(not validation folds of one"):
            build_report(dirs, split="val")
    del files["fold2.h5"]
    with pytest.raises(SicotError, match="its prepared file is needed to check.*fold2.h5: prepared dataset not found"):
        build_report(dirs, split="val")
    files["fold2.h5"] = (["a", "b"], ["v1", "t2", "t1", "x1", "x2"])
    cfg = json.loads((tmp_path / "f2" / "bilinear-s0" / "config.json").read_text())
    cfg["recipe"]["train"]["lr"] = 5.0  # a fold trained otherwise is still refused
    (tmp_path / "f2" / "bilinear-s0" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SicotError, match=r"train\.lr"):
        build_report(dirs, split="val")


@pytest.mark.parametrize("metrics", ["", '{"epoch": 1, "lo'])
def test_a_finished_run_with_fewer_epoch_records_than_it_trained_is_warned(tmp_path, caplog, metrics):
    """metrics.jsonl emptied or torn by hand: the curves would be empty; the report says why."""
    run = make_run(tmp_path / "x", "mean", 0, 50.0, np.arange(4) % 2 == 0)
    (run / "metrics.jsonl").write_text(metrics)
    build_report([run])
    assert f"{run / 'metrics.jsonl'}: 0 of the 1 epochs' records" in caplog.text


def test_a_single_run_without_baseline_is_reported_with_its_curves(tmp_path, monkeypatch):
    import warnings

    figs = capture_figures(monkeypatch)
    run = make_run(tmp_path / "x", "mean", 0, 50.0, np.arange(4) % 2 == 0)
    rep = build_report([run])
    tables = rep.tables()
    assert tables["Table 3: encoders, top-1"] == [{"method": "mean", "top-1": "50.00", "gain": "-", "evidence": "-"}]
    assert (
        tables["Table 2: baseline vs co-training, top-1 (top-3)"] == []
        and tables["Table 4: head/tail and many/medium/few, class-averaged top-1 (top-3)"] == []
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning may leak from the figures
        r = runner.invoke(app, ["report", str(run)])
    assert r.exit_code == 0, r.output
    assert "no baseline" not in r.output
    assert_png(run / "curves.png", (10, 3.6))
    loss_panel, val_panel = figs["curves.png"].axes
    # one line per run: the epochs against metrics.jsonl's loss_v (1.0 at epoch 1); no validation top-1
    assert [(list(ln.get_xdata()), list(ln.get_ydata())) for ln in loss_panel.lines] == [([1], [1.0])]
    assert len(val_panel.lines) == 1 and np.isnan(val_panel.lines[0].get_ydata()).all()
    # per_class.csv names the classes (here the prepared file is gone: class ids)
    assert (run / "per_class.csv").read_text().splitlines() == ["class,train_images,top1 mean", "0,,0.5", "1,,0.6"]


def test_ablate_into_a_folder_of_other_data_names_the_data(tiny_prepared, tmp_path):
    """Another --data into an ablation's folder was refused as "another recipe (...: its settings
    differ)"; it names the data (path and checksum) and the setting that differs. The same data under
    another name (a copy) is the same ablation: its finished run is skipped."""
    from conftest import KEEP_ALL

    from sicot_cli import ablate as ab
    from sicot_cli.config import load_recipe
    from sicot_cli.data.prepare import prepare

    recipe = tiny_recipe(tiny_prepared, "train.epochs=1")
    root, _ = ab.ablate(recipe, [], [0], tmp_path / "abl", data=tiny_prepared)
    other = tmp_path / "other.h5"
    m = tiny_prepared.parent / "raw" / "m.csv"
    prepare(
        load_recipe(
            None, ["data.source=manifest", f"data.manifest={m}", "data.image_size=16", *KEEP_ALL, "embed.seed=1"]
        ),
        other,
    )
    with pytest.raises(SicotError) as e:
        ab.ablate(recipe, [], [0], root, data=other)
    said = str(e.value)
    assert said.startswith(
        f"{root}: holds an ablation of other data ({root / 'ablation.json'}: data: {tiny_prepared} (checksum "
    )
    assert f"-> {other} (checksum " in said and "embed.seed: 0 -> 1" in said
    assert said.endswith(f"use another --out, or give it the data it was made with (--data {tiny_prepared})")
    copy = tmp_path / "copy.h5"
    shutil.copy(tiny_prepared, copy)
    shutil.copy(tiny_prepared.with_suffix(".recipe.json"), copy.with_suffix(".recipe.json"))
    _, statuses = ab.ablate(recipe, [], [0], root, data=copy)
    assert [s.state for s in statuses] == ["skipped"]


def test_ablate_skips_finished_and_resumes(tiny_prepared, tmp_path, monkeypatch):
    from matplotlib.colors import to_hex

    from sicot_cli import ablate as ab
    from sicot_cli import runs
    from sicot_cli.data.dataset import open_prepared
    from sicot_cli.figures import render_all

    recipe = tiny_recipe(tiny_prepared, "train.epochs=1")
    real_train = ab.train
    calls = []

    def kill_after_first(r, run_dir, **kw):
        calls.append(run_dir.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies during the second run
        return real_train(r, run_dir, **kw)

    monkeypatch.setattr(ab, "train", kill_after_first)
    with pytest.raises(KeyboardInterrupt):
        ab.ablate(recipe, ["bilinear"], [0], tmp_path / "abl", data=tiny_prepared)
    first = tmp_path / "abl" / "none-s0"
    mtime = (first / "checkpoint-last.pt").stat().st_mtime_ns
    monkeypatch.setattr(ab, "train", real_train)
    root, statuses = ab.ablate(recipe, ["bilinear"], [0], tmp_path / "abl", data=tiny_prepared)
    assert [(s.run_dir.name, s.state) for s in statuses] == [("none-s0", "skipped"), ("bilinear-s0", "trained")]
    assert (first / "checkpoint-last.pt").stat().st_mtime_ns == mtime
    rep = build_report([root])
    assert rep.encoders == ["none", "bilinear"]
    figs = capture_figures(monkeypatch)
    pngs = render_all(rep, root)
    names = sorted(p.name for p in pngs)
    assert names == ["curves.png", "fig6_distribution.png", "fig7_attention.png", "per_class_gain.png"]
    for p, size in zip(sorted(pngs), [(10, 3.6), (7, 3.2), (9, 0.6 + 0.55 * 6), (7, 3.6)], strict=True):
        assert_png(p, size)
    # what the figures plot, against the run files and the prepared file read here
    p = open_prepared(tiny_prepared)
    loss_panel = figs["curves.png"].axes[0]
    assert [list(ln.get_ydata()) for ln in loss_panel.lines] == [
        [h["loss_v"] for h in runs.read_metrics(r.path)] for r in rep.runs
    ]
    steps = figs["fig6_distribution.png"].axes[0].patches  # one filled step outline per group, a step per class
    bars = [(float(v), to_hex(st.get_facecolor())) for st in steps for v in st.get_data().values]
    counts = sorted(p.train_counts.tolist(), reverse=True)
    assert [h for h, _ in bars] == counts == [8, 8, 8]
    assert [c for _, c in bars] == ["#d62728" if c >= rep.head_threshold else "#2ca02c" for c in counts]
    per_class = {r.encoder: json.loads((r.path / "summary.json").read_text())["per_class_top1"] for r in rep.runs}
    gain = np.array(per_class["bilinear"]) - np.array(per_class["none"])
    head, tail = figs["per_class_gain.png"].axes[0].collections[:2]
    assert len(head.get_offsets()) == 0  # 8 training images per class: every class is a tail class
    np.testing.assert_array_equal(np.asarray(tail.get_offsets()), np.c_[p.train_counts, gain])
    # Fig. 7: 6 test titles; per title its class, then its words by attention (highest first, 3 green)
    texts = [
        t for t in figs["fig7_attention.png"].axes[0].texts if t.get_text() and not t.get_text().startswith("(no CJK")
    ]
    labels = [t for t in texts if t.get_text().endswith(":")]
    assert len(labels) == 6 and {t.get_text()[:-1] for t in labels} <= set(p.class_names)
    for lab in labels:
        words = [t for t in texts if t not in labels and t.get_position()[1] == lab.get_position()[1]]
        assert words and all(t.get_text().rsplit(" ", 1)[0] in p.words for t in words)
        weights = [float(t.get_text().rsplit(" ", 1)[1]) for t in words]
        assert weights == sorted(weights, reverse=True) and abs(sum(weights) - 1) <= 0.005 * len(weights)
        assert [to_hex(t.get_color()) for t in words[:3]] == ["#1a9641"] * min(3, len(words))
    with pytest.raises(SicotError, match=r"ablation of another recipe \(.*train\.epochs: \d+ -> 2\)"):
        ab.ablate(tiny_recipe(tiny_prepared, "train.epochs=2"), ["bilinear"], [0], root, data=tiny_prepared)
    # ablation.json lost: the runs still say what they were trained with, and another recipe is
    # refused before the plan is rewritten (nothing is reported as what it is not)
    (root / "ablation.json").unlink()
    with pytest.raises(SicotError, match=r"none-s0: holds a run trained with other settings .*train\.epochs: \d+ -> 2"):
        ab.ablate(tiny_recipe(tiny_prepared, "train.epochs=2"), ["bilinear"], [0], root, data=tiny_prepared)
    assert not (root / "ablation.json").exists()
    # a co-training variant's ablation may start from the default's baselines (docs/demo-pretraining.md):
    # no co-training key changes a run without a text encoder; the co-trained run copied in is refused
    variant = tmp_path / "variant"
    variant.mkdir()
    for name in ("none-s0", "bilinear-s0"):
        shutil.copytree(root / name, variant / name)
    lam2 = tiny_recipe(tiny_prepared, "train.epochs=1", "train.lam=2", "train.normalize_loss=false")
    with pytest.raises(
        SicotError, match=r"bilinear-s0: holds a run trained with other settings .*train\.lam: 1\.0 -> 2"
    ):
        ab.ablate(lam2, ["bilinear"], [0], variant, data=tiny_prepared)
    shutil.rmtree(variant / "bilinear-s0")
    _, statuses = ab.ablate(lam2, ["bilinear"], [0], variant, data=tiny_prepared)
    assert [(s.run_dir.name, s.state) for s in statuses] == [("none-s0", "skipped"), ("bilinear-s0", "trained")]


def test_a_class_name_never_ends_its_markdown_table_row():
    """A label typed with Alt+Enter in a spreadsheet ("hats\\nwinter") split its row of report.md in two."""
    from sicot_cli.report import md_cell

    assert md_cell("hats\nwinter") == "hats<br>winter"
    assert md_cell("a|b\r\nc\u2028d") == "a\\|b<br>c<br>d"
    assert md_cell("plain") == "plain" and md_cell("") == ""


def test_a_fifo_in_place_of_a_runs_predictions_is_refused_not_waited_on(ablation):
    """`report` opened a FIFO at predictions.h5 with h5py and waited for a writer for ever."""
    import os

    p = ablation / "bilinear-s1" / "predictions.h5"
    p.unlink()
    os.mkfifo(p)
    with pytest.raises(SicotError, match=r"bilinear-s1/predictions.h5: not a regular file \(a FIFO"):
        build_report([ablation], "bilinear")


@pytest.mark.parametrize(
    ("file", "edit", "needle"),
    [
        ("config.json", {"stage": "x"}, "field stage"),
        ("summary.json", {"final.head_threshold": float("nan")}, "head_threshold must be a whole number >= 0"),
        ("summary.json", {"final.test_images": -5}, "test_images must be a whole number >= 0"),
        ("summary.json", {"final.split": ["x"]}, "split must be one of test, val"),
        ("summary.json", {"final.checkpoint": {"a": 1}}, "checkpoint must be one of last, best"),
        ("summary.json", {"per_class_top1": []}, "per_class_top1 must be a list of numbers or nulls, one a class"),
        ("summary.json", {"per_class_top1": [1e300, 5.0]}, "per_class_top1 must hold accuracies in %"),
    ],
)
def test_hostile_values_in_a_runs_files_are_one_line(ablation, file, edit, needle):
    """From a downloaded run folder: a stage of the wrong type and a NaN boundary were tracebacks; an
    empty per-class list wrote an empty per_class.csv that blocked the next report; 1e300 % and a
    split of ['x'] went into the report as they were."""
    path = ablation / "bilinear-s1" / file
    data = json.loads(path.read_text())
    for key, value in edit.items():
        node, _, leaf = key.rpartition(".")
        (data[node] if node else data)[leaf] = value
    path.write_text(json.dumps(data))
    with pytest.raises(SicotError, match=re.escape(needle)):
        build_report([ablation], "bilinear")


def test_a_baseline_alone_has_no_table_comparing_it_with_itself(tmp_path):
    """Only baseline runs: Table 2 read "baseline vs none", the same run in both columns."""
    run = make_run(tmp_path / "x", "none", 0, 50.0, np.arange(4) % 2 == 0)
    rep = build_report([run])
    tables = rep.tables()
    assert tables["Table 3: encoders, top-1"] == [
        {"method": "baseline", "top-1": "50.00", "gain": "-", "evidence": "-"}
    ]
    assert all(rows == [] for title, rows in tables.items() if title.startswith(("Table 2", "Table 4")))
    r = runner.invoke(app, ["report", str(run), "--no-figures"])
    assert r.exit_code == 0 and "vs none" not in r.output and "Table 2" not in r.output, r.output


def test_the_bootstrap_holds_a_bounded_number_of_resampled_values(monkeypatch):
    """scipy resampled all 2,000 x n at once (31 KB a test image: 5 GB at 171k images); in batches
    the interval is the same (one random stream) and at most BOOTSTRAP_BATCH_VALUES values are held."""
    import scipy.stats

    from sicot_cli import report as report_mod

    diff = np.random.default_rng(2).choice([-1.0, 0.0, 1.0], size=3001, p=[0.2, 0.6, 0.2])
    whole = report_mod.bootstrap_ci(diff)
    batches = []
    real = scipy.stats.bootstrap
    monkeypatch.setattr(scipy.stats, "bootstrap", lambda *a, **k: batches.append(k["batch"]) or real(*a, **k))
    monkeypatch.setattr(report_mod, "BOOTSTRAP_BATCH_VALUES", 100_000)
    assert report_mod.bootstrap_ci(diff) == whole
    assert batches == [33] and batches[0] * len(diff) <= 100_000


def test_names_from_the_data_cannot_run_as_spreadsheet_formulas():
    """A class label such as =HYPERLINK(...) from an untrusted manifest is written as text; numbers stay numbers."""
    from sicot_cli.report import _per_class_csv

    rows = [
        {"class": '=HYPERLINK("http://x")', "train_images": 3, "top1 mean": -0.5},
        {"class": "@SUM(A1)", "train_images": 2, "top1 mean": 0.25},
        {"class": "mug", "train_images": 1, "top1 mean": 1.0},
    ]
    lines = _per_class_csv(rows).splitlines()
    assert lines[1:] == ['"\'=HYPERLINK(""http://x"")",3,-0.5', "'@SUM(A1),2,0.25", "mug,1,1.0"]


def test_a_damaged_plan_beside_its_runs_is_ours_a_foreign_one_alone_is_refused(tmp_path):
    """ablate rewrites its own torn ablation.json (its runs are beside it) but never replaces a user's
    file of that name: in a folder without the ablation's runs, or one that is no plan at all."""
    from types import SimpleNamespace

    from sicot_cli.ablate import _check_out_folder
    from sicot_cli.errors import SicotError

    root = tmp_path / "abl"
    (root / "none-s0").mkdir(parents=True)
    (root / "ablation.json").write_text('{"recipe": {"name": "x"}, "encoders": ["none"]}', encoding="utf-8")
    jobs = [SimpleNamespace(run_dir=root / "none-s0")]
    _check_out_folder(root, jobs)  # a plan as ablate writes it
    (root / "ablation.json").write_text('{"recipe": {"na', encoding="utf-8")  # torn
    with pytest.raises(SicotError, match="not an ablation plan `sicot ablate` wrote"):
        _check_out_folder(root, jobs)
    (root / "none-s0" / "config.json").write_text("{}", encoding="utf-8")  # the ablation's run is there
    _check_out_folder(root, jobs)
    # a user's own file of that name, beside runs they copied in: never replaced
    (root / "ablation.json").write_text('{"my": "notes"}', encoding="utf-8")
    with pytest.raises(SicotError, match="not an ablation plan `sicot ablate` wrote"):
        _check_out_folder(root, jobs)
    (root / "ablation.json").write_text("my notes", encoding="utf-8")
    with pytest.raises(SicotError, match="not an ablation plan `sicot ablate` wrote"):
        _check_out_folder(root, jobs)
    (root / "ablation.json").unlink()
    (root / "ablation.json").mkdir()  # said "holds 'ablation.json' and no ablation.json"
    with pytest.raises(SicotError, match=r"ablation.json: not a file \(a folder, or a link to nothing\)"):
        _check_out_folder(root, jobs)


def test_a_torn_plan_beside_its_runs_is_rewritten_not_a_traceback(tiny_prepared, tmp_path):
    """``{"recipe": null, ...}`` (or an empty file, a BOM) beside the ablation's runs: rewritten, the
    finished run skipped; ``"recipe": null`` was an AttributeError traceback."""
    import json

    from sicot_cli import ablate as ab

    recipe = tiny_recipe(tiny_prepared, "train.epochs=1")
    root, _ = ab.ablate(recipe, [], [0], tmp_path / "abl", data=tiny_prepared)
    plan = root / "ablation.json"
    good = json.loads(plan.read_text(encoding="utf-8"))
    for torn in ('{"recipe": null, "encoders": ["none"]}', '{"recipe": "x"}', "", "\ufeff" + json.dumps(good)[:40]):
        plan.write_text(torn, encoding="utf-8")
        _, statuses = ab.ablate(recipe, [], [0], root, data=tiny_prepared)
        assert [s.state for s in statuses] == ["skipped"]
        assert json.loads(plan.read_text(encoding="utf-8"))["recipe"] == good["recipe"]
