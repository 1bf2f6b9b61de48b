"""Format 2 (JPEG shards) against format 1 (raw pixels), measured in one run.

Run ``python -m benchmarks.format2 [--quick] [--device cpu|cuda] [--workers W]``. A temporary folder
gets N photo-like JPEGs (benchmarks.prepare.make_images: ~400x300, smooth colour fields and noise) and
a manifest; then:

1. bytes per image: ``sicot prepare`` in both formats at 64 and at 224 px (index + shards vs the
   one .h5). Goal at 224: format 2 <= 1/5 of format 1.
2. prepare: format 2's encode rate on all cores vs one process running the same function
   (:func:`sicot_cli.data.jpegwrite.encode`: decode, resize, JPEG-encode) x cores. Goal >= 0.8.
3. loader per core: the training loader with ``W`` worker processes (random resized crop to 224 from
   the 256-px stored images) vs one process decoding and cropping the same rows with the same
   function and the same crops, in interleaved rounds. Goal: loader / W >= 0.9 x the bare rate.
4. a training epoch (ResNet-18 at 64 px on CPU, ResNet-50 at 224 on CUDA, bf16) read by the loader
   vs the same steps on the same batches already decoded and on the device. Goal: <= 1.05 on CPU;
   on CUDA images/s >= 0.9 x the on-device rate (time ratio <= 1 / 0.9).

Results: ``benchmarks/results/format2-<device>.json``.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from benchmarks.common import benchmark_parser, count, parse, start, write_results
from benchmarks.prepare import make_images
from sicot_cli.config import load_recipe
from sicot_cli.data import jpegstore, jpegwrite
from sicot_cli.data.augment import crop_flip_params
from sicot_cli.data.dataset import open_prepared
from sicot_cli.data.loader import Batch, BatchLoader, epoch_seed
from sicot_cli.data.prepare import prepare

BYTES_GOAL = 1 / 5
PREPARE_GOAL = 0.8
LOADER_GOAL = 0.9
EPOCH_GOAL = 1.05
GPU_GOAL = 0.9  # CUDA: loader-fed images/s vs the same steps on on-device data
SCALE = (0.35, 1.0)


def _prepared(manifest: Path, out: Path, size: int, images: str, workers: int) -> tuple[object, float]:
    recipe = load_recipe(
        None,
        [
            "data.source=manifest", f"data.manifest={manifest}", f"data.image_size={size}", f"data.images={images}",
            "text.drop_most_frequent=0", "text.drop_least_frequent=0", "embed.epochs=1", f"data.workers={workers}",
            "data.test_per_class=0", "data.val_fraction=0",
        ],
    )  # fmt: skip
    summary = prepare(recipe, out)
    return summary, summary.images_per_second


def _disk_bytes(index: Path) -> int:
    p = open_prepared(index)
    shards = sum((p.store.folder / n).stat().st_size for n in p.store.names) if p.store is not None else 0
    return index.stat().st_size + shards


def bytes_per_image(manifest: Path, root: Path, n: int, workers: int) -> tuple[list[dict], dict[str, Path]]:
    rows, made = [], {}
    for size in (64, 224):
        per = {}
        for images in ("raw", "jpeg"):
            out = root / f"{images}{size}.h5"
            _prepared(manifest, out, size, images, workers)
            per[images] = _disk_bytes(out) / n
            made[f"{images}{size}"] = out
        rows.append({"image_size": size, "raw_bytes_per_image": per["raw"], "jpeg_bytes_per_image": per["jpeg"],
                     "ratio": per["jpeg"] / per["raw"]})  # fmt: skip
    return rows, made


def prepare_rate(manifest: Path, root: Path, workers: int) -> dict:
    """Format 2's prepare on ``workers`` processes vs one process encoding the same images."""
    paths = sorted(manifest.parent.glob("*.jpg"))
    t0 = time.perf_counter()
    for p in paths:
        jpegwrite.encode((p, 256, 10**9, 90))
    raw = len(paths) / (time.perf_counter() - t0)
    _, rate = _prepared(manifest, root / "rate.h5", 224, "jpeg", workers)
    return {"raw_images_per_s_one_process": raw, "workers": workers, "prepare_images_per_s": rate,
            "ratio": rate / (raw * workers)}  # fmt: skip


