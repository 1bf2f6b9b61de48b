"""``sicot export`` (ONNX, TorchScript, the JSON beside them) and ``sicot serve`` (the HTTP service)."""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import tiny_recipe
from PIL import Image
from typer.testing import CliRunner

from sicot_cli import runs
from sicot_cli.cli import app
from sicot_cli.errors import SicotError
from sicot_cli.predict import load_recognizer

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")

from fastapi.testclient import TestClient  # noqa: E402

from sicot_cli import export as export_mod  # noqa: E402
from sicot_cli.batcher import Busy, MicroBatcher  # noqa: E402
from sicot_cli.serve import ServeLimits, create_app  # noqa: E402

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tiny_prepared, tmp_path_factory) -> Path:
    """A tiny image-only run whose scores depend on the image (resnet18, 2 epochs at a small lr)."""
    from sicot_cli.train import train

    out = tmp_path_factory.mktemp("deploy") / "run"
    train(
        tiny_recipe(tiny_prepared, "model.encoder=none", "model.backbone=resnet18", "train.lr=0.001", "train.epochs=2"),
        out,
    )
    return out


@pytest.fixture(scope="module")
def images(tiny_prepared) -> list[Path]:
    raw = tiny_prepared.parent / "raw"
    return [raw / f"{c}{i}.png" for c in ("cat", "dog", "cup") for i in (0, 5)]


@pytest.fixture(scope="module")
def reference(run_dir, images) -> list[dict]:
    """`sicot predict --json -k 3` on the images: what every other path must answer."""
    r = runner.invoke(app, ["predict", "--run", str(run_dir), "--json", "-k", "3", *map(str, images)])
    assert r.exit_code == 0, r.output
    preds = json.loads(r.output)
    scores = [p["top"][0]["score"] for p in preds]
    assert len(set(scores)) > 1, "the fixture model must not answer every image alike"
    return preds


def _same_top(got: list[dict], want: list[dict], atol: float) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert [t["class"] for t in g["top"]] == [t["class"] for t in w["top"]]
        assert [t["title"] for t in g["top"]] == [t["title"] for t in w["top"]]
        np.testing.assert_allclose([t["score"] for t in g["top"]], [t["score"] for t in w["top"]], atol=atol, rtol=0)


# --- export ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_model(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    r = runner.invoke(app, ["export", "--run", str(run_dir), "--out", str(out)])
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())
    assert "(onnx)" in said and "from checkpoint last (epoch 2)" in said and "top-1 identical" in said
    return out


def test_onnx_export_equals_pytorch(onnx_model, run_dir, tiny_prepared, images, reference):
    import onnxruntime as ort

    meta = json.loads((onnx_model.parent / "model.onnx.json").read_text())
    assert meta["model"] == {
        "file": "model.onnx",
        "format": "onnx",
        "sha256": meta["model"]["sha256"],
        "runtime": "onnxruntime",
    }
    assert (
        meta["sicot"]["run"] == str(run_dir.resolve())
        and meta["sicot"]["version"]
        and meta["sicot"]["checkpoint"] == "last"
    )
    assert meta["verification"]["images"] == 6 and meta["verification"]["top1_equal"] is True
    assert meta["verification"]["max_abs_diff"] <= 1e-4
    assert sorted(c["name"] for c in meta["classes"]) == ["cat", "cup", "dog"] and all(
        c["title"] for c in meta["classes"]
    )
    assert meta["input"]["shape"] == ["batch", 3, 16, 16] and meta["output"]["shape"] == ["batch", 3]
    # the dynamic batch axis: batches of 1 and 7 of the run's test images, against the eager model
    import h5py

    recognizer = load_recognizer(run_dir, device="cpu")
    with h5py.File(tiny_prepared, "r") as f:
        x = np.asarray(f["images"][-7:])
    session = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    for batch in (x[:1], x):
        got = session.run(["probabilities"], {"images": batch})[0]
        want = recognizer.probabilities(batch)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4
        assert (got.argmax(1) == want.argmax(1)).all()
    # served from the file (no run, no dataset): the same answers as `sicot predict`
    exported = export_mod.load_exported(onnx_model)
    from sicot_cli.predict import preprocess

    probs = exported.probabilities(np.stack([preprocess(p, exported.image_size) for p in images]))
    _same_top([p.as_dict() for p in exported.top(probs, list(map(str, images)), 3)], reference, atol=1e-4)


