"""Image-only inference: ``sicot predict``, and the model that ``sicot serve`` loads once.

The paper's online flow (§3.1): a query image -> the recognition service predicts a SKU id -> the
product index returns that SKU's title. ``predict`` prints the top-k classes with their scores and,
for each, a representative training title from the prepared dataset.

:func:`preprocess` is the one image pipeline of inference (``predict``, ``serve``, the export's
verification): the same decoding, shorter-side bicubic resize and centre crop as ``prepare``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sicot_cli import runs
from sicot_cli.data.images import DEFAULT_MAX_PIXELS, ImageSkip, load_image
from sicot_cli.data.manifest import URL
from sicot_cli.errors import SicotError
from sicot_cli.evaluate import load_run_model, resolve_device


def preprocess(source: str | Path | bytes, size: int, max_pixels: int | None = None) -> np.ndarray:
    """Decode one image (a path or its bytes) into the model's input: ``[3, size, size]`` uint8 RGB.

    The same pipeline as ``prepare`` (:func:`sicot_cli.data.images.load_image`): colour modes to RGB,
    shorter side resized to ``size`` (bicubic), centre crop.

    Args:
        source: an image file, or the bytes of one.
        size: the model's image size.
        max_pixels: refuse images with more pixels than this before decoding them (read from the
            header, so a decompression bomb costs nothing; a JPEG: at the reduced size it is decoded
            at); None: ``data.max_image_pixels``'s default.

    Raises:
        ImageSkip: not an image, truncated, over the pixel limit (:class:`TooManyPixels`)...
    """
    # load_image opens whatever PIL's Image.open accepts: a path or a file object.
    data = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    return load_image(data, size, limit, limit_name=None).transpose(2, 0, 1)  # type: ignore[arg-type]


def representative_titles(prepared, classes: set[int]) -> dict[int, str]:  # noqa: ANN001 - Prepared
    """One training title per class: the first training row of the class."""
    train_labels = prepared.labels[: prepared.n_train]
    uniq, first = np.unique(train_labels, return_index=True)
    rows = {int(c): int(r) for c, r in zip(uniq, first, strict=True) if int(c) in classes}
    titles = prepared.titles(list(rows.values()))
    return dict(zip(rows.keys(), titles, strict=True))


@dataclass
class Prediction:
    """The top-k classes for one image."""

    image: str
    classes: list[str]
    scores: list[float]
    titles: list[str | None]

    def as_dict(self) -> dict[str, object]:
        return {
            "image": self.image,
            "top": [
                {"class": c, "score": s, "title": t}
                for c, s, t in zip(self.classes, self.scores, self.titles, strict=True)
            ],
        }


@dataclass
class Recognizer:
    """A model loaded once: uint8 images ``[B, 3, S, S]`` -> class probabilities, with its classes.

    Built from a run (:func:`load_recognizer`) or from an exported model and its JSON
    (:func:`sicot_cli.export.load_exported`); ``predict`` and ``serve`` use it alike.
    """

    image_size: int
    class_names: list[str]
    probabilities: Callable[[np.ndarray], np.ndarray]  # uint8 [B, 3, S, S] -> float32 [B, C]
    title_lookup: Callable[[set[int]], dict[int, str]]
    source: str
    _titles: dict[int, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def titles(self, classes: set[int]) -> dict[int, str]:
        """Titles of these classes (read once, then cached)."""
        missing = classes - self._titles.keys()
        if missing:
            self._titles.update(self.title_lookup(missing))
        return {c: self._titles[c] for c in classes if c in self._titles}

    def top(self, probs: np.ndarray, names: list[str], k: int) -> list[Prediction]:
        """The top-k classes of each row of ``probs``, highest first (ties: the lower index)."""
        k = min(k, self.num_classes)
        # a stable sort of -p gives the same order as torch.topk on distinct scores, and a fixed one on ties
        idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        titles = self.titles(set(idx.ravel().tolist()))
        return [
            Prediction(
                name,
                [self.class_names[c] for c in idx[i]],
                [float(probs[i, c]) for c in idx[i]],
                [titles.get(int(c)) for c in idx[i]],
            )
            for i, name in enumerate(names)
        ]


def load_recognizer(
    run_dir: str | Path, checkpoint: str | None = None, data: str | Path | None = None, device: str = "auto"
) -> Recognizer:
    """The image-only model of a run (``checkpoint`` default: the one its scores come from), in eval mode on ``device``.

    Raises:
        SicotError: not a run, a missing checkpoint, or a dataset other than the run's.
    """
    dev = resolve_device(device, "--device")
    checkpoint = runs.scored_checkpoint(Path(run_dir), checkpoint)
    _, prepared, model, state = load_run_model(Path(run_dir), checkpoint, data)
    model.to(dev).eval()
    epoch = state.get("epoch")

    @torch.no_grad()
    def probabilities(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(dev)
        return torch.softmax(model.logits(model.normalize(x)).float(), dim=1).cpu().numpy()

    return Recognizer(
        prepared.image_size,
        list(prepared.class_names),
        probabilities,
        lambda cs: representative_titles(prepared, cs),
        f"run {run_dir} (checkpoint {checkpoint}" + (f", epoch {epoch})" if isinstance(epoch, int) else ")"),
    )


DEFAULT_TOP = 3  # classes per image when --top does not say (at most every class)


def check_top(k: int | None, num_classes: int, default: int) -> None:
    """``--top k`` of predict and serve: above the model's classes it is refused, not silently fewer
    (``default``: what leaving it out gives)."""
    if k is not None and k > num_classes:
        raise SicotError(
            f"--top {k}: the model knows {num_classes} classes; ask for at most that many "
            f"(or leave --top out: {default}, or every class of a smaller model)"
        )


# Images decoded and scored at a time by ``predict``: memory stays that of one batch for any number of files.
PREDICT_BATCH = 64


@dataclass
class Unreadable:
    """An image ``predict`` could not read, and why."""

    image: str
    reason: str


def predict(
    run_dir: str | Path,
    images: list[str | Path],
    k: int | None = None,
    checkpoint: str | None = None,
    data: str | Path | None = None,
    device: str = "auto",
    batch: int = PREDICT_BATCH,
    on_model: Callable[[str], None] | None = None,
) -> tuple[list[Prediction], list[Unreadable]]:
    """Top-k classes of each readable image, by the image-only model of a run, ``batch`` images at a time.

    Returns:
        The predictions, in the order of ``images``, and the images that could not be read (each with
        its reason; a folder's reason says how to name its images).

    Raises:
        SicotError: not a run, a dataset other than the run's, no image, a URL or standard input.
    """
    if not images:
        raise SicotError("no image given: sicot predict --run DIR IMAGE...")
    if k is not None and k < 1:
        raise SicotError(f"--top must be >= 1, got {k}")
    for p in images:  # before the model is loaded: these are no files at all
        if str(p) == "-":
            raise SicotError("-: standard input is not read; save the image to a file and name it")
        if URL.match(str(p)):  # Path() has already folded "//" to "/"
            raise SicotError(f"{p}: a URL; predict reads local image files: download the image first")
    recognizer = load_recognizer(run_dir, checkpoint, data, device)
    check_top(k, recognizer.num_classes, DEFAULT_TOP)
    k = k or min(DEFAULT_TOP, recognizer.num_classes)
    if on_model is not None:
        on_model(recognizer.source)
    preds: list[Prediction] = []
    unreadable: list[Unreadable] = []
    for start in range(0, len(images), batch):
        arrays, names = [], []
        for p in images[start : start + batch]:
            try:
                arrays.append(preprocess(Path(p), recognizer.image_size))
                names.append(str(p))
            except ImageSkip as e:
                hint = f" (name its images, e.g. {Path(p) / '*.jpg'})" if _is_folder(Path(p)) else ""
                unreadable.append(Unreadable(str(p), f"{e}{hint}"))
        if arrays:
            preds += recognizer.top(recognizer.probabilities(np.stack(arrays)), names, k)
    return preds, unreadable


def _is_folder(path: Path) -> bool:
    """``path.is_dir()``, False where the folder above it may not be read (Python 3.11 raises there)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def predictions_json(preds: list[Prediction]) -> str:
    return json.dumps([p.as_dict() for p in preds], ensure_ascii=False, indent=2)
