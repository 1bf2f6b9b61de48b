"""The one training loop: baseline (no encoder) and co-training take exactly the same path.

Per batch: uint8 images go to the device, are augmented there in one batched op (seeded per batch),
normalised, and scored; the loss is Eq. 1 (``sicot_cli.model.sicot_loss``). Per epoch: StepLR, evaluation on the
VALIDATION rows (carved from the training data by ``prepare``), ``checkpoint-last.pt`` (and
``-best``, the best validation top-1), one ``metrics.jsonl`` line. The test rows are scored once,
after the last epoch, with the weights ``eval.select`` names: nothing is ever chosen on test.
Everything random is seeded from (seed, epoch, batch), so an interrupted run resumed from its
checkpoint, even in the middle of an epoch, reproduces the uninterrupted run exactly on CPU.

Launched by ``torchrun`` the same loop runs data-parallel (``sicot_cli.distributed``): each rank
takes its slice of every global batch, the streams run under DDP, the shared classifier is
replicated or sharded by class, and only rank 0 writes the run directory and shows progress.
"""

from __future__ import annotations

import copy
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sicot_cli import checkpoints, runs
from sicot_cli.classifier_step import eq1_from_streams
from sicot_cli.config import Recipe, TrainConfig, adopt_prepared
from sicot_cli.data.augment import random_resized_crop_flip
from sicot_cli.data.dataset import Prepared, open_prepared
from sicot_cli.data.loader import Batch, BatchLoader, epoch_seed
from sicot_cli.distributed import DistContext, init_distributed, reduce_mean, shard_range, shutdown
from sicot_cli.errors import SicotError
from sicot_cli.evaluate import evaluate_model, resolve_device, use_in_memory, write_predictions
from sicot_cli.model import SICoT, Streams, make_model, sicot_loss
from sicot_cli.progress import NullProgress, Progress
from sicot_cli.provenance import package_versions
from sicot_cli.threads import set_threads

log = logging.getLogger(__name__)

# Keys of a metrics record that measure wall-clock time (they differ between identical runs).
TIMING_KEYS = ("train_images_per_s", "epoch_seconds", "eval_images_per_s")


@dataclass
class TrainResult:
    """Where the run is and how it ended."""

    run_dir: Path
    history: list[dict[str, Any]]
    interrupted: bool = False
    skipped: bool = False  # the run had already finished
    test: dict[str, Any] | None = None  # summary.json's "final": test metrics and how they were chosen

    @property
    def final(self) -> dict[str, Any]:
        """The finished run's test metrics; the last epoch's record while it is unfinished."""
        if self.test is not None:
            return self.test
        return self.history[-1] if self.history else {}


def data_path(recipe: Recipe, data: str | Path | None) -> Path:
    return Path(data) if data is not None else Path(recipe.data.out)


def run_config(recipe: Recipe, prepared: Prepared) -> dict[str, Any]:
    return {
        "recipe": recipe.to_dict(),
        "encoder": recipe.model.encoder,
        "data": str(prepared.path.resolve()),
        "dataset": prepared.fingerprint(),
        "versions": package_versions(),
        "git_commit": runs.git_commit(),
    }


def use_sharding(cfg: TrainConfig, ctx: DistContext, num_classes: int) -> bool:
    """Shard the classifier by class? Only when distributed: forced, or from the recipe's size on."""
    if not ctx.enabled or cfg.classifier_parallel == "no":
        return False
    return cfg.classifier_parallel == "yes" or num_classes >= cfg.classifier_parallel_min_classes


def _meta(recipe: Recipe, prepared: Prepared, model: SICoT) -> dict[str, Any]:
    return {
        "backbone": recipe.model.backbone,
        "encoder": recipe.model.encoder,
        "num_classes": prepared.num_classes,
        "feat_dim": model.feat_dim,
        "image_size": prepared.image_size,
        "dataset": prepared.fingerprint(),
    }


def scores_streams(cfg: TrainConfig, sharded: bool) -> bool:
    """Does the step score the classifier itself (sharded or class-sampled), its ``forward`` giving only the streams?"""
    return sharded or cfg.class_sample_rate < 1.0


def step_forward(model: SICoT, cfg: TrainConfig, sharded: bool) -> torch.nn.Module:
    """What :func:`train_step`'s ``forward`` runs (before DDP or compile): the model, or its streams alone."""
    return Streams(model) if scores_streams(cfg, sharded) else model


SHOW_EVERY = 10  # batches between progress-bar loss updates (each costs a device sync)


