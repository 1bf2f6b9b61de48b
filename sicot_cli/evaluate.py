"""Scoring a model on the test rows (image only), and ``sicot evaluate``.

Evaluation follows §4.2: top-1 and top-3, overall and averaged over the head and tail classes
(boundary ``eval.head_threshold`` on training counts), plus many/medium/few; the arithmetic lives in
:mod:`sicot_cli.metrics`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sicot_cli import metrics, runs
from sicot_cli.config import Recipe, TrainConfig, recipe_from_dict
from sicot_cli.data.dataset import Prepared, open_prepared, val_rows_hint
from sicot_cli.data.loader import BatchLoader, decode_workers
from sicot_cli.distributed import DistContext, _all_gather_rows, sharded_topk
from sicot_cli.errors import SicotError
from sicot_cli.fsutil import atomic_h5
from sicot_cli.progress import NullProgress, Progress

log = logging.getLogger(__name__)

PER_CLASS = "per_class_"


def resolve_device(name: str, option: str = "train.device") -> torch.device:
    """``auto`` -> CUDA when available, else CPU.

    Args:
        name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        option: how the user set it (``train.device`` or ``--device``), for the message.

    Raises:
        SicotError: not one of those, or a CUDA device that is not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind != "cuda" or not (index.isascii() and index.isdigit()))):
        raise SicotError(f"{option} must be auto, cpu, cuda or cuda:N, got {name!r}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            use = f"{option}=cpu" if option.startswith("train.") else f"{option} cpu"
            raise SicotError(f"{option} = {name!r} but CUDA is not available here (use {use} or auto)")
        if index and int(index) >= torch.cuda.device_count():
            raise SicotError(f"{option} = {name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


def use_in_memory(cfg: TrainConfig, prepared: Prepared) -> bool:
    """Hold the images in RAM when asked, or when they fit ``train.memory_limit_gb`` ("auto")."""
    if cfg.in_memory != "auto":
        return cfg.in_memory == "yes"
    if prepared.store is not None:  # format 2: the encoded bytes
        return prepared.store.nbytes(0, prepared.n) <= cfg.memory_limit_gb * 1e9
    return prepared.n * 3 * prepared.image_size**2 <= cfg.memory_limit_gb * 1e9


@dataclass
class EvalResult:
    """Test-set scores of one model."""

    metrics: dict[str, Any]
    topk_labels: np.ndarray  # [N_test, K] int64
    topk_scores: np.ndarray  # [N_test, K] float32 softmax probabilities
    labels: np.ndarray
    rows: np.ndarray
    images_per_s: float
    checkpoint: str | None = None  # sicot evaluate: which of the run's checkpoints was scored
    checkpoint_epoch: int | None = None  # and the epochs its weights trained

    def scalars(self) -> dict[str, Any]:
        """The metrics without the per-class lists (one metrics.jsonl line)."""
        return {k: v for k, v in self.metrics.items() if not k.startswith(PER_CLASS)}

    def per_class(self) -> dict[str, Any]:
        return {k: v for k, v in self.metrics.items() if k.startswith(PER_CLASS)}


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    prepared: Prepared,
    device: torch.device,
    recipe: Recipe,
    in_memory: bool = True,
    ctx: Any = None,
    split: str = "test",
    progress: Progress | None = None,
) -> EvalResult:
    """Image-only scores on the rows of ``split`` (``"test"`` or ``"val"``) and their metrics
    (``progress``: a task over the split's images; 55k images x 50k classes scored in silence for 80 s).

    Only the image is read: a row's title never changes or drops its score.

    Distributed (``ctx``, a :class:`~sicot_cli.distributed.DistContext`): each rank scores its
    slice of every batch; features are gathered, and a class-sharded classifier's top-k are merged
    across ranks (no rank forms the full logits). Every rank returns the whole result.
    """
    distributed = ctx is not None and ctx.enabled
    was_training = model.training
    model.eval()
    cfg = recipe.train
    k = min(max(cfg.topk), prepared.num_classes)
    start, stop = prepared.split_range(split)
    rank, world = (ctx.rank, ctx.world) if distributed else (0, 1)
    loader = BatchLoader(
        prepared, cfg.eval_batch_size, start, stop, shuffle=False, in_memory=in_memory,
        block_rows=cfg.block_rows, rank=rank, world=world, workers=decode_workers(cfg.loader_workers, 1),
    )  # fmt: skip

    parts = []
    t0 = time.perf_counter()
    with (progress or NullProgress()).task(f"scoring {split} images", stop - start) as task:
        for batch in loader.epoch(0):
            x = model.normalize(batch.images.to(device, non_blocking=True))
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if distributed:
                parts.append(_score_across_ranks(model, x, batch, k, device, ctx))
            else:
                parts.append(_score(model, x, batch, k))
            task.advance(batch.global_size if distributed else len(batch.rows))
    seconds = time.perf_counter() - t0
    model.train(was_training)
    ids, scores, labels, rows = (np.concatenate(column) for column in zip(*parts, strict=True))
    return make_result(recipe, prepared, ids, scores, labels, rows, seconds)


Scored = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # top-k classes, their probabilities, labels, rows


def _float32(device: torch.device) -> Any:  # noqa: ANN401 - torch's autocast context
    """Scoring in float32 on every device, also inside a caller's autocast, as predict, serve and
    export run the model: under train.amp's bf16 autocast (CUDA) the recorded scores were another
    computation than the shipped model's (probabilities up to 1e-2 apart, measured by casting on
    CPU). Training steps keep the autocast."""
    return torch.autocast(device_type=device.type, enabled=False)


def _score(model: torch.nn.Module, x: torch.Tensor, batch: Any, k: int) -> Scored:
    """One process: the batch's image-only top-k."""
    with _float32(x.device):
        logits = model.logits(x)
    top = torch.softmax(logits.float(), dim=1).topk(k, dim=1)
    return top.indices.cpu().numpy(), top.values.cpu().numpy(), batch.labels.numpy(), batch.rows


def _score_across_ranks(
    model: torch.nn.Module, x: torch.Tensor, batch: Any, k: int, device: torch.device, ctx: DistContext
) -> Scored:
    """This rank's slice of the batch: features, labels and rows gathered from every rank; a replicated
    classifier scores the whole batch, a sharded one its classes, and the per-shard top-k are merged
    (:func:`sicot_cli.distributed.sharded_topk`). Every rank returns the whole batch's top-k."""
    total = batch.global_size
    clf = model.classifier
    with _float32(device):
        feats = model.features(x) if x.shape[0] else torch.zeros((0, model.feat_dim), device=device)
        feats = _all_gather_rows(feats.float(), ctx.world, total)
        logits = clf(feats)
    if hasattr(clf, "lo"):  # sharded by class
        scores, ids = sharded_topk(logits, k, clf.lo, ctx)
    else:
        scores, ids = torch.softmax(logits.float(), dim=1).topk(k, dim=1)
    meta = torch.stack([batch.labels.to(device), torch.as_tensor(batch.rows, dtype=torch.int64, device=device)], dim=1)
    meta = _all_gather_rows(meta, ctx.world, total)
    return ids.cpu().numpy(), scores.float().cpu().numpy(), meta[:, 0].cpu().numpy(), meta[:, 1].cpu().numpy()


@torch.no_grad()
def rows_output(
    fn: Callable[[torch.Tensor], torch.Tensor],
    model: torch.nn.Module,
    prepared: Prepared,
    device: torch.device,
    cfg: TrainConfig,
    rows: tuple[int, int],
    width: int,
    in_memory: bool = True,
    progress: Progress | None = None,
    what: str = "images",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn`` of the normalised images of the rows ``[lo, hi)`` (float32, CPU, ``[n, width]``) and their labels.

    One process, the model in eval mode: the frozen features of a second stage, or the logits the
    post-hoc adjustment chooses tau on. ``progress``: a task named ``what`` over the rows.
    """
    was_training = model.training
    model.eval()
    loader = BatchLoader(
        prepared, cfg.eval_batch_size, *rows, shuffle=False, in_memory=in_memory, block_rows=cfg.block_rows,
        workers=decode_workers(cfg.loader_workers, 1),
    )  # fmt: skip
    outs, labels = [], []
    with (progress or NullProgress()).task(what, rows[1] - rows[0]) as task:
        for batch in loader.epoch(0):
            outs.append(fn(model.normalize(batch.images.to(device))).float().cpu())
            labels.append(batch.labels)
            task.advance(len(batch.rows))
    model.train(was_training)
    if not outs:
        return torch.zeros(0, width), torch.zeros(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(labels)


def split_logits(
    model: torch.nn.Module, prepared: Prepared, device: torch.device, recipe: Recipe, split: str, in_memory: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-only logits ``[n, C]`` (float32, CPU) of a split's rows and their labels (one process, full classifier)."""
    rows = prepared.split_range(split)
    return rows_output(model.logits, model, prepared, device, recipe.train, rows, prepared.num_classes, in_memory)


def make_result(
    recipe: Recipe,
    prepared: Prepared,
    topk: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    rows: np.ndarray,
    seconds: float,
) -> EvalResult:
    """Metrics of the test rows' top-k predictions."""
    ks = tuple(sorted(set(recipe.train.topk)))
    result = metrics.evaluate(
        topk,
        labels,
        prepared.train_counts,
        recipe.eval.head_threshold,
        recipe.eval.many_threshold,
        recipe.eval.few_threshold,
        ks=ks,
    )
    return EvalResult(result, topk, scores.astype(np.float32), labels, rows, len(labels) / max(seconds, 1e-9))


def write_predictions(path: Path, result: EvalResult) -> None:
    """``predictions.h5``: the test rows' top-k labels and scores, and the true labels."""
    with atomic_h5(path) as f:
        f["rows"] = result.rows
        f["labels"] = result.labels
        f["topk_labels"] = result.topk_labels
        f["topk_scores"] = result.topk_scores


def _why_no_best(run_dir: Path, config: dict[str, Any], prepared: Prepared) -> str:
    """Why a run has no ``checkpoint-best.pt``, as far as its files tell."""
    if config.get("stage"):
        method = config["stage"].get("method", "") if isinstance(config["stage"], dict) else ""
        return f"a second stage ({method or 'sicot decouple'}) keeps only checkpoint-last.pt"
    if config["recipe"].get("train", {}).get("keep_best", True) is False:
        return "this run was trained with train.keep_best = false, which keeps only checkpoint-last.pt"
    if prepared.n_val < 1:
        return "its data has no validation rows, on which the best epoch is chosen"
    if not (run_dir / runs.SUMMARY).is_file():
        return f"no epoch has been scored on validation yet (resume it: `sicot train --run-dir {run_dir} --resume`)"
    return "it was removed"


def load_run_model(
    run_dir: Path, checkpoint: str | None = None, data: str | Path | None = None
) -> tuple[Recipe, Prepared, torch.nn.Module, dict[str, Any]]:
    """The run's recipe, its prepared dataset (checked against the run) and a model with the weights
    of ``checkpoint`` (default: the one the run's scores come from, :func:`runs.scored_checkpoint`).

    Raises:
        SicotError: not a run, missing checkpoint, or a dataset other than the run's.
    """
    from sicot_cli.model import first_nonfinite, make_model
    from sicot_cli.runs import check_dataset

    config = runs.read_config(run_dir)
    recipe = recipe_from_dict(config["recipe"], str(run_dir / runs.CONFIG))
    if data is None and not config["data"]:
        raise SicotError(f"{run_dir / runs.CONFIG}: records no prepared dataset; pass --data with the run's .h5")
    if data is None and not os.path.exists(config["data"]):  # a dangling link too
        raise SicotError(
            f"{config['data']}: the prepared dataset {run_dir} was trained on is not there (moved or removed): "
            "pass --data with where it is now, or prepare it again with the run's recipe"
        )
    prepared = open_prepared(data if data is not None else config["data"])
    check_dataset(prepared, config, run_dir)
    checkpoint = runs.scored_checkpoint(run_dir, checkpoint)
    name = {"last": runs.LAST, "best": runs.BEST}.get(checkpoint)
    if name is None:
        raise SicotError(f"--checkpoint must be last or best, got {checkpoint!r}")
    if checkpoint == "best" and not (run_dir / name).is_file():
        raise SicotError(
            f"{run_dir / name}: not found: {_why_no_best(run_dir, config, prepared)}; use --checkpoint last"
        )
    stage = config.get("stage")
    if stage:
        epochs, kind = recipe.decouple.epochs, "decouple epochs"
        how = f"sicot decouple {stage.get('from_run')} --method {stage.get('method')} --run-dir {run_dir} --resume"
    else:
        epochs, kind, how = recipe.train.epochs, "epochs", f"sicot train --run-dir {run_dir} --resume"
    if checkpoint == "last" and not (run_dir / name).exists() and not runs.is_finished(run_dir):
        runs.lost_checkpoint(run_dir)
        raise SicotError(
            f"{run_dir / name}: not found: the run saved no checkpoint yet (stopped, or copied, before its first "
            f"epoch ended): continue it with `{how}`"
        )
    state = runs.load_checkpoint(run_dir / name)
    if not runs.is_finished(run_dir):  # evaluate, predict, export and serve use it as it stands: say so
        done = len(runs.read_metrics(run_dir))
        log.warning(
            "%s: unfinished (%d of %d %s trained): its %s checkpoint is used; finish it with `%s`",
            run_dir,
            done,
            epochs,
            kind,
            checkpoint,
            how,
        )
    recipe.model.pretrained = ""  # the checkpoint holds the weights
    model = make_model(recipe, prepared)
    from sicot_cli.checkpoints import restore

    restore(state, run_dir / name, model)  # a class-sharded checkpoint is assembled here
    bad = first_nonfinite(model.state_dict().items())
    if bad is not None:  # training stops before saving such weights: damaged, or not sicot's
        raise SicotError(
            f"{run_dir / name}: damaged checkpoint ({bad} holds NaN or infinite values; every score would be "
            "NaN): use the other checkpoint, or retrain the run"
        )
    return recipe, prepared, model, state


def evaluate_run(
    run_dir: str | Path,
    checkpoint: str | None = None,
    data: str | Path | None = None,
    device: str = "auto",
    split: str = "test",
    progress: Progress | None = None,
) -> EvalResult:
    """Re-score a run's checkpoint (default: the one its scores come from) on its test (or
    validation) split (``sicot evaluate``); the result names the checkpoint and its epoch.

    Raises:
        SicotError: an unknown split, a bad ``device``, or a split without rows (``val`` on a
            dataset prepared without validation rows, or a file whose rows are all training rows).
    """
    if split not in ("test", "val"):
        raise SicotError(f"--split must be test or val, got {split!r}")
    dev = resolve_device(device, "--device")
    checkpoint = runs.scored_checkpoint(Path(run_dir), checkpoint)
    recipe, prepared, model, state = load_run_model(Path(run_dir), checkpoint, data)
    if prepared.split_range(split)[0] == prepared.split_range(split)[1]:
        raise SicotError(
            f"{prepared.path}: has no {split} rows: "
            + (
                f"score --split test, or {val_rows_hint(prepared.recipe.get('data', {}).get('val_fraction', 0))}"
                if split == "val"
                else "every row is a training row; prepare it with test rows (data.test_per_class > 0)"
            )
        )
    model.to(dev)
    if recipe.train.channels_last:
        model.to(memory_format=torch.channels_last)
    in_memory = use_in_memory(recipe.train, prepared)
    result = evaluate_model(model, prepared, dev, recipe, in_memory=in_memory, split=split, progress=progress)
    epoch = state.get("epoch")
    result.checkpoint, result.checkpoint_epoch = checkpoint, epoch if isinstance(epoch, int) else None
    return result