def loader_rate(data: Path, workers: int, batch: int, rounds: int) -> dict:
    """Images/s of the training loader (``workers`` processes) and of one process decoding the same crops."""
    p = open_prepared(data)
    store = p.store
    assert store is not None
    n = p.n_train
    loader = BatchLoader(p, batch, 0, n, shuffle=True, in_memory=True, workers=workers, crop=SCALE, drop_last=True)
    blobs = {k: store.read_shard(k) for k in np.unique(store.shard[:n]).tolist()}

    def bare(epoch: int) -> float:
        t0 = time.perf_counter()
        order = loader.order(epoch)
        for j in range(len(loader)):
            rows = order[j * batch : (j + 1) * batch]
            gen = torch.Generator().manual_seed(epoch_seed(0, epoch, 1 + j))
            for row, (box, flip) in zip(
                rows.tolist(), jpegstore.crop_boxes(crop_flip_params(len(rows), gen, SCALE), store.side), strict=True
            ):
                k, o, m = int(store.shard[row]), int(store.offset[row]), int(store.length[row])
                jpegstore.decode_row(blobs[k][o : o + m], p.image_size, box, flip)
        return len(loader) * batch / (time.perf_counter() - t0)

    def loaded(epoch: int) -> float:
        t0 = time.perf_counter()
        count = sum(len(b.labels) for b in loader.epoch(epoch))
        return count / (time.perf_counter() - t0)

    bare(0), loaded(0)  # warm-up (page cache, worker start-up paths)
    pairs = [(loaded(e + 1), bare(e + 1)) for e in range(rounds)]
    per_core = statistics.median(a / workers / b for a, b in pairs)
    return {"workers": workers, "bare_images_per_s": statistics.median(b for _, b in pairs),
            "loader_images_per_s": statistics.median(a for a, _ in pairs), "ratio_per_core": per_core}  # fmt: skip


def epoch_ratio(data: Path, device: str, backbone: str, workers: int, batch: int, epochs: int) -> dict:
    """An epoch read and decoded by the loader vs the same steps on batches already decoded in memory."""
    from sicot_cli.model import build_model
    from sicot_cli.train import train_step

    p = open_prepared(data)
    dev = torch.device(device)
    cfg = load_recipe(None, [f"train.device={device}"]).train
    torch.manual_seed(0)
    model = build_model(backbone, p.num_classes, "bilinear", torch.from_numpy(p.vectors))
    model = model.to(memory_format=torch.channels_last).to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    loader = BatchLoader(p, batch, 0, p.n_train, shuffle=True, in_memory=True, workers=workers, crop=SCALE,
                         drop_last=True, pin_memory=dev.type == "cuda")  # fmt: skip
    cached: list[Batch] = list(loader.epoch(0))
    for b in cached:  # already on the device (on CUDA: the step on synthetic on-device data)
        b.images, b.labels, b.tokens, b.mask = (t.to(dev) for t in (b.images, b.labels, b.tokens, b.mask))
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)

    def run(batches: object) -> float:
        sync()
        t0 = time.perf_counter()
        for b in batches:  # type: ignore[attr-defined]
            train_step(model, model, opt, b, dev, cfg, gen)
        sync()
        return time.perf_counter() - t0

    run(cached[:2])
    pairs = [(run(loader.epoch(e + 1)), run(cached)) for e in range(epochs)]
    return {"backbone": backbone, "image_size": p.image_size, "steps": len(cached), "workers": workers,
            "loader_seconds": statistics.median(a for a, _ in pairs), "cached_seconds": statistics.median(b for _, b in pairs),
            "ratio": statistics.median(a / b for a, b in pairs)}  # fmt: skip


