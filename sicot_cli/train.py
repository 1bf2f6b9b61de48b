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

import contextlib
import copy
import dataclasses
import logging
import math
import signal
import threading
import time
import warnings as warnings_module
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sicot_cli import checkpoints, interrupts, runs
from sicot_cli.classifier_step import eq1_from_streams
from sicot_cli.config import Recipe, TrainConfig, adopt_prepared
from sicot_cli.data.augment import random_resized_crop_flip
from sicot_cli.data.dataset import Prepared, open_prepared, val_rows_hint
from sicot_cli.data.loader import Batch, BatchLoader, decode_workers, epoch_seed
from sicot_cli.distributed import DistContext, init_distributed, reduce_mean, shard_range, shutdown
from sicot_cli.errors import SicotError
from sicot_cli.evaluate import evaluate_model, resolve_device, split_logits, use_in_memory, write_predictions
from sicot_cli.losses import Criterion, adjusted_bias, choose_tau, criterion
from sicot_cli.model import SICoT, Streams, diverged, make_model, orthogonal_backward, sicot_loss
from sicot_cli.progress import NullProgress, Progress
from sicot_cli.provenance import package_versions
from sicot_cli.resume import check_same_content, check_same_settings
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
    # interrupted: what checkpoint-last.pt now holds ("epoch 2, batch 3": saved by the Ctrl-C; "after
    # epoch 1": the last epoch's, kept), or None when the run stopped before its first checkpoint
    checkpoint: str | None = None
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
        # a resumed run continues on exactly this data (a baseline: on these labels, splits and sizes)
        "content": {"data": prepared.data_checksum(), "labels": prepared.data_checksum(text=False)},
        "versions": package_versions(),
        "git_commit": runs.git_commit(),
    }


def use_sharding(cfg: TrainConfig, ctx: DistContext, num_classes: int) -> bool:
    """Shard the classifier by class? Only when distributed: forced, or from the recipe's size on."""
    if not ctx.enabled or cfg.classifier_parallel == "no":
        return False
    return cfg.classifier_parallel == "yes" or num_classes >= cfg.classifier_parallel_min_classes


def run_meta(recipe: Recipe, prepared: Prepared, model: SICoT) -> dict[str, Any]:
    """What a checkpoint must match to be loaded into a run: backbone, encoder, classes, sizes, dataset."""
    return {
        "backbone": recipe.model.backbone,
        "encoder": recipe.model.encoder,
        "num_classes": prepared.num_classes,
        "feat_dim": model.feat_dim,
        "image_size": prepared.image_size,
        "dataset": prepared.fingerprint(),
    }


def scores_streams(cfg: TrainConfig, sharded: bool) -> bool:
    """Does the step score the classifier itself (sharded, class-sampled or bf16-stored), its ``forward`` giving only the streams?"""
    return sharded or cfg.class_sample_rate < 1.0 or cfg.classifier_dtype != "float32"


def step_forward(model: SICoT, cfg: TrainConfig, sharded: bool) -> torch.nn.Module:
    """What :func:`train_step`'s ``forward`` runs (before DDP or compile): the model, or its streams alone."""
    return Streams(model) if scores_streams(cfg, sharded) else model


SHOW_EVERY = 10  # batches between progress-bar loss updates (each costs a device sync)


def epoch_lam(cfg: TrainConfig, epoch: int) -> float:
    """Eq. 1's lambda in ``epoch`` (0-based): 0 while the run trains image-only, then ``train.lam``."""
    return 0.0 if epoch < cfg.image_only_epochs else cfg.lam


# An epoch's mean loss this many times a uniform guess's (ln classes) is a diverging run, though finite:
# warned (seen: 1.8e14 at lr 100, finished as a normal run).
LOSS_ALARM = 100


def _store(accum: dict[str, Any], sums: torch.Tensor) -> None:
    accum["loss"], accum["loss_v"], accum["loss_m"] = (float(v) for v in sums.tolist())


