"""Resuming a run from what it recorded, not from what the command line happens to say.

``sicot train --resume --run-dir DIR`` continues with the run's own resolved recipe and prepared
file, both saved in ``DIR/config.json``; that one command is all an interrupted run needs. A
``--recipe`` or ``section.key=value`` overrides given with it are compared with the saved recipe:
a difference that changes what the run computes (learning rate, batch size, epochs, lambda,
augmentation...) is refused, naming each key with its saved and asked-for value, unless
``--allow-changes`` is passed; then the new recipe is saved in ``config.json`` and the change is
recorded there under ``changes`` (when, and each key's old and new value), so the run still
describes itself.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sicot_cli import runs
from sicot_cli.config import PREPARE_HOW, Recipe, apply_overrides, load_recipe, recipe_from_dict
from sicot_cli.errors import SicotError
from sicot_cli.fsutil import write_json

if TYPE_CHECKING:
    from sicot_cli.data.dataset import Prepared

log = logging.getLogger(__name__)

# Settings that change nothing a run computes: where it runs (another device may differ in the
# last bits, as any two devices do), evaluation batch size, compilation and memory layout, where
# runs are kept, and the sections only `prepare` reads (the prepared file itself is checked by
# its fingerprint on resume). Everything else is part of the result.
NEUTRAL = (
    "train.device",
    "train.eval_batch_size",
    "train.compile",
    "train.channels_last",
    "train.runs_dir",
    "data.",
    "text.",
    "embed.",
)


def _flat(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and key != "encoder_options":
            out.update(_flat(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def changes(saved: dict[str, Any], wanted: dict[str, Any], neutral: Collection[str] = NEUTRAL) -> dict[str, list[Any]]:
    """``key -> [saved, wanted]`` for every setting that differs, but the ``neutral`` keys (a name
    ending in "." stands for its whole section): by default, every result-changing setting."""
    a, b = _flat(saved), _flat(wanted)
    return {
        k: [a.get(k), b.get(k)]
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k) and not any(k == n or (n.endswith(".") and k.startswith(n)) for n in neutral)
    }


def described(diff: dict[str, list[Any]]) -> str:
    """``key: old -> new; ...``: how every error about differing settings names them."""
    return "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in diff.items())


# Keys that say how a run is executed on this machine, not what it computes: a run continued or
# reused by `sicot ablate` may differ in these from the run that started it.
HOW_IT_RUNS = ("train.threads", "train.loader_workers", "train.in_memory", "train.memory_limit_gb", "name")
# Keys that change nothing in a run without a text encoder (the baseline: its loss is CE(x_v) alone),
# so a baseline is one run under every preset, lambda and co-training variant.
TEXT_ONLY = (
    "preset",
    "model.encoder_options",
    "model.freeze_embeddings",
    "model.semantic_norm",
    "model.mixed_trains_classifier",
    "train.lam",
    "train.normalize_loss",
    "train.cotrain_after",
    "train.distill",
    "train.distill_temperature",
    "train.mixed_step",
)


def check_same_settings(run_dir: Path, saved: dict[str, Any], recipe: Recipe, what_to_do: str) -> None:
    """Refuse to continue or reuse a run whose saved recipe computes something else than ``recipe``.

    Raises:
        SicotError: naming each differing key with the run's and the asked-for value, then ``what_to_do``.
    """
    ignored = HOW_IT_RUNS + (TEXT_ONLY if recipe.model.encoder == "none" else ())
    diff = {
        k: v
        for k, v in changes(recipe_from_dict(saved, str(run_dir / runs.CONFIG)).to_dict(), recipe.to_dict()).items()
        if not k.startswith(ignored)
    }
    if diff:
        raise SicotError(
            f"{run_dir}: holds a run trained with other settings than asked for ({described(diff)}): {what_to_do}"
        )


def resume_recipe(
    run_dir: Path, recipe: Path | None, overrides: list[str], allow_changes: bool = False
) -> tuple[Recipe, Path]:
    """The recipe and prepared file to resume ``run_dir`` with.

    Args:
        run_dir: an existing run directory.
        recipe: a ``--recipe`` given with ``--resume`` (compared with the saved one), or None.
        overrides: ``section.key=value`` given with ``--resume``, applied to the saved recipe
            (or to ``recipe`` when given).
        allow_changes: accept result-changing differences, and record them in ``config.json``.

    Returns:
        The recipe, and the prepared file the run was trained on.

    Raises:
        SicotError: a result-changing difference without ``allow_changes``, or a bad run directory.
    """
    config = runs.read_config(run_dir)
    path = run_dir / runs.CONFIG
    saved = config["recipe"]
    wanted = (
        load_recipe(recipe, overrides)
        if recipe is not None
        else apply_overrides(saved, overrides, f"{path} with the command-line overrides")
    )
    # compared as resolved recipes: a key a newer sicot added is at its default in both; how the run
    # runs (threads, loader workers, memory) is not its result, as ablate's resume already counts it
    diff = {
        k: v
        for k, v in changes(recipe_from_dict(saved, f"{path}, field recipe").to_dict(), wanted.to_dict()).items()
        if not k.startswith(HOW_IT_RUNS)
    }
    if diff and not allow_changes:
        raise SicotError(
            f"{run_dir}: resuming with a recipe other than the run's changes its result ({described(diff)}): "
            f"resume with `sicot train --resume --run-dir {run_dir}` alone, or pass --allow-changes to accept and record the change"
        )
    if diff:
        _check_change_applies(run_dir, diff, config.get("encoder"))
        if "train.epochs" in diff:
            _warn_moved_schedules(run_dir, recipe_from_dict(saved, str(path)), wanted)
        when = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        write_json(
            path,
            {
                **config,
                "recipe": wanted.to_dict(),
                "changes": [*config.get("changes", []), {"at": when, "settings": diff}],
            },
        )
    return wanted, Path(config["data"])


def _warn_moved_schedules(run_dir: Path, old: Recipe, new: Recipe) -> None:
    """Schedules given as a fraction of ``train.epochs`` are re-drawn over the new count for the
    epochs still to train (the trained ones keep theirs): say where each one moves."""
    a, b = old.train, new.train
    done = len(runs.read_metrics(run_dir))
    moved = []
    if new.model.encoder != "none" and (a.cotrain_after or b.cotrain_after):
        moved.append(("train.cotrain_after", "co-training", a.image_only_epochs, b.image_only_epochs))
    if a.reweight == "drw" or b.reweight == "drw":
        moved.append(("train.drw_start", "re-weighting", a.drw_epoch, b.drw_epoch))
    for key, what, was, now in moved:
        if was != now:
            log.warning(
                "%s: train.epochs %d -> %d moves %s's start of %s from epoch %d to epoch %d; the %d epoch(s) "
                "trained keep the schedule they had%s",
                run_dir, a.epochs, b.epochs, key, what, was + 1, now + 1, done,
                f" ({_epochs(done + 1, now)} train{'s' if now == done + 1 else ''} without {what} again)"
                if was <= done < now
                else "",
            )  # fmt: skip
    if b.sampler == "progressive":
        log.warning(
            "%s: train.epochs %d -> %d stretches the progressive sampler: epoch t now draws at t/%d of the way "
            "to class-balanced (the %d epoch(s) trained drew at t/%d)",
            run_dir, a.epochs, b.epochs, b.epochs, done, a.epochs,
        )  # fmt: skip


def _epochs(first: int, last: int) -> str:
    return f"epoch {first}" if first == last else f"epochs {first}-{last}"


# Keys that decide which weights the model has: a checkpoint of one cannot continue as another.
# (model.encoder covers model.encoder_options; TEXT_ONLY's keys change no weight of a baseline.)
MODEL_SHAPE = ("model.encoder", "model.backbone", "model.semantic_norm")


def _check_change_applies(run_dir: Path, diff: dict[str, list[Any]], encoder: str | None) -> None:
    """``--allow-changes`` changes the rest of a run: refused on a finished run, for the model's
    shape (:data:`MODEL_SHAPE`: the checkpoint holds other weights), and
    for an epoch count the run has already reached (its config would claim epochs it never trained).
    Checked before ``config.json`` is rewritten; ``encoder``: the run's, as its config records it."""
    if runs.is_finished(run_dir):
        raise SicotError(
            f"{run_dir}: has finished, so --allow-changes would record settings it never trained with: "
            "train a new run (`sicot train --run-dir NEW_DIR ...`)"
        )
    baseline = "model.encoder" not in diff and encoder == "none"
    shape = [k for k in diff if k.startswith(MODEL_SHAPE) and not (baseline and k.startswith(TEXT_ONLY))]
    if shape:
        raise SicotError(
            f"{run_dir}: --allow-changes cannot change {described({k: diff[k] for k in shape})}: its checkpoint "
            "holds the weights of the model it started with; train a new run (`sicot train --run-dir NEW_DIR ...`), "
            f"which may start its visual stream from this one's with model.pretrained={run_dir}"
        )
    if "train.epochs" in diff:
        done = len(runs.read_metrics(run_dir))
        if diff["train.epochs"][1] <= done:
            raise SicotError(
                f"{run_dir}: has trained {done} epochs already, so train.epochs = {diff['train.epochs'][1]} would "
                f"end it where it stands: ask for more than {done}, or use the run as it is"
            )


