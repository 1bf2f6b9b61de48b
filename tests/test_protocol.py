"""The evaluation protocol: test rows are scored whatever their titles, choices are made on validation only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import KEEP_ALL, TRAIN_FAST, make_manifest, write_image

from sicot_cli import runs
from sicot_cli.config import load_recipe
from sicot_cli.data.dataset import open_prepared
from sicot_cli.data.prepare import prepare
from sicot_cli.errors import SicotError


def _prepare(manifest: Path, out: Path, *extra: str):
    prepare(
        load_recipe(
            None, ["data.source=manifest", f"data.manifest={manifest}", "data.image_size=16", *KEEP_ALL, *extra]
        ),
        out,
    )
    return open_prepared(out)


def _ids(p, split: str) -> set[str]:
    lo, hi = p.split_range(split)
    return set(p.ids()[lo:hi])


def test_test_rows_with_empty_titles_are_scored(tmp_path: Path) -> None:
    """A test row is scored image-only: an empty title, or one the noise filter empties, drops nothing."""
    extra = [
        {"image": "cat0.png", "title": "", "label": "cat", "id": "t-empty", "split": "test"},
        {"image": "dog0.png", "title": "!!! ...", "label": "dog", "id": "t-punct", "split": "test"},  # no word at all
        {"image": "cup0.png", "title": "", "label": "cup", "id": "tr-empty", "split": "train"},  # training row: dropped
    ]
    m = make_manifest(tmp_path / "raw", per_class=6, split=True, extra_rows=extra)
    p = _prepare(m, tmp_path / "d.h5")
    test = _ids(p, "test")
    assert {"t-empty", "t-punct"} <= test and len(test) == 3 * 2 + 2
    assert "tr-empty" not in set(p.ids())
    lo, hi = p.split_range("test")
    ids = p.ids()[lo:hi]
    assert all(p.lengths[lo + ids.index(i)] == 0 for i in ("t-empty", "t-punct"))

    from sicot_cli.train import train

    recipe = load_recipe(
        None, [f"data.out={tmp_path / 'd.h5'}", *TRAIN_FAST, "model.encoder=bilinear", "train.epochs=1"]
    )
    result = train(recipe, tmp_path / "run", data=tmp_path / "d.h5")
    assert result.final["n_test"] == 8 and result.final["test_images"] == 8
    import h5py

    with h5py.File(tmp_path / "run" / runs.PREDICTIONS) as f:
        assert sorted(f["rows"][()].tolist()) == list(range(lo, hi))


def test_validation_split_is_carved_from_training_rows(tmp_path: Path) -> None:
    """Class-stratified floor(fraction * n), disjoint from train and test, fixed by data.split_seed."""
    m = make_manifest(tmp_path / "raw", per_class=24)
    a = _prepare(m, tmp_path / "a.h5", "data.val_fraction=0.2")
    b = _prepare(m, tmp_path / "b.h5", "data.val_fraction=0.2")
    c = _prepare(m, tmp_path / "c.h5", "data.val_fraction=0.2", "data.split_seed=7")
    none = _prepare(m, tmp_path / "n.h5", "data.val_fraction=0")
    train, val, test = _ids(a, "train"), _ids(a, "val"), _ids(a, "test")
    assert not (train & val) and not (val & test) and not (train & test)
    assert len(train) + len(val) + len(test) == a.n == 72
    # 22 training rows per class after the 2 test rows: floor(0.2 * 22) = 4 of each class
    lo, hi = a.split_range("val")
    assert np.bincount(a.labels[lo:hi]).tolist() == [4, 4, 4] and a.n_val == 12
    assert a.train_counts.tolist() == [18, 18, 18]  # the counts of the rows actually trained on
    # the same prepared split whatever the run's seed (one file); the same file from the same split_seed
    assert (_ids(b, "val"), _ids(b, "test")) == (val, test)
    assert _ids(c, "val") != val
    # the test split does not depend on the validation carve
    assert _ids(none, "test") == test and none.n_val == 0 and _ids(none, "train") == train | val


def test_small_classes_keep_all_their_training_images(tmp_path: Path) -> None:
    m = make_manifest(tmp_path / "raw", per_class=6)  # 4 training rows per class: floor(0.2 * 4) = 0
    p = _prepare(m, tmp_path / "d.h5", "data.val_fraction=0.2")
    assert p.n_val == 0 and p.train_counts.tolist() == [4, 4, 4]
    p = _prepare(m, tmp_path / "e.h5", "data.val_fraction=0.5", "data.min_train_per_class=3")
    assert p.n_val == 3 and p.train_counts.tolist() == [3, 3, 3]  # 2 wanted, min_train_per_class keeps 3


def test_manifest_val_rows_are_kept_as_given(tmp_path: Path) -> None:
    extra = [
        {"image": f"v{i}.png", "title": "red cat", "label": "cat", "id": f"v{i}", "split": sp}
        for i, sp in ((2, "val"), (3, "validation"))
    ]
    (tmp_path / "raw").mkdir()
    for i in (2, 3):  # images of their own: a validation row that repeats a training file is skipped
        write_image(tmp_path / "raw" / f"v{i}.png", seed=700 + i, channel=0)
    m = make_manifest(tmp_path / "raw", per_class=8, split=True, extra_rows=extra)
    p = _prepare(m, tmp_path / "d.h5")
    assert _ids(p, "val") == {"v2", "v3"}


def test_validation_folds_redraw_validation_rows_only(tmp_path: Path) -> None:
    """data.val_fold = k > 0: the same number of validation rows per class, other rows, the same test
    rows; fold 0 is the file every earlier version prepared. Refused where the manifest names val rows."""
    m = make_manifest(tmp_path / "raw", per_class=24)  # no split column: the test rows are drawn too
    base = _prepare(m, tmp_path / "a.h5", "data.val_fraction=0.2")
    zero = _prepare(m, tmp_path / "z.h5", "data.val_fraction=0.2", "data.val_fold=0")
    assert zero.ids() == base.ids()
    folds = [_prepare(m, tmp_path / f"f{k}.h5", "data.val_fraction=0.2", f"data.val_fold={k}") for k in (1, 2)]
    vals = [_ids(base, "val")] + [_ids(f, "val") for f in folds]
    assert len({frozenset(v) for v in vals}) == 3  # three different validation draws
    for f in folds:
        assert _ids(f, "test") == _ids(base, "test")
        assert _ids(f, "train") | _ids(f, "val") == _ids(base, "train") | _ids(base, "val")
        lo, hi = f.split_range("val")
        assert np.bincount(f.labels[lo:hi]).tolist() == [4, 4, 4]
    with pytest.raises(SicotError, match="val_fraction"):
        _prepare(m, tmp_path / "n.h5", "data.val_fraction=0", "data.val_fold=1")
    extra = [{"image": "cat0.png", "title": "red cat", "label": "cat", "id": "v0", "split": "val"}]
    own = make_manifest(tmp_path / "own", per_class=8, split=True, extra_rows=extra)
    with pytest.raises(SicotError, match="names its own val rows.*--val-seed"):
        _prepare(own, tmp_path / "o.h5", "data.val_fold=1")


@pytest.fixture(scope="module")
def with_val(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("val")
    m = make_manifest(root / "raw", per_class=14)
    out = root / "v.h5"
    _prepare(m, out, "data.val_fraction=0.25")  # 12 training rows per class: 3 validation rows each
    return out


def test_checkpoint_best_follows_validation_not_test(
    with_val: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fixture where validation and test disagree: best = the best VALIDATION epoch; test is scored once."""
    import sicot_cli.train as train_mod

    real = train_mod.evaluate_model
    calls: list[str] = []
    val_top1 = iter([10.0, 50.0, 20.0])  # validation peaks at epoch 2

    def scripted(*args, split: str = "test", **kw):
        result = real(*args, split=split, **kw)
        calls.append(split)
        if split == "val":
            result.metrics["top1"] = next(val_top1)
        return result

    monkeypatch.setattr(train_mod, "evaluate_model", scripted)
    recipe = load_recipe(None, [f"data.out={with_val}", *TRAIN_FAST, "train.epochs=3", "eval.select=best"])
    result = train_mod.train(recipe, tmp_path / "run", data=with_val)
    assert calls == ["val", "val", "val", "test"]
    assert runs.load_checkpoint(tmp_path / "run" / runs.BEST)["epoch"] == 2
    final = json.loads((tmp_path / "run" / runs.SUMMARY).read_text())["final"]
    assert (final["checkpoint"], final["checkpoint_epoch"], final["selected_on"], final["val_images"]) == (
        "best",
        2,
        "val",
        9,
    )
    assert [h["val_top1"] for h in result.history] == [10.0, 50.0, 20.0]
    assert not any(k in h for h in result.history for k in ("top1", "top3", "tail_top1"))  # no test score per epoch

    # the weights scored on test are checkpoint-best's: evaluating that checkpoint gives the same numbers
    from sicot_cli.evaluate import evaluate_run

    again = evaluate_run(tmp_path / "run", checkpoint="best", device="cpu")
    assert again.metrics["top1"] == pytest.approx(final["top1"])
    val = evaluate_run(tmp_path / "run", checkpoint="best", device="cpu", split="val")
    assert val.metrics["n_test"] == 9
    # --json names the split it scored and counts its images as such, not as test images
    from typer.testing import CliRunner

    from sicot_cli.cli import app

    r = CliRunner().invoke(app, ["evaluate", "--run", str(tmp_path / "run"), "--split", "val", "--json"])
    out = json.loads(r.output)
    assert (out["split"], out["n_images"], "n_test" in out) == ("val", 9, False)
    assert out["top1"] == pytest.approx(val.metrics["top1"])

    # unless told, every command uses the checkpoint the run's scores come from (here best, epoch 2,
    # not the last, epoch 3), and says so: evaluate's default reproduces the recorded test score
    assert runs.scored_checkpoint(tmp_path / "run") == "best"
    default = evaluate_run(tmp_path / "run", device="cpu")
    assert (default.checkpoint, default.checkpoint_epoch) == ("best", 2)
    assert default.metrics["top1"] == pytest.approx(final["top1"])
    out = json.loads(CliRunner().invoke(app, ["evaluate", "--run", str(tmp_path / "run"), "--json"]).output)
    assert (out["checkpoint"], out["checkpoint_epoch"], out["top1"]) == ("best", 2, pytest.approx(final["top1"]))
    out = json.loads(
        CliRunner().invoke(app, ["evaluate", "--run", str(tmp_path / "run"), "--json", "--checkpoint", "last"]).output
    )
    assert (out["checkpoint"], out["checkpoint_epoch"]) == ("last", 3)
    image = tmp_path / "x.png"
    write_image(image, seed=1, channel=0)
    r = CliRunner().invoke(app, ["predict", "--run", str(tmp_path / "run"), str(image)])
    assert r.exit_code == 0 and "(checkpoint best, epoch 2)" in " ".join(r.output.split()), r.output
    r = CliRunner().invoke(app, ["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "m.pt")])
    assert r.exit_code == 0 and "from checkpoint best (epoch 2)" in " ".join(r.output.split()), r.output
    sicot = json.loads((tmp_path / "m.pt.json").read_text())["sicot"]
    assert (sicot["checkpoint"], sicot["epoch"], "stage" in sicot) == ("best", 2, False)


def test_select_best_needs_validation_rows(tiny_prepared: Path, tmp_path: Path) -> None:
    from sicot_cli.train import train

    recipe = load_recipe(None, [f"data.out={tiny_prepared}", *TRAIN_FAST, "eval.select=best"])
    with pytest.raises(SicotError, match="eval.select = best needs validation rows"):
        train(recipe, tmp_path / "run", data=tiny_prepared)
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


@pytest.mark.parametrize(
    "bad", ["data.val_fraction=0.6", "data.val_fraction=-0.1", "data.val_fraction=nan", "eval.select=test"]
)
def test_protocol_keys_are_checked(bad: str) -> None:
    with pytest.raises(SicotError, match=bad.split("=")[0]):
        load_recipe(None, [bad])


def test_degenerate_t_test_is_undefined() -> None:
    """Identical differences on every seed: the t statistic is 0/0 or x/0, so no p-value; said so."""
    from sicot_cli.report import Gain, paired_t

    p = paired_t([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
    assert p is not None and math.isnan(p)
    assert math.isnan(paired_t([0.0, 0.0], [0.0, 0.0]))
    assert paired_t([1.0], [0.0]) is None
    assert paired_t([1.0, 2.0, 3.0], [0.0, 0.0, 0.0]) == pytest.approx(
        0.07417990022744853
    )  # scipy.stats.ttest_rel on the same
    g = Gain([1.0, 1.0, 1.0], p)
    assert g.significant is None and g.as_dict()["p_value"] is None and g.as_dict()["t_test"] == "undefined"
    g = Gain([1.0, 1.0, 1.0], p, ci=(0.5, 1.5))
    assert g.significant is True  # the bootstrap CI over images still speaks


def test_presets_resolve_to_the_documented_keys() -> None:
    """defaults < preset < recipe file < command line; docs/presets.md lists the same keys."""
    from sicot_cli.config import PRESETS

    keys = lambda r: (r.train.normalize_loss, r.model.semantic_norm, r.model.mixed_trains_classifier)  # noqa: E731
    assert keys(load_recipe(None)) == (True, "batchnorm", True)
    assert keys(load_recipe(None, ["preset=paper"])) == (False, "none", True)
    assert keys(load_recipe(None, ["preset=paper", "model.semantic_norm=batchnorm"])) == (False, "batchnorm", True)
    assert keys(load_recipe(None, ["preset=sicot", "train.normalize_loss=false"])) == (False, "batchnorm", True)
    with pytest.raises(SicotError, match="preset must be one of paper, sicot, got 'papr'"):
        load_recipe(None, ["preset=papr"])
    doc = (Path(__file__).resolve().parent.parent / "docs" / "presets.md").read_text(encoding="utf-8")
    for name, table in PRESETS.items():
        for key, value in table.items():
            shown = str(value).lower() if isinstance(value, bool) else f'"{value}"'
            assert f"| {name} | `{key}` | `{shown}` |" in doc, (name, key)


def test_recipe_file_keys_beat_the_preset(tmp_path: Path) -> None:
    f = tmp_path / "r.toml"
    f.write_text('name = "x"\npreset = "paper"\n[train]\nnormalize_loss = true\n', encoding="utf-8")
    r = load_recipe(f)
    assert (r.preset, r.train.normalize_loss, r.model.semantic_norm) == ("paper", True, "none")


def test_shipped_recipes_use_the_default_preset() -> None:
    root = Path(__file__).resolve().parent.parent / "recipes"
    for f in sorted(root.glob("*.toml")):
        r = load_recipe(f)
        assert (r.preset, r.train.normalize_loss, r.model.semantic_norm) == ("sicot", True, "batchnorm"), f.name


def test_ablate_compares_presets_side_by_side(tiny_prepared: Path, tmp_path: Path) -> None:
    from sicot_cli.ablate import ablate
    from sicot_cli.report import build_report

    recipe = load_recipe(None, [f"data.out={tiny_prepared}", *TRAIN_FAST, "train.epochs=1"])
    root, statuses = ablate(recipe, ["mean"], [0], tmp_path / "ab", data=tiny_prepared, presets=["sicot", "paper"])
    assert [s.run_dir.name for s in statuses] == ["none-s0", "mean-s0", "mean-paper-s0"]
    paper = json.loads((root / "mean-paper-s0" / "config.json").read_text())["recipe"]
    assert (paper["preset"], paper["train"]["normalize_loss"], paper["model"]["semantic_norm"]) == (
        "paper",
        False,
        "none",
    )
    rep = build_report([root], "mean", bootstrap=False)
    assert rep.encoders == ["none", "mean", "mean[paper]"]
    with pytest.raises(SicotError, match="unknown preset 'x'"):
        ablate(recipe, ["mean"], [0], tmp_path / "ab2", data=tiny_prepared, presets=["x"])
    # a key the presets set, set again by hand, won for the recipe's own preset and lost for the other
    own = load_recipe(None, [f"data.out={tiny_prepared}", *TRAIN_FAST, "train.epochs=1", "model.semantic_norm=none"])
    with pytest.raises(SicotError, match=r"^model.semantic_norm is set by --presets .*--presets sicot\)$"):
        ablate(own, ["mean"], [0], tmp_path / "ab3", data=tiny_prepared, presets=["sicot", "paper"])
    assert not (tmp_path / "ab3").exists()
    ablate(
        own, ["mean"], [0], tmp_path / "ab3", data=tiny_prepared, presets=["sicot"]
    )  # one preset: the key is the user's
    # a recipe file that sets no preset key: the preset's own keys are not the user's (all were refused)
    r = tmp_path / "r.toml"
    r.write_text('[model]\nbackbone = "mobilenet_v3_small"\n')
    from_file = load_recipe(r, [f"data.out={tiny_prepared}", *TRAIN_FAST, "train.epochs=1"])
    assert not {"train.normalize_loss", "model.semantic_norm", "model.mixed_trains_classifier"} & from_file.explicit
    ablate(from_file, ["mean"], [0], tmp_path / "ab4", data=tiny_prepared, presets=["sicot", "paper"])


def test_ablate_on_validation_folds_is_the_documented_loop_in_one_command(tmp_path: Path, monkeypatch) -> None:
    """`ablate --val-folds 0,1`: fold K prepared beside data.out (fold 0 is data.out itself), seed K
    trained on it in <out>/fold-K, then the validation tables over both folds; no report written.
    Folds that cannot be drawn, or a fold file holding another fold, are refused before any run."""
    from typer.testing import CliRunner

    from sicot_cli.cli import app

    monkeypatch.chdir(tmp_path)
    m = make_manifest(tmp_path / "raw", per_class=14)
    data = [
        "data.source=manifest",
        f"data.manifest={m}",
        "data.image_size=16",
        "data.out=d.h5",
        "data.val_fraction=0.25",
    ]
    args = ["ablate", "--val-folds", "0,1", "--encoders", "mean", "--out", "ab", *data, *KEEP_ALL, *TRAIN_FAST]
    r = CliRunner().invoke(app, [*args, "train.epochs=1"])
    assert r.exit_code == 0, r.output
    assert "2 validation folds" in r.output and "validation only" in r.output
    assert "ablation (validation)" in r.output and "test top-1" not in r.output  # runs shown by their validation scores
    assert sorted(p.name for p in (tmp_path / "ab").iterdir()) == ["fold-0", "fold-1"]
    for k in (0, 1):
        assert sorted(p.name for p in (tmp_path / "ab" / f"fold-{k}").iterdir() if p.is_dir()) == [
            f"mean-s{k}",
            f"none-s{k}",
        ]
        cfg = json.loads((tmp_path / "ab" / f"fold-{k}" / f"mean-s{k}" / "config.json").read_text())
        assert (cfg["recipe"]["data"]["val_fold"], cfg["recipe"]["train"]["seed"]) == (k, k)
    assert not list((tmp_path / "ab").rglob("report.md"))
    f0, f1 = open_prepared(tmp_path / "d.h5"), open_prepared(tmp_path / "d-vf1.h5")
    assert _ids(f0, "test") == _ids(f1, "test") and _ids(f0, "val") != _ids(f1, "val")
    # again: everything is kept, nothing retrained
    r = CliRunner().invoke(app, [*args, "train.epochs=1"])
    assert r.exit_code == 0 and r.output.count("skipped") >= 4, r.output
    # files prepared with other settings: one warning a fold, advising what --val-folds allows
    r = CliRunner().invoke(app, [*args, "train.epochs=1", "data.image_size=20"])
    said = " ".join(r.output.split())
    assert r.exit_code == 0 and said.count("was prepared with other settings") == 2, r.output
    assert "Remove the file: --val-folds prepares it again" in said and "--data it writes" not in said, r.output
    assert said.index("d-vf1.h5 was prepared with other settings") < said.index("skipped"), "both before any run"
    for extra, needle in (
        (["--seeds", "0"], "leave --seeds out"),
        (["--seeds", ""], "leave --seeds out"),
        (["--data", "d.h5"], "leave --data out"),
        (["data.val_fold=1"], "--val-folds sets data.val_fold"),
        (["data.val_fraction=0"], "carves none"),
    ):
        r = CliRunner().invoke(app, [*args, *extra])
        assert r.exit_code == 2 and needle in " ".join(r.output.split()), r.output
    (tmp_path / "d-vf2.h5").write_bytes((tmp_path / "d-vf1.h5").read_bytes())  # fold 1's file under fold 2's name
    r = CliRunner().invoke(
        app, ["ablate", "--val-folds", "2", "--encoders", "mean", "--out", "ab2", *data, *KEEP_ALL, *TRAIN_FAST]
    )
    assert r.exit_code == 2 and "holds validation fold 1, not fold 2" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "ab2").exists()
    r = CliRunner().invoke(app, ["ablate", "--val-folds", "0,x"])
    assert r.exit_code == 2 and "--val-folds must be comma-separated integers" in r.output
    # a manifest that names its own val rows: refused in --val-folds' terms before fold 0 is prepared
    own = make_manifest(tmp_path / "raw-own", per_class=14, split=True)
    own.write_text(own.read_text().replace("-5,train", "-5,val"))  # image 5 of each class: a val row
    assert own.read_text().count(",val") == 3
    fresh = [a for a in data if not a.startswith(("data.manifest=", "data.out="))]
    own_args = ["ablate", "--val-folds", "0,1", "--encoders", "mean", "--out", "ab3", *fresh, f"data.manifest={own}"]
    r = CliRunner().invoke(app, [*own_args, "data.out=own.h5", *KEEP_ALL, *TRAIN_FAST])
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and "--val-folds 1:" in said and "names its own val rows" in said, r.output
    assert "data.val_fold" not in said and not (tmp_path / "own.h5").exists() and not (tmp_path / "ab3").exists()
