"""prepare: the HDF5 layout read back against the source rows, refusals, atomicity, bad input."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import KEEP_ALL, TITLES, make_manifest, write_image
from PIL import Image
from typer.testing import CliRunner

from sicot_cli.cli import app
from sicot_cli.config import load_recipe
from sicot_cli.data import prepare as prep
from sicot_cli.data.dataset import open_prepared
from sicot_cli.data.images import square_resize
from sicot_cli.data.tokenize import tokenize
from sicot_cli.errors import SicotError

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def recipe_for(manifest: Path, *extra: str):
    return load_recipe(None, ["data.source=manifest", f"data.manifest={manifest}", *KEEP_ALL, *extra])


def test_layout_matches_source_rows(tmp_path, manifest):
    out = tmp_path / "p.h5"
    s = prep.prepare(recipe_for(manifest, "data.image_size=16"), out)
    assert (s.train_images, s.test_images, s.classes) == (18, 6, 3)
    p = open_prepared(out)
    with open(manifest, newline="") as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    ids = p.ids()
    titles = p.titles()
    assert sorted(ids) == sorted(rows)
    assert p.n_train == 18 and p.image_size == 16
    # training rows first, then test rows (each block in manifest order): the training set is one
    # contiguous block, and the test block holds 2 rows of each class
    manifest_order = list(rows)
    test_ids = set(ids[18:])
    assert ids[:18] == [i for i in manifest_order if i not in test_ids]
    assert ids[18:] == [i for i in manifest_order if i in test_ids]
    assert sorted(i.split("-")[0] for i in ids[18:]) == ["cat", "cat", "cup", "cup", "dog", "dog"]
    with h5py.File(out) as f:
        images = f["images"]
        assert images.dtype == np.uint8 and images.shape == (24, 3, 16, 16)
        assert images.compression is None and images.chunks[1:] == (3, 16, 16)
        for i in (0, 7, 23):
            src = rows[ids[i]]
            with Image.open(manifest.parent / src["image"]) as im:
                expected = square_resize(im.convert("RGB"), 16).transpose(2, 0, 1)
            np.testing.assert_array_equal(images[i], expected)
            assert titles[i] == src["title"]
            assert p.class_names[p.labels[i]] == src["label"]
            words = [p.words[t] for t in p.tokens[i, : p.lengths[i]]]
            assert words == tokenize(src["title"])
            assert (p.tokens[i, p.lengths[i] :] == 0).all()
    assert p.words[0] == "<pad>" and p.vectors.shape == (len(p.words), 8)
    assert not p.vectors[0].any()
    assert list(p.train_counts) == [6, 6, 6] and list(p.test_counts) == [2, 2, 2]
    assert (p.labels[:18] >= 0).all() and np.bincount(p.labels[18:]).tolist() == [2, 2, 2]
    assert p.recipe["data"]["image_size"] == 16
    assert (out.with_suffix(".recipe.json")).is_file()
    # the same package versions as a run's config.json records (sicot_cli.provenance)
    from sicot_cli.provenance import PACKAGES, package_versions

    side = json.loads(out.with_suffix(".recipe.json").read_text(encoding="utf-8"))
    with h5py.File(out) as f:
        assert json.loads(f.attrs["versions"]) == side["versions"] == package_versions()
    assert (
        set(side["versions"])
        == set(PACKAGES)
        >= {"sicot", "torch", "torchvision", "numpy", "h5py", "gensim", "jieba", "pillow"}
    )


def test_given_split_is_kept_and_classes_ordered_by_count(tmp_path):
    # 4 training rows per class from the fixture (i >= 2), plus extra training rows: dog 4 + 2,
    # cup 4 + 1, and a new class bee with 4 (a tie with cat, broken by the name): dog, cup, bee, cat
    extra = [
        {"image": f"xd{i}.png", "title": "blue dog", "label": "dog", "id": f"xd{i}", "split": "train"} for i in range(2)
    ]
    extra += [{"image": "xc0.png", "title": "white cup", "label": "cup", "id": "xc0", "split": "train"}]
    extra += [
        {"image": f"xb{i}.png", "title": "red toy", "label": "bee", "id": f"xb{i}", "split": "train"} for i in range(4)
    ]
    (tmp_path / "raw").mkdir()
    for n, row in enumerate(extra):  # images of their own: a file on both sides would lose its test row
        write_image(tmp_path / "raw" / row["image"], seed=900 + n, channel=n % 3)
    m = make_manifest(tmp_path / "raw", per_class=6, split=True, extra_rows=extra)
    s = prep.prepare(recipe_for(m), tmp_path / "p.h5")
    assert (s.train_images, s.test_images) == (12 + 7, 6)
    p = open_prepared(tmp_path / "p.h5")
    # the manifest's split is kept: exactly the rows it marks "test" (i < 2) are test rows
    assert sorted(p.ids()[19:]) == sorted(f"{c}-{i}" for c in ("cat", "dog", "cup") for i in (0, 1))
    assert p.class_names == ["dog", "cup", "bee", "cat"]
    assert p.train_counts.tolist() == [6, 5, 4, 4] and p.test_counts.tolist() == [2, 2, 0, 2]
    ids = p.ids()
    assert [p.class_names[p.labels[ids.index(i)]] for i in ("xb0", "dog-0", "xc0", "cat-3")] == [
        "bee",
        "dog",
        "cup",
        "cat",
    ]


def test_split_is_seeded_and_balanced(tmp_path, manifest):
    a = prep.prepare(recipe_for(manifest), tmp_path / "a.h5")
    prep.prepare(recipe_for(manifest), tmp_path / "b.h5")
    prep.prepare(recipe_for(manifest, "data.split_seed=1"), tmp_path / "c.h5")
    ids = lambda p: open_prepared(p).ids()[a.train_images :]  # noqa: E731
    assert ids(tmp_path / "a.h5") == ids(tmp_path / "b.h5") != ids(tmp_path / "c.h5")


def test_rows_of_one_image_are_drawn_to_one_side(tmp_path):
    # One photo listed twice (two titles, or a repeated row): both rows are one unit of the drawn
    # test and validation split, so no image is trained on and scored.
    root = tmp_path / "raw"
    make_manifest(root, per_class=12)
    with (root / "m.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:  # the second row names the file another way: a hard link, or ./ and ../
        if r["id"].endswith(("0", "2", "4", "6", "8")):
            os.link(root / r["image"], root / ("hard-" + r["image"]))
    dups = [
        {
            **r,
            "id": "dup-" + r["id"],
            "title": r["title"] + " again",
            "image": ("hard-" + r["image"])
            if r["id"].endswith(("0", "2", "4", "6", "8"))
            else f"./../raw/{r['image']}",
        }
        for r in rows
    ]
    m = make_manifest(root, per_class=12, extra_rows=dups)
    out = tmp_path / "p.h5"
    prep.prepare(
        load_recipe(None, ["data.source=manifest", f"data.manifest={m}", "data.image_size=16", *KEEP_ALL]), out
    )
    p = open_prepared(out)
    ids = p.ids()
    side = {rid: ("train" if i < p.n_train else "val" if i < p.test_start else "test") for i, rid in enumerate(ids)}
    assert len(side) == 2 * len(rows)
    assert {side[r["id"]] for r in rows} == {"train", "val", "test"}
    for r in rows:
        assert side[r["id"]] == side["dup-" + r["id"]], r["id"]


def test_same_image_both_sides_of_a_given_split_loses_its_test_row(tmp_path):
    extra = [
        {"image": "cat0.png", "title": "red cat", "label": "cat", "id": "again", "split": "train"},
        {"image": "./cat3.png", "title": "red cat", "label": "cat", "id": "val-of-train", "split": "val"},
        {"image": "./dog5.png", "title": "dog", "label": "dog", "id": "val-5", "split": "val"},
        {"image": "../raw/dog5.png", "title": "dog", "label": "dog", "id": "test-of-val", "split": "test"},
    ]
    m = make_manifest(tmp_path / "raw", per_class=6, split=True, extra_rows=extra)
    lines = m.read_text(encoding="utf-8").splitlines()  # dog5.png's own row becomes a test row too
    m.write_text("\n".join(ln for ln in lines if not ln.startswith("dog5.png,")) + "\n", encoding="utf-8")
    out = tmp_path / "p.h5"
    s = prep.prepare(
        load_recipe(None, ["data.source=manifest", f"data.manifest={m}", "data.image_size=16", *KEEP_ALL]), out
    )
    ids = open_prepared(out).ids()
    assert "again" in ids and "cat-0" not in ids  # cat0.png is a test row (i < 2) in the given split
    assert "val-5" in ids and "val-of-train" not in ids and "test-of-val" not in ids
    assert s.skipped == {
        "test image also in a training or validation row (the same file)": 2,
        "validation image also in a training row (the same file)": 1,
    }


@pytest.mark.parametrize("fmt", [[], ["data.images=jpeg", "data.shard_rows=5", "data.stored_side=16"]])
def test_pixel_copies_across_splits_are_kept_counted_and_named(tmp_path, caplog, fmt):
    """Another file with a training image's pixels, in validation or test: kept, counted, named (both formats)."""
    root = tmp_path / "raw"
    extra = [
        {"image": "copy-a.png", "title": "red cat", "label": "cat", "id": "t-copy", "split": "test"},
        {"image": "copy-b.png", "title": "dog", "label": "dog", "id": "v-copy", "split": "val"},
        {"image": "copy-c.png", "title": "dog", "label": "dog", "id": "t-of-val", "split": "test"},
        {"image": "copy-d.png", "title": "red cat", "label": "cat", "id": "train-copy", "split": "train"},
    ]
    m = make_manifest(root, per_class=6, split=True, extra_rows=extra)
    for name, of in (("copy-a", "cat3"), ("copy-b", "dog4"), ("copy-c", "copy-b"), ("copy-d", "cat5")):
        shutil.copy(root / f"{of}.png", root / f"{name}.png")
    out = tmp_path / "p.h5"
    with caplog.at_level("WARNING"):
        s = prep.prepare(
            load_recipe(None, ["data.source=manifest", f"data.manifest={m}", "data.image_size=16", *KEEP_ALL, *fmt]),
            out,
        )
    assert s.duplicate_counts == {"val": 1, "test": 2}  # a copy within training is no leak
    assert s.duplicate_examples["val"] == [(f"{m}:{len(TITLES) * 6 + 3}", f"{m}:{list(TITLES).index('dog') * 6 + 6}")]
    assert {"t-copy", "v-copy", "t-of-val", "train-copy"} <= set(open_prepared(out).ids())  # nothing dropped
    text = " ".join(caplog.text.split())
    assert "1 validation image has the same pixels as a training image" in text
    assert "2 test images have the same pixels as a training or validation image" in text
    side = json.loads(out.with_suffix(".recipe.json").read_text())["summary"]
    assert side["duplicate_counts"] == {"val": 1, "test": 2}
    clean = tmp_path / "clean.h5"
    assert (
        prep.prepare(recipe_for(make_manifest(tmp_path / "raw2"), "data.image_size=16", *fmt), clean).duplicate_counts
        == {}
    )


