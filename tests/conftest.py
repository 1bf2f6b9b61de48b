"""Shared fixtures: tiny datasets made by code."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("COLUMNS", "200")  # wide rich tables in CliRunner output

TITLES = {
    "cat": ["红色 猫 玩具 包邮", "red cat toy", "猫 玩具 新款 soft"],
    "dog": ["blue dog toy free shipping", "蓝色 狗 玩具", "dog plush blue"],
    "cup": ["保温杯 white cup 新款", "white mug 500ml", "保温杯 白色"],
}


def write_image(path: Path, seed: int, channel: int, size: tuple[int, int] = (40, 50)) -> None:
    rng = np.random.default_rng(seed)
    a = (rng.random((size[1], size[0], 3)) * 120).astype("uint8")
    a[..., channel] = 255
    Image.fromarray(a).save(path)


def make_manifest(
    root: Path, per_class: int = 8, name: str = "m.csv", extra_rows: list[dict] | None = None, split: bool = False
) -> Path:
    """A CSV manifest of 3 classes x ``per_class`` small PNGs with noisy bilingual titles."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for c, (label, titles) in enumerate(TITLES.items()):
        for i in range(per_class):
            img = root / f"{label}{i}.png"
            write_image(img, seed=100 * c + i, channel=c)
            row = {"image": img.name, "title": f"{titles[i % 3]} w{i % 4}", "label": label, "id": f"{label}-{i}"}
            if split:
                row["split"] = "test" if i < 2 else "train"
            rows.append(row)
    rows += extra_rows or []
    fields = ["image", "title", "label", "id"] + (["split"] if split else [])
    path = root / name
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in fields})
    return path


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    return make_manifest(tmp_path / "raw")


# Settings that keep every word of the tiny fixtures (the 5 % rules would remove real words there).
KEEP_ALL = [
    "text.drop_most_frequent=0",
    "text.drop_least_frequent=0",
    "data.test_per_class=2",
    "data.workers=1",
    "embed.dim=8",
    "embed.epochs=2",
]


TRAIN_FAST = [
    "model.backbone=mobilenet_v3_small",
    "train.batch_size=8",
    "train.eval_batch_size=16",
    "train.lr=0.005",
    "train.epochs=2",
    "train.device=cpu",
]


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory) -> Path:
    """A prepared 3-class dataset at 16 px (24 train, 6 test images)."""
    from sicot_cli.config import load_recipe
    from sicot_cli.data.prepare import prepare

    root = tmp_path_factory.mktemp("tiny")
    m = make_manifest(root / "raw", per_class=10)
    out = root / "tiny.h5"
    prepare(load_recipe(None, ["data.source=manifest", f"data.manifest={m}", "data.image_size=16", *KEEP_ALL]), out)
    return out


def tiny_recipe(data: Path, *extra: str):
    from sicot_cli.config import load_recipe

    return load_recipe(None, [f"data.out={data}", *TRAIN_FAST, *extra])


@pytest.fixture(scope="session")
def many_classes(tmp_path_factory):
    """A prepared synthetic set of 24 classes at 16 px (more classes than a batch holds)."""
    from sicot_cli.config import load_recipe
    from sicot_cli.data.prepare import prepare

    out = tmp_path_factory.mktemp("many") / "many.h5"
    prepare(
        load_recipe(
            None,
            [
                "data.source=synthetic",
                "data.synthetic.num_classes=24",
                "data.synthetic.max_per_class=6",
                "data.synthetic.min_per_class=2",
                "data.synthetic.test_per_class=1",
                "data.image_size=16",
                "data.workers=1",
                "embed.dim=8",
                "embed.epochs=1",
            ],
        ),
        out,
    )
    return out


def capture_figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """File name -> the matplotlib Figure written to it (still saved to disk as usual)."""
    from sicot_cli import figures

    real, figs = figures._save, {}

    def save(fig, path: Path) -> Path:
        figs[Path(path).name] = fig
        return real(fig, path)

    monkeypatch.setattr(figures, "_save", save)
    return figs


def assert_png(path: Path, figsize: tuple[float, float]) -> None:
    """A complete PNG of about the figure's size (120 dpi, cropped to its tight box), not a blank image."""
    with Image.open(path) as im:
        assert im.format == "PNG", path
        im.load()  # decodes every row: a truncated file raises here
        assert im.width >= 0.6 * 120 * figsize[0] and im.height >= 0.6 * 120 * figsize[1], (path, im.size)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 10, (path, "blank image")