CONSUMER = r"""
# A consumer without sicot or torch: the JSON beside the model says everything it needs.
import json, sys
import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

model_path, images = sys.argv[1], sys.argv[2:]
meta = json.load(open(model_path + ".json"))
size = meta["input"]["image_size"]
assert "PIL.ImageOps.exif_transpose" in meta["input"]["preprocessing"] and "draft" in meta["input"]["preprocessing"]
assert meta["input"]["dtype"] == "uint8" and meta["input"]["layout"] == "NCHW" and meta["input"]["channels"] == "RGB"
for said in ("tRNS", "(v * 255 + top // 2) // top", "top = 65535 for I;16*", "(v - min) / (max - min) * 255"):
    assert said in meta["input"]["preprocessing"], said

def to_rgb(img):  # the JSON's "convert to RGB", rule by rule
    if img.mode.startswith("I"):
        a = np.asarray(img).astype(np.int64)
        top = 65535 if img.mode.startswith("I;16") or a.max() > 255 else 255
        a = (np.clip(a, 0, top) * 255 + top // 2) // top
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float32)
        lo, hi = a.min(), a.max()
        a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo) * 255.0
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")

batch = []
for path in images:
    img = Image.open(path)
    if img.format == "JPEG":  # as the JSON says: draft mode first
        s = min(img.size) / size
        img.draft("RGB", (max(size, round(img.width / s)), max(size, round(img.height / s))))
    img = to_rgb(ImageOps.exif_transpose(img))
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    batch.append(np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8).transpose(2, 0, 1))
session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
probs = session.run([meta["output"]["name"]], {meta["input"]["name"]: np.stack(batch)})[0]
out = []
for path, p in zip(images, probs):
    order = np.argsort(-p, kind="stable")[:3]
    out.append({"image": path, "top": [{"class": meta["classes"][i]["name"], "score": float(p[i]), "title": meta["classes"][i]["title"]} for i in order]})
assert "torch" not in sys.modules and not any(m.startswith("sicot") for m in sys.modules)
print(json.dumps(out))
"""