def diverged(model: torch.nn.Module) -> bool:
    """True when a weight is no longer finite (checked with the loss, at the same device syncs).

    The loss of a step is computed before its update, so a step that blows the weights up (an
    inf or huge learning rate) shows a finite loss; only the weights tell, and without this a
    one-epoch run would be evaluated and marked finished with NaN weights.
    """
    params = [p.detach() for p in model.parameters()]
    return bool(params) and not bool(torch.isfinite(torch.nn.utils.get_total_norm(params)))


def _store(accum: dict[str, Any], sums: torch.Tensor) -> None:
    accum["loss"], accum["loss_v"], accum["loss_m"] = (float(v) for v in sums.tolist())


def train_step(
    model: SICoT,
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    device: torch.device,
    cfg: TrainConfig,
    generator: torch.Generator,
    ctx: DistContext | None = None,
    sharded: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One optimisation step on a batch (the same for baseline and co-training).

    uint8 images go to the device, are augmented there (seeded by ``generator``), normalised and
    scored; the loss is Eq. 1. ``forward`` is the model, its DDP wrapper or its ``torch.compile``
    wrapper; with ``sharded`` or class sampling (``cfg.class_sample_rate`` < 1) it is the streams'
    wrapper (:func:`step_forward`) and the classifier is scored by
    :func:`~sicot_cli.classifier_step.eq1_from_streams` (sharded: the whole global batch against
    this rank's classes; sampled: against the step's sampled classes, whose rows get their own SGD
    update after ``optimizer.step()``).

    Returns:
        The global batch's total loss, CE(x_v) and CE(x_m) (None for the baseline), detached.
    """
    ctx = ctx or DistContext()
    images = batch.images.to(device, non_blocking=True)
    labels = batch.labels.to(device, non_blocking=True)
    if cfg.augment:
        images = random_resized_crop_flip(images, generator, (cfg.crop_scale[0], cfg.crop_scale[1]), batch.offset, batch.total)
    x = model.normalize(images)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    tokens = mask = None
    if model.encoder is not None:
        tokens = batch.tokens.to(device, non_blocking=True)
        mask = batch.mask.to(device, non_blocking=True)
    sampled = None
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
        if scores_streams(cfg, sharded):  # forward gives the streams; the classifier is scored here
            x_v, x_m = forward(x, tokens, mask)
            loss, loss_v, loss_m, sampled = eq1_from_streams(model, x_v, x_m, labels, batch.global_size, cfg.lam, cfg.normalize_loss, ctx, sharded, cfg.class_sample_rate, generator)
        else:
            logits_v, logits_m = forward(x, tokens, mask)
    if not scores_streams(cfg, sharded):
        loss, loss_v, loss_m = sicot_loss(logits_v, logits_m, labels, cfg.lam, cfg.normalize_loss)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if sampled is not None:  # the classifier's sampled rows: their own SGD step (sicot_cli.classifier_step)
        sampled.step(optimizer, ctx if ctx.enabled and not sharded else None)
    out = torch.stack([loss.detach(), loss_v.detach(), loss_m.detach() if loss_m is not None else torch.zeros_like(loss)])
    if ctx.enabled and not sharded:  # per-rank means of equal slices -> the global batch's mean
        out = reduce_mean(out, ctx)
    return out[0], out[1], None if loss_m is None else out[2]


def train(
    recipe: Recipe,
    run_dir: str | Path | None = None,
    resume: bool = False,
    data: str | Path | None = None,
    progress: Progress | None = None,
    hook: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train (or resume) one run, in one process or as one rank of a ``torchrun`` job.

    Args:
        recipe: the resolved recipe; ``model.encoder = "none"`` trains the baseline.
        run_dir: the run directory (default ``<train.runs_dir>/<name>-<encoder>-s<seed>``).
        resume: continue an existing run from ``checkpoint-last.pt``.
        data: the prepared file (default ``data.out``).
        progress: progress reporting (rank 0 only).
        hook: called as ``hook(epoch, batch)`` before every batch (tests use it to interrupt).

    Returns:
        The run's directory and per-epoch history. Ctrl-C saves a resumable checkpoint and returns
        with ``interrupted=True``.
    """
    ctx = init_distributed(recipe.train.device)
    if not ctx.is_main:  # one voice: rank 0 logs, the others only warn
        logging.getLogger("sicot_cli").setLevel(logging.WARNING)
    clean = False
    try:
        result = _train(ctx, recipe, run_dir, resume, data, progress if ctx.is_main else None, hook)
        clean = True
        return result
    finally:
        shutdown(ctx, clean)


def _score_test(
    model: SICoT, prepared: Prepared, device: torch.device, recipe: Recipe, in_memory: bool, ctx: DistContext, run_dir: Path, history: list[dict[str, Any]]
) -> tuple[Any, dict[str, Any]]:
    """Score the test rows once, with the weights ``eval.select`` names; say which and how chosen.

    ``last``: the final weights, no selection. ``best``: ``checkpoint-best.pt``, the epoch with the
    best validation top-1 (validation rows only, never test).
    """
    last_epoch = history[-1]["epoch"] if history else 0
    epoch = last_epoch
    if recipe.eval.select == "best":
        state = runs.load_checkpoint(run_dir / runs.BEST)
        checkpoints.restore(state, run_dir / runs.BEST, model)
        epoch = int(state.get("epoch", last_epoch))
    final = evaluate_model(model, prepared, device, recipe, in_memory=in_memory, ctx=ctx, split="test")
    selection = {
        "split": "test",
        "test_images": prepared.n - prepared.test_start,
        "val_images": prepared.n_val,
        "checkpoint": recipe.eval.select,
        "checkpoint_epoch": epoch,
        "selected_on": "val" if recipe.eval.select == "best" else None,
    }
    return final, selection


def _on_main(ctx: DistContext, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only; its result, or its user error, reaches every rank (no rank hangs)."""
    if not ctx.enabled:
        return fn()
    import torch.distributed as dist

    box: list[Any] = [None]
    if ctx.is_main:
        try:
            box[0] = ("ok", fn())
        except SicotError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise SicotError(value)
    return value


def training_plan(recipe: Recipe, prepared: Prepared, steps_per_epoch: int, threads: int) -> tuple[str, list[str]]:
    """What training will do, in one line, and warnings for a setting that cannot learn.

    Own data trained with another dataset's settings fails silently (one class predicted for
    everything): the plan names the effective image size, backbone, batch and steps, and warns
    when there are fewer optimisation steps in the whole run than classes to separate.
    """
    cfg = recipe.train
    init = recipe.model.pretrained or "from scratch"
    total = steps_per_epoch * cfg.epochs
    line = (
        f"{prepared.image_size}x{prepared.image_size} images, {recipe.model.backbone} ({init}), "
        f"{prepared.n_train:,} training images / {prepared.num_classes:,} classes, batch {cfg.batch_size} -> "
        f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs, lr {cfg.lr:g}, {threads} CPU thread(s)"
    )
    warnings = []
    if prepared.n_train < cfg.batch_size:
        warnings.append(
            f"train.batch_size {cfg.batch_size} is larger than the {prepared.n_train:,} training images: one step per epoch"
        )
    if total < prepared.num_classes:
        warnings.append(
            f"fewer optimisation steps in the whole run ({total}) than classes ({prepared.num_classes}): likely too few "
            f"to learn them (a model that predicts one class for everything); lower train.batch_size or raise "
            f"train.epochs (recipes/product-manifest.toml is the starting point for own data)"
        )
    return line, warnings


def _checkpoint_note(run_dir: Path) -> str:
    """The run's size on disk, and how to keep less."""
    files = [p for p in run_dir.iterdir() if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    best = run_dir / runs.BEST
    note = f"{run_dir}: {total / 1e6:,.0f} MB on disk"
    if best.is_file():
        note += f" (checkpoint-best.pt {best.stat().st_size / 1e6:,.0f} MB: train.keep_best=false keeps only checkpoint-last.pt)"
    return note


def _train(ctx: DistContext, recipe: Recipe, run_dir: str | Path | None, resume: bool, data: str | Path | None, progress: Progress | None, hook: Callable[[int, int], None] | None) -> TrainResult:
    progress = progress or NullProgress()
    recipe = copy.deepcopy(recipe)  # the prepared file's settings are taken in below: not the caller's
    cfg = recipe.train
    path = data_path(recipe, data)
    if not path.exists():
        raise SicotError(f"{path}: prepared dataset not found: run `sicot prepare` with the same recipe first (or pass --data)")
    prepared = open_prepared(path)
    adopted = adopt_prepared(recipe, prepared.recipe, path)
    if adopted:
        log.debug("from %s: %s", path, ", ".join(adopted))
    threads = set_threads(cfg.threads)
    run_dir = Path(run_dir) if run_dir is not None else Path(cfg.runs_dir) / runs.default_run_name(recipe.name, recipe.model.encoder, cfg.seed)
    if prepared.n_train < 1 or prepared.n - prepared.test_start < 1:
        raise SicotError(f"{path}: needs training and test images (has {prepared.n_train} / {prepared.n - prepared.test_start})")
    if recipe.eval.select == "best" and prepared.n_val < 1:
        raise SicotError(
            f"{path}: eval.select = best needs validation rows, and this file has none: "
            "rebuild it with data.val_fraction > 0 (`sicot prepare --force`) or use eval.select=last"
        )
    if ctx.enabled and (cfg.batch_size % ctx.world or prepared.n_train < cfg.batch_size):
        raise SicotError(
            f"train.batch_size = {cfg.batch_size} (the global batch) must be a multiple of the {ctx.world} ranks "
            f"and at most the {prepared.n_train} training images"
        )
    device = resolve_device(cfg.device)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    sharded = use_sharding(cfg, ctx, prepared.num_classes)
    shard = shard_range(prepared.num_classes, ctx.world, ctx.rank) if sharded else None
    model = make_model(recipe, prepared, shard)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    meta = _meta(recipe, prepared, model)
    # Only now, with the device, model and optimiser built (anything the recipe gets wrong has been
    # refused), is the run directory created: a failed start leaves nothing that blocks the retry.
    config = run_config(recipe, prepared) | {"threads": threads}
    resuming = _on_main(ctx, lambda: runs.start_run(run_dir, config, resume))
    if resuming:
        runs.check_dataset(prepared, runs.read_config(run_dir), run_dir)
        if runs.is_finished(run_dir):
            return TrainResult(run_dir, runs.read_metrics(run_dir), skipped=True, test=runs.read_summary(run_dir).get("final"))

    start_epoch, start_batch, history, best = 0, 0, [], -1.0
    accum = {"loss": 0.0, "loss_v": 0.0, "loss_m": 0.0, "images": 0, "seconds": 0.0}
    if resuming:
        state = runs.load_checkpoint(run_dir / runs.LAST)
        if state["meta"] != meta:
            raise SicotError(f"{run_dir / runs.LAST}: checkpoint of another model ({state['meta']}) than the recipe's ({meta})")
        checkpoints.restore(state, run_dir / runs.LAST, model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start_epoch, start_batch, history, best = state["epoch"], state["batch"], state["history"], state["best"]
        accum = state["accum"]
        _on_main(ctx, lambda: runs.write_metrics(run_dir, history))
        log.info("resuming %s at epoch %d, batch %d", run_dir, start_epoch + 1, start_batch)

    in_memory = use_in_memory(cfg, prepared)
    loader = BatchLoader(
        prepared, cfg.batch_size, 0, prepared.n_train, shuffle=True, seed=cfg.seed, in_memory=in_memory,
        block_rows=cfg.block_rows, shuffle_blocks=cfg.shuffle_blocks, drop_last=prepared.n_train >= cfg.batch_size,
        rank=ctx.rank, world=ctx.world, pin_memory=device.type == "cuda",
    )
    plan, plan_warnings = training_plan(recipe, prepared, len(loader), threads)
    log.info("%s: %s", run_dir, plan)
    for w in plan_warnings:
        log.warning("%s", w)
    forward: Callable[..., Any] = step_forward(model, cfg, sharded)
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        forward = DDP(step_forward(model, cfg, sharded), device_ids=ids)
    if cfg.compile:
        forward = torch.compile(forward)

    def checkpoint(epoch: int, batch: int) -> dict[str, Any]:
        return {
            "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "epoch": epoch, "batch": batch,
            "history": history, "best": best, "accum": accum, "meta": meta,
        }

    def save(name: str, state: dict[str, Any], with_optimizer: bool, tag: str) -> None:
        checkpoints.save(run_dir / name, state, model, optimizer if with_optimizer else None, ctx, sharded, tag)

    epoch = start_epoch
    batch_idx = start_batch
    training = False  # True while the epoch's batches run: only then is a mid-epoch checkpoint valid
    # Ctrl-C inside a step (after optimizer.step() began, before the batch is counted) would save
    # weights one step ahead of their batch counter: such an interrupt waits for the step's end.
    stop = {"in_step": False, "asked": False}

    def on_sigint(signum: int, frame: Any) -> None:
        if stop["in_step"]:
            stop["asked"] = True
        else:
            raise KeyboardInterrupt

    old_handler = signal.signal(signal.SIGINT, on_sigint) if threading.current_thread() is threading.main_thread() else None
    try:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            skip = start_batch if epoch == start_epoch else 0
            if skip == 0:
                accum = {"loss": 0.0, "loss_v": 0.0, "loss_m": 0.0, "images": 0, "seconds": 0.0}
            sums = torch.tensor([accum["loss"], accum["loss_v"], accum["loss_m"]], dtype=torch.float64, device=device)
            training = True  # after sums exists: a Ctrl-C from here on saves them
            lr = optimizer.param_groups[0]["lr"]
            with progress.task(f"epoch {epoch + 1}/{cfg.epochs}", len(loader)) as task:
                task.advance(skip)
                batch_idx = skip
                t_last = time.perf_counter()
                for batch in loader.epoch(epoch, skip):
                    if hook is not None:
                        hook(epoch, batch_idx)
                    stop["in_step"] = True
                    gen = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch, 1 + batch_idx))
                    loss, loss_v, loss_m = train_step(model, forward, optimizer, batch, device, cfg, gen, ctx, sharded)
                    n = batch.global_size
                    # Sums stay on the device (no per-step host sync); read when shown or saved.
                    sums += torch.stack([loss, loss_v, loss_m if loss_m is not None else torch.zeros_like(loss)]).double() * n
                    accum["images"] += n
                    now = time.perf_counter()
                    accum["seconds"] += now - t_last
                    t_last = now
                    batch_idx += 1
                    stop["in_step"] = False
                    if stop["asked"]:
                        raise KeyboardInterrupt
                    if batch_idx % SHOW_EVERY == 0 or batch_idx == len(loader):
                        if not torch.isfinite(sums[0]) or diverged(model):
                            raise SicotError(f"{run_dir}: the loss diverged (not finite) by epoch {epoch + 1}, batch {batch_idx}: lower train.lr")
                        task.advance(1, info=f"loss {sums[0].item() / accum['images']:.3f}  {accum['images'] / max(accum['seconds'], 1e-9):,.0f} img/s")
                    else:
                        task.advance(1)
                _store(accum, sums)
            training = False
            scheduler.step()
            val = evaluate_model(model, prepared, device, recipe, in_memory=in_memory, ctx=ctx, split="val") if prepared.n_val else None
            record = {
                "epoch": epoch + 1,
                "lr": lr,
                "loss": accum["loss"] / max(accum["images"], 1),
                "loss_v": accum["loss_v"] / max(accum["images"], 1),
                "loss_m": accum["loss_m"] / max(accum["images"], 1) if model.encoder is not None else None,
                "train_images": accum["images"],
                "train_images_per_s": accum["images"] / max(accum["seconds"], 1e-9),
                "epoch_seconds": accum["seconds"],
                **({f"val_{k}": v for k, v in val.scalars().items()} | {"eval_images_per_s": val.images_per_s} if val else {}),
            }
            history.append(record)
            batch_idx = 0
            if val is not None and record["val_top1"] > best:
                best = record["val_top1"]
                if cfg.keep_best:
                    save(runs.BEST, {"meta": meta, "epoch": epoch + 1}, False, f"e{epoch + 1}")
            save(runs.LAST, checkpoint(epoch + 1, 0), True, f"e{epoch + 1}")
            _on_main(ctx, lambda: runs.append_metrics(run_dir, record))
            log.info("epoch %d: loss %.4f%s", epoch + 1, record["loss"], f" val top1 {record['val_top1']:.2f}" if val else "")
    except KeyboardInterrupt:
        # Between the last batch and the epoch's checkpoint the previous checkpoint is the valid one.
        # Distributed, the ranks may be stopped at different batches: resume from the last epoch.
        if training and not ctx.enabled:
            _store(accum, sums)
            save(runs.LAST, checkpoint(epoch, batch_idx), True, f"e{epoch}b{batch_idx}")
        return TrainResult(run_dir, history, interrupted=True)
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)

    final, selection = _score_test(model, prepared, device, recipe, in_memory, ctx, run_dir, history)

    def write_outputs() -> None:
        write_predictions(run_dir / runs.PREDICTIONS, final)
        runs.finish(run_dir, history, final.per_class(), final.scalars() | selection)

    _on_main(ctx, write_outputs)
    if ctx.is_main:
        log.info("%s", _checkpoint_note(run_dir))
    return TrainResult(run_dir, history, test={**(history[-1] if history else {}), **final.scalars(), **selection})