@pytest.mark.parametrize("fmt", [[], ["data.images=jpeg", "data.shard_rows=7", "data.stored_side=16"]])
def test_the_data_checksum_covers_the_pixels(tmp_path, manifest, fmt):
    """An image replaced in place and prepared again under the same settings: the runs' data checksum
    (what ablate and resume compare) changes; the same images under another name keep it."""
    a, b, c = (tmp_path / f"{n}.h5" for n in "abc")
    prep.prepare(recipe_for(manifest, "data.image_size=16", *fmt), a)
    prep.prepare(recipe_for(manifest, "data.image_size=16", *fmt), b)
    assert open_prepared(a).pixels_sha256 and open_prepared(a).data_checksum() == open_prepared(b).data_checksum()
    write_image(manifest.parent / "dog3.png", seed=999, channel=1)  # one training image replaced, same size
    prep.prepare(recipe_for(manifest, "data.image_size=16", *fmt), c)
    pa, pc = open_prepared(a), open_prepared(c)
    assert (pa.labels == pc.labels).all() and pa.words == pc.words  # everything else is the same
    assert pa.data_checksum() != pc.data_checksum()
    assert pa.data_checksum(text=False) != pc.data_checksum(text=False)  # a baseline sees the pixels too


def test_files_prepared_before_the_pixel_checksum_keep_their_data_checksum(tmp_path, manifest):
    """A file without ``pixels_sha256`` (earlier versions) checks as it always did: its runs still match."""
    out = tmp_path / "p.h5"
    prep.prepare(recipe_for(manifest, "data.image_size=16"), out)
    new = open_prepared(out).data_checksum()
    with h5py.File(out, "a") as f:
        del f.attrs["pixels_sha256"]
    old = open_prepared(out)
    assert old.pixels_sha256 == "" and old.data_checksum() != new