def _table(console: Console, sizes: list[dict], prep: dict, load: dict, epoch: dict, cuda: bool) -> None:
    t = Table(title="format 2 (JPEG shards) vs format 1 (raw pixels)")
    for col in ("measure", "value", "ratio", "goal"):
        t.add_column(col, justify="left" if col == "measure" else "right")
    for r in sizes:
        goal = f"<= {BYTES_GOAL:.2f}" if r["image_size"] == 224 else ""
        t.add_row(f"bytes/image at {r['image_size']} px: raw -> jpeg",
                  f"{r['raw_bytes_per_image']:,.0f} -> {r['jpeg_bytes_per_image']:,.0f}", f"{r['ratio']:.3f}", goal)  # fmt: skip
    t.add_row(f"prepare (jpeg, {prep['workers']} processes) vs 1 process x {prep['workers']}",
              f"{prep['prepare_images_per_s']:,.0f} vs {prep['raw_images_per_s_one_process']:,.0f} img/s",
              f"{prep['ratio']:.2f}", f">= {PREPARE_GOAL}")  # fmt: skip
    t.add_row(f"loader per core ({load['workers']} workers, crop to 224) vs bare decode+crop",
              f"{load['loader_images_per_s']:,.0f} vs {load['bare_images_per_s']:,.0f} img/s",
              f"{load['ratio_per_core']:.2f}", f">= {LOADER_GOAL}")  # fmt: skip
    t.add_row(f"epoch via loader vs cached ({epoch['backbone']} at {epoch['image_size']} px, {epoch['steps']} steps)",
              f"{epoch['loader_seconds']:.2f} vs {epoch['cached_seconds']:.2f} s", f"{epoch['ratio']:.3f}",
              f"<= {1 / GPU_GOAL:.2f}" if cuda else f"<= {EPOCH_GOAL}")  # fmt: skip
    console.print(t)


def main(argv: list[str] | None = None) -> dict:
    parser = benchmark_parser("format2", __doc__, quick="few images (about 1 min on a 2-core CPU)", device=True)
    parser.add_argument(
        "--workers", type=count, default=0, help="loader and prepare processes (0: cores - 1, at least 1)"
    )
    args = parse(parser, argv)
    start()
    cores = os.cpu_count() or 1
    workers = args.workers or max(1, cores - 1)
    n = 200 if args.quick else 1000
    console = Console()
    cuda = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "raw").mkdir()
        manifest = make_images(root / "raw", n)
        sizes, made = bytes_per_image(manifest, root, n, cores)
        prep = prepare_rate(manifest, root, cores)
        load = loader_rate(made["jpeg224"], workers, 32, 2 if args.quick else 4)
        epoch = epoch_ratio(made["jpeg224" if cuda else "jpeg64"], args.device, "resnet50" if cuda else "resnet18",
                            workers, 64 if cuda else 32, 2 if args.quick else 3)  # fmt: skip
    _table(console, sizes, prep, load, epoch, cuda)
    verdicts = {
        "bytes_224_met": next(r for r in sizes if r["image_size"] == 224)["ratio"] <= BYTES_GOAL,
        "prepare_met": prep["ratio"] >= PREPARE_GOAL,
        "loader_met": load["ratio_per_core"] >= LOADER_GOAL,
        "epoch_met": epoch["ratio"] <= (1 / GPU_GOAL if cuda else EPOCH_GOAL),
    }
    for k, v in verdicts.items():
        console.print(f"goal {k.removesuffix('_met')}: " + ("[green]met[/]" if v else "[red]not met[/]"))
    result = {"benchmark": "format2", "quick": args.quick, "images": n, "cores": cores, "bytes": sizes,
              "prepare": prep, "loader": load, "epoch": epoch, "goals": verdicts}  # fmt: skip
    console.print(f"wrote {write_results('format2', args.device, result)}")
    return result


if __name__ == "__main__":
    from benchmarks.common import cli

    cli(main)
