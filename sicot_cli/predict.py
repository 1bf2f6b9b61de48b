"""Image-only inference (``sicot predict``) and the deployable model (``sicot export``).

The paper's online flow (§3.1): a query image -> the recognition service predicts a SKU id -> the
product index returns that SKU's title. ``predict`` prints the top-k classes with their scores and,
for each, a representative training title from the prepared dataset.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sicot_cli.data.images import ImageSkip, load_image
from sicot_cli.errors import SicotError
from sicot_cli.evaluate import load_run_model, resolve_device
from sicot_cli.fsutil import check_name, ensure_dir, exists, write_bytes, write_json
from sicot_cli.model import ImageOnly


@dataclass
class Prediction:
    """The top-k classes for one image."""

    image: str
    classes: list[str]
    scores: list[float]
    titles: list[str | None]

    def as_dict(self) -> dict[str, object]:
        return {"image": self.image, "top": [{"class": c, "score": s, "title": t} for c, s, t in zip(self.classes, self.scores, self.titles, strict=True)]}


def representative_titles(prepared, classes: set[int]) -> dict[int, str]:  # noqa: ANN001 - Prepared
    """One training title per class: the first training row of the class."""
    train_labels = prepared.labels[: prepared.n_train]
    rows = {c: int(np.flatnonzero(train_labels == c)[0]) for c in classes if (train_labels == c).any()}
    titles = prepared.titles(list(rows.values()))
    return dict(zip(rows.keys(), titles, strict=True))


@torch.no_grad()
def predict(run_dir: str | Path, images: list[str | Path], k: int = 3, checkpoint: str = "last", data: str | Path | None = None, device: str = "auto") -> list[Prediction]:
    """Top-k classes of each image, by the image-only model of a run.

    Raises:
        SicotError: not a run, a dataset other than the run's, or an image that cannot be read.
    """
    if not images:
        raise SicotError("no image given: sicot predict --run DIR IMAGE...")
    if k < 1:
        raise SicotError(f"--top must be >= 1, got {k}")
    dev = resolve_device(device, "--device")
    _, prepared, model, _ = load_run_model(Path(run_dir), checkpoint, data)
    model.to(dev).eval()
    arrays = []
    for p in images:
        try:
            arrays.append(load_image(Path(p), prepared.image_size).transpose(2, 0, 1))
        except ImageSkip as e:
            raise SicotError(f"{p}: {e}") from None
    x = torch.from_numpy(np.stack(arrays)).to(dev)
    probs = torch.softmax(model.logits(model.normalize(x)).float(), dim=1)
    top = probs.topk(min(k, prepared.num_classes), dim=1)
    idx, val = top.indices.cpu().numpy(), top.values.cpu().numpy()
    titles = representative_titles(prepared, set(idx.ravel().tolist()))
    return [
        Prediction(str(p), [prepared.class_names[c] for c in idx[i]], [float(v) for v in val[i]], [titles.get(int(c)) for c in idx[i]])
        for i, p in enumerate(images)
    ]


def export(run_dir: str | Path, out: str | Path, checkpoint: str = "last", data: str | Path | None = None) -> Path:
    """Write a TorchScript image-only model (uint8 [B, 3, S, S] -> probabilities) and its classes.

    The file loads with ``torch.jit.load`` alone (no sicot); ``<out>.classes.json`` beside it lists
    the class names by index and the input size.
    """
    out = Path(out)
    for path in (out, out.with_suffix(".classes.json")):
        check_name(path)
        if exists(path):
            raise SicotError(f"{path}: already exists (choose another --out)")
    ensure_dir(out.parent)
    _, prepared, model, _ = load_run_model(Path(run_dir), checkpoint, data)
    net = ImageOnly(model.cpu()).eval()
    example = torch.zeros(2, 3, prepared.image_size, prepared.image_size, dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export, but it is still the format that
        # C++ (libtorch) and most serving stacks load without Python; keep it until they move.
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.trace(net, example)
        if not torch.allclose(scripted(example), net(example), atol=1e-5):
            raise RuntimeError("the traced model disagrees with the eager one")
    # Serialised in memory and written by Python: libtorch's own file writer aborts the process
    # (SIGABRT) on a full disk, while a Python write raises ENOSPC, which atomic_path reports.
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # as above: TorchScript is still the portable format
        torch.jit.save(scripted, buf)
    write_bytes(out, buf.getbuffer())
    write_json(out.with_suffix(".classes.json"), {"classes": prepared.class_names, "input": {"dtype": "uint8", "shape": [None, 3, prepared.image_size, prepared.image_size], "layout": "RGB, NCHW, 0-255"}})
    return out


def predictions_json(preds: list[Prediction]) -> str:
    return json.dumps([p.as_dict() for p in preds], ensure_ascii=False, indent=2)