def test_refuses_to_overwrite_and_force_replaces(tmp_path, manifest):
    out = tmp_path / "p.h5"
    prep.prepare(recipe_for(manifest), out)
    before = out.stat().st_mtime_ns
    with pytest.raises(SicotError, match="already exists"):
        prep.prepare(recipe_for(manifest), out)
    assert out.stat().st_mtime_ns == before
    prep.prepare(recipe_for(manifest), out, force=True)
    assert open_prepared(out).n == 24


def test_a_second_prepare_to_the_same_output_is_refused_while_the_first_writes(tmp_path, manifest):
    """Two prepares to one --out both succeeded, the last to finish winning: the second is refused at
    once, naming the first's pid (here this process holds the output, as a running prepare does)."""
    from sicot_cli.fsutil import exclusive

    out = tmp_path / "p.h5"
    args = ["data.source=manifest", f"data.manifest={manifest}", *KEEP_ALL]
    in_use = f"p.h5: in use by another sicot process (pid {os.getpid()}); wait for it to finish"
    with exclusive(out):
        r = runner.invoke(app, ["prepare", "--out", str(out), *args])
        assert r.exit_code == 2 and in_use in r.output, r.output
        r = runner.invoke(app, ["prepare", "--out", str(out), "--force", *args])  # --force too: it is being written
        assert r.exit_code == 2 and in_use in r.output, r.output
        assert not out.exists()
    assert run("prepare", "--out", str(out), *args).exit_code == 0  # released with its holder
    assert sorted(os.listdir(tmp_path)) == ["p.h5", "p.recipe.json", "raw"]  # no lock file left