def _inputs(
    model: SICoT, batch: Batch, device: torch.device, cfg: TrainConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A batch on the device: augmented (seeded by ``generator``) and normalised images, labels, title tokens."""
    images = batch.images.to(device, non_blocking=True)
    labels = batch.labels.to(device, non_blocking=True)
    if cfg.augment and not batch.augmented:  # format 2's loader crops as it decodes
        scale = (cfg.crop_scale[0], cfg.crop_scale[1])
        images = random_resized_crop_flip(images, generator, scale, batch.offset, batch.total)
    x = model.normalize(images)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    tokens = mask = None
    if model.encoder is not None:
        tokens = batch.tokens.to(device, non_blocking=True)
        mask = batch.mask.to(device, non_blocking=True)
    return x, labels, tokens, mask


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
    criterion: Criterion | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One optimisation step, the paper's §3.3 (the same for baseline and co-training).

    The two streams give x_v and x_m = max(x_v, semantic); the ONE shared classifier scores both;
    the loss is Eq. 1, CE(x_v) + λ·CE(x_m); backward; SGD step. ``forward`` is the model, its DDP
    wrapper or its ``torch.compile`` wrapper. With ``sharded`` or class sampling
    (``cfg.class_sample_rate`` < 1) it is the streams' wrapper (:func:`step_forward`) and the
    classifier is scored by :func:`~sicot_cli.classifier_step.eq1_from_streams` (sharded: the whole
    global batch against this rank's classes; sampled: against the step's sampled classes, whose
    rows get their own SGD update after ``optimizer.step()``). ``criterion``: the epoch's long-tail
    loss for both terms (``train.loss``, ``train.reweight``; sicot_cli.losses), cross-entropy if None.

    Returns:
        The global batch's total loss, CE(x_v) and CE(x_m) (None for the baseline), detached.
    """
    ctx = ctx or DistContext()
    if criterion is not None and criterion.weight is not None and ctx.enabled and not sharded:
        criterion = criterion.across_ranks(lambda s: reduce_mean(s, ctx))  # DRW's weighted mean, global
    x, labels, tokens, mask = _inputs(model, batch, device, cfg, generator)
    sampled = None
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
        if scores_streams(cfg, sharded):  # forward gives the streams; the classifier is scored here
            x_v, x_m = forward(x, tokens, mask)
            loss, loss_v, loss_m, sampled = eq1_from_streams(
                model,
                x_v,
                x_m,
                labels,
                batch.global_size,
                cfg.lam,
                cfg.normalize_loss,
                ctx,
                sharded,
                cfg.class_sample_rate,
                generator,
                criterion,
            )
        else:
            logits_v, logits_m = forward(x, tokens, mask)
    if not scores_streams(cfg, sharded):
        distill = cfg.distill if cfg.lam else 0.0  # no teacher while train.cotrain_after trains image-only
        loss, loss_v, loss_m = sicot_loss(
            logits_v, logits_m, labels, cfg.lam, cfg.normalize_loss, criterion, distill, cfg.distill_temperature
        )
    optimizer.zero_grad(set_to_none=True)
    if cfg.mixed_step == "orthogonal" and loss_m is not None and cfg.lam and not scores_streams(cfg, sharded):
        orthogonal_backward(model, loss_v, loss_m, cfg.lam)  # one process, whole classifier (config, _set_up)
    else:
        loss.backward()
    optimizer.step()
    if sampled is not None:  # the classifier's sampled rows: their own SGD step (sicot_cli.classifier_step)
        sampled.step(optimizer, ctx if ctx.enabled and not sharded else None)
    zero = torch.zeros_like(loss)
    out = torch.stack([loss.detach(), loss_v.detach(), loss_m.detach() if loss_m is not None else zero])
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
        The run's directory and per-epoch history. Ctrl-C among an epoch's batches saves a resumable
        checkpoint and returns with ``interrupted=True`` (``checkpoint`` says what is kept).
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


def test_selection(prepared: Prepared, checkpoint: str, epoch: int, selected_on: str | None) -> dict[str, Any]:
    """What ``summary.json``'s "final" says of how the test scores were made: split, sizes, weights, selection."""
    return {
        "split": "test",
        "test_images": prepared.n - prepared.test_start,
        "val_images": prepared.n_val,
        "checkpoint": checkpoint,
        "checkpoint_epoch": epoch,
        "selected_on": selected_on,
    }


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
    when a visual stream trained from scratch gets fewer optimisation steps in the whole run than
    there are classes to separate (the demo fine-tunes a pretrained one in 112 steps for 120 classes).
    """
    cfg = recipe.train
    init = recipe.model.pretrained or "from scratch"
    total = steps_per_epoch * cfg.epochs
    line = (
        f"{prepared.image_size}x{prepared.image_size} images, {recipe.model.backbone} ({init}), "
        f"{prepared.n_train:,} training images / {prepared.num_classes:,} classes, batch {cfg.batch_size} -> "
        f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs, lr {cfg.lr:g}, {threads} CPU thread(s)"
    )
    if recipe.model.encoder != "none" and (first := cfg.image_only_epochs):
        line += f"; image-only (lam 0) for {first} epoch(s), then co-training (train.cotrain_after)"
    if recipe.model.encoder != "none" and cfg.lam and cfg.mixed_step == "orthogonal":
        line += "; CE(x_m)'s step orthogonal to CE(x_v)'s (train.mixed_step)"
    if recipe.model.encoder != "none" and cfg.distill:
        line += f"; x_m's scores distilled into x_v's (train.distill {cfg.distill:g}, T {cfg.distill_temperature:g})"
    if getattr(prepared, "store", None) is not None:  # format 2
        workers = decode_workers(cfg.loader_workers, threads)
        line += f"; JPEG shards (stored {prepared.store.side} px) decoded by {workers} loader process(es)"
    warnings = []
    if recipe.model.encoder != "none" and not cfg.lam:
        warnings.append(
            f"train.lam = 0 with encoder {recipe.model.encoder!r}: CE(x_m) never trains, so this run is the baseline's "
            "(the titles are read and unused)"
        )
    if recipe.model.encoder != "none" and cfg.cotrain_after and not cfg.image_only_epochs:
        warnings.append(
            f"train.cotrain_after = {cfg.cotrain_after:g} of {cfg.epochs} epoch(s) is no epoch (floor), so co-training "
            "starts at once: raise it or train.epochs"
        )
    if cfg.reweight == "drw" and cfg.drw_epoch >= cfg.epochs:
        warnings.append(
            f"train.drw_start = {cfg.drw_start:g} of {cfg.epochs} epoch(s) starts re-weighting after the last epoch: "
            "this run is plain CE; lower it"
        )
    if prepared.n_train < cfg.batch_size:
        warnings.append(
            f"train.batch_size {cfg.batch_size} is larger than the {prepared.n_train:,} training images: one step per epoch"
        )
    above = sorted(k for k in set(cfg.topk) if k >= prepared.num_classes > 1)
    if above:
        warnings.append(
            f"train.topk: top-{above[0]} is 100 % by definition with {prepared.num_classes} classes; keep k < "
            f"{prepared.num_classes} (e.g. train.topk = {sorted({1, min(3, prepared.num_classes - 1)})})"
        )
    if total < prepared.num_classes and not recipe.model.pretrained:  # a pretrained stream needs fewer
        warnings.append(
            f"fewer optimisation steps in the whole run ({total}) than classes ({prepared.num_classes}): likely too few "
            f"to learn them (a model that predicts one class for everything); lower train.batch_size or raise "
            f"train.epochs (the built-in recipe product-manifest, `--recipe product-manifest`, is the starting point for own data)"
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


def _fresh_accum() -> dict[str, Any]:
    return {"loss": 0.0, "loss_v": 0.0, "loss_m": 0.0, "images": 0, "seconds": 0.0}


@dataclass
class _Run:
    """What one run is built from, fixed before its first step."""

    ctx: DistContext
    recipe: Recipe  # the caller's recipe with the prepared file's settings taken in
    prepared: Prepared
    run_dir: Path
    threads: int
    device: torch.device
    sharded: bool
    model: SICoT
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.StepLR
    meta: dict[str, Any]
    in_memory: bool
    progress: Progress = field(default_factory=NullProgress)  # the caller's: epochs, and each scoring pass


@dataclass
class _State:
    """Where training is: what ``checkpoint-last.pt`` holds besides the weights and the optimiser."""

    epoch: int = 0  # the epoch running (0-based); in a checkpoint, the next one to run
    batch: int = 0  # batches of ``epoch`` done
    history: list[dict[str, Any]] = field(default_factory=list)
    best: float = -1.0  # best validation top-1 so far
    accum: dict[str, Any] = field(default_factory=_fresh_accum)  # the epoch's running loss sums, images, seconds
    sums: torch.Tensor | None = None  # the running loss sums on the device, while an epoch's batches run
    # eval.logit_adjust = "val": the tau chosen and the validation scores, once the adjusted weights were saved
    logit_adjust: dict[str, Any] = field(default_factory=dict)
    saved_on_interrupt: bool = False  # a Ctrl-C inside an epoch's batches saved checkpoint-last.pt


def kept_checkpoint(run_dir: Path, state: _State) -> str | None:
    """What an interrupted run's ``checkpoint-last.pt`` holds, in words; None when there is none yet.

    A Ctrl-C among an epoch's batches saves one there; a Ctrl-C while the epoch's validation runs
    saves none (the previous epoch's checkpoint is the valid one, and in epoch 1 there is none).
    """
    if not (run_dir / runs.LAST).is_file():
        return None
    if state.saved_on_interrupt:
        return f"epoch {state.epoch + 1}, batch {state.batch}"
    return f"after epoch {len(state.history)}"


class SigintGuard:
    """Ctrl-C (and SIGTERM, where the CLI made it an interrupt) between steps stops at once; inside a
    step it waits for the step's end.

    A Ctrl-C after ``optimizer.step()`` began but before the batch is counted would save weights one
    step ahead of their batch counter.
    """

    def __init__(self) -> None:
        self.in_step = False
        self.asked = False
        self._old: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        interrupts.note_stop(signum)
        if self.in_step:
            self.asked = True
        else:
            raise KeyboardInterrupt

    def step_done(self) -> None:
        self.in_step = False
        if self.asked:
            raise KeyboardInterrupt

    def __enter__(self) -> SigintGuard:
        if threading.current_thread() is threading.main_thread():
            # SIGTERM only where the CLI made it an interrupt (stop_on_sigterm): a library caller keeps its own
            term = signal.getsignal(signal.SIGTERM) is interrupts.interrupt
            self._old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, *([signal.SIGTERM] * term))}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in (self._old or {}).items():
            signal.signal(signum, handler)


def _train(
    ctx: DistContext,
    recipe: Recipe,
    run_dir: str | Path | None,
    resume: bool,
    data: str | Path | None,
    progress: Progress | None,
    hook: Callable[[int, int], None] | None,
) -> TrainResult:
    run = _set_up(ctx, recipe, run_dir, data)
    # Only now, with the device, model and optimiser built (anything the recipe gets wrong has been
    # refused), is the run directory created: a failed start leaves nothing that blocks the retry.
    # Rank 0, which writes it, holds it until the run ends: a second process is refused at once.
    with contextlib.ExitStack() as held:
        _on_main(ctx, lambda: held.enter_context(runs.hold(run.run_dir)))
        return _train_held(run, resume, progress, hook)


def _train_held(
    run: _Run, resume: bool, progress: Progress | None, hook: Callable[[int, int], None] | None
) -> TrainResult:
    """:func:`_train` once the run directory is this process's."""
    config = run_config(run.recipe, run.prepared) | {"threads": run.threads}
    resuming = _on_main(run.ctx, lambda: runs.start_run(run.run_dir, config, resume))
    state = _State()
    if resuming:
        saved = runs.read_config(run.run_dir)
        if saved.get("stage"):
            raise SicotError(
                f"{run.run_dir}: is a second stage (sicot decouple), not a training run: continue it with "
                f"`sicot decouple <first run> --resume --run-dir {run.run_dir}`"
            )
        runs.check_dataset(run.prepared, saved, run.run_dir)
        check_same_content(run.prepared, saved, run.run_dir)
        check_same_settings(  # `sicot ablate` reuses and continues runs with the recipe it is given
            run.run_dir,
            saved["recipe"],
            run.recipe,
            "train these settings into another directory (`--run-dir`; `--out` for `sicot ablate`)",
        )
        if runs.is_finished(run.run_dir):
            final = runs.read_summary(run.run_dir).get("final")
            return TrainResult(run.run_dir, runs.read_metrics(run.run_dir), skipped=True, test=final)
        state = _resume(run)
    loader = _loader(run)
    forward = _forward(run)
    run.progress = progress or NullProgress()
    with SigintGuard() as guard:
        if _epochs(run, state, loader, forward, run.progress, hook, guard):
            kept = kept_checkpoint(run.run_dir, state)
            return TrainResult(run.run_dir, state.history, interrupted=True, checkpoint=kept)
    return _finish(run, state)


def _open_data(recipe: Recipe, data: str | Path | None) -> tuple[Recipe, Prepared]:
    """The prepared file, with its settings taken into (a copy of) the recipe; refused if it cannot train."""
    recipe = copy.deepcopy(recipe)  # the prepared file's settings are taken in below: not the caller's
    path = data_path(recipe, data)
    if not path.exists():
        raise SicotError(
            f"{path}: prepared dataset not found: run `sicot prepare` with the same recipe first (or pass --data)"
        )
    prepared = open_prepared(path)
    adopted = adopt_prepared(recipe, prepared.recipe, path)
    if adopted:
        log.debug("from %s: %s", path, ", ".join(adopted))
    if prepared.n_train < 1 or prepared.n - prepared.test_start < 1:
        raise SicotError(
            f"{path}: needs training and test images (has {prepared.n_train} / {prepared.n - prepared.test_start})"
        )
    if recipe.eval.logit_adjust == "val" and len(recipe.eval.logit_adjust_taus) > 1 and prepared.n_val < 1:
        raise SicotError(
            f"{path}: eval.logit_adjust = val chooses tau on validation rows, and this file has none: "
            f"{val_rows_hint(recipe.data.val_fraction)}, or use eval.logit_adjust=off"
        )
    if recipe.eval.select == "best" and prepared.n_val < 1:
        raise SicotError(
            f"{path}: eval.select = best needs validation rows, and this file has none: "
            f"{val_rows_hint(recipe.data.val_fraction)}, or use eval.select=last"
        )
    return recipe, prepared


def _set_up(ctx: DistContext, recipe: Recipe, run_dir: str | Path | None, data: str | Path | None) -> _Run:
    """Data, device, model (sharded by class when distributed and large), SGD and StepLR."""
    recipe, prepared = _open_data(recipe, data)
    cfg = recipe.train
    threads = set_threads(cfg.threads)
    name = runs.default_run_name(recipe.name, recipe.model.encoder, cfg.seed)
    run_dir = Path(run_dir) if run_dir is not None else Path(cfg.runs_dir) / name
    if ctx.enabled and (
        cfg.batch_size % ctx.world or prepared.n_train < cfg.batch_size or cfg.batch_size < 2 * ctx.world
    ):
        raise SicotError(
            f"train.batch_size = {cfg.batch_size} (the global batch) must be a multiple of the {ctx.world} ranks, "
            f"at least 2 images a rank (batch normalisation) and at most the {prepared.n_train} training images"
        )
    device = resolve_device(cfg.device)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    sharded = use_sharding(cfg, ctx, prepared.num_classes)
    if sharded and cfg.distill and recipe.model.encoder != "none":
        raise SicotError(
            "train.distill needs every class's scores in one process, and this run shards the classifier "
            "by class: set train.classifier_parallel=no (on --resume with --allow-changes), or train.distill=0"
        )
    if ctx.enabled and cfg.mixed_step == "orthogonal" and recipe.model.encoder != "none":
        raise SicotError(
            'train.mixed_step = "orthogonal" runs in one process (its two backward passes bypass the gradient '
            'averaging across ranks): train without torchrun, or with train.mixed_step = "sum"'
        )
    if recipe.eval.logit_adjust == "val" and ctx.enabled:
        raise SicotError(
            "eval.logit_adjust = val runs in one process: train with eval.logit_adjust=off, then "
            "`sicot decouple RUN --method logit_adjust` on the finished run"
        )
    shard = shard_range(prepared.num_classes, ctx.world, ctx.rank) if sharded else None
    model = make_model(recipe, prepared, shard)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.to(device)
    if cfg.classifier_dtype == "bfloat16":  # its weights and momentum (created like them); steps via the rows path
        model.classifier.to(torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    meta = run_meta(recipe, prepared, model)
    in_memory = use_in_memory(cfg, prepared)
    return _Run(ctx, recipe, prepared, run_dir, threads, device, sharded, model, optimizer, scheduler, meta, in_memory)


def _resume(run: _Run) -> _State:
    """Weights, optimiser, scheduler, RNG and position from ``checkpoint-last.pt``."""
    ckpt = runs.load_checkpoint(run.run_dir / runs.LAST)
    if ckpt.get("meta") != run.meta:
        raise SicotError(
            f"{run.run_dir / runs.LAST}: checkpoint of another model ({ckpt.get('meta')}) than the recipe's ({run.meta})"
        )
    _check_position(ckpt, run.run_dir / runs.LAST, run.recipe.train.epochs)
    checkpoints.restore(ckpt, run.run_dir / runs.LAST, run.model, run.optimizer)
    run.scheduler.load_state_dict(ckpt["scheduler"])
    follow_recipe(run.optimizer, run.scheduler, run.recipe.train)
    torch.set_rng_state(ckpt["rng"])
    state = _State(ckpt["epoch"], ckpt["batch"], ckpt["history"], ckpt["best"], ckpt["accum"])
    state.logit_adjust = {k: ckpt[k] for k in ADJUST_KEYS if k in ckpt}
    _on_main(run.ctx, lambda: runs.write_metrics(run.run_dir, state.history))
    log.info("resuming %s at epoch %d, batch %d", run.run_dir, state.epoch + 1, state.batch)
    return state


def _check_position(ckpt: dict[str, Any], path: Path, epochs: int) -> None:
    """What a resume takes from a checkpoint besides weights, checked before anything is written
    (its history becomes metrics.jsonl): a downloaded or damaged file is refused in one line."""
    history = ckpt.get("history")
    ok = (
        type(ckpt.get("epoch")) is int
        and 0 <= ckpt["epoch"] <= epochs
        and type(ckpt.get("batch")) is int
        and ckpt["batch"] >= 0
        and isinstance(history, list)
        and len(history) == ckpt["epoch"]
        and all(isinstance(h, dict) and h.get("epoch") == i + 1 for i, h in enumerate(history))
        and isinstance(ckpt.get("rng"), torch.Tensor)
        and ckpt["rng"].dtype == torch.uint8
        and isinstance(ckpt.get("scheduler"), dict)
        and isinstance(ckpt.get("accum"), dict)
        and isinstance(ckpt.get("best"), int | float)
        and "meta" in ckpt
    )
    if not ok:
        raise SicotError(
            f"{path}: damaged checkpoint (its epoch, batch, history, random state or schedule are not what training "
            f"saves for a run of {epochs} epochs): it cannot be resumed; retrain the run with --run-dir NEW_DIR"
        )


def follow_recipe(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.StepLR, cfg: TrainConfig
) -> None:
    """After a checkpoint's optimiser and StepLR state were loaded: the recipe's SGD and StepLR settings.

    Their saved state holds the values the run started with; a resume with ``--allow-changes``
    (``train.lr``, ``momentum``, ``weight_decay``, ``step_size``, ``gamma``) would otherwise record
    the new value in ``config.json`` and train on with the old one. The learning rate is the one the
    recipe's schedule gives at the resumed epoch, ``lr * gamma ** (epoch // step_size)``, as a run
    trained with these settings from the start would have; an unchanged schedule is left as loaded
    (bit for bit: a resumed run reproduces the uninterrupted one).
    """
    for group in optimizer.param_groups:
        group["momentum"], group["weight_decay"] = cfg.momentum, cfg.weight_decay
    if (scheduler.step_size, scheduler.gamma) == (cfg.step_size, cfg.gamma) and all(
        base == cfg.lr for base in scheduler.base_lrs
    ):
        return
    scheduler.step_size, scheduler.gamma = cfg.step_size, cfg.gamma
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    lr = cfg.lr * cfg.gamma ** (scheduler.last_epoch // cfg.step_size)
    for group in optimizer.param_groups:
        group["initial_lr"], group["lr"] = cfg.lr, lr
    scheduler._last_lr = [lr] * len(optimizer.param_groups)  # what get_last_lr() reports


def _checkpoint(run: _Run, state: _State, epoch: int, batch: int) -> dict[str, Any]:
    return {
        "scheduler": run.scheduler.state_dict(), "rng": torch.get_rng_state(), "epoch": epoch, "batch": batch,
        "history": state.history, "best": state.best, "accum": state.accum, "meta": run.meta, **state.logit_adjust,
    }  # fmt: skip


def _save(run: _Run, name: str, state: dict[str, Any], with_optimizer: bool, tag: str) -> None:
    if run.ctx.rank == 0:  # the process that holds the run directory (runs.hold)
        runs.check_held(run.run_dir)
    optimizer = run.optimizer if with_optimizer else None
    checkpoints.save(run.run_dir / name, state, run.model, optimizer, run.ctx, run.sharded, tag)


def _loader(run: _Run) -> BatchLoader:
    """The training rows in seeded shuffled batches (this rank's slice of each); the plan logged."""
    cfg, prepared = run.recipe.train, run.prepared
    loader = BatchLoader(
        prepared, cfg.batch_size, 0, prepared.n_train, shuffle=True, seed=cfg.seed, in_memory=run.in_memory,
        block_rows=cfg.block_rows, shuffle_blocks=cfg.shuffle_blocks, drop_last=prepared.n_train >= cfg.batch_size,
        rank=run.ctx.rank, world=run.ctx.world, pin_memory=run.device.type == "cuda", sampler=cfg.sampler,
        epochs=cfg.epochs, workers=decode_workers(cfg.loader_workers, run.threads),
        crop=(cfg.crop_scale[0], cfg.crop_scale[1]) if cfg.augment else None, rank_shards=cfg.rank_shards,
    )  # fmt: skip
    plan, plan_warnings = training_plan(run.recipe, prepared, len(loader), run.threads)
    log.info("%s: %s", run.run_dir, plan)
    for w in plan_warnings:
        log.warning("%s", w)
    return loader


def _forward(run: _Run) -> Callable[..., Any]:
    """What the step calls: the model (or its streams), under DDP when distributed, compiled if asked."""
    cfg = run.recipe.train
    forward: Callable[..., Any] = step_forward(run.model, cfg, run.sharded)
    if run.ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [run.device.index] if run.device.type == "cuda" else None
        forward = DDP(step_forward(run.model, cfg, run.sharded), device_ids=ids)
    if cfg.compile:
        forward = torch.compile(forward)
    return forward


def _epochs(
    run: _Run,
    state: _State,
    loader: BatchLoader,
    forward: Callable[..., Any],
    progress: Progress,
    hook: Callable[[int, int], None] | None,
    guard: SigintGuard,
) -> bool:
    """Train from ``state`` to the last epoch. True when Ctrl-C stopped it (among the batches a resumable
    checkpoint is saved, ``state.saved_on_interrupt``; during validation the last epoch's stays)."""
    cfg = run.recipe.train
    start_epoch, start_batch = state.epoch, state.batch
    try:
        for epoch in range(start_epoch, cfg.epochs):
            state.epoch = epoch
            run.model.train()
            skip = start_batch if epoch == start_epoch else 0
            if skip == 0:
                state.accum = _fresh_accum()
            so_far = [state.accum["loss"], state.accum["loss_v"], state.accum["loss_m"]]
            state.sums = torch.tensor(
                so_far, dtype=torch.float64, device=run.device
            )  # a Ctrl-C from here on saves them
            lr = run.optimizer.param_groups[0]["lr"]
            with progress.task(f"epoch {epoch + 1}/{cfg.epochs}", len(loader)) as task:
                task.advance(skip)
                _run_epoch(run, state, state.sums, loader, forward, skip, task, hook, guard)
            state.sums = None
            _end_epoch(run, state, lr, guard)
    except KeyboardInterrupt:
        # Between the last batch and the epoch's checkpoint the previous checkpoint is the valid one.
        # Distributed, the ranks may be stopped at different batches: resume from the last epoch.
        if state.sums is not None and not run.ctx.enabled:
            _store(state.accum, state.sums)
            _save(
                run, runs.LAST, _checkpoint(run, state, state.epoch, state.batch), True, f"e{state.epoch}b{state.batch}"
            )
            state.saved_on_interrupt = True
        return True
    return False


def _run_epoch(
    run: _Run,
    state: _State,
    sums: torch.Tensor,
    loader: BatchLoader,
    forward: Callable[..., Any],
    skip: int,
    task: Any,
    hook: Callable[[int, int], None] | None,
    guard: SigintGuard,
) -> None:
    """The epoch's batches from ``skip`` on: one :func:`train_step` each, running ``sums``, divergence check."""
    cfg, epoch = run.recipe.train, state.epoch
    state.batch = skip
    loss_fn = criterion(cfg, run.prepared.train_counts, epoch).to(run.device)
    cfg = dataclasses.replace(cfg, lam=epoch_lam(cfg, epoch))  # 0 in train.cotrain_after's image-only epochs
    t_last = time.perf_counter()
    for batch in loader.epoch(epoch, skip):
        if hook is not None:
            hook(epoch, state.batch)
        guard.in_step = True
        gen = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch, 1 + state.batch))
        loss, loss_v, loss_m = train_step(
            run.model, forward, run.optimizer, batch, run.device, cfg, gen, run.ctx, run.sharded, loss_fn
        )
        n = batch.global_size
        # Sums stay on the device (no per-step host sync); read when shown or saved.
        sums += torch.stack([loss, loss_v, loss_m if loss_m is not None else torch.zeros_like(loss)]).double() * n
        state.accum["images"] += n
        now = time.perf_counter()
        state.accum["seconds"] += now - t_last
        t_last = now
        state.batch += 1
        guard.step_done()
        if state.batch % SHOW_EVERY == 0 or state.batch == len(loader):
            if not torch.isfinite(sums[0]) or diverged(run.model):
                raise SicotError(
                    f"{run.run_dir}: the loss diverged (not finite) by epoch {epoch + 1}, batch {state.batch}: lower train.lr"
                )
            speed = state.accum["images"] / max(state.accum["seconds"], 1e-9)
            task.advance(1, info=f"loss {sums[0].item() / state.accum['images']:.3f}  {speed:,.0f} img/s")
        else:
            task.advance(1)
    _store(state.accum, sums)


def _epoch_record(
    epoch: int, lr: float, accum: dict[str, Any], val: Any, co_training: bool, lam: float
) -> dict[str, Any]:
    """One ``metrics.jsonl`` line: the epoch's mean losses, speed, and validation scores."""
    images = max(accum["images"], 1)
    record = {
        "epoch": epoch + 1,
        "lr": lr,
        "loss": accum["loss"] / images,
        "loss_v": accum["loss_v"] / images,
        "loss_m": accum["loss_m"] / images if co_training else None,
        "lam": lam if co_training else None,
        "train_images": accum["images"],
        "train_images_per_s": accum["images"] / max(accum["seconds"], 1e-9),
        "epoch_seconds": accum["seconds"],
    }
    if val is not None:
        record |= {f"val_{k}": v for k, v in val.scalars().items()} | {"eval_images_per_s": val.images_per_s}
    return record


def _end_epoch(run: _Run, state: _State, lr: float, guard: SigintGuard) -> None:
    """StepLR, validation, the metrics line, ``checkpoint-best`` (best validation top-1) and ``-last``.

    A Ctrl-C while the epoch's checkpoints and metrics line are written waits for them (``guard``):
    interrupted inside ``torch.save`` the checkpoint would be lost with a traceback, not saved.
    """
    epoch = state.epoch
    with warnings_module.catch_warnings():
        # a run resumed after its epoch's last step takes no optimiser step in this process before the
        # scheduler's, and torch warns that the schedule skips a value; it does not (the scheduler's
        # state came with the checkpoint, and a test checks the resumed lr against an uninterrupted run)
        warnings_module.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        run.scheduler.step()
    val = None
    if run.prepared.n_val:
        val = evaluate_model(
            run.model, run.prepared, run.device, run.recipe, in_memory=run.in_memory, ctx=run.ctx, split="val",
            progress=run.progress,
        )  # fmt: skip
    record = _epoch_record(
        epoch, lr, state.accum, val, run.model.encoder is not None, epoch_lam(run.recipe.train, epoch)
    )
    guard.in_step = True
    state.history.append(record)
    state.batch = 0
    if val is not None and record["val_top1"] > state.best:
        state.best = record["val_top1"]
        if run.recipe.train.keep_best:
            _save(run, runs.BEST, {"meta": run.meta, "epoch": epoch + 1}, False, f"e{epoch + 1}")
    _save(run, runs.LAST, _checkpoint(run, state, epoch + 1, 0), True, f"e{epoch + 1}")
    _on_main(run.ctx, lambda: runs.append_metrics(run.run_dir, record))
    log.info("epoch %d: loss %.4f%s", epoch + 1, record["loss"], f" val top1 {record['val_top1']:.2f}" if val else "")
    chance = math.log(max(run.prepared.num_classes, 2))
    if isinstance(record.get("loss"), float) and record["loss"] > LOSS_ALARM * chance:  # finite, yet diverging
        log.warning(
            "epoch %d: loss %.3g is over %d times a guess's (ln %d classes = %.2f): the run is diverging; lower "
            "train.lr", epoch + 1, record["loss"], LOSS_ALARM, run.prepared.num_classes, chance,
        )  # fmt: skip
    guard.step_done()  # a Ctrl-C that waited stops here, after a complete checkpoint


ADJUST_KEYS = ("logit_adjust_tau", "logit_adjust_val_scores")


def _score_test(run: _Run, state: _State) -> tuple[Any, dict[str, Any]]:
    """Score the test rows once, with the weights ``eval.select`` names; say which and how chosen.

    ``last``: the final weights, no selection. ``best``: ``checkpoint-best.pt``, the epoch with the
    best validation top-1 (validation rows only, never test). With ``eval.logit_adjust = "val"`` the
    classifier of those weights is adjusted first (:func:`_adjust`), unless they already were.
    """
    recipe = run.recipe
    epoch = state.history[-1]["epoch"] if state.history else 0
    if recipe.eval.select == "best":
        best = runs.load_checkpoint(run.run_dir / runs.BEST)
        checkpoints.restore(best, run.run_dir / runs.BEST, run.model)
        epoch = int(best.get("epoch", epoch))
        state.logit_adjust = {k: best[k] for k in ADJUST_KEYS if k in best}
    if recipe.eval.logit_adjust == "val" and not state.logit_adjust:
        state.logit_adjust = _adjust(run)
        _save_adjusted(run, state, epoch)
    final = evaluate_model(
        run.model, run.prepared, run.device, recipe, in_memory=run.in_memory, ctx=run.ctx, split="test",
        progress=run.progress,
    )  # fmt: skip
    selected_on = "val" if recipe.eval.select == "best" else None
    return final, test_selection(run.prepared, recipe.eval.select, epoch, selected_on) | state.logit_adjust


def _adjust(run: _Run) -> dict[str, Any]:
    """Post-hoc logit adjustment of the model's classifier: tau chosen on the validation rows."""
    p = run.prepared
    logits, labels = split_logits(run.model, p, run.device, run.recipe, "val", run.in_memory)
    tau, scores = choose_tau(logits, labels, run.recipe.eval.logit_adjust_taus, p.train_counts)
    run.model.classifier.float()  # training is over: a bf16-stored classifier is adjusted (and saved) in fp32
    with torch.no_grad():
        run.model.classifier.bias.copy_(adjusted_bias(run.model.classifier.bias, tau, p.train_counts))
    log.info("post-hoc logit adjustment: tau %g (class-averaged validation top-1 %s)", tau, scores)
    return {"logit_adjust_tau": tau, "logit_adjust_val_scores": scores}


def _save_adjusted(run: _Run, state: _State, epoch: int) -> None:
    """The scored checkpoint keeps the adjusted classifier (predict/export use it) and says so, for a resume."""
    if run.recipe.eval.select == "best":
        _save(run, runs.BEST, {"meta": run.meta, "epoch": epoch} | state.logit_adjust, False, "adjusted")
    else:
        _save(run, runs.LAST, _checkpoint(run, state, run.recipe.train.epochs, 0), True, "adjusted")


def _finish(run: _Run, state: _State) -> TrainResult:
    """The test rows scored once (``eval.select``), predictions and ``summary.json`` written."""
    final, selection = _score_test(run, state)

    def write_outputs() -> None:
        write_predictions(run.run_dir / runs.PREDICTIONS, final)
        runs.finish(run.run_dir, state.history, final.per_class(), final.scalars() | selection)

    _on_main(run.ctx, write_outputs)
    if run.ctx.is_main:
        log.info("%s", _checkpoint_note(run.run_dir))
    last = state.history[-1] if state.history else {}
    return TrainResult(run.run_dir, state.history, test={**last, **final.scalars(), **selection})
