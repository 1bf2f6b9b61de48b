"""``sicot decouple``: the second stage of decoupled classifier learning on a finished run.

Kang et al. (ICLR 2020) learn the representation with instance sampling, then fix it and re-balance
only the classifier. The second stage here is a run like any other: its own directory (default
``<run>-<method>``), ``config.json`` naming the run it started from (``stage.from_run``),
``metrics.jsonl``, ``checkpoint-last.pt`` (an image-only model: the first run's visual stream and
the new classifier, which ``predict``, ``export`` and ``serve`` take as they take any run),
``predictions.h5`` and ``summary.json``; an interrupted one is resumed with ``--resume``.

The first run's visual stream is frozen: its features of the training and validation rows are
computed once (eval mode, no augmentation, the weights ``eval.select`` scored) and kept in
``features.pt``, so the stage costs one forward pass over the data plus classifier steps that take
seconds on a CPU. Kang et al. re-train cRT with augmentation through the frozen network; with cached
features the classifier sees each training image's centre view only (documented in docs/long-tail.md).

- ``crt``: a classifier re-initialised (seeded by ``train.seed``) and trained with
  ``decouple.sampler`` (class-balanced), SGD with cosine-annealed ``decouple.lr``;
- ``lws``: the first run's classifier kept, one scale per class learned the same way
  (``w_j <- f_j w_j``, bias kept);
- ``tau_norm``: ``w_j <- w_j / ||w_j||^tau``, no bias (Kang et al.'s tau-normalised classifier);
- ``logit_adjust``: post-hoc logit adjustment (Menon et al., ICLR 2021): ``b_j <- b_j - tau log prior_j``.

``tau_norm`` and ``logit_adjust`` take the tau of ``decouple.taus`` with the best class-averaged
top-1 on the VALIDATION rows (the classes that have validation rows); the test rows are scored once,
at the end, as every run's are.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sicot_cli import checkpoints, runs
from sicot_cli.config import Recipe, apply_overrides
from sicot_cli.data.dataset import Prepared, val_rows_hint
from sicot_cli.data.loader import epoch_seed
from sicot_cli.data.sampler import draw_rows
from sicot_cli.distributed import DistContext
from sicot_cli.errors import SicotError
from sicot_cli.evaluate import (
    evaluate_model,
    load_run_model,
    resolve_device,
    rows_output,
    use_in_memory,
    write_predictions,
)
from sicot_cli.fsutil import atomic_path
from sicot_cli.losses import adjusted_bias, val_balanced_top1
from sicot_cli.model import SICoT, diverged, first_nonfinite
from sicot_cli.progress import NullProgress, Progress
from sicot_cli.threads import set_threads
from sicot_cli.train import SigintGuard, TrainResult, run_config, run_meta, test_selection

log = logging.getLogger(__name__)

FEATURES = "features.pt"
METHOD_NAMES = {"crt": "crt", "lws": "lws", "tau_norm": "tau-norm", "logit_adjust": "posthoc-la"}
_ALLOWED = ("decouple.", "train.device", "train.threads", "train.eval_batch_size")


@dataclass
class _Stage:
    """What the second stage works with."""

    recipe: Recipe
    prepared: Prepared
    model: SICoT  # image-only: the first run's visual stream and (for lws/tau_norm/logit_adjust) classifier
    device: torch.device
    run_dir: Path
    source: Path
    source_encoder: str  # the first run's encoder: what its training needed (the stage's report label)


def decouple(
    source: str | Path,
    overrides: list[str] | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    data: str | Path | None = None,
) -> TrainResult:
    """Run the second stage ``decouple.method`` on the finished run ``source``.

    Args:
        source: a finished run directory (any encoder: the second stage of a co-trained run keeps
            its visual stream and drops the text stream, which inference never uses).
        overrides: ``decouple.*`` keys (and ``train.device``, ``train.threads``,
            ``train.eval_batch_size``); the rest of the recipe is the first run's.
        run_dir: the new run's directory (default ``<source>-<method name>``).
        resume: continue an interrupted second stage.
        progress: progress reporting.
        data: the prepared file (default: the first run's; checked to be the same dataset).
    """
    if not Path(source).exists():  # named as typed: a link to nothing is not named by its target
        raise SicotError(f"{source}: no such folder (decouple starts from a run that `sicot train` finished)")
    stage = _set_up(Path(source).resolve(), overrides or [], run_dir, data)
    d = stage.recipe.decouple
    config = run_config(stage.recipe, stage.prepared) | {
        "encoder": stage.source_encoder,
        "stage": {"method": d.method, "from_run": str(stage.source)},
    }
    with runs.hold(stage.run_dir):  # a second process writing this stage is refused at once
        return _run_stage(stage, config, resume, progress)


def _run_stage(stage: _Stage, config: dict[str, Any], resume: bool, progress: Progress | None) -> TrainResult:
    """:func:`decouple` once the stage's directory is this process's."""
    d = stage.recipe.decouple
    if resume and (stage.run_dir / runs.CONFIG).is_file():
        _check_same_stage(stage.run_dir, config)
    if runs.start_run(stage.run_dir, config, resume) and runs.is_finished(stage.run_dir):
        final = runs.read_summary(stage.run_dir).get("final")
        return TrainResult(stage.run_dir, runs.read_metrics(stage.run_dir), skipped=True, test=final)
    feats = _features(stage, progress)
    if d.method in ("crt", "lws"):
        history = _train_classifier(stage, feats, progress or NullProgress())
    else:
        history = [_choose_tau(stage, feats)]
        runs.write_metrics(stage.run_dir, history)
        _save(stage, {"epoch": 1, "history": history}, None)
    return _finish(stage, history, progress)


def _moved_beside(run_dir: Path, theirs: Any, mine: Any) -> bool:
    """The first run recorded as ``theirs`` and the one given now are the same run moved with its stage:
    the same name, and the one given sits beside the stage's directory (an ablation's folder moved or
    copied elsewhere, ``<out>/none-s0`` beside ``<out>/none-crt-s0``)."""
    if not isinstance(theirs, str) or not isinstance(mine, str) or theirs == mine:
        return False
    given = Path(mine).absolute()
    return Path(theirs).name == given.name and given.parent.resolve() == run_dir.absolute().parent.resolve()


def _check_same_stage(run_dir: Path, config: dict[str, Any]) -> None:
    """``--resume`` continues the second stage the directory holds: same first run, method and decouple settings."""
    old = runs.read_config(run_dir)
    if not old.get("stage"):
        raise SicotError(
            f"{run_dir}: holds a training run (`sicot train`), not a second stage: --resume continues a second "
            "stage in its own directory; choose a new --run-dir (it must not be the first run's)"
        )
    theirs = {f"stage.{k}": v for k, v in (old.get("stage") or {}).items()}
    theirs |= {f"decouple.{k}": v for k, v in (old.get("recipe", {}).get("decouple") or {}).items()}
    mine = {f"stage.{k}": v for k, v in config["stage"].items()}
    mine |= {f"decouple.{k}": v for k, v in config["recipe"]["decouple"].items()}
    if _moved_beside(run_dir, theirs.get("stage.from_run"), mine.get("stage.from_run")):
        theirs["stage.from_run"] = mine["stage.from_run"]
    changed = [
        f"{k} {theirs.get(k)!r} -> {mine.get(k)!r}"
        for k in sorted(set(mine) | set(theirs))
        if mine.get(k) != theirs.get(k)
    ]
    if changed:
        raise SicotError(
            f"{run_dir}: holds another second stage than this command asks for ({'; '.join(changed)}): resume it "
            "with the command that started it, or use another --run-dir"
        )


def _set_up(source: Path, overrides: list[str], run_dir: str | Path | None, data: str | Path | None) -> _Stage:
    if not runs.is_run(source) or not runs.is_finished(source):
        raise SicotError(f"{source}: not a finished run (decouple starts from a run that `sicot train` finished)")
    config, final = runs.read_config(source), runs.read_summary(source).get("final", {})
    if config.get("stage"):
        first = config["stage"].get("from_run", "its first run")
        raise SicotError(f"{source}: is itself a second stage; start from the run it was made from ({first})")
    if final.get("logit_adjust_tau") is not None:
        raise SicotError(
            f"{source}: its classifier was already adjusted at the end of training (eval.logit_adjust = val); "
            "a second stage starts from a run trained with eval.logit_adjust = off"
        )
    bad = [o for o in overrides if not o.split("=", 1)[0].strip().startswith(_ALLOWED)]
    if bad:
        raise SicotError(
            f"override {bad[0]!r}: a second stage keeps its first run's recipe; only decouple.*, "
            "train.device, train.threads and train.eval_batch_size may be set"
        )
    checkpoint = final.get("checkpoint", "last")
    first, prepared, model, _ = load_run_model(source, checkpoint if checkpoint in ("last", "best") else "last", data)
    recipe = apply_overrides(first.to_dict(), overrides, "decouple overrides")
    recipe.model.encoder, recipe.model.pretrained = "none", ""
    set_threads(recipe.train.threads)
    model.encoder = model.semantic_norm = None  # image-only from here on
    device = resolve_device(recipe.train.device)
    model.to(device).eval()
    d = recipe.decouple
    if d.method in ("tau_norm", "logit_adjust") and len(d.taus) > 1 and prepared.n_val == 0:
        raise SicotError(
            f"{prepared.path}: has no validation rows, and {d.method} chooses tau on them: "
            f"{val_rows_hint(prepared.recipe['data'].get('val_fraction', 0))}, or fix tau (decouple.taus=[1.0])"
        )
    name = f"{source.name}-{METHOD_NAMES[recipe.decouple.method]}"
    run_dir = Path(run_dir) if run_dir else source.parent / name
    return _Stage(recipe, prepared, model, device, run_dir, source, config["encoder"])


@torch.no_grad()
def _features(stage: _Stage, progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """The frozen visual stream's features of the training and validation rows (computed once, kept in ``features.pt``)."""
    path = stage.run_dir / FEATURES
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged cache is recomputed, never trusted
            cached = None
        if _fits(cached, stage):
            return cached
        log.warning("%s: unreadable or not this run's features, computing them again", path)
    out: dict[str, torch.Tensor] = {}
    p, cfg, m = stage.prepared, stage.recipe.train, stage.model
    for split in ("train", "val"):
        x, y = rows_output(
            m.features, m, p, stage.device, cfg, p.split_range(split), m.feat_dim, use_in_memory(cfg, p),
            progress, f"features of the {'training' if split == 'train' else 'validation'} images",
        )  # fmt: skip
        out[f"{split}_x"], out[f"{split}_y"] = x, y
    clf = stage.model.classifier
    out["weight"], out["bias"] = clf.weight.detach().cpu().clone(), clf.bias.detach().cpu().clone()
    with atomic_path(path) as tmp:
        torch.save(out, tmp)
    return out