def test_a_second_embed_to_the_same_output_is_refused_while_the_first_writes(tmp_path, manifest):
    from sicot_cli.fsutil import exclusive

    out = tmp_path / "v.txt"
    args = ["embed", "--manifest", str(manifest), "--out", str(out), *KEEP_ALL]
    with exclusive(out):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and f"v.txt: in use by another sicot process (pid {os.getpid()})" in r.output
        assert not out.exists()
    assert run(*args).exit_code == 0 and out.exists()


def test_the_parts_of_one_format2_dataset_hold_only_themselves(tmp_path, manifest):
    """A --shard part holds its part (the same part twice is refused; other parts run beside it),
    --merge holds the output."""
    from sicot_cli.fsutil import exclusive

    out = tmp_path / "p.h5"
    args = ["prepare", "--out", str(out), "data.source=manifest", f"data.manifest={manifest}", "data.images=jpeg"]
    args += [*KEEP_ALL, "data.shard_rows=8"]
    with exclusive(out.with_name("p.h5.part-0-of-2")):
        r = runner.invoke(app, [*args, "--shard", "0/2"])
        assert r.exit_code == 2 and "p.h5.part-0-of-2: in use by another sicot process" in r.output, r.output
        assert run(*args, "--shard", "1/2").exit_code == 0  # the other part runs
    assert run(*args, "--shard", "0/2").exit_code == 0
    with exclusive(out):
        r = runner.invoke(app, [*args, "--merge"])
        assert r.exit_code == 2 and "p.h5: in use by another sicot process" in r.output, r.output
    assert run(*args, "--merge").exit_code == 0 and open_prepared(out).n == 24


def test_interrupted_prepare_leaves_no_final_file(tmp_path, manifest, monkeypatch):
    out = tmp_path / "p.h5"

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep.ds, "write_attrs", boom)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(recipe_for(manifest), out)
    assert os.listdir(tmp_path) == ["raw"]


def test_stale_temporary_of_a_killed_prepare_is_removed(tmp_path, manifest):
    out = tmp_path / "p.h5"
    stale = tmp_path / ".p.h5.tmp-999999999"
    stale.write_bytes(b"half")
    prep.prepare(recipe_for(manifest), out)
    assert not stale.exists() and out.exists()


def test_unfinished_file_is_refused(tmp_path, manifest):
    out = tmp_path / "p.h5"
    prep.prepare(recipe_for(manifest), out)
    with h5py.File(out, "a") as f:
        f.attrs["complete"] = 0
    with pytest.raises(SicotError, match="incomplete .*sicot prepare --recipe R \\(or --manifest M\\) --out"):
        open_prepared(out)
    out.write_bytes(out.read_bytes()[:1000])
    with pytest.raises(SicotError, match="not a readable HDF5 file"):
        open_prepared(out)


# --- bad input through the CLI: one line naming the thing, exit 2; or a counted skip ------------


def _cli_prepare(manifest: Path, out: Path, *extra: str):
    return run("prepare", "--manifest", str(manifest), "--out", str(out), *KEEP_ALL, *extra)