def check_same_content(prepared: Prepared, config: dict[str, Any], run_dir: Path) -> None:
    """A resumed run continues on the data it started with: refuse a prepared file that holds other data.

    A run without a text encoder is checked on its labels, splits and image size only (it reads no
    title): baseline runs copied into another ablation (docs/demo-pretraining.md) keep working across title variants.
    """
    saved_sums = config.get("content")
    if not isinstance(saved_sums, dict):
        return  # a run from before data checksums: the fingerprint is all there is
    key = "labels" if config.get("encoder") == "none" else "data"
    want = saved_sums.get(key)
    if not want or want == prepared.data_checksum(text=key == "data"):
        return
    if want == prepared.checksum_without_pixels(text=key == "data"):  # recorded by a sicot that did not hash pixels
        log.warning(
            "%s: recorded before data checksums covered the images: %s holds the same labels, splits and text, "
            "and its images are not checked against the run's",
            run_dir, prepared.path,
        )  # fmt: skip
        return
    sections = ("data",) if key == "labels" else ("data", "text", "embed")
    saved = {k: v for k, v in (config.get("recipe") or {}).items() if k in sections}
    now = {k: v for k, v in prepared.recipe.items() if k in sections}
    diff = changes(saved, now, neutral=PREPARE_HOW)  # how prepare ran is not what the file holds
    what = described(diff) if diff else "the same settings: the source's images or titles changed"
    raise SicotError(
        f"{run_dir}: {prepared.path} holds other data than the run started on ({what}), and a run continues on "
        "the data it started with: give it that data (--data), or train a new run (`--run-dir NEW_DIR`)"
    )
