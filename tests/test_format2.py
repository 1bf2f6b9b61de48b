"""Format 2: JPEG shards + an index; parallel prepare (--shard i/n, --merge); the decoding loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import KEEP_ALL, TRAIN_FAST, make_manifest
from typer.testing import CliRunner

from sicot_cli.cli import app
from sicot_cli.config import load_recipe
from sicot_cli.data import jpegstore, jpegwrite
from sicot_cli.data.augment import crop_flip_params
from sicot_cli.data.dataset import open_prepared
from sicot_cli.data.loader import BatchLoader, epoch_seed
from sicot_cli.data.prepare import prepare
from sicot_cli.errors import SicotError
from sicot_cli.train import train

SIZE = 24
JPEG = ["data.images=jpeg", "data.shard_rows=7", "data.jpeg_quality=95", "data.val_fraction=0.2"]


def _recipe(manifest: Path, *extra: str):  # noqa: ANN202
    return load_recipe(
        None,
        ["data.source=manifest", f"data.manifest={manifest}", f"data.image_size={SIZE}", *KEEP_ALL, *JPEG, *extra],
    )


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("f2")
    return make_manifest(root / "raw", per_class=12)


@pytest.fixture(scope="module")
def jpeg_data(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("f2data") / "d.h5"
    prepare(_recipe(raw, f"data.stored_side={SIZE}"), out)
    return out


def _all_images(path: Path, start: int = 0, stop: int | None = None) -> np.ndarray:
    p = open_prepared(path)
    loader = BatchLoader(p, 5, start, p.n if stop is None else stop, shuffle=False, in_memory=False, prefetch=0)
    return np.concatenate([b.images.numpy() for b in loader.epoch(0)])


def test_round_trip_pixels_within_jpeg_tolerance_everything_else_exact(
    raw: Path, jpeg_data: Path, tmp_path: Path
) -> None:
    raw_out = tmp_path / "raw.h5"
    prepare(_recipe(raw, "data.images=raw"), raw_out)
    a, b = open_prepared(raw_out), open_prepared(jpeg_data)
    assert (a.format, b.format) == (1, 2)
    assert b.store is not None and len(b.store.names) == -(-b.n // 7)
    for name in ("labels", "tokens", "lengths", "train_counts", "test_counts", "vectors"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert (a.n_train, a.n_val, a.class_names, a.words) == (b.n_train, b.n_val, b.class_names, b.words)
    assert a.ids() == b.ids() and a.titles() == b.titles()
    with h5py.File(raw_out) as f:
        pixels = f["images"][()]
    decoded = _all_images(jpeg_data)
    assert decoded.shape == pixels.shape
    # JPEG's loss on these noise images (the worst case for it) is a few grey levels; each decoded row is
    # nearest to its own raw row: the right images, in the index's order
    flat_d, flat_p = decoded.reshape(len(decoded), -1).astype(float), pixels.reshape(len(pixels), -1).astype(float)
    dist = np.abs(flat_d[:, None, :] - flat_p[None, :, :]).mean(2)
    assert np.diag(dist).max() < 10, np.diag(dist).max()
    assert np.array_equal(dist.argmin(1), np.arange(len(dist)))


def test_format2_is_the_default_from_96_px_and_bytes_are_smaller(raw: Path, tmp_path: Path) -> None:
    assert jpegstore.uses_jpeg(load_recipe(None, ["data.image_size=96"]).data)
    assert not jpegstore.uses_jpeg(load_recipe(None, ["data.image_size=64"]).data)
    assert jpegstore.stored_side(load_recipe(None, ["data.image_size=224"]).data) == 256
    p = open_prepared(prepare(_recipe(raw, "data.image_size=96", "data.jpeg_quality=90"), tmp_path / "d96.h5").out)
    assert p.store is not None and p.store.side == 110
    assert p.store.nbytes(0, p.n) < p.n * 3 * 96 * 96 / 5


def test_truncated_or_tampered_shard_is_refused_with_its_name(jpeg_data: Path, tmp_path: Path) -> None:
    copy = tmp_path / "c"
    shutil.copytree(jpeg_data.parent, copy)
    data = copy / jpeg_data.name
    store = open_prepared(data).store
    assert store is not None
    shard = store.folder / store.names[1]
    body = shard.read_bytes()
    shard.write_bytes(body[: len(body) // 2])
    with pytest.raises(SicotError, match=rf"{shard.name}: image shard is {len(body) // 2} bytes.*truncated"):
        open_prepared(data)
    tampered = bytearray(body)
    tampered[len(body) // 2] ^= 0xFF
    shard.write_bytes(bytes(tampered))
    p = open_prepared(data)  # a stat cannot see a same-size change ...
    loader = BatchLoader(p, 4, 0, p.n_train, shuffle=True, in_memory=False, workers=1)
    with pytest.raises(SicotError, match=rf"{shard.name}: image shard damaged"):  # ... the read's sha256 does
        list(loader.epoch(0))
    with pytest.raises(SicotError, match=rf"{shard.name}: image shard damaged"):
        BatchLoader(p, 4, 0, p.n_train, shuffle=True, in_memory=True)
    shard.unlink()
    with pytest.raises(SicotError, match=rf"{shard.name}: image shard missing"):
        open_prepared(data)
    shard.mkdir()  # was "image shard is 4096 bytes, the index records N (truncated or replaced)"
    with pytest.raises(SicotError, match=rf"{shard.name}: the image shard is not a file \(a folder"):
        open_prepared(data)
    shard.rmdir()
    shutil.copy(data, tmp_path / "moved.h5")  # the index without its folder
    with pytest.raises(SicotError, match=r"image shards folder d\.shards-\w+ is not beside it .*copy or move both"):
        open_prepared(tmp_path / "moved.h5")
    result = CliRunner().invoke(app, ["train", "--data", str(data), *TRAIN_FAST])
    assert result.exit_code == 2 and "image shard missing" in result.output and "Traceback" not in result.output


def test_an_index_naming_a_path_outside_its_folder_is_refused(jpeg_data: Path, tmp_path: Path) -> None:
    copy = tmp_path / "c"
    shutil.copytree(jpeg_data.parent, copy)
    with h5py.File(copy / jpeg_data.name, "r+") as f:
        f.attrs["shard_dir"] = "../../etc"
    with pytest.raises(SicotError, match="corrupt prepared dataset"):
        open_prepared(copy / jpeg_data.name)


def test_parts_merged_equal_one_machine_prepare(raw: Path, tmp_path: Path) -> None:
    one = tmp_path / "one" / "d.h5"
    prepare(_recipe(raw), one)
    many = tmp_path / "many" / "d.h5"
    runner = CliRunner()
    args = ["prepare", "--manifest", str(raw), "--out", str(many), *KEEP_ALL, *JPEG, f"data.image_size={SIZE}"]
    result = runner.invoke(app, [*args, "--merge"])
    assert result.exit_code == 2 and "image shards missing" in result.output and "--shard i/n" in result.output
    for i in (2, 0, 1):  # any order, on any machine sharing the folder
        result = runner.invoke(app, [*args, "--shard", f"{i}/3"])
        assert result.exit_code == 0, result.output
        assert f"part {i}/3" in result.output and "--merge" in result.output
    assert not many.exists()
    result = runner.invoke(app, [*args, "--merge"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    # the merge decodes nothing: no throughput (it printed 253,075 images/s for the merge's own 0.7 s)
    assert "merged: nothing decoded here" in result.output and "images/s" not in result.output
    a, b = open_prepared(one), open_prepared(many)
    assert a.store is not None and b.store is not None and a.store.folder.name == b.store.folder.name
    for name in ("labels", "tokens", "vectors"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    for name in ("shard", "offset", "length"):
        assert np.array_equal(getattr(a.store, name), getattr(b.store, name))
    assert a.store.sha256 == b.store.sha256
    assert all((a.store.folder / n).read_bytes() == (b.store.folder / n).read_bytes() for n in a.store.names)
    # more parts than shards: the last part has nothing to write, and says so
    n = len(a.store.names)
    result = runner.invoke(app, [*args, "--shard", f"{n}/{n + 1}"])
    flat = " ".join(result.output.split())
    assert result.exit_code == 0 and f"part {n}/{n + 1}: no shards to write" in flat and "shards 1-0" not in flat
    # a part run with other settings writes other shards: they never mix with these
    assert runner.invoke(app, [*args, "--shard", "0/3", "data.jpeg_quality=50"]).exit_code == 0
    bad = runner.invoke(app, [*args, "--merge", "--force", "data.jpeg_quality=50"])
    flat = " ".join(bad.output.split())
    assert bad.exit_code == 2 and "000002.jpgs" in flat and f"4 of {len(a.store.names)} image shards missing" in flat
    assert open_prepared(many).store.sha256 == a.store.sha256
    for text in ("5/3", "1", "a/b", "-1/2"):
        result = runner.invoke(app, [*args, "--shard", text])
        assert result.exit_code == 2 and "expected i/n" in result.output
    # a part checks the word2vec corpus the merge will train on, so a bad one is not found hours later
    result = runner.invoke(app, [*args, "--shard", "0/2", f"embed.corpus={tmp_path / 'nope.txt'}"])
    assert result.exit_code == 2 and "nope.txt: word2vec corpus not found" in result.output, result.output
    result = runner.invoke(app, [*args, "--shard", "0/2", "data.images=raw"])
    assert result.exit_code == 2 and 'data.images = "jpeg"' in result.output
    # rebuilt as format 1, the file's shard folders go (the old index stayed valid until the rename)
    assert len(list(many.parent.glob("d.shards-*"))) == 2
    assert runner.invoke(app, [*args, "--force", "data.images=raw"]).exit_code == 0
    assert open_prepared(many).format == 1 and not list(many.parent.glob("d.shards-*"))


def test_an_interrupted_prepare_keeps_its_finished_shards(raw: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    out = tmp_path / "d.h5"
    calls = []
    real = jpegwrite.write_shard

    def stop_after_two(folder, k, fingerprint, results):  # noqa: ANN001, ANN202
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(k)
        return real(folder, k, fingerprint, results)

    monkeypatch.setattr(jpegwrite, "write_shard", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        prepare(_recipe(raw), out)
    assert not out.exists() and calls == [0, 1]
    monkeypatch.setattr(jpegwrite, "write_shard", lambda *a: calls.append(a[1]) or real(*a))
    prepare(_recipe(raw), out)
    assert calls[2:] == list(range(2, len(open_prepared(out).store.names)))  # 0 and 1 were kept


def test_loader_crops_as_format_1_does_and_workers_change_nothing(jpeg_data: Path) -> None:
    p = open_prepared(jpeg_data)
    runs = {}
    for workers in (0, 2):
        loader = BatchLoader(
            p, 4, 0, p.n_train, shuffle=True, seed=3, in_memory=False, workers=workers, crop=(0.35, 1.0)
        )
        runs[workers] = [(b.rows.copy(), b.images.clone(), b.augmented) for b in loader.epoch(1)]
    assert len(runs[0]) == len(runs[2]) > 2
    for (r0, i0, a0), (r2, i2, a2) in zip(runs[0], runs[2], strict=True):
        assert np.array_equal(r0, r2) and torch.equal(i0, i2) and a0 and a2
    # the crop of batch j is the affine crop format 1 draws on the device from the same seed
    theta = crop_flip_params(4, torch.Generator().manual_seed(epoch_seed(3, 1, 1)), (0.35, 1.0))
    boxes = jpegstore.crop_boxes(theta, p.store.side)
    for (x0, y0, x1, y1), _ in boxes:
        assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
        assert (x1 - x0) * (y1 - y0) >= 0.3 * SIZE * SIZE
    identity = torch.tensor([[[-1.0, 0, 0], [0, 1.0, 0]]])
    assert jpegstore.crop_boxes(identity, 10) == [((0.0, 0.0, 10.0, 10.0), True)]
    plain = _all_images(jpeg_data, 0, 4)
    first = runs[0][0]
    assert not torch.equal(first[1], torch.from_numpy(plain[: len(first[0])]))  # cropped, not the plain image


def test_format2_trains_and_resumes_mid_epoch_exactly(jpeg_data: Path, tmp_path: Path) -> None:
    from sicot_cli import runs

    recipe = load_recipe(None, [f"data.out={jpeg_data}", *TRAIN_FAST, "model.encoder=bilinear", "train.epochs=2",
                                "train.batch_size=4", "train.loader_workers=1"])  # fmt: skip
    full = train(recipe, tmp_path / "full")

    def hook(epoch: int, batch: int) -> None:
        if (epoch, batch) == (1, 2):
            raise KeyboardInterrupt

    cut = train(recipe, tmp_path / "cut", hook=hook)
    assert cut.interrupted
    resumed = train(recipe, tmp_path / "cut", resume=True)
    a = runs.load_checkpoint(resumed.run_dir / runs.LAST)["model"]
    b = runs.load_checkpoint(full.run_dir / runs.LAST)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.test["top1"] == full.test["top1"]


def test_two_ranks_decode_disjoint_rows_that_cover_each_batch(jpeg_data: Path) -> None:
    p = open_prepared(jpeg_data)
    kw = {"shuffle": True, "seed": 1, "in_memory": False, "crop": (0.35, 1.0), "drop_last": True}
    one = list(BatchLoader(p, 6, 0, p.n_train, **kw).epoch(0))
    ranks = [list(BatchLoader(p, 6, 0, p.n_train, rank=r, world=2, workers=1, **kw).epoch(0)) for r in (0, 1)]
    for whole, r0, r1 in zip(one, *ranks, strict=True):
        assert not set(r0.rows) & set(r1.rows)
        assert np.array_equal(np.concatenate([r0.rows, r1.rows]), whole.rows)
        assert torch.equal(torch.cat([r0.images, r1.images]), whole.images)  # each image cropped as in one process


def test_rank_shards_give_each_rank_its_own_shards(jpeg_data: Path) -> None:
    p = open_prepared(jpeg_data)
    kw = {"shuffle": True, "seed": 1, "in_memory": False, "crop": (0.35, 1.0), "drop_last": True, "rank_shards": True}
    loaders = [BatchLoader(p, 4, 0, p.n_train, rank=r, world=2, **kw) for r in (0, 1)]
    assert len(loaders[0]) == len(loaders[1]) > 0
    epochs = [[list(loader.epoch(e)) for loader in loaders] for e in (0, 1)]
    for e, per_rank in enumerate(epochs):
        rows = [np.concatenate([b.rows for b in batches]) for batches in per_rank]
        shards = [set(p.store.shard[r].tolist()) for r in rows]
        assert not shards[0] & shards[1], "a shard read by both ranks"
        assert len(set(rows[0]) | set(rows[1])) == len(rows[0]) + len(rows[1])  # each row once in the epoch
        for b0, b1 in zip(*per_rank, strict=True):
            assert (b0.offset, b1.offset, b0.total, b1.total) == (0, 2, 4, 4) and b0.augmented
        if e == 1:  # another epoch, another order over the same shards
            assert not np.array_equal(rows[0], np.concatenate([b.rows for b in epochs[0][0]]))
    again = list(loaders[0].epoch(1, skip=1))  # resume mid-epoch: the same batches
    assert all(
        np.array_equal(a.rows, b.rows) and torch.equal(a.images, b.images)
        for a, b in zip(again, epochs[1][0][1:], strict=True)
    )
    with pytest.raises(SicotError, match="rank_shards works with"):
        BatchLoader(p, 4, 0, p.n_train, rank=0, world=2, sampler="class_balanced", **kw)


def test_a_loader_process_that_dies_is_one_clear_error(jpeg_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from sicot_cli.data import loader as loader_mod

    monkeypatch.setattr(loader_mod._JpegBatches, "decode", lambda self, j: os._exit(9))  # as the OOM killer would
    p = open_prepared(jpeg_data)
    loader = BatchLoader(p, 4, 0, p.n_train, shuffle=True, in_memory=False, workers=1, crop=(0.35, 1.0))
    with pytest.raises(SicotError, match="a loader process failed .*lower train.loader_workers"):
        list(loader.epoch(0))


@pytest.mark.parametrize(("attr", "value", "needle"), [
    ("stored_side", 0, "stored_side 0 is no image side"),
    ("n_train", 10**6, "n_train 1000000 and n_val"),
])  # fmt: skip
def test_an_index_with_hostile_attributes_is_refused_in_one_line(jpeg_data, tmp_path, attr, value, needle):
    """stored_side 0 was a ZeroDivisionError in the loader; an n_train past the rows was called
    "images are int32 ... expected uint8", which format 2 rightly holds."""
    from sicot_cli.data import dataset as ds

    copy = tmp_path / jpeg_data.name
    shutil.copy(jpeg_data, copy)
    shutil.copytree(
        jpeg_data.parent / str(open_prepared(jpeg_data).store.folder.name),
        tmp_path / open_prepared(jpeg_data).store.folder.name,
    )
    with h5py.File(copy, "a") as f:
        f.attrs[attr] = value
        f.attrs["content_sha256"] = ds._sha256_v2(ds._read_hashed(f), f)  # resealed
    with pytest.raises(SicotError, match=needle):
        open_prepared(copy)


def test_a_stored_image_over_the_pixel_limit_is_a_decode_error(monkeypatch):
    import io

    from PIL import Image

    from sicot_cli.data.jpegstore import decode_row

    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "JPEG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64 x 64 is over twice it: PIL's bomb error
    with pytest.raises(ValueError, match="over PIL's pixel limit"):
        decode_row(buf.getvalue(), 16, None, False)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda info: info.pop("digests"), id="written before shards recorded pixel digests"),
        pytest.param(lambda info: info.update(digests=7), id="digests not a list"),
        pytest.param(lambda info: info.update(lengths=["12"] * len(info["lengths"])), id="lengths not numbers"),
        pytest.param(lambda info: info.update(skips=[]), id="skips not a table"),
    ],
)
def test_a_shard_record_without_pixel_digests_or_malformed_is_encoded_again(raw, tmp_path, monkeypatch, edit):  # noqa: ANN001
    """Such a record cannot serve the cross-split copy check (or be read at all): the rerun rewrites that shard."""
    out = tmp_path / "d.h5"
    prepare(_recipe(raw), out)
    record = next(out.parent.glob("d.shards-*")) / "000001.json"
    info = json.loads(record.read_text())
    edit(info)
    record.write_text(json.dumps(info))
    calls = []
    real = jpegwrite.write_shard
    monkeypatch.setattr(jpegwrite, "write_shard", lambda *a: calls.append(a[1]) or real(*a))
    prepare(_recipe(raw), out, force=True)
    assert calls == [1]
    rewritten = json.loads(record.read_text())
    assert len(rewritten["digests"]) == len(rewritten["lengths"]) > 0


def test_merging_parts_written_before_pixel_digests_names_that_cause(raw: Path, tmp_path: Path) -> None:
    """Parts written by the previous version: "missing, incomplete or made from other rows" hid the cause."""
    many = tmp_path / "many" / "d.h5"
    args = ["prepare", "--manifest", str(raw), "--out", str(many), *KEEP_ALL, *JPEG, f"data.image_size={SIZE}"]
    runner = CliRunner()
    assert runner.invoke(app, [*args, "--shard", "0/1"]).exit_code == 0
    records = sorted(next(many.parent.glob("d.shards-*")).glob("*.json"))
    for record in records:
        info = json.loads(record.read_text())
        info.pop("digests")
        record.write_text(json.dumps(info))
    result = runner.invoke(app, [*args, "--merge"])
    flat = " ".join(result.output.split())
    assert (
        result.exit_code == 2 and f"({len(records)} written by an earlier sicot, without the pixel digests" in flat
    ), flat


def test_parts_given_one_manifest_by_two_spellings_merge(raw: Path, tmp_path: Path) -> None:
    """`--recipe product-manifest` (data/x.csv) and `--recipe recipes/product-manifest.toml`
    (recipes/../data/x.csv) name one manifest: their parts belong to one dataset."""
    (raw.parent / "sub").mkdir()
    many = tmp_path / "many" / "d.h5"
    common = ["--out", str(many), *KEEP_ALL, *JPEG, f"data.image_size={SIZE}"]
    runner = CliRunner()
    alias = f"{raw.parent}/sub/../{raw.name}"
    assert runner.invoke(app, ["prepare", "--manifest", alias, *common, "--shard", "0/1"]).exit_code == 0
    result = runner.invoke(app, ["prepare", "--manifest", str(raw), *common, "--merge"])
    assert result.exit_code == 0, result.output