def _one_error_line(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for needle in needles:
        assert needle in " ".join(lines), result.output
    assert "Traceback" not in result.output


def test_missing_manifest(tmp_path):
    _one_error_line(_cli_prepare(tmp_path / "nope.csv", tmp_path / "o.h5"), "nope.csv", "manifest not found")


def test_unknown_column(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("image,title,lable\na.png,t,x\n")
    _one_error_line(_cli_prepare(m, tmp_path / "o.h5"), "m.csv", "unknown column 'lable'")


def test_missing_column(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"image": "a.png", "title": "t"}\n')
    _one_error_line(_cli_prepare(m, tmp_path / "o.h5"), "m.jsonl", "missing column 'label'")


def _bad_rows(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "notimage.png").write_bytes(b"this is text")
    good = raw / "trunc_src.png"
    Image.fromarray(np.full((30, 30, 3), 200, np.uint8)).save(good)
    (raw / "truncated.png").write_bytes(good.read_bytes()[:60])
    (raw / "dir.png").mkdir()
    extra = [
        {"image": "missing.png", "title": "red cat", "label": "cat", "id": "x1"},
        {"image": "notimage.png", "title": "red cat", "label": "cat", "id": "x2"},
        {"image": "truncated.png", "title": "red cat", "label": "cat", "id": "x3"},
        {"image": "dir.png", "title": "red cat", "label": "cat", "id": "x4"},
        {"image": "cat0.png", "title": "!!! ★", "label": "cat", "id": "x5"},
        {"image": "cat0.png", "title": "red cat", "label": "cat", "id": "cat-0"},
    ]
    m = make_manifest(raw, extra_rows=extra)
    with m.open("ab") as f:
        f.write(b"cat1.png,caf\xe9 au lait,cat,x6\n")
    return m


def test_bad_rows_are_counted_skips(tmp_path):
    m = _bad_rows(tmp_path)
    r = _cli_prepare(m, tmp_path / "o.h5")
    assert r.exit_code == 0, r.output
    for reason in (
        "image file not found",
        "not an image file",
        "truncated or corrupt image",
        "image path is a directory",
        "empty title",
        "duplicate id",
        "line is not UTF-8",
    ):
        assert f"skipped: {reason}" in r.output, (reason, r.output)
    assert "31 / 24 / 7" in r.output  # rows read / kept / skipped
    assert open_prepared(tmp_path / "o.h5").n == 24


@pytest.mark.parametrize(
    "row, needle",
    [
        ({"image": "missing.png", "title": "red cat", "label": "cat", "id": "x1"}, "image file not found"),
        ({"image": "cat0.png", "title": "", "label": "cat", "id": "x1"}, "empty title"),
    ],
)
def test_strict_turns_skips_into_errors(tmp_path, row, needle):
    m = make_manifest(tmp_path / "raw", extra_rows=[row])
    _one_error_line(_cli_prepare(m, tmp_path / "o.h5", "--strict"), "m.csv:26", needle)


def test_label_with_no_training_image(tmp_path):
    m = make_manifest(
        tmp_path / "raw",
        per_class=6,
        split=True,
        extra_rows=[{"image": "cat0.png", "title": "red fox", "label": "fox", "id": "f1", "split": "test"}],
    )
    r = _cli_prepare(m, tmp_path / "o.h5")
    assert r.exit_code == 0 and "label has no training image" in r.output, r.output
    assert open_prepared(tmp_path / "o.h5").num_classes == 3


def test_unknown_recipe_key_and_wrong_type_and_override(tmp_path, manifest):
    bad = tmp_path / "r.toml"
    bad.write_text("[data]\nimgae_size = 32\n")
    _one_error_line(run("prepare", "--recipe", str(bad)), "r.toml", "unknown key 'data.imgae_size'")
    bad.write_text('[data]\nimage_size = "32"\n')
    _one_error_line(run("prepare", "--recipe", str(bad)), "r.toml", "data.image_size must be an integer")
    _one_error_line(run("prepare", "data.imagesize=3"), "unknown override key 'data.imagesize'")


def test_output_directory_not_writable(tmp_path, manifest):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_error_line(
        _cli_prepare(manifest, blocker / "sub" / "o.h5"), str(blocker / "sub"), "cannot create the output directory"
    )


def test_empty_vocabulary_after_filtering(tmp_path, manifest):
    r = run(
        "prepare",
        "--manifest",
        str(manifest),
        "--out",
        str(tmp_path / "o.h5"),
        "data.workers=1",
        "text.drop_most_frequent=0.5",
        "text.drop_least_frequent=0.49",
        "text.min_count=100",
    )
    _one_error_line(r, "vocabulary is empty after filtering")


def test_prepare_the_synthetic_pretraining_set(tmp_path):
    """data.synthetic.pretrain_classes > 0: a balanced set of other classes, none of the long-tailed set's."""
    small = [
        "data.synthetic.num_classes=6",
        "data.synthetic.max_per_class=8",
        "data.synthetic.min_per_class=2",
        "data.synthetic.test_per_class=1",
        "data.test_per_class=1",
        "data.image_size=16",
        "data.workers=1",
        "embed.dim=8",
        "embed.epochs=1",
        "text.drop_most_frequent=0",
        "text.drop_least_frequent=0",
    ]
    prep.prepare(load_recipe(None, small), tmp_path / "t.h5")
    target = open_prepared(tmp_path / "t.h5")
    summary = prep.prepare(
        load_recipe(None, [*small, "data.synthetic.pretrain_classes=5", "data.synthetic.pretrain_per_class=3"]),
        tmp_path / "p.h5",
    )
    assert "PRETRAINING set (5 classes disjoint" in summary.source
    pre = open_prepared(tmp_path / "p.h5")
    assert len(pre.class_names) == 5 and not set(pre.class_names) & set(target.class_names)
    assert list(pre.train_counts) == [3] * 5 and pre.n_train == 15


def test_labels_differing_only_in_case_stay_classes_with_a_warning(tmp_path, caplog):
    import logging

    from sicot_cli.data.manifest import read_manifest
    from sicot_cli.data.skips import Skips

    m = tmp_path / "m.csv"
    rows = ["image,title,label", "a.png,x,cat", "b.png,x,CAT", "c.png,x, Dog ", "d.png,x,dog", "e.png,x,cow"]
    m.write_text("\n".join(rows) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="sicot_cli.data.manifest"):
        read = read_manifest(m, Skips())
    assert sorted({r.label for r in read}) == ["CAT", "Dog", "cat", "cow", "dog"]  # as written: no silent merge
    (record,) = caplog.records
    assert "4 labels differ from another only in case" in record.message
    assert "'CAT' / 'cat'; 'Dog' / 'dog'" in record.message


def test_labels_that_only_look_alike_stay_classes_with_a_warning(tmp_path, caplog):
    """A zero-width space, a Cyrillic 'а' or a full-width letter in a label made another class silently."""
    import logging

    from sicot_cli.data.manifest import read_manifest
    from sicot_cli.data.skips import Skips

    m = tmp_path / "m.csv"
    labels = ["red", "red\u200b", "r\u0435d", "cat", "c\u0430t", "Ｃat", "dog", "DOG", "猫"]
    labels += [
        "T-shirt",
        "T\u2013shirt",
        "red bag",
        "red  bag",
        "Men's",
        "Men\u2019s",
    ]  # autocorrect's dash, quote, a doubled space
    m.write_text(
        "image,title,label\n" + "".join(f"{i}.png,x,{lab}\n" for i, lab in enumerate(labels)), encoding="utf-8"
    )
    with caplog.at_level(logging.WARNING, logger="sicot_cli.data.manifest"):
        read = read_manifest(m, Skips())
    assert {r.label for r in read} == set(labels)  # as written: no silent merge
    (case, looks) = (r.message for r in caplog.records)
    assert "2 labels differ from another only in case" in case  # DOG / dog: the case warning's, not this one's
    assert "m.csv: 12 labels look like another but differ in invisible or look-alike characters or spacing" in looks
    assert "'Men's' / 'Men\\u2019s'; 'T-shirt' / 'T\\u2013shirt'; 'cat' / 'c\\u0430t' / '\\uff23at' and 2 more" in looks
    caplog.clear()
    m.write_text("image,title,label\na.png,x,cat\nb.png,x,сок\nc.png,x,кот\n", encoding="utf-8")  # Russian labels
    with caplog.at_level(logging.WARNING, logger="sicot_cli.data.manifest"):
        read_manifest(m, Skips())
    assert not caplog.records


def test_csv_line_numbers_count_line_feeds_as_an_editor_does():
    """A CR inside a quoted title counted as a line of its own: every later row was named one line
    too far down ("m.csv:5" for the row on line 4); a row whose title runs over two lines was named
    by its last line, not the line it starts on."""
    from sicot_cli.fsutil import csv_records

    text = 'image,title,label\na.png,"red\rcat",cat\nb.png,"two\nlines",dog\nc.png,too,many,fields\n'
    _, records = csv_records(text, "m.csv", tsv=False)
    assert [(n, r.get("image")) for n, r in records] == [(2, "a.png"), (3, "b.png"), (5, "c.png")]
    crlf = text.replace("\n", "\r\n")
    _, records = csv_records(crlf, "m.csv", tsv=False)
    assert [n for n, _ in records] == [2, 3, 5]
    assert [n for n, _ in csv_records(text.removesuffix("\n"), "m.csv", tsv=False)[1]] == [2, 3, 5]
    # a row after blank lines is named by its own line, not the blank one before it
    blank = "image,label,title\n\na.png,x,t1\n\n\nb.png,y,t2\n"
    assert [n for n, _ in csv_records(blank, "m.csv", tsv=False)[1]] == [3, 6]
    # lines ending in CR alone (Excel for Mac's "CSV (Macintosh)"): rows, not one malformed line
    mac = "image,label,title\ra.png,x,t1\rb.png,y,t2\r"
    assert [(n, r["image"]) for n, r in csv_records(mac, "m.csv", tsv=False)[1]] == [(2, "a.png"), (3, "b.png")]


def test_repeated_rows_are_counted_skips_and_an_image_under_two_labels_is_warned(tmp_path, caplog):
    """A manifest pasted twice doubled every class and scored each test image twice; one file under
    two labels trained (and was scored) under both; neither was said."""
    import logging

    m = make_manifest(tmp_path / "raw", per_class=8)
    lines = m.read_text(encoding="utf-8").splitlines()
    rows = [line for line in lines[1:] if not line.startswith(("dog",))]
    # every cat and cup row twice (ids removed: the line numbers name them), dog0.png as a cup too
    header = "image,title,label"
    body = [",".join(line.split(",")[:3]) for line in rows]
    dogs = [",".join(line.split(",")[:3]) for line in lines[1:] if line.startswith("dog")]
    m.write_text("\n".join([header, *body, *dogs, *body, "dog0.png,a dog or a cup,cup"]) + "\n", encoding="utf-8")
    out = tmp_path / "p.h5"
    with caplog.at_level(logging.WARNING):
        s = prep.prepare(recipe_for(m, "data.image_size=16"), out)
    assert s.skipped == {"row repeats an earlier row (the same image, label, title and split)": 16}
    first_repeat = 2 + len(body) + len(dogs)  # line of the first repeated row
    assert s.skip_examples["row repeats an earlier row (the same image, label, title and split)"][0] == (
        f"{m}:{first_repeat} (= {m}:2)"
    )
    assert (s.train_images + s.val_images + s.test_images, s.classes) == (25, 3)
    text = " ".join(caplog.text.split())
    n_dog0 = 2 + len(body)
    assert (
        f"1 image file carries more than one label (e.g. {m}:{n_dog0} as 'dog'; {m}:{2 * len(body) + len(dogs) + 2} as 'cup')"
        in text
    )


def test_a_quote_that_never_closes_does_not_merge_the_next_row_silently(tmp_path):
    """`shoe1.png,"Dream shoe size 9,...` took the next row into its title: 23 rows read, 0 skipped,
    one image gone without a word. A quoted field that runs into what begins as a row is a skip."""
    m = make_manifest(tmp_path / "raw", per_class=8)
    lines = m.read_text(encoding="utf-8").splitlines()
    lines[3] = lines[3].replace(",", ',"Dream shoe size 9,', 1)  # cat2.png's title opens a quote...
    lines[4] = lines[4].replace(",cat,", '",cat,', 1)  # ...that the next row's title closes
    m.write_text("\n".join(lines) + "\n", encoding="utf-8")
    s = prep.prepare(recipe_for(m, "data.image_size=16"), tmp_path / "p.h5")
    assert s.skipped == {"a quoted field holds the next row (a quote never closed?)": 1}
    assert s.skip_examples["a quoted field holds the next row (a quote never closed?)"][0] == f"{m}:4 (+1 line(s))"
    assert s.rows_read == 23  # 24 data lines, one row spanning two
    # a title that runs over lines of its own is the title's
    lines = make_manifest(tmp_path / "raw2", per_class=8).read_text(encoding="utf-8").splitlines()
    parts = lines[3].split(",")
    lines[3] = ",".join([parts[0], '"red cat\nsoft, warm\ntoy.png pictured"', *parts[2:]])
    m2 = tmp_path / "raw2" / "m.csv"
    m2.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert prep.prepare(recipe_for(m2, "data.image_size=16"), tmp_path / "q.h5").skipped == {}


def test_file_urls_and_paths_in_the_other_unicode_form_are_the_files_they_name(tmp_path):
    """A `file:///...` image was "a URL (download the images first)"; a folder `été` decomposed on
    disk (a zip made on a Mac) and composed in the manifest was "image file not found", and a whole
    class went without a word."""
    import unicodedata

    m = make_manifest(tmp_path / "raw", per_class=8)
    folder = tmp_path / "raw" / unicodedata.normalize("NFD", "été")
    folder.mkdir()
    lines = m.read_text(encoding="utf-8").splitlines()
    out = [lines[0]]
    for line in lines[1:]:
        image, rest = line.split(",", 1)
        if image.startswith("cup"):
            (tmp_path / "raw" / image).rename(folder / image)
            image = unicodedata.normalize("NFC", "été") + "/" + image  # composed, as typed
        elif image.startswith("dog"):
            image = (tmp_path / "raw" / image).as_uri()  # file:///...
        out.append(f"{image},{rest}")
    m.write_text("\n".join(out) + "\n", encoding="utf-8")
    s = prep.prepare(recipe_for(m, "data.image_size=16"), tmp_path / "p.h5")
    assert (s.skipped, s.classes, s.train_images + s.val_images + s.test_images) == ({}, 3, 24)


def test_when_no_row_survives_the_error_names_an_example_and_what_to_do(tmp_path):
    m = tmp_path / "m.csv"
    m.write_bytes(
        b"image,title,label\n" + "".join(f"{i}.png,caf\xe9 {i},c{i % 2}\n" for i in range(4)).encode("latin-1")
    )  # Excel's "CSV"
    with pytest.raises(SicotError) as e:
        prep.prepare(recipe_for(m, "data.image_size=16"), tmp_path / "p.h5")
    assert f"no usable rows (4 skipped: line is not UTF-8 (4, e.g. {m}:2): save the manifest as UTF-8" in str(
        e.value
    ), str(e.value)
    j = tmp_path / "m.jsonl"
    j.write_text('[\n  {\n    "image": "a.png",\n    "title": "x",\n    "label": "y"\n  }\n]\n', encoding="utf-8")
    with pytest.raises(
        SicotError,
        match=r"not a JSON object \(7, e.g. .*m.jsonl:1 \(Expecting value\)\): a .jsonl manifest holds one JSON object a line; a JSON array",
    ):
        prep.prepare(recipe_for(j, "data.image_size=16"), tmp_path / "q.h5")


def test_no_test_row_drawn_says_why_not_what_was_done(tmp_path, caplog):
    """One image a class (the label column held SKU ids): the warning said to leave the split column
    out, which the manifest had done."""
    import logging

    m = tmp_path / "raw" / "m.csv"
    m.parent.mkdir()
    for i in range(6):
        write_image(m.parent / f"{i}.png", seed=i, channel=i % 3)
    m.write_text("image,title,label\n" + "".join(f"{i}.png,red shoe {i},SKU-{i}\n" for i in range(6)), encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        prep.prepare(recipe_for(m, "data.image_size=16"), tmp_path / "p.h5")
    text = " ".join(caplog.text.split())
    assert "no test row could be drawn: a class spares a test image only above data.min_train_per_class = 1" in text
    assert "the largest of the 6 classes has 1 (data.test_per_class = 2)" in text
    assert "(6 of the classes have a single image: is the label column an id?)" in text
    assert "leave the split column out" not in text


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ("recipe_list", "its recorded recipe is not a recipe"),
        ("recipe_deep", "its recorded recipe is nested too deeply"),
        ("nan_vectors", "word vectors that are NaN or infinite"),
    ],
)
def test_a_prepared_file_with_a_hostile_recipe_or_vectors_is_refused(tmp_path, manifest, edit, needle):
    """A recorded recipe of "[1]" or nested thousands deep was a traceback in train/evaluate; NaN
    word vectors trained into "the loss diverged: lower train.lr", blaming the settings."""
    from sicot_cli.data import dataset as ds

    out = tmp_path / "p.h5"
    prep.prepare(recipe_for(manifest, "data.image_size=16"), out)
    with h5py.File(out, "a") as f:
        if edit == "recipe_list":
            f.attrs["recipe"] = "[1]"
        elif edit == "recipe_deep":
            f.attrs["recipe"] = '{"a": ' * 100_000 + "1" + "}" * 100_000
        else:
            v = f["vectors"][()]
            v[1] = np.nan
            f["vectors"][...] = v
            f.attrs["content_sha256"] = ds._sha256_v2(ds._read_hashed(f), f)  # resealed: not "damaged on disk"
    with pytest.raises(SicotError, match=re.escape(needle)):
        open_prepared(out)


def test_a_title_over_lines_that_names_an_image_is_not_taken_for_a_swallowed_row(tmp_path):
    """`"Icon set, 50 icons\nformats: .png, .jpg"` and `"Sticker pack\nfile.png, 300 dpi"` were
    skipped as "a quoted field holds the next row": only an image the manifest's folder holds counts."""
    m = make_manifest(tmp_path / "raw", per_class=8)
    lines = m.read_text(encoding="utf-8").splitlines()
    for k, title in ((3, "Icon set, 50 icons\nformats: .png, .jpg"), (5, "Sticker pack\nfile.png, 300 dpi")):
        parts = lines[k].split(",")
        lines[k] = ",".join([parts[0], f'"{title}"', *parts[2:]])
    m.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert prep.prepare(recipe_for(m, "data.image_size=16"), tmp_path / "p.h5").skipped == {}


def test_a_field_over_the_csv_limit_is_named_as_such(monkeypatch, tmp_path):
    """A runaway title (or a quote that never closes) past the field limit: said as such, not as a quoting mistake."""

    from sicot_cli import fsutil

    before = csv.field_size_limit()
    monkeypatch.setattr(fsutil, "CSV_FIELD_LIMIT", 1 << 20)
    try:
        csv.field_size_limit(1 << 20)
        text = "image,title,label\na.png,short,cat\nb.png," + "x" * ((1 << 20) + 10) + ",cat\n"
        _, records = fsutil.csv_records(text, tmp_path / "m.csv", tsv=False)
        with pytest.raises(SicotError, match=r"m.csv: line 3: a field over 1 MiB \(a runaway title"):
            list(records)
    finally:
        csv.field_size_limit(before)


def test_a_runaway_title_is_tokenised_from_its_start_only(tmp_path, monkeypatch, caplog):
    """A title longer than TITLE_CHARS: its start is tokenised (with a warning), the row is kept."""
    monkeypatch.setattr(prep, "TITLE_CHARS", 40)
    long = {"image": "cat0.png", "title": "red cat toy " + "zzzword " * 50, "label": "cat", "id": "long"}
    m = make_manifest(tmp_path / "raw", extra_rows=[long])
    with caplog.at_level("WARNING"):
        prep.prepare(recipe_for(m), tmp_path / "o.h5")
    assert "1 title(s) longer than 40 characters: only the first 40 of each are tokenised" in caplog.text
    assert "long" in open_prepared(tmp_path / "o.h5").ids()