def _fits(cached: object, stage: _Stage) -> bool:
    """A features cache of this stage's data and model: the keys, shapes, label range and finite
    values :func:`_features` writes (a file from elsewhere or a damaged one is computed again)."""
    p, clf = stage.prepared, stage.model.classifier
    if not isinstance(cached, dict) or not all(isinstance(cached.get(k), torch.Tensor) for k in FEATURE_KEYS):
        return False
    dim, classes = clf.weight.shape[1], p.num_classes
    ok = cached["weight"].shape == (classes, dim) and cached["bias"].shape == (classes,)
    for split in ("train", "val"):
        x, y = cached[f"{split}_x"], cached[f"{split}_y"]
        lo, hi = p.split_range(split)
        ok = ok and x.shape == (hi - lo, dim) and y.shape == (hi - lo,) and not y.is_floating_point()
        ok = ok and (len(y) == 0 or (int(y.min()) >= 0 and int(y.max()) < classes))
    return bool(ok) and first_nonfinite((k, cached[k]) for k in FEATURE_KEYS) is None


FEATURE_KEYS = ("train_x", "train_y", "val_x", "val_y", "weight", "bias")


def adjusted_classifier(
    method: str, weight: torch.Tensor, bias: torch.Tensor, tau: float, train_counts: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier of ``tau_norm`` or ``logit_adjust`` at ``tau``."""
    if method == "tau_norm":
        norm = weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return weight / norm.pow(tau), torch.zeros_like(bias)
    return weight.clone(), adjusted_bias(bias, tau, train_counts)


def _choose_tau(stage: _Stage, feats: dict[str, torch.Tensor]) -> dict[str, Any]:
    """tau_norm / logit_adjust: every tau of ``decouple.taus`` scored on validation; the best one set."""
    d, p = stage.recipe.decouple, stage.prepared
    scores: list[float | None] = []
    for tau in d.taus if len(feats["val_y"]) else []:  # no validation rows: one fixed tau (checked in _set_up)
        w, b = adjusted_classifier(d.method, feats["weight"], feats["bias"], tau, p.train_counts)
        scores.append(val_balanced_top1(feats["val_x"] @ w.T + b, feats["val_y"], p.num_classes))
    best = int(np.argmax(scores)) if scores else 0  # the first (smallest listed) tau among equal scores
    w, b = adjusted_classifier(d.method, feats["weight"], feats["bias"], d.taus[best], p.train_counts)
    with torch.no_grad():
        stage.model.classifier.weight.copy_(w)
        stage.model.classifier.bias.copy_(b)
    score = scores[best] if scores else None
    shown = f"{score:.2f}" if score is not None else "none: no validation rows"
    log.info("%s: tau %g (class-averaged validation top-1 %s)", stage.run_dir, d.taus[best], shown)
    return {
        "epoch": 1,
        "tau": d.taus[best],
        "val_balanced_top1": score,
        "taus": list(d.taus),
        "val_scores": scores,
    }


class _Scaled(torch.nn.Module):
    """What the second stage trains: a new classifier (cRT) or per-class scales of the old one (LWS)."""

    def __init__(self, method: str, weight: torch.Tensor, bias: torch.Tensor, seed: int) -> None:
        super().__init__()
        self.method = method
        if method == "crt":
            torch.manual_seed(seed)
            self.linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        else:
            self.register_buffer("w0", weight.clone())
            self.register_buffer("b0", bias.clone())
            self.scale = torch.nn.Parameter(torch.ones(weight.shape[0]))

    def classifier(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.method == "crt":
            return self.linear.weight, self.linear.bias
        return self.scale[:, None] * self.w0, self.b0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.classifier()
        return F.linear(x, w, b)


def _train_classifier(stage: _Stage, feats: dict[str, torch.Tensor], progress: Progress) -> list[dict[str, Any]]:
    """cRT / LWS: SGD on the cached features with ``decouple.sampler``, one checkpoint per epoch."""
    d, seed = stage.recipe.decouple, stage.recipe.train.seed
    head = _Scaled(d.method, feats["weight"], feats["bias"], seed)
    opt = torch.optim.SGD(head.parameters(), lr=d.lr, momentum=d.momentum, weight_decay=d.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=d.epochs)
    history: list[dict[str, Any]] = []
    if (stage.run_dir / runs.LAST).is_file():  # resume after the last finished epoch
        state = runs.load_checkpoint(stage.run_dir / runs.LAST)
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer_head"])
        sched.load_state_dict(state["scheduler"])
        history = state["history"]
        runs.write_metrics(stage.run_dir, history)
        _set_classifier(stage, head)  # the stage's classifier, also when every epoch was already done
    with SigintGuard() as guard:
        while len(history) < d.epochs:
            _classifier_epoch(stage, feats, (head, opt, sched), history, guard, progress)
    return history


def _classifier_epoch(
    stage: _Stage,
    feats: dict[str, torch.Tensor],
    trained: tuple[_Scaled, torch.optim.Optimizer, Any],
    history: list[dict[str, Any]],
    guard: SigintGuard,
    progress: Progress,
) -> None:
    """One cRT / LWS epoch (the head, its optimiser and scheduler); a Ctrl-C while its metrics line and
    checkpoint are written waits for them."""
    head, opt, sched = trained
    d, p, seed = stage.recipe.decouple, stage.prepared, stage.recipe.train.seed
    x, y = feats["train_x"], feats["train_y"]
    epoch = len(history)
    rng = np.random.default_rng(epoch_seed(seed, epoch, 7))
    if d.sampler == "instance":
        order = rng.permutation(len(y))
    else:
        order = rng.permutation(draw_rows(d.sampler, y.numpy(), p.num_classes, rng, epoch, d.epochs))
    total, lr = 0.0, opt.param_groups[0]["lr"]
    with progress.task(f"{d.method} epoch {epoch + 1}/{d.epochs}", math.ceil(len(order) / d.batch_size)) as task:
        for i in range(0, len(order), d.batch_size):
            idx = torch.from_numpy(order[i : i + d.batch_size])
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            task.advance(1)
    if not math.isfinite(total) or diverged(head):
        # as train's check: a NaN classifier's argmax is a score, and the stage would be "finished"
        raise SicotError(
            f"{stage.run_dir}: the loss diverged (not finite) in {d.method} epoch {epoch + 1}: lower decouple.lr "
            "and train the stage into a new --run-dir"
        )
    sched.step()
    with torch.no_grad():
        val = val_balanced_top1(head(feats["val_x"]), feats["val_y"], p.num_classes)
    guard.in_step = True
    history.append({"epoch": epoch + 1, "lr": lr, "loss": total / max(len(order), 1), "val_balanced_top1": val})
    runs.append_metrics(stage.run_dir, history[-1])
    _set_classifier(stage, head)
    state = {"head": head.state_dict(), "optimizer_head": opt.state_dict(), "scheduler": sched.state_dict()}
    _save(stage, {"epoch": epoch + 1, "history": history} | state, None)
    guard.step_done()  # a Ctrl-C that waited stops here, after a complete checkpoint


def _set_classifier(stage: _Stage, head: _Scaled) -> None:
    w, b = head.classifier()
    with torch.no_grad():
        stage.model.classifier.weight.copy_(w)
        stage.model.classifier.bias.copy_(b)


def _save(stage: _Stage, state: dict[str, Any], optimizer: torch.optim.Optimizer | None) -> None:
    """``checkpoint-last.pt``: the image-only model (loadable as any run's) and the stage's own state."""
    state = copy.copy(state) | {"meta": run_meta(stage.recipe, stage.prepared, stage.model)}
    checkpoints.save(stage.run_dir / runs.LAST, state, stage.model, optimizer, DistContext(), False, "stage2")


def _finish(stage: _Stage, history: list[dict[str, Any]], progress: Progress | None = None) -> TrainResult:
    """The test rows scored once with the final classifier; predictions and ``summary.json``."""
    recipe, p = stage.recipe, stage.prepared
    in_memory = use_in_memory(recipe.train, p)
    final = evaluate_model(stage.model, p, stage.device, recipe, in_memory=in_memory, progress=progress)
    d = recipe.decouple
    # tau chosen among several on validation; one tau (posthoc-la(tau=1)) is fixed, nothing chosen
    chose = d.method in ("tau_norm", "logit_adjust") and len(d.taus) > 1
    epoch = history[-1]["epoch"] if history else 0
    selection = test_selection(p, "last", epoch, "val" if chose else None) | {"stage": d.method}
    if "tau" in history[-1]:
        selection["tau"] = history[-1]["tau"]
    write_predictions(stage.run_dir / runs.PREDICTIONS, final)
    runs.finish(stage.run_dir, history, final.per_class(), final.scalars() | selection)
    return TrainResult(stage.run_dir, history, test={**final.scalars(), **selection})
