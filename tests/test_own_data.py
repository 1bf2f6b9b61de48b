"""Own data as a new user meets it (issue 21): names, boundaries, OOV split, pixel limit, threads,
tables off a terminal, ablation progress and figures, training plan warnings."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import KEEP_ALL, TRAIN_FAST, assert_png, capture_figures, make_manifest, write_image
from PIL import Image
from typer.testing import CliRunner

from sicot_cli.cli import app
from sicot_cli.config import load_recipe
from sicot_cli.data.prepare import data_boundaries, prepare

runner = CliRunner()


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> Path:
    """``sicot prepare --manifest shop.csv`` with no recipe (tiny settings as overrides)."""
    root = tmp_path_factory.mktemp("own")
    m = make_manifest(root / "raw", per_class=10, name="shop.csv")
    out = root / "shop.h5"
    r = runner.invoke(app, ["prepare", "--manifest", str(m), "--out", str(out), "data.image_size=16", *KEEP_ALL])
    assert r.exit_code == 0, r.output
    return out


def test_prepare_manifest_names_the_file_and_derives_its_boundaries(own):
    from sicot_cli.data.dataset import open_prepared

    p = open_prepared(own)
    assert p.recipe["name"] == "shop" and p.recipe["data"]["source"] == "manifest"
    assert p.recipe["eval"]["boundaries"] == "data"
    # 10 per class, 2 test, floor(0.1 * 8) = 0 validation: 8 training images in each of 3 classes
    assert p.train_counts.tolist() == [8, 8, 8]
    assert {k: p.recipe["eval"][k] for k in ("head_threshold", "many_threshold", "few_threshold")} == {
        "head_threshold": 8,
        "many_threshold": 8,
        "few_threshold": 8,
    }
    assert p.head_threshold == 8


def test_data_boundaries_known_answer():
    # counts 1..9: mean 5; tertiles: the 4th smallest (index 3) and the 6th (index 5)
    assert data_boundaries(np.arange(1, 10)) == {"head_threshold": 5, "many_threshold": 6, "few_threshold": 4}
    # 200 classes of 1000 and 800 of 10: the mean (208) is the head boundary, as the paper's iMaterialist 200 ~ its mean 218
    counts = np.r_[np.full(200, 1000), np.full(800, 10)]
    assert data_boundaries(counts) == {"head_threshold": 208, "many_threshold": 10, "few_threshold": 10}


def test_runs_and_reports_carry_the_prepared_files_name_settings_and_boundaries(own, tmp_path):
    from sicot_cli.report import build_report, to_markdown
    from sicot_cli.train import train

    # no --recipe, no name: the built-in demo recipe, as `sicot train --data shop.h5` gives
    recipe = load_recipe(
        None, [*TRAIN_FAST, "train.epochs=1", f"train.runs_dir={tmp_path}", "model.encoder=none", "train.threads=1"]
    )
    assert recipe.name == "demo" and recipe.eval.head_threshold == 40
    result = train(recipe, data=own)
    assert result.run_dir == tmp_path / "shop-none-s0"
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["recipe"]["name"] == "shop"
    assert config["recipe"]["data"]["source"] == "manifest" and config["recipe"]["data"]["out"] == str(own)
    assert config["recipe"]["eval"]["head_threshold"] == 8
    assert config["threads"] == 1
    import torch

    assert torch.get_num_threads() == 1
    final = json.loads((result.run_dir / "summary.json").read_text())["final"]
    assert (final["head_threshold"], final["many_threshold"], final["few_threshold"]) == (8, 8, 8)
    rep = build_report([result.run_dir])
    assert rep.dataset == "shop" and (rep.head_threshold, rep.many_threshold, rep.few_threshold) == (8, 8, 8)
    assert to_markdown(rep).startswith("# sicot report: shop")
    # an explicit override wins over the file's boundary, and the name given explicitly stays
    r2 = load_recipe(
        None,
        [
            *TRAIN_FAST,
            "train.epochs=1",
            f"train.runs_dir={tmp_path}",
            "model.encoder=none",
            "eval.head_threshold=3",
            "name=mine",
        ],
    )
    from sicot_cli.config import adopt_prepared
    from sicot_cli.data.dataset import open_prepared

    changed = adopt_prepared(r2, open_prepared(own).recipe, own)
    assert r2.name == "mine" and r2.eval.head_threshold == 3 and r2.eval.many_threshold == 8
    assert "name" not in changed and "eval.many_threshold" in changed and "data.source" in changed


def _oov_manifest(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(3):
        for label, word in (("a", "apple"), ("b", "banana")):
            write_image(root / f"{label}{i}.png", seed=i, channel=0 if label == "a" else 1)
            rows.append({"image": f"{label}{i}.png", "title": f"common {word}", "label": label, "split": "train"})
    write_image(root / "ta.png", seed=9, channel=0)
    write_image(root / "tb.png", seed=8, channel=1)
    rows.append({"image": "ta.png", "title": "common unseen apple", "label": "a", "split": "test"})
    rows.append({"image": "tb.png", "title": "banana", "label": "b", "split": "test"})
    path = root / "m.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["image", "title", "label", "split"])
        w.writeheader()
        w.writerows(rows)
    return path


def test_test_title_oov_and_filtered_words_are_reported_separately(tmp_path):
    m = _oov_manifest(tmp_path / "raw")
    # 3 training words (common 6, apple 3, banana 3): floor(0.34 * 3) = 1 removed, "common"
    recipe = load_recipe(
        None,
        [
            "data.source=manifest",
            f"data.manifest={m}",
            "data.image_size=16",
            "data.workers=1",
            "embed.dim=8",
            "embed.epochs=1",
            "text.drop_most_frequent=0.34",
            "text.drop_least_frequent=0",
        ],
    )
    s = prepare(recipe, tmp_path / "o.h5")
    # test words: common (removed by the filter), unseen (never seen), apple, banana
    assert (s.test_oov_rate, s.test_filtered_rate) == (0.25, 0.25)
    from sicot_cli.views import prepare_table

    lines = _render(prepare_table(s)).splitlines()
    assert any("test-title words unseen in training titles (OOV)" in ln and "25.0%" in ln for ln in lines)
    assert any("test-title words removed by the noise filter" in ln and "25.0%" in ln for ln in lines)
    # embed --neighbours says the filter removed the word, not that it was never seen
    r = runner.invoke(app, ["embed", "--neighbours", "common", "--data", str(tmp_path / "o.h5")])
    assert r.exit_code == 2 and "removed by the noise filter (34% most spread over labels)" in r.output
    # tokenize --data marks dropped words in text, not only in colour
    r = runner.invoke(app, ["tokenize", "--data", str(tmp_path / "o.h5"), "common apple"])
    assert r.exit_code == 0 and "[common] | apple" in r.output


def _render(table) -> str:  # noqa: ANN001
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=300).print(table)
    return buf.getvalue()


def test_large_jpeg_decodes_in_draft_mode_and_the_pixel_limit_is_a_recipe_key(tmp_path):
    from sicot_cli.data.images import ImageSkip, load_image

    a = np.zeros((2400, 2000, 3), np.uint8)
    a[:, :1000] = 255  # left half white: survives the reduction and the centre crop
    Image.fromarray(a).save(tmp_path / "big.jpg", quality=90)
    Image.fromarray(a).save(tmp_path / "big.png")
    # 4.8 MP over a 1 MP limit: the JPEG decodes at 1/8 (300 x 250) in draft mode, the PNG cannot
    hwc = load_image(tmp_path / "big.jpg", 16, max_pixels=1_000_000)
    assert hwc.shape == (16, 16, 3) and hwc[:, :6].min() > 200 and hwc[:, 10:].max() < 60
    with pytest.raises(ImageSkip, match=r"image over data.max_image_pixels \(1 MP\)"):
        load_image(tmp_path / "big.png", 16, max_pixels=1_000_000)
    assert load_image(tmp_path / "big.png", 16, max_pixels=5_000_000).shape == (16, 16, 3)
    with pytest.raises(Exception, match="data.max_image_pixels must be >= 1"):
        load_recipe(None, ["data.max_image_pixels=0"])


def test_odd_images_convert_or_skip_with_a_reason(tmp_path):
    """Audit round 8: colour-keyed transparency on white, 16-bit scaled by integers, NaN and icons skipped, no warnings."""
    import warnings

    from sicot_cli.data.images import ImageSkip, _to_rgb, load_image

    for mode, fill in (("L", 7), ("RGB", (1, 2, 3))):  # a tRNS colour key: the keyed pixels are transparent
        p = tmp_path / f"key-{mode}.png"
        Image.new(mode, (8, 8), fill).save(p, transparency=fill)
        assert (load_image(p, 8) == 255).all(), mode
    grey16 = Image.fromarray(np.array([[0, 128, 129, 40000, 65535]], np.uint16))
    assert np.asarray(_to_rgb(grey16))[0, :, 0].tolist() == [0, 0, 1, 156, 255]  # round(v * 255 / 65535)
    int32 = Image.fromarray(np.array([[-5, 0, 17, 255]], np.int32))
    assert np.asarray(_to_rgb(int32))[0, :, 0].tolist() == [0, 0, 17, 255]
    nan = tmp_path / "nan.tif"
    Image.fromarray(np.full((8, 8), np.nan, np.float32)).save(nan)
    with pytest.raises(ImageSkip, match="non-finite pixel values"):
        load_image(nan, 8)
    ico = tmp_path / "a.png"  # an icon named .png
    Image.new("RGB", (32, 32), (9, 9, 9)).save(ico, format="ICO")
    with pytest.raises(ImageSkip, match=r"an icon container \(ICO, CUR or ICNS\) is not read"):
        load_image(ico, 8)
    with pytest.raises(ImageSkip, match="icon container"):  # whatever its name says
        load_image(io.BytesIO(ico.read_bytes()), 8)
    tga = tmp_path / "t.tga"  # an uncompressed TGA's header (00 00 02 00) is also a CUR's: it is read
    Image.new("RGB", (24, 20), (0, 200, 0)).save(tga)
    assert tga.read_bytes()[:4] == b"\x00\x00\x02\x00"
    assert load_image(tga, 8)[0, 0].tolist() == [0, 200, 0]
    bad_exif = tmp_path / "exif.jpg"
    Image.new("RGB", (8, 8), (200, 0, 0)).save(bad_exif, exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff\x00")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert load_image(bad_exif, 8).shape == (8, 8, 3)  # the pixels as stored
    assert not seen, [str(w.message) for w in seen]


def test_threads_auto_value_and_bounds(monkeypatch):
    from sicot_cli import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 64)
    assert threads.resolve_threads(0) == 8 and threads.resolve_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's per-rank setting is the auto value
    assert threads.resolve_threads(0) == 1 and threads.resolve_threads(3) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    assert threads.resolve_threads(0) == 2
    for odd in ("²", "٣", "x", "-2"):  # '²'.isdigit() is True, and int('²') raised a traceback
        monkeypatch.setenv("OMP_NUM_THREADS", odd)
        assert threads.resolve_threads(0) == 2
    with pytest.raises(Exception, match="train.threads must be >= 0"):
        load_recipe(None, ["train.threads=-1"])


def test_tables_are_never_cut_off_a_terminal():
    from rich.console import Console
    from rich.table import Table

    from sicot_cli.console import show

    t = Table("dataset", "baseline", "evidence (top-1 gain)", title="Table 2")
    t.add_row(
        "my-own-products",
        "29.43±5.31 (50.12±4.02)",
        "not significant across seeds (seeds p=0.388; images CI [-2.03, -0.26])",
    )
    buf = io.StringIO()
    show(t, Console(file=buf, width=60, force_terminal=False))
    out = buf.getvalue()
    assert "…" not in out and "29.43±5.31 (50.12±4.02)" in out and "images CI [-2.03, -0.26])" in out
    # in a narrow terminal the cells wrap instead: nothing is replaced by an ellipsis
    buf = io.StringIO()
    show(t, Console(file=buf, width=60, force_terminal=True, color_system=None))
    assert "…" not in buf.getvalue() and "29.43±5.31" in buf.getvalue()


def test_verdict_names_the_test_that_fails():
    from sicot_cli.report import Gain

    assert Gain([-1.0, -2.0, 0.5], 0.388, (-2.03, -0.26)).verdict() == "not significant across seeds"
    assert Gain([1.0, 1.2, 1.1], 0.004, (-0.5, 2.0)).verdict() == "not significant across images"
    assert Gain([1.0, 1.2, 1.1], 0.004, (0.5, 2.0)).verdict() == "significant"
    assert Gain([1.0, -1.0, 0.1], 0.9, (-0.5, 2.0)).verdict() == "not significant"


def test_training_plan_warns_when_the_setting_cannot_learn():
    from sicot_cli.train import training_plan

    recipe = load_recipe(None, ["train.batch_size=128", "train.epochs=8"])
    prepared = SimpleNamespace(image_size=32, n_train=68, num_classes=100)
    line, warnings = training_plan(recipe, prepared, 1, 2)
    assert (
        line
        == "32x32 images, resnet18 (from scratch), 68 training images / 100 classes, batch 128 -> 1 steps/epoch x 8 epochs, lr 0.03, 2 CPU thread(s)"
    )
    assert warnings == [
        "train.batch_size 128 is larger than the 68 training images: one step per epoch",
        "fewer optimisation steps in the whole run (8) than classes (100): likely too few to learn them (a model that "
        "predicts one class for everything); lower train.batch_size or raise train.epochs (the built-in recipe "
        "product-manifest, `--recipe product-manifest`, is the starting point for own data)",
    ]
    assert training_plan(recipe, SimpleNamespace(image_size=32, n_train=6800, num_classes=100), 53, 2)[1] == []
    pretrained = load_recipe(None, ["train.batch_size=128", "train.epochs=8", "model.pretrained=runs/x"])
    assert training_plan(pretrained, SimpleNamespace(image_size=32, n_train=6800, num_classes=100), 1, 2)[1] == []


def test_ablation_progress_names_the_run_and_moves_the_overall_bar():
    from rich.console import Console

    from sicot_cli.console import AblationProgress

    recipe = load_recipe(None, ["train.epochs=4"])
    buf = io.StringIO()
    with AblationProgress(Console(file=buf, force_terminal=True, width=120)) as bars:
        bars.start_run("bilinear-s0", 1, 3, recipe)
        overall = bars.bars.tasks[0]
        assert overall.description == "run 2/3 bilinear-s0" and overall.total == 12 and overall.completed == 4
        with bars.task("epoch 1/4", 10) as task:
            for _ in range(5):
                task.advance(1)
            assert bars.bars.tasks[1].completed == 5
        assert overall.completed == pytest.approx(4.5)
    # off a terminal: one line per run
    buf = io.StringIO()
    with AblationProgress(Console(file=buf, force_terminal=False)) as bars:
        bars.start_run("none-s0", 0, 2, recipe)
    assert buf.getvalue() == "run 1/2: none-s0\n"


def test_ablate_writes_figures_per_class_table_and_confusions(own, tmp_path, monkeypatch):
    import warnings

    from matplotlib.colors import to_hex

    figs = capture_figures(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "Mean of empty slice" may leak
        r = runner.invoke(
            app,
            [
                "ablate",
                "--data",
                str(own),
                "--encoders",
                "bilinear",
                "--out",
                str(tmp_path / "abl"),
                "--threads",
                "1",
                *TRAIN_FAST,
                "train.epochs=1",
            ],
        )
    assert r.exit_code == 0, r.output
    abl = tmp_path / "abl"
    assert (abl / "report.md").read_text(encoding="utf-8").startswith("# sicot report: shop")
    assert_png(abl / "curves.png", (10, 3.6))
    assert_png(abl / "fig6_distribution.png", (7, 3.2))
    # 8 training images in each class, head boundary 8 (the file's own): three red head bars
    steps = figs["fig6_distribution.png"].axes[0].patches  # one filled step outline per group
    bars = [(float(v), to_hex(st.get_facecolor())) for st in steps for v in st.get_data().values]
    assert bars == [(8, "#d62728")] * 3
    assert [len(ln.get_xdata()) for ln in figs["curves.png"].axes[0].lines] == [
        1,
        1,
    ]  # baseline and bilinear, 1 epoch each
    assert "fig6_distribution.png" in r.output and "| shop |" not in r.output  # printed as a table, not Markdown
    rows = list(csv.DictReader((abl / "per_class.csv").open(encoding="utf-8")))
    assert [row["class"] for row in rows] == sorted(["cat", "dog", "cup"], key=lambda c: (-8, c))
    assert (
        set(rows[0]) == {"class", "train_images", "top1 baseline", "top1 bilinear"} and rows[0]["train_images"] == "8"
    )
    plan = json.loads((abl / "ablation.json").read_text())
    assert plan["recipe"]["name"] == "shop" and plan["recipe"]["eval"]["head_threshold"] == 8
    assert "Evidence: seeds p: paired t-test over seeds" in (abl / "report.md").read_text()


def test_fig7_words_start_after_the_longest_class_name(tmp_path, monkeypatch):
    from sicot_cli import figures
    from sicot_cli.figures import TitleAttention

    captured = {}
    monkeypatch.setattr(figures, "_save", lambda fig, path: captured.setdefault("fig", fig))
    long = "an extremely long product class name that goes on and on and on"
    items = [
        TitleAttention(0, long, ["red", "cup"], [0.6, 0.4]),
        TitleAttention(1, "cup", ["white", "mug"], [0.7, 0.3]),
    ]
    figures.fig7_attention(items, tmp_path / "f.png", "bilinear")
    fig = captured["fig"]
    ax = fig.axes[0]
    inv = ax.transAxes.inverted()
    texts = [t for t in ax.texts if t.get_text() and not t.get_text().startswith("(no CJK")]
    labels = [t for t in texts if t.get_text().endswith(":")]
    words = [t for t in texts if not t.get_text().endswith(":")]
    assert labels[0].get_text().count("\n") >= 1  # wrapped
    right = max(t.get_window_extent().transformed(inv).x1 for t in labels)
    assert min(t.get_window_extent().transformed(inv).x0 for t in words) > right


def test_embed_rebuilds_a_prepared_files_vocabulary_and_reads_a_manifest(own):
    from sicot_cli.data.dataset import open_prepared

    words = len(open_prepared(own).words) - 1
    r = runner.invoke(app, ["embed", "--data", str(own)])
    assert r.exit_code == 0, r.output
    assert any(
        "vocabulary (before -> after filter)" in ln and ln.rstrip(" │").endswith(f"-> {words}")
        for ln in r.output.splitlines()
    ), r.output
    manifest = open_prepared(own).recipe["data"]["manifest"]
    r = runner.invoke(app, ["embed", "--manifest", manifest, *KEEP_ALL])
    assert r.exit_code == 0, r.output
    assert any(
        "vocabulary (before -> after filter)" in ln and ln.rstrip(" │").endswith(f"-> {words}")
        for ln in r.output.splitlines()
    ), r.output


def test_version_option():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.startswith("sicot ")


def test_fig6_has_no_head_entry_without_head_classes(tmp_path, monkeypatch):
    from sicot_cli import figures

    captured = {}
    monkeypatch.setattr(figures, "_save", lambda fig, path: captured.setdefault("fig", fig))
    figures.fig6_distribution(np.array([5, 3, 1]), 40, "x", tmp_path / "f.png")
    labels = [t.get_text() for t in captured["fig"].axes[0].get_legend().get_texts()]
    assert labels == ["tail (< 40)"]


def test_keep_best_false_writes_only_the_last_checkpoint(tmp_path):
    from sicot_cli.data.dataset import open_prepared
    from sicot_cli.train import train

    m = make_manifest(tmp_path / "raw", per_class=6)
    data = tmp_path / "v.h5"
    prepare(
        load_recipe(
            None,
            ["data.source=manifest", f"data.manifest={m}", "data.image_size=16", "data.val_fraction=0.5", *KEEP_ALL],
        ),
        data,
    )
    assert open_prepared(data).n_val == 6  # validation rows: a best checkpoint would be written
    for keep in ("true", "false"):
        recipe = load_recipe(None, [*TRAIN_FAST, "train.epochs=1", "model.encoder=none", f"train.keep_best={keep}"])
        result = train(recipe, tmp_path / f"run-{keep}", data=data)
        assert (result.run_dir / "checkpoint-last.pt").is_file()
        assert (result.run_dir / "checkpoint-best.pt").exists() == (keep == "true")
    with pytest.raises(Exception, match="train.keep_best = false needs eval.select"):
        load_recipe(None, ["train.keep_best=false", "eval.select=best"])


def test_report_names_the_removed_words_most_tied_to_a_label(tmp_path):
    from sicot_cli.report import _removed_words_line

    side = {
        "summary": {
            "filter_rules": [{"rule": "5% most frequent", "words": 165}],
            "informative_removed": [["flag", 0.41, "country-flag", 0.97], ["the", 0.0, "x", 0.1]],
        }
    }
    (tmp_path / "e.recipe.json").write_text(json.dumps(side))
    report = SimpleNamespace(runs=[SimpleNamespace(config={"data": str(tmp_path / "e.h5")})])
    assert (
        _removed_words_line(report)
        == "Noise-word filter (5% most frequent: 165 words): the removed words most tied to a label: flag (0.41 bits; 97% in country-flag)."
    )
    assert (
        _removed_words_line(SimpleNamespace(runs=[SimpleNamespace(config={"data": str(tmp_path / "gone.h5")})])) is None
    )
    # a class name of a thousand characters is shown by its first 39 and an ellipsis, as in prepare's summary
    side["summary"]["informative_removed"][0][2] = "x" * 1000
    (tmp_path / "e.recipe.json").write_text(json.dumps(side))
    assert _removed_words_line(report).endswith(f"97% in {'x' * 39}…).")


def test_prepare_summary_shortens_a_long_class_name_in_the_removed_words_row():
    from rich.console import Console
    from rich.table import Table

    from sicot_cli.views import _informative_rows

    table = Table()
    table.add_column("a")
    table.add_column("b")
    _informative_rows(table, [("flag", 0.41, "y" * 1000, 0.97)], [])
    console = Console(width=4000, record=True)
    console.print(table)
    text = console.export_text()
    assert f"97% in {'y' * 39}…)" in text and "y" * 40 not in text, text


def test_recipe_keys_the_prepared_file_overrides_are_warned_once(tiny_prepared, caplog):
    """`train --recipe R --data X`: X's data settings win, and each explicit key of R they override is named."""
    import logging
    import os

    from sicot_cli.config import adopt_prepared, load_recipe
    from sicot_cli.data.dataset import open_prepared

    theirs = open_prepared(tiny_prepared).recipe
    manifest = theirs["data"]["manifest"]
    same_file = os.path.join(os.path.dirname(manifest), ".", os.path.basename(manifest))
    with caplog.at_level(logging.WARNING, logger="sicot_cli.config"):
        # the built-in recipe's own keys and data.out are no user's choice; one file spelt two ways is one file
        quiet = load_recipe(None, [f"data.out={tiny_prepared}", "data.workers=3"])
        assert "data.source" in adopt_prepared(quiet, theirs, tiny_prepared)
        same = load_recipe(None, ["data.source=manifest", f"data.manifest={same_file}"])
        assert "data.manifest" in adopt_prepared(same, theirs, tiny_prepared)
        assert not caplog.records
        loud = load_recipe(None, ["data.image_size=32", "text.min_count=2"])
        adopt_prepared(loud, theirs, tiny_prepared)
    (record,) = caplog.records
    assert (
        "data.image_size = 32 (the file: 16)" in record.message and "text.min_count = 2 (the file: 1)" in record.message
    )
    assert loud.data.image_size == 16 and str(tiny_prepared) in record.message and "--force" in record.message


