"""Inference is image-only (§3.3): titles never change a prediction, and every inference path
(evaluation's ``predictions.h5``, ``sicot predict``, the exported TorchScript model) gives the
scores of ``softmax(SICoT.logits)`` on the same images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import tiny_recipe
from typer.testing import CliRunner

from sicot_cli import runs
from sicot_cli.cli import app
from sicot_cli.data import dataset as ds
from sicot_cli.data.dataset import open_prepared
from sicot_cli.evaluate import evaluate_run, load_run_model

runner = CliRunner()
COTRAIN = (
    "model.encoder=bilinear",
    "model.semantic_norm=batchnorm",
    "model.backbone=resnet18",
    "train.lr=0.001",
    "train.epochs=1",
)


@pytest.fixture(scope="module")
def cotrained(tiny_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished co-training run whose scores depend on the image (resnet18 at a small lr; bilinear
    encoder, batch-normalised title embedding: the default preset)."""
    from sicot_cli.train import train

    out = tmp_path_factory.mktemp("image-only") / "run"
    train(tiny_recipe(tiny_prepared, *COTRAIN), out)
    return out


def retitled(src: Path, dst: Path, rows: np.ndarray, how: str) -> Path:
    """A copy of a prepared file whose ``rows`` have other titles: ``empty``, or ``rolled`` (another row's, of another class)."""
    shutil.copy(src, dst)
    with h5py.File(dst, "a") as f:
        tokens, lengths, titles = (
            f["tokens"][()],
            f["lengths"][()],
            [t.decode() if isinstance(t, bytes) else t for t in f["titles"][()]],
        )
        if how == "empty":
            tokens[rows], lengths[rows] = 0, 0
            new = {int(r): "" for r in rows}
        else:
            donors = np.roll(rows, 2)
            tokens[rows], lengths[rows] = tokens[donors], lengths[donors]
            new = {int(r): titles[int(d)] for r, d in zip(rows, donors, strict=True)}
        f["tokens"][...] = tokens
        f["lengths"][...] = lengths
        for r, t in new.items():
            f["titles"][r] = t
        ds.write_attrs(f)  # a consistent, checksummed file: only the titles differ
    return dst


def _predictions(run: Path) -> dict[str, np.ndarray]:
    with h5py.File(run / runs.PREDICTIONS, "r") as f:
        return {k: f[k][()] for k in ("rows", "labels", "topk_labels", "topk_scores")}


def test_titles_do_not_change_image_only_predictions(cotrained: Path, tiny_prepared: Path, tmp_path: Path) -> None:
    p = open_prepared(tiny_prepared)
    test = np.arange(p.test_start, p.n)
    everything = np.arange(p.n)
    empty = retitled(tiny_prepared, tmp_path / "empty.h5", everything, "empty")
    rolled = retitled(tiny_prepared, tmp_path / "rolled.h5", test, "rolled")
    q = open_prepared(rolled)
    assert open_prepared(empty).lengths.sum() == 0 and q.fingerprint() == p.fingerprint()
    assert (q.labels[test] != q.labels[np.roll(test, 2)]).all() and not np.array_equal(q.tokens[test], p.tokens[test])

    # the titles do reach the co-training stream x_m: its scores differ; the image-only scores do not
    _, _, model, _ = load_run_model(cotrained)
    model.eval()
    with h5py.File(tiny_prepared) as f:
        x = model.normalize(torch.from_numpy(f["images"][p.test_start :]))
    scores = {}
    for name, prepared in (("original", p), ("rolled", q)):
        tokens = torch.from_numpy(prepared.tokens[test].astype(np.int64))
        with torch.no_grad():
            scores[name] = (*model(x, tokens, tokens != 0), model.logits(x))
    assert not torch.allclose(scores["original"][1], scores["rolled"][1], atol=1e-3), (
        "the titles changed nothing: the test would not see them used"
    )
    assert torch.equal(scores["original"][0], scores["rolled"][0]) and torch.equal(
        scores["original"][2], scores["rolled"][2]
    )

    # evaluation of the run on each file: the same rows, classes and scores, exactly
    want = evaluate_run(cotrained, device="cpu")
    assert len(set(want.topk_scores[:, 0].tolist())) > 1, "the fixture model must not answer every image alike"
    for data in (empty, rolled):
        got = evaluate_run(cotrained, data=data, device="cpu")
        for field in ("rows", "labels", "topk_labels", "topk_scores"):
            assert np.array_equal(getattr(got, field), getattr(want, field)), (data.name, field)

    # training on a file whose test titles differ: the same steps, the same predictions.h5
    from sicot_cli.train import train

    other = train(tiny_recipe(rolled, *COTRAIN), tmp_path / "run", data=rolled)
    a, b = _predictions(cotrained), _predictions(other.run_dir)
    assert all(np.array_equal(a[k], b[k]) for k in a), {k: (a[k], b[k]) for k in a}


def test_predict_agrees_with_the_predictions_written_at_evaluation(cotrained: Path, tiny_prepared: Path) -> None:
    """``sicot predict`` on the test images' source files gives the classes and scores of ``predictions.h5``."""
    p = open_prepared(tiny_prepared)
    written = _predictions(cotrained)
    ids = p.ids()
    raw = tiny_prepared.parent / "raw"
    files = [raw / "{}{}.png".format(*ids[r].split("-")) for r in written["rows"]]  # id "cat-3" <- raw/cat3.png
    assert len(files) == 6 and all(f.is_file() for f in files)
    r = runner.invoke(app, ["predict", "--run", str(cotrained), "--json", "-k", "3", *map(str, files)])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    assert [g["image"] for g in got] == [str(f) for f in files]
    for g, labels, scores in zip(got, written["topk_labels"], written["topk_scores"], strict=True):
        assert [t["class"] for t in g["top"]] == [p.class_names[c] for c in labels]
        np.testing.assert_allclose([t["score"] for t in g["top"]], scores, rtol=0, atol=1e-6)


def test_torchscript_export_equals_softmax_of_sicot_logits(
    cotrained: Path, tiny_prepared: Path, tmp_path: Path
) -> None:
    from sicot_cli.export import export

    result = export(cotrained, tmp_path / "model.pt", fmt="torchscript")
    assert (result.format, result.verified_images, result.top1_equal) == ("torchscript", 6, True)
    scripted = torch.jit.load(str(tmp_path / "model.pt"))
    _, _, model, _ = load_run_model(cotrained)  # the run's SICoT, with its text stream, loaded afresh
    model.eval()
    with h5py.File(tiny_prepared) as f:
        test = torch.from_numpy(f["images"][-6:])
    noise = torch.randint(0, 256, (7, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    for images in (test, test[:1], noise):  # the traced batch of 2 is not baked in
        with torch.no_grad():
            want = torch.softmax(model.logits(model.normalize(images)), dim=1)
            got = scripted(images)
        assert got.shape == want.shape == (len(images), 3)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert torch.equal(got.argmax(1), want.argmax(1))
