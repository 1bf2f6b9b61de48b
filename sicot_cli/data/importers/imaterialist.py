"""iMaterialist Product 2019 (FGVC6, 2,019 SKU classes) + a titles file the user brings -> manifest.

The released layout (https://github.com/malongtech/imaterialist-product-2019, README "Dataset Format
and Download"; the Kaggle competition ``imaterialist-product-2019``): ``train.json`` and ``val.json``
each hold ``{"images": [{"id": string, "url": string, "class": int}, ...]}``; "the filename of each
image is its id" (ids look like ``20dc3e9e6ca73cfa3ad4d13d1d7526b8.jpg``); ``test.json`` has no
labels and is not used. Images are downloaded by the user from the URLs, into one folder per file
(``train/`` and ``val/`` by default).

The paper (§4.1) trains on the training images and tests on a ~5-per-class set of 9,986 images,
the size of ``val.json`` (10,095), so ``train.json`` -> ``train`` and ``val.json`` -> ``test``.

Titles: the dataset has none. The paper used the title of the top-1 result of an image search
engine (Pailitao) per image, which no user has; bring your own titles file (``id,title`` CSV/TSV
or JSONL), keyed by the image id with or without its extension. Images without a title are left out
(the paper: "throwing away those images without any side information"), and counted.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from sicot_cli.data.importers.common import ImportSummary, load_json, manifest_path, read_titles, write_manifest
from sicot_cli.errors import SicotError


def _images(path: Path) -> list[dict[str, Any]]:
    data = load_json(path, "not found (the dataset's train.json / val.json)")
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise SicotError(f'{path}: expected {{"images": [{{"id", "url", "class"}}, ...]}}')
    return images


def _title(titles: dict[str, str], image_id: str) -> str | None:
    if image_id in titles:
        return titles[image_id]
    stem = image_id.rsplit(".", 1)[0] if "." in image_id else image_id
    return titles.get(stem) or titles.get(f"{stem}.jpg")


def _entry(im: Any) -> tuple[str, str] | str:
    """``(id, class)`` of one ``images`` entry, or why it is skipped.

    The release's id is an image's file name and its class an integer: a class written as a digit
    string ("01") is that integer ("1"), never a class of its own; ``true`` is not a class (JSON's
    booleans are Python ints); an id with a path in it would point outside the image folder.
    """
    if not isinstance(im, dict) or im.get("id") is None or im.get("class") is None:
        return "entry without id or class"
    raw_id, raw_class = im["id"], im["class"]
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
        return "entry whose id is not a file name"
    image_id = str(raw_id).strip()
    if not image_id or image_id in (".", "..") or "/" in image_id or "\\" in image_id or not image_id.isprintable():
        return "entry whose id is not a file name"
    if isinstance(raw_class, str) and raw_class.strip().isascii() and raw_class.strip().isdigit():
        raw_class = int(raw_class.strip())
    if isinstance(raw_class, bool) or not isinstance(raw_class, int):
        return "entry whose class is not an integer"
    return image_id, str(raw_class)


def import_imaterialist(
    root: Path,
    titles: Path,
    out: Path,
    train_json: str = "train.json",
    test_json: str = "val.json",
    train_images: str = "train",
    test_images: str = "val",
) -> ImportSummary:
    """Write the manifest of iMaterialist Product 2019 with the user's titles.

    Args:
        root: the dataset folder (with ``train.json``, ``val.json`` and the image folders).
        titles: the titles file (``id`` -> ``title``).
        out: the manifest to write (``.csv``).
        train_json / test_json: the annotation files, relative to ``root``.
        train_images / test_images: the image folders, relative to ``root``.

    Raises:
        SicotError: missing or malformed files, no image with a title.
    """
    table, problems = read_titles(titles)
    skipped: Counter[str] = Counter({f"titles file: {k}": v for k, v in problems.items()})
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for split, name, folder in (("train", train_json, train_images), ("test", test_json, test_images)):
        for im in _images(root / name):
            entry = _entry(im)
            if isinstance(entry, str):
                skipped[f"{name}: {entry}"] += 1
                continue
            image_id, label = entry
            if image_id in seen:
                skipped[f"{name}: duplicate id"] += 1
                continue
            seen.add(image_id)
            title = _title(table, image_id)
            if title is None:
                skipped["no title in the titles file"] += 1
                continue
            rows.append(
                {
                    "image": manifest_path(root / folder / image_id, out.parent),
                    "title": title,
                    "label": label,
                    "split": split,
                    "id": image_id,
                }
            )
    if not rows:
        raise SicotError(
            f"{titles}: no image of {root / train_json} has a title here (ids must match the images' id field)"
        )
    write_manifest(out, rows, with_split=True)
    n_test = sum(1 for r in rows if r["split"] == "test")
    return ImportSummary(
        dataset="imaterialist2019",
        manifests=[str(out)],
        rows=len(rows),
        classes=len({r["label"] for r in rows}),
        train=len(rows) - n_test,
        test=n_test,
        skipped=dict(sorted(skipped.items())),
        notes=["images that were not downloaded are counted by `sicot prepare` (image file not found)"],
    )