def test_exported_json_is_enough_for_onnxruntime_and_numpy(onnx_model, images, reference):
    r = subprocess.run(
        [sys.executable, "-c", CONSUMER, str(onnx_model), *map(str, images)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert r.returncode == 0, r.stderr
    _same_top(json.loads(r.stdout), reference, atol=1e-4)


def test_the_exported_json_names_the_exif_orientation_predict_applies(run_dir, onnx_model, images, tmp_path):
    """A phone photo stored sideways (EXIF orientation 6): sicot turns it upright, and the JSON's
    preprocessing did not say so, so a consumer following it scored the sideways picture."""
    img = Image.open(images[0]).convert("RGB")
    img = img.resize((img.width * 2, img.height))  # not square: the crop depends on the orientation
    sideways = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    img.transpose(Image.Transpose.ROTATE_90).save(sideways, quality=100, exif=exif)
    want = runner.invoke(app, ["predict", "--run", str(run_dir), "--json", "-k", "3", str(sideways)])
    assert want.exit_code == 0, want.output
    r = subprocess.run(
        [sys.executable, "-c", CONSUMER, str(onnx_model), str(sideways)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    _same_top(json.loads(r.stdout), json.loads(want.output), atol=1e-4)


def test_the_exported_json_says_how_every_image_mode_becomes_rgb(run_dir, onnx_model, tmp_path):
    """Colour-key transparency (tRNS), 32-bit integer and float images: sicot converts each by its own
    rule, which the JSON did not state, so a consumer following it scored other pixels (up to 247
    levels off, a different top-1)."""
    rng = np.random.default_rng(5)
    rgb = (rng.random((20, 24, 3)) * 255).astype(np.uint8)
    files = []
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 3
    for name, img, kw in (
        ("pal-key.png", pal, {"transparency": 3}),
        ("rgb-key.png", Image.fromarray(rgb), {"transparency": tuple(int(v) for v in rgb[0, 0])}),
        ("i32-12bit.tif", Image.fromarray((rng.random((20, 24)) * 4095).astype(np.int32), "I"), {}),
        ("i32-8bit.tif", Image.fromarray((rng.random((20, 24)) * 255).astype(np.int32), "I"), {}),
        ("f32.tif", Image.fromarray((rng.random((20, 24)) * 3 - 1).astype(np.float32), "F"), {}),
    ):
        img.save(tmp_path / name, **kw)
        files.append(str(tmp_path / name))
    assert Image.open(files[1]).info.get("transparency") is not None and Image.open(files[2]).mode == "I"
    want = runner.invoke(app, ["predict", "--run", str(run_dir), "--json", "-k", "3", *files])
    assert want.exit_code == 0, want.output
    r = subprocess.run(
        [sys.executable, "-c", CONSUMER, str(onnx_model), *files], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    _same_top(json.loads(r.stdout), json.loads(want.output), atol=1e-4)


def test_torchscript_export_has_no_grad_and_equals_predict(run_dir, images, reference, tmp_path):
    out = tmp_path / "model.pt"
    r = runner.invoke(app, ["export", "--run", str(run_dir), "--out", str(out), "--format", "torchscript"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "model.pt.json").read_text())["model"]["format"] == "torchscript"
    scripted = torch.jit.load(str(out))
    from sicot_cli.predict import preprocess

    probs = scripted(torch.from_numpy(np.stack([preprocess(p, 16) for p in images])))
    assert probs.grad_fn is None and not probs.requires_grad
    exported = export_mod.load_exported(out)
    _same_top([p.as_dict() for p in exported.top(probs.numpy(), list(map(str, images)), 3)], reference, atol=1e-5)
    # a TorchScript ResNet takes any size, so the trained size is recorded inside the file: an edited JSON is caught
    side = tmp_path / "model.pt.json"
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "input": {**meta["input"], "image_size": 200}}))
    with pytest.raises(SicotError, match="input.image_size is 200, but model.pt was trained on 16 px images"):
        export_mod.load_exported(out)


def test_export_refusals(run_dir, onnx_model, tmp_path, monkeypatch):
    r = runner.invoke(app, ["export", "--run", str(run_dir), "--out", str(onnx_model)])
    assert r.exit_code == 2 and "already exists" in r.output
    # two exports to one --out: both succeeded and one replaced the other's files without a word
    from sicot_cli.fsutil import exclusive

    busy = tmp_path / "busy.pt"
    with exclusive(busy):  # another export writing it
        r = runner.invoke(app, ["export", "--run", str(run_dir), "--out", str(busy)])
    assert r.exit_code == 2 and "busy.pt: in use by another sicot process" in " ".join(r.output.split())
    assert not busy.exists()
    r = runner.invoke(app, ["export", "--run", str(run_dir), "--out", str(tmp_path / "m.bin"), "--format", "tflite"])
    assert r.exit_code == 2 and "--format must be torchscript or onnx" in r.output
    # an export that disagrees with PyTorch is refused and leaves nothing behind
    monkeypatch.setattr(export_mod, "TOLERANCE", -1.0)
    monkeypatch.setattr(export_mod, "float32_rounding", lambda net, images: -1.0)
    with pytest.raises(SicotError, match="disagrees with PyTorch on 6 test images"):
        export_mod.export(run_dir, tmp_path / "bad.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with pytest.raises(SicotError, match="model.onnx.json: not found"):
        (tmp_path / "model.onnx").write_bytes(onnx_model.read_bytes())
        export_mod.load_exported(tmp_path / "model.onnx")


def test_an_export_stopped_before_its_model_is_redone(run_dir, tmp_path, monkeypatch, caplog):
    """The JSON is written first and the model renamed into place last: a stop in between leaves the
    JSON alone (never a model without it), and the same command then replaces it; a JSON that no
    export left (the user's own, or one naming another model) is still refused."""
    from sicot_cli import fsutil

    out = tmp_path / "m.pt"
    real = fsutil.os.replace

    def stop_at_model(src, dst):  # Ctrl-C after the JSON, before the model's rename
        if str(dst) == str(out):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", stop_at_model)
    with pytest.raises(KeyboardInterrupt):
        export_mod.export(run_dir, out, "torchscript")
    monkeypatch.setattr(fsutil.os, "replace", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the JSON is taken back too
    (tmp_path / "m.pt.json").write_text(json.dumps({"format": export_mod.SIDECAR_FORMAT, "model": {"file": "m.pt"}}))
    export_mod.export(run_dir, out, "torchscript")  # as a SIGKILL between the two would leave it
    assert "left by an export stopped before its model was written: replaced" in caplog.text
    assert export_mod.load_exported(out).num_classes == 3
    for text in ('{"mine": 1}', json.dumps({"format": export_mod.SIDECAR_FORMAT, "model": {"file": "x.pt"}})):
        (tmp_path / "n.pt.json").write_text(text)
        with pytest.raises(SicotError, match=r"n.pt.json: already exists \(choose another --out\)"):
            export_mod.export(run_dir, tmp_path / "n.pt", "torchscript")


def test_a_model_with_large_logits_is_checked_within_float32s_own_rounding(run_dir, tiny_prepared):
    """A cRT classifier's logits reach 1e5, where float32 rounds the probabilities by ~4e-4 (an ulp
    is 0.008): its ONNX export was refused at 1e-4 though top-1 agreed. An export as exact as float64
    passes; one off by more than PyTorch's own rounding allows is refused, naming the way out."""
    from sicot_cli.evaluate import load_run_model
    from sicot_cli.model import ImageOnly

    _, prepared, model, _ = load_run_model(run_dir, "last", None)
    net = ImageOnly(model.cpu()).eval()
    with torch.no_grad():  # logits of ~1e5, as the audit's cRT stage had; the same probabilities in exact arithmetic
        net.classifier.bias += 1e5
    images = export_mod._test_images(prepared, 64)
    exact = copy.deepcopy(net).double()

    def exported(x, shift=0.0):  # float64 arithmetic, float32 out (the best any float32 export can give)
        with torch.no_grad():
            z = exact.classifier(exact.visual((torch.from_numpy(x).double() - exact.mean) / exact.std))
            p = torch.softmax(z, dim=1).float().numpy()
        p[:, p.argmax(1)[0]] += shift  # a wrong export that keeps every top-1
        return p

    diff, top1 = export_mod.verify(exported, net, images)
    assert top1 and diff > export_mod.TOLERANCE  # float32 PyTorch itself is that far from exact
    checked = export_mod.check_agreement(Path("m.onnx"), exported, net, images)
    assert checked["max_abs_diff"] == diff and checked["tolerance"] > diff
    assert checked["tolerance"] == export_mod.ROUNDING_MARGIN * checked["float32_rounding"]
    with pytest.raises(SicotError, match=r"m.onnx: .* > tolerance .*float32 rounding.*`--format torchscript`"):
        export_mod.check_agreement(Path("m.onnx"), lambda x: exported(x, shift=0.02), net, images)


def test_the_format_follows_the_name_of_a_file_called_onnx():
    """``--out ex/.onnx`` wrote TorchScript: ``Path('.onnx').suffix`` is empty."""
    assert export_mod.format_for(Path("ex/.onnx"), None) == "onnx"
    assert export_mod.format_for(Path("ex/m.ONNX"), None) == "onnx"
    assert export_mod.format_for(Path("ex/m.pt"), None) == export_mod.format_for(Path("ex/onnx"), None) == "torchscript"
    with pytest.raises(SicotError, match="an .onnx name for a TorchScript file"):
        export_mod.format_for(Path("ex/.onnx"), "torchscript")


def test_an_edited_export_json_is_named_once_at_load(onnx_model, tmp_path):
    """serve/predict trust nothing in the JSON beside a model: each field it relies on is checked on load."""
    model = tmp_path / "model.onnx"
    model.write_bytes(onnx_model.read_bytes())
    good = json.loads(onnx_model.with_name("model.onnx.json").read_text(encoding="utf-8"))

    def edited(change) -> str:
        meta = json.loads(json.dumps(good))
        change(meta)
        (tmp_path / "model.onnx.json").write_text(json.dumps(meta), encoding="utf-8")
        with pytest.raises(SicotError) as e:
            export_mod.load_exported(model)
        return str(e.value)

    assert 'input.image_size must be an integer between 8 and 4096, got "big"' in edited(
        lambda m: m["input"].update(image_size="big")
    )
    assert "got 0 (export the run again" in edited(lambda m: m["input"].update(image_size=0))
    assert "got null" in edited(lambda m: m.pop("input"))
    assert 'classes must list {"index": i' in edited(lambda m: m.update(classes={"a": 1}))
    assert "model.onnx: scores 3 classes, but model.onnx.json lists 2" in edited(
        lambda m: m.update(classes=m["classes"][:2])
    )
    assert "model.onnx: does not take 99 px images as model.onnx.json says" in edited(
        lambda m: m["input"].update(image_size=99)
    )
    assert "not the model model.onnx.json describes (its sha256 differs)" in edited(
        lambda m: m["model"].update(sha256="0" * 64)
    )
    (tmp_path / "model.onnx.json").write_text(json.dumps(good), encoding="utf-8")
    assert export_mod.load_exported(model).num_classes == 3
    with pytest.raises(
        SicotError, match=r"model.onnx.json: is an export's JSON; name the model file beside it \(model.onnx\)"
    ):
        export_mod.load_exported(tmp_path / "model.onnx.json")


def test_documented_checkpoint_reader(run_dir):
    """The README's one line that reads a checkpoint without sicot works, and gives what sicot loads."""
    line = next(
        ln.strip()
        for ln in (ROOT / "README.md").read_text().splitlines()
        if "weights_only=True" in ln and ln.strip().startswith("state = ")
    )
    scope = {"path": str(run_dir / runs.LAST)}
    exec("import io, torch\n" + line, scope)  # noqa: S102 - the documented line itself
    want = runs.load_checkpoint(run_dir / runs.LAST)
    assert scope["state"].keys() == want.keys()
    assert all(torch.equal(a, want["model"][k]) for k, a in scope["state"]["model"].items())


# --- serve ----------------------------------------------------------------------------------------

LIMITS = ServeLimits(
    max_batch=8, max_wait_ms=2.0, max_upload_bytes=200_000, max_pixels=1_000_000, max_images=4, timeout_s=10.0, top_k=3
)


@pytest.fixture(scope="module")
def client(run_dir):
    with TestClient(create_app(load_recognizer(run_dir, device="cpu"), LIMITS)) as c:
        yield c


def _ico() -> bytes:
    """A small, honest .ico: refused like a bomb would be, since PIL decodes an icon's images while opening it."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="ICO")
    return buf.getvalue()


def test_predict_scores_every_readable_image_in_batches_and_names_the_rest(run_dir, images, reference, tmp_path):
    """A bad file among good ones: the good ones are predicted (as alone), each bad one gets a red line, exit 2."""
    from sicot_cli.predict import predict

    bad = tmp_path / "junk.jpg"
    bad.write_bytes(b"not an image")
    r = runner.invoke(
        app,
        [
            "predict",
            "--run",
            str(run_dir),
            "--json",
            "-k",
            "3",
            str(images[0]),
            str(bad),
            str(images[1]),
            str(tmp_path),
        ],
    )
    assert r.exit_code == 2
    preds = json.loads(r.stdout)
    _same_top(preds, reference[:2], atol=1e-6)
    assert "junk.jpg: not an image file" in r.stderr
    assert "image path is a directory (name its images" in r.stderr
    assert "2 of 4 images could not be read; the others were predicted" in r.stderr
    # an image this user may not read is one of the unreadable, not a refusal of the whole command
    # (click's readable check said "Invalid value for 'images'"; root reads anything, so os.access says no)
    real_access = os.access
    denied = images[1].name
    with mock.patch("os.access", lambda path, mode, **kw: Path(path).name != denied and real_access(path, mode, **kw)):
        r = runner.invoke(app, ["predict", "--run", str(run_dir), "--json", str(images[0]), str(images[1])])
    assert "Invalid value" not in r.output and r.exit_code == 0, r.output
    # an image inside a folder this user may not read: Python 3.11's is_dir raises there (it was a
    # "permission denied" for the whole command, no prediction at all)
    locked = tmp_path / "lock" / "in.png"
    real_is_dir = Path.is_dir

    def is_dir(self):  # noqa: ANN001, ANN202
        if "lock" in self.parts:
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_dir(self)

    with mock.patch.object(Path, "is_dir", is_dir):
        r = runner.invoke(app, ["predict", "--run", str(run_dir), "--json", str(images[0]), str(locked)])
    assert r.exit_code == 2 and len(json.loads(r.stdout)) == 1, r.output
    assert f"{locked}: image file" in r.stderr and "1 of 2 images could not be read" in r.stderr, r.stderr
    # decoded and scored a few at a time: the same answers as in one batch
    small, unreadable = predict(run_dir, [*images, bad], k=3, device="cpu", batch=4)
    assert [u.image for u in unreadable] == [str(bad)]
    _same_top([p.as_dict() for p in small], reference, atol=1e-5)


def test_export_records_the_epoch_its_weights_trained(onnx_model):
    assert json.loads(Path(f"{onnx_model}.json").read_text())["sicot"]["epoch"] == 2


def test_health_answers_head_and_the_api_has_no_docs_pages(client):
    """HEAD /healthz for health checks; no /docs, /redoc or /openapi.json (the docs page loads from a CDN)."""
    assert client.head("/healthz").status_code == 200
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 404, path


def test_serve_applies_its_pixel_limit_above_the_prepare_default(monkeypatch):
    """--max-pixels reaches the decoder: the prepare default (89 MP) no longer caps it."""
    import sicot_cli.predict as predict_module

    seen = {}

    def fake(data, size, max_pixels, limit_name):  # noqa: ANN001, ANN202
        seen.update(max_pixels=max_pixels, limit_name=limit_name)
        return np.zeros((size, size, 3), np.uint8)

    monkeypatch.setattr(predict_module, "load_image", fake)
    predict_module.preprocess(b"x", 8, 150_000_000)
    assert seen == {"max_pixels": 150_000_000, "limit_name": None}


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds almost nothing: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_served_images_are_decoded_on_the_servers_own_few_threads(run_dir, images, monkeypatch):
    """Decoding ran on the server's pool of ~40 threads, and glibc keeps each thread's freed memory:
    8 concurrent 40 MP images held 7 GB after they were done (16 requests of 2: 10 GB). It now runs on
    DECODE_SLOTS threads of its own (2.6 GB measured for both), which this checks."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import sicot_cli.serve as serve

    seen: set[str] = set()
    real = serve.preprocess

    def recorded(*a, **kw):
        seen.add(threading.current_thread().name)
        return real(*a, **kw)

    monkeypatch.setattr(serve, "preprocess", recorded)
    files = [("image", (p.name, p.read_bytes(), "image/png")) for p in images[:2]]
    with TestClient(create_app(load_recognizer(run_dir, device="cpu"), LIMITS)) as c:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: c.post("/predict", files=files), range(16)))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200][:1]
    assert seen and all(name.startswith("sicot-decode") for name in seen), seen
    assert len(seen) <= serve.DECODE_SLOTS


def test_served_topk_equals_predict(client, images, reference):
    files = [("image", (p.name, p.read_bytes(), "image/png")) for p in images[:4]]
    r = client.post("/predict", files=files)
    assert r.status_code == 200, r.text
    want = [{**w, "image": Path(w["image"]).name} for w in reference]
    _same_top(r.json()["predictions"], want[:4], atol=1e-5)
    assert [p["image"] for p in r.json()["predictions"]] == [p.name for p in images[:4]]
    # JSON: a list of base64 strings (a data URL too), and k
    b64 = [base64.b64encode(p.read_bytes()).decode() for p in images[4:]]
    r = client.post("/predict?k=2", json={"images": [b64[0], "data:image/png;base64," + b64[1]]})
    assert r.status_code == 200, r.text
    _same_top(r.json()["predictions"], [{**w, "top": w["top"][:2]} for w in want[4:]], atol=1e-5)
    # base64 as `base64` and MIME write it, wrapped at 76 columns: the same images
    wrapped = [base64.encodebytes(p.read_bytes()).decode() for p in images[4:6]]
    assert all("\n" in w for w in wrapped)
    r2 = client.post("/predict?k=2", json={"images": wrapped})
    assert r2.status_code == 200 and r2.json()["predictions"] == r.json()["predictions"], r2.text
    classes = client.get("/classes").json()["classes"]
    assert [c["index"] for c in classes] == [0, 1, 2] and all(c["title"] for c in classes)
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["classes"] == 3 and health["images"] >= 6


def _bad_cases(images: list[Path]) -> dict[str, tuple[dict, int, str]]:
    """Each bad request class: the request, its status and a fragment of its error."""
    png = images[0].read_bytes()
    return {
        "garbage_bytes": (
            {"files": {"image": ("x.png", b"\x89PNG garbage" * 10, "image/png")}},
            422,
            "x.png: not an image file",
        ),
        "truncated_image": (
            {"files": {"image": ("t.png", png[: len(png) // 2], "image/png")}},
            422,
            "t.png: truncated or corrupt image",
        ),
        "oversized_upload": (
            {"files": {"image": ("big.png", b"\0" * 300_000, "image/png")}},
            413,
            "upload over the limit of 200,000 bytes",
        ),
        "pixel_limit": (
            {"files": {"image": ("big.png", _png_header(10_000, 10_000), "image/png")}},
            413,
            "big.png: image has 100,000,000 pixels (limit 1,000,000)",
        ),
        "pixel_bomb": (
            {"files": {"image": ("bomb.png", _png_header(50_000, 50_000), "image/png")}},
            413,
            "bomb.png: image has 2,500,000,000 pixels (limit 1,000,000)",
        ),
        "non_image_part": (
            {"files": {"image": ("a.txt", b"hello", "text/plain")}},
            415,
            "a.txt: content type 'text/plain' is not an image",
        ),
        "non_image_request": (
            {"content": b"hello", "headers": {"content-type": "text/plain"}},
            415,
            "content type 'text/plain'",
        ),
        "no_content_type": ({"content": png}, 415, "content type '(none)'"),
        "too_many_images": (
            {"files": [("image", (f"{i}.png", png, "image/png")) for i in range(5)]},
            413,
            "5 images in one request (limit 4)",
        ),
        "far_too_many_images": (
            {"files": [("image", (f"{i}.png", png, "image/png")) for i in range(9)]},
            413,
            "more than 5 images in one request (limit 4)",
        ),
        "too_many_images_json": (
            {"json": [base64.b64encode(png).decode()] * 5},
            413,
            "5 images in one request (limit 4)",
        ),
        "base64_non_image": ({"json": [base64.b64encode(b"hello").decode()]}, 422, "images[0]: not an image file"),
        "icon_container": (
            {"files": {"image": ("i.ico", _ico(), "image/x-icon")}},
            422,
            "i.ico: an icon container (ICO, CUR or ICNS) is not read: save the image as PNG",
        ),
        "no_image": (
            {"content": b"--zz--\r\n", "headers": {"content-type": "multipart/form-data; boundary=zz"}},
            400,
            "no image in the request",
        ),
        "field_not_file": (  # a part without a filename beside an image: was dropped, 2 images sent, 1 answered
            {"files": [("image", ("a.png", png, "image/png")), ("b", (None, "b"))]},
            400,
            "form field 'b' is no file upload (its part has no filename): send each image as a file, e.g. curl -F 'b=@photo.jpg'",
        ),
        "bad_json": (
            {"content": b"[1,", "headers": {"content-type": "application/json"}},
            400,
            "body is not valid JSON",
        ),
        "json_not_strings": ({"json": {"images": [1, 2]}}, 400, "list of base64 strings"),
        "json_nested_too_deeply": (
            {"content": b"[" * 100_000, "headers": {"content-type": "application/json"}},
            400,
            "body is not valid JSON (nested too deeply)",
        ),
        "bad_base64": ({"json": ["@@@"]}, 400, "images[0] is not valid base64"),
        "empty_list": ({"json": []}, 400, "no image in the request"),
        "k_zero": (
            {"files": {"image": ("a.png", png, "image/png")}, "params": {"k": 0}},
            422,
            "k must be between 1 and 3, got 0",
        ),
        "k_not_int": (
            {"files": {"image": ("a.png", png, "image/png")}, "params": {"k": "x"}},
            422,
            "query.k: Input should be a valid integer",
        ),
        "bad_multipart": (
            {"content": b"xx", "headers": {"content-type": "multipart/form-data; boundary=zz"}},
            400,
            "bad multipart body",
        ),
        "multipart_no_boundary": (
            {"content": b"xx", "headers": {"content-type": "multipart/form-data"}},
            400,
            "bad multipart body: Missing boundary",
        ),
        "multipart_truncated": (  # a whole image part, no closing boundary: was "no image in the request"
            {
                "content": b'--zz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
                b"Content-Type: image/png\r\n\r\n" + png + b"\r\n",
                "headers": {"content-type": "multipart/form-data; boundary=zz"},
            },
            400,
            "does not end with its closing boundary (a truncated upload?)",
        ),
    }


BAD_CASES = [
    "garbage_bytes",
    "truncated_image",
    "oversized_upload",
    "pixel_limit",
    "pixel_bomb",
    "non_image_part",
    "non_image_request",
    "no_content_type",
    "too_many_images",
    "far_too_many_images",
    "too_many_images_json",
    "base64_non_image",
    "icon_container",
    "no_image",
    "field_not_file",
    "bad_json",
    "json_not_strings",
    "json_nested_too_deeply",
    "bad_base64",
    "empty_list",
    "k_zero",
    "k_not_int",
    "bad_multipart",
    "multipart_no_boundary",
    "multipart_truncated",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_upload_answers_4xx_json_and_service_keeps_serving(client, images, reference, case):
    kwargs, status, message = _bad_cases(images)[case]
    r = client.post("/predict", **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert message in r.json()["error"]
    good = client.post("/predict", files={"image": (images[1].name, images[1].read_bytes(), "image/png")})
    assert good.status_code == 200
    _same_top(good.json()["predictions"], [{**reference[1], "image": images[1].name}], atol=1e-5)


def test_top_k_beyond_the_classes_is_refused_and_the_default_is_at_most_every_class(run_dir, images, client):
    r = runner.invoke(app, ["predict", "--run", str(run_dir), "-k", "4", str(images[0])])
    assert r.exit_code == 2 and "--top 4: the model knows 3 classes" in " ".join(r.output.split()), r.output
    r = runner.invoke(app, ["predict", "--run", str(run_dir), "--json", str(images[0])])
    assert r.exit_code == 0 and len(json.loads(r.output)[0]["top"]) == 3  # default 3
    png = images[0].read_bytes()
    r = client.post("/predict", files={"image": ("a.png", png, "image/png")}, params={"k": 4})
    assert r.status_code == 422 and "k must be between 1 and 3, got 4" in r.json()["error"]
    r = client.post("/predict", files={"image": ("a.png", png, "image/png")})
    assert r.status_code == 200 and len(r.json()["predictions"][0]["top"]) == 3  # the fixture's --top 3
    # ?top=1 (the CLI's option name) was answered with the default k without a word
    r = client.post("/predict", files={"image": ("a.png", png, "image/png")}, params={"top": 1})
    assert r.status_code == 422 and "unknown query parameter 'top': /predict takes k" in r.json()["error"]
    r = client.post("/predict?k=1&k=2", files={"image": ("a.png", png, "image/png")})
    assert r.status_code == 422 and "k given more than once" in r.json()["error"]


def test_unknown_route_and_method_are_json(client):
    r = client.get("/nope")
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}
    r = client.get("/predict")
    assert r.status_code == 405 and r.json() == {"error": "Method Not Allowed"}


def test_microbatcher_batches_carries_and_drops_abandoned():
    seen: list[int] = []

    def infer(x: np.ndarray) -> np.ndarray:
        seen.append(len(x))
        return x.reshape(len(x), -1).astype(np.float32) * 2

    async def scenario() -> None:
        b = MicroBatcher(infer, max_batch=4, max_wait_ms=1000, max_queue=100)
        b.start()
        # a lone request is not kept waiting for company; one with another on its way is
        t0 = time.perf_counter()
        await b.submit(np.zeros((1, 1)))
        assert time.perf_counter() - t0 < 0.5
        with b.arriving():
            t0 = time.perf_counter()
            await b.submit(np.zeros((1, 1)))
            assert time.perf_counter() - t0 >= 1.0
        seen.clear()
        # 5 single images queued together: a batch of 4, then 1
        xs = [np.full((1, 1), i) for i in range(5)]
        outs = await asyncio.gather(*(b.submit(x) for x in xs))
        assert [float(o[0, 0]) for o in outs] == [0, 2, 4, 6, 8]
        assert seen == [4, 1]
        # requests of 3 images: one would overflow a batch of 4, so it opens the next one
        seen.clear()
        outs = await asyncio.gather(b.submit(np.arange(3).reshape(3, 1)), b.submit(np.arange(3, 6).reshape(3, 1)))
        assert [o.ravel().tolist() for o in outs] == [[0, 2, 4], [6, 8, 10]]
        assert seen == [3, 3]
        # a full queue refuses; a caller that gave up is not computed
        with pytest.raises(Busy):
            await b.submit(np.zeros((101, 1)))
        seen.clear()
        task = asyncio.ensure_future(b.submit(np.zeros((2, 1))))
        await asyncio.sleep(0)
        task.cancel()
        assert (await b.submit(np.ones((1, 1))))[0, 0] == 2
        assert seen == [1] and b.waiting == 0
        await b.stop()

    asyncio.run(scenario())


def test_model_timeout_is_503_and_the_next_request_succeeds(run_dir, images):
    recognizer = load_recognizer(run_dir, device="cpu")
    fast = recognizer.probabilities
    slow = {"on": True}

    def probabilities(x: np.ndarray) -> np.ndarray:
        if slow["on"]:
            time.sleep(1.0)
        return fast(x)

    recognizer.probabilities = probabilities
    limits = ServeLimits(max_batch=4, max_wait_ms=0, timeout_s=0.3, top_k=1)
    with TestClient(create_app(recognizer, limits)) as c:
        png = images[0].read_bytes()
        r = c.post("/predict", files={"image": ("a.png", png, "image/png")})
        assert r.status_code == 503 and "no answer from the model within 0.3 s" in r.json()["error"]
        slow["on"] = False
        time.sleep(1.0)  # the abandoned batch finishes
        r = c.post("/predict", files={"image": ("a.png", png, "image/png")})
        assert r.status_code == 200 and len(r.json()["predictions"][0]["top"]) == 1


def test_serve_cli_refusals(run_dir, onnx_model):
    r = runner.invoke(app, ["serve"])
    assert r.exit_code == 2 and "give exactly one of --run DIR or --model FILE" in r.output
    r = runner.invoke(app, ["serve", "--run", str(run_dir), "--max-batch", "0"])
    assert r.exit_code == 2 and "--max-batch must be at least 1" in r.output
    r = runner.invoke(app, ["serve", "--run", str(run_dir), "--max-queue", "2", "--max-images", "3"])
    assert r.exit_code == 2 and "--max-queue 2 is below --max-images 3" in r.output  # answered 503 forever
    r = runner.invoke(app, ["serve", "--run", str(run_dir), "--threads", "0"])
    assert r.exit_code == 2 and "--threads must be 1..1024, got 0" in r.output
    r = runner.invoke(app, ["serve", "--run", str(run_dir), "--threads", "100000"])
    assert r.exit_code == 2 and "--threads must be 1..1024, got 100000" in r.output
    r = runner.invoke(app, ["serve", "--run", str(run_dir), "--top", "0"])
    assert r.exit_code == 2 and "--top must be at least 1, got 0" in r.output
    # more classes than the model knows: refused by serve, predict and ?k=N alike (two clipped silently)
    r = runner.invoke(app, ["serve", "--run", str(run_dir), "--top", "4"])
    assert r.exit_code == 2 and "--top 4: the model knows 3 classes; ask for at most that many" in r.output
    r = runner.invoke(app, ["serve", "--run", str(run_dir), "--port", "70000"])
    assert r.exit_code == 2 and "cannot listen on 127.0.0.1:70000" in r.output
    r = runner.invoke(app, ["serve", "--model", str(onnx_model.with_name("nope.onnx"))])
    assert r.exit_code == 2 and "nope.onnx: model file not found" in r.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        r = runner.invoke(app, ["serve", "--run", str(run_dir), "--port", str(busy.getsockname()[1])])
    assert r.exit_code == 2 and "cannot listen on 127.0.0.1" in r.output


def test_a_request_head_that_never_ends_is_disconnected_at_the_deadline():
    """A client that sends half a request head and stops was held for ever (one file descriptor each:
    a thousand such clients exhaust the process); a complete request on the same protocol is answered,
    and its kept-alive connection can send the next request."""
    import uvicorn

    from sicot_cli.serve import head_deadline_protocol

    async def app(scope, receive, send):  # the smallest ASGI app: 200 "ok"
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, http=head_deadline_protocol(0.5), log_config=None, access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as ok:
            for _ in range(2):  # two requests on one kept-alive connection, the second after the deadline
                ok.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert ok.recv(4096).startswith(b"HTTP/1.1 200")
                time.sleep(0.8)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
            t0 = time.monotonic()
            assert slow.recv(4096) == b""  # closed by the server
            assert time.monotonic() - t0 < 8
    finally:
        server.should_exit = True
        thread.join(30)


def _post(url: str, path: Path, out: list, i: int) -> None:
    import httpx

    try:
        r = httpx.post(f"{url}/predict", files={"image": (path.name, path.read_bytes(), "image/png")}, timeout=30)
        out[i] = (r.status_code, r.json())
    except Exception as e:  # noqa: BLE001 - recorded, the test asserts on it
        out[i] = ("error", repr(e))


def test_sigterm_answers_accepted_requests_then_exits(run_dir, images, reference):
    """One real uvicorn process: SIGTERM with 6 requests waiting in a batch and a slow upload under way;
    the 6 are answered, the slow client gets 408 at its deadline, then the process exits 0."""
    import httpx

    cmd = [
        sys.executable,
        "-m",
        "sicot_cli",
        "serve",
        "--run",
        str(run_dir),
        "--port",
        "0",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--max-batch",
        "64",
        "--max-wait-ms",
        "8000",
        "--timeout",
        "10",
        "-k",
        "3",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "300"}
    )
    slow = None
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the service did not start"
            time.sleep(0.2)
        # a client that announces 10 kB and sends 10 bytes: while it uploads, the batcher waits for it
        # (8 s at most: time enough for the 6 requests below to reach it on a busy machine)
        host, port = url.removeprefix("http://").split(":")
        slow = socket.create_connection((host, int(port)), timeout=30)
        slow.sendall(
            b'POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000\r\n\r\n["aaaaaaa'
        )
        out: list = [None] * 6
        threads = [threading.Thread(target=_post, args=(url, images[i], out, i)) for i in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while httpx.get(f"{url}/healthz", timeout=5).json()["waiting"] < 6:
            assert time.monotonic() < deadline, "the requests did not reach the batcher"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        for i, (status, body) in enumerate(out):
            assert status == 200, body
            _same_top(body["predictions"], [{**reference[i], "image": images[i].name}], atol=1e-5)
        answer = b""
        while b"}" not in answer:
            chunk = slow.recv(65536)
            if not chunk:
                break
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b"the upload was not received in time" in answer
        assert proc.wait(30) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/healthz", timeout=2)
    finally:
        if slow is not None:
            slow.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_checkpoint_with_nan_weights_is_refused_by_every_reader(run_dir, tmp_path):
    """evaluate exited 0 on NaN weights, predict printed `score nan`, serve answered 200 with null
    scores, and export suggested the torchscript format that would ship them."""
    import shutil

    import torch

    bad = Path(shutil.copytree(run_dir, tmp_path / "run"))
    state = runs.load_checkpoint(bad / runs.LAST)
    state["model"]["classifier.weight"] = torch.full_like(state["model"]["classifier.weight"], float("nan"))
    runs.save_checkpoint(bad / runs.LAST, state)
    for args in (["evaluate", "--run", str(bad)], ["predict", "--run", str(bad), str(tmp_path)],
                 ["export", "--run", str(bad), "--out", str(tmp_path / "m.pt")]):  # fmt: skip
        r = runner.invoke(app, args)
        flat = " ".join(r.output.split())
        assert r.exit_code == 2 and "checkpoint-last.pt: damaged checkpoint (classifier.weight holds NaN" in flat, flat