def test_class_names_with_dollar_signs_are_drawn_as_written(tmp_path):
    """matplotlib read "$5_$10" as a formula: report crashed with a traceback ("$5_$10" cannot be
    parsed) or drew "$10-$20 shoes" as "10 - 20 shoes"."""
    from sicot_cli import figures
    from sicot_cli.figures import TitleAttention

    items = [TitleAttention(0, "price_bin_$5_$10", ["red", "cup"], [0.6, 0.4])]
    figures.fig7_attention(items, tmp_path / "f.png", "bilinear")  # raised ValueError (ParseSyntaxException)
    assert (tmp_path / "f.png").stat().st_size > 0
    figures.fig6_distribution(np.array([5, 3, 1]), 2, "$10-$20 shoes", tmp_path / "g.png")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    assert ax.text(0, 0, "$10-$20 shoes").get_parse_math() is False  # drawn as written, not as 10 - 20
    plt.close(fig)


def test_fig6_draws_one_outline_per_group_whatever_the_number_of_classes(tmp_path, monkeypatch):
    """One bar object per class: 32 s and 613 MB at 50k classes. Now two filled steps, their edges on the classes."""
    from sicot_cli import figures

    captured = {}
    monkeypatch.setattr(figures, "_save", lambda fig, path: captured.setdefault("fig", fig))
    counts = np.array([50, 3, 40, 1, 7] * 2000)
    figures.fig6_distribution(counts, 40, "x", tmp_path / "f.png")
    steps = captured["fig"].axes[0].patches
    assert len(steps) == 2
    (head, head_edges), (tail, tail_edges) = ((st.get_data().values, st.get_data().edges) for st in steps)
    assert list(head) == [50] * 2000 + [40] * 2000 and list(tail) == [7] * 2000 + [3] * 2000 + [1] * 2000
    assert head_edges[0] == -0.5 and head_edges[-1] == tail_edges[0] == 3999.5 and tail_edges[-1] == 9999.5


def test_a_path_too_long_or_through_a_file_is_named_so_not_a_corrupt_image(tmp_path):
    """A 300-character file name or a 5,000-character path was counted as "truncated or corrupt image"."""
    from sicot_cli.data.images import ImageSkip, load_image

    for path in (tmp_path / ("x" * 300 + ".png"), Path(str(tmp_path) + ("/" + "d" * 200) * 25 + "/a.png")):
        with pytest.raises(ImageSkip, match="image path too long for this filesystem"):
            load_image(path, 8)
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(ImageSkip, match="a file where a folder should be"):
        load_image(tmp_path / "f" / "a.png", 8)
