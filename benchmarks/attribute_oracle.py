"""Attribute oracle: does what a visual stream learns on the head reach the tail? (accuracy, not speed)

Run ``python -m benchmarks.attribute_oracle [--data data/demo.h5] [--pretrained RUN_OR_FILE]
[--epochs 16] [--seed 0] [--quick]`` on a prepared copy of the built-in synthetic dataset.

The demo's classes are attribute combinations (product type, colour, pattern, brand; see
``sicot_cli/data/synthetic.py``) and every attribute value of a tail class also occurs on head
classes. This benchmark trains the recipe's backbone on the ATTRIBUTE labels of every training
image (four softmax heads, the demo's optimiser and augmentation) instead of the class labels, then
reports, for the test images of head and of tail classes separately, how often each attribute is
read correctly, and the class top-1 of the composed prediction (the class whose four attributes
have the highest summed log-probability). That is an upper bound on what a title can teach the
visual stream for the tail: the titles name these attributes, with noise. If even the oracle reads
the attributes of tail images much worse than those of head images, the backbone has learned head
class templates rather than attributes, and no co-training loss can transfer head knowledge to the
tail through it (measured: docs/demo-pretraining.md).

Prints a table and writes ``benchmarks/results/attribute_oracle-cpu.json`` (or the device's).
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from benchmarks.common import benchmark_parser, count, parse, positive_int, start, write_results
from sicot_cli.config import load_recipe
from sicot_cli.data.augment import random_resized_crop_flip
from sicot_cli.data.dataset import open_prepared
from sicot_cli.data.synthetic import ATTRIBUTES, ClassSpec
from sicot_cli.errors import SicotError
from sicot_cli.model import SICoT, build_backbone

ATTRS = tuple(ATTRIBUTES)  # shape, colour, pattern, brand


def class_attributes(names: list[str]) -> tuple[torch.Tensor, list[list[str]]]:
    """``[C, 4]`` attribute ids per class (order :data:`ATTRS`) and each attribute's values."""
    by_name = {spec.name: spec for spec in itertools.starmap(ClassSpec, itertools.product(*ATTRIBUTES.values()))}
    parsed = []
    for n in names:
        if n not in by_name:
            raise SicotError(
                f"class {n!r} is not a built-in synthetic class: the attribute oracle needs data.source = 'synthetic'"
            )
        parsed.append(tuple(by_name[n].attributes()[a] for a in ATTRS))
    values = [sorted({p[i] for p in parsed}) for i in range(len(ATTRS))]
    ids = torch.tensor([[values[i].index(p[i]) for i in range(len(ATTRS))] for p in parsed])
    return ids, values


def run(
    data: Path,
    backbone: str,
    pretrained: str,
    epochs: int,
    seed: int,
    device: str,
    head_threshold: int,
    batch: int = 128,
    lr: float = 0.03,
) -> dict:
    """Train the attribute oracle and measure it; returns the result record."""
    p = open_prepared(data)
    attr_of, values = class_attributes(list(p.class_names))
    sizes = [len(v) for v in values]
    cut = np.cumsum([0, *sizes])
    with h5py.File(p.path, "r") as f:  # a few thousand small images: hold them in RAM
        images = torch.from_numpy(f["images"][:])
    labels = torch.from_numpy(p.labels)
    ntr = p.n_train
    torch.manual_seed(seed)
    net, dim = build_backbone(backbone, pretrained)
    model = (
        SICoT(net, dim, int(cut[-1])).to(device).to(memory_format=torch.channels_last)
    )  # one head per attribute, side by side

    def scores(x: torch.Tensor) -> torch.Tensor:
        return model.logits(model.normalize(x).contiguous(memory_format=torch.channels_last))

    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.8)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(ntr, generator=gen)
        for b in range(0, ntr, batch):
            idx = order[b : b + batch]
            x = random_resized_crop_flip(images[idx].to(device), gen, (0.35, 1.0))
            z = scores(x)
            target = attr_of[labels[idx]].to(device)
            loss = sum(F.cross_entropy(z[:, cut[i] : cut[i + 1]], target[:, i]) for i in range(len(ATTRS)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        test = images[ntr:]
        z = torch.cat([scores(test[i : i + 512].to(device)).float().cpu() for i in range(0, len(test), 512)])
    logp = [F.log_softmax(z[:, cut[i] : cut[i + 1]], 1) for i in range(len(ATTRS))]
    y = labels[ntr:]
    composed = sum(logp[i][:, attr_of[:, i]] for i in range(len(ATTRS))).argmax(1)
    tail = torch.from_numpy(p.train_counts[y.numpy()] < head_threshold)
    groups = {}
    for name, m in (("head", ~tail), ("tail", tail)):
        groups[name] = {
            "test_images": int(m.sum()),
            **{
                f"{a}_accuracy": round(100 * float((logp[i][m].argmax(1) == attr_of[y[m], i]).float().mean()), 2)
                for i, a in enumerate(ATTRS)
            },
            "composed_top1": round(100 * float((composed[m] == y[m]).float().mean()), 2),
        }
    ratios = {
        f"{a}_tail_to_head": round(groups["tail"][f"{a}_accuracy"] / max(groups["head"][f"{a}_accuracy"], 1e-9), 3)
        for a in ATTRS
    }
    return {
        "data": str(data),
        "backbone": backbone,
        "pretrained": pretrained or "none (random init)",
        "epochs": epochs,
        "seed": seed,
        "head_threshold": head_threshold,
        "train_seconds": round(train_s, 1),
        "groups": groups,
        "ratios": ratios,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = benchmark_parser("attribute_oracle", __doc__, quick="1 epoch: checks that it runs, measures nothing useful")
    ap.add_argument(
        "--recipe",
        default="recipes/demo.toml",
        help="backbone, head/tail threshold and (unless --data) the prepared file",
    )
    ap.add_argument("--data", default=None, help="a prepared synthetic .h5 (default: the recipe's data.out)")
    ap.add_argument(
        "--pretrained",
        default="",
        help="model.pretrained for the backbone: a sicot run directory, a checkpoint or a state_dict file",
    )
    ap.add_argument("--epochs", type=positive_int, default=16)
    ap.add_argument("--seed", type=count, default=0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parse(ap, argv)
    start()
    recipe = load_recipe(args.recipe)
    data = Path(args.data or recipe.data.out)
    epochs = 1 if args.quick else args.epochs
    try:
        result = run(
            data, recipe.model.backbone, args.pretrained, epochs, args.seed, args.device, recipe.eval.head_threshold
        )
    except SicotError as e:
        raise SystemExit(f"error: {e}") from None
    table = Table(
        title=f"attribute oracle: {recipe.model.backbone}, {epochs} epochs, pretrained: {result['pretrained']}"
    )
    table.add_column("test images of")
    for a in ATTRS:
        table.add_column(f"{a} acc.", justify="right")
    table.add_column("composed top-1", justify="right")
    for g, r in result["groups"].items():
        table.add_row(
            f"{g} classes ({r['test_images']})",
            *(f"{r[f'{a}_accuracy']:.1f}" for a in ATTRS),
            f"{r['composed_top1']:.2f}",
        )
    table.add_row("tail / head", *(f"{result['ratios'][f'{a}_tail_to_head']:.2f}" for a in ATTRS), "")
    Console().print(table)
    write_results("attribute_oracle", args.device, {"benchmark": "attribute_oracle", **result})
    return result


if __name__ == "__main__":
    from benchmarks.common import cli

    cli(main)
