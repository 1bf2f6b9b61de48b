"""``sicot ablate``: the baseline and every encoder, per seed, under one ablation directory.

Each (encoder, seed) is one ordinary run directory ``<ablation>/<encoder>-s<seed>/`` trained by
:func:`sicot_cli.train.train` with the same prepared data, optimiser and, per seed, the same data
order and initialisation. Finished runs are skipped and an interrupted one is resumed, so the
command can simply be run again after a crash. ``ablation.json`` records the recipe; a later call
with a different recipe (other than the encoder list and seeds) is refused rather than mixing runs
of two settings in one table.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sicot_cli import methods, runs
from sicot_cli.config import FILE_REMEDY, PREPARE_HOW, PRESETS, Recipe, adopt_prepared, recipe_from_dict
from sicot_cli.errors import SicotError
from sicot_cli.fsutil import ensure_dir, json_file_state, write_json
from sicot_cli.progress import NullProgress, Progress
from sicot_cli.resume import changes, check_same_settings, described
from sicot_cli.train import TrainResult, train

if TYPE_CHECKING:
    from sicot_cli.data.dataset import Prepared

log = logging.getLogger(__name__)

PLAN = "ablation.json"
BASELINE = "none"


@dataclass
class RunStatus:
    """One (encoder, method, seed) of the ablation and what happened to it in this call."""

    encoder: str
    seed: int
    run_dir: Path
    state: str  # "trained", "resumed", "skipped" (already finished), "interrupted"
    final: dict[str, Any]
    method: str = methods.CE


def _shared_recipe(recipe: Recipe) -> dict[str, Any]:
    d = copy.deepcopy(recipe.to_dict())
    d["model"].pop("encoder")
    d["train"].pop("seed")
    d["train"].pop("threads", None)  # how fast, not what: a rerun may use other --threads
    return d


def run_name(encoder: str, seed: int, preset: str | None = None, method: str = methods.CE) -> str:
    """``<encoder>[-<preset>][-<method>]-s<seed>``: the preset when not the recipe's, the method when not CE."""
    parts = [encoder] + ([preset] if preset is not None else []) + ([method] if method != methods.CE else [])
    return "-".join(parts) + f"-s{seed}"


def with_preset(recipe: Recipe, preset: str) -> Recipe:
    """A copy of ``recipe`` with ``preset``'s keys set (they replace the recipe's own values)."""
    r = copy.deepcopy(recipe)
    r.preset = preset
    _set_keys(r, PRESETS[preset])
    return r


def _set_keys(r: Recipe, keys: dict[str, Any]) -> None:
    """Set dotted ``section.key`` values on ``r`` (in place)."""
    for dotted, value in keys.items():
        section, key = dotted.split(".")
        setattr(getattr(r, section), key, value)


def default_dir(recipe: Recipe) -> Path:
    return Path(recipe.train.runs_dir) / f"ablate-{recipe.name}"


def ablate(
    recipe: Recipe,
    encoders: list[str],
    seeds: list[int],
    out: str | Path | None = None,
    progress: Progress | None = None,
    on_run: Callable[[RunStatus], None] | None = None,
    data: str | Path | None = None,
    presets: list[str] | None = None,
    on_start: Callable[[str, int, int, Recipe], None] | None = None,
    method_names: list[str] | None = None,
    data_remedy: str | None = FILE_REMEDY,
    report_figures: bool | None = None,
) -> tuple[Path, list[RunStatus]]:
    """Train (or skip, or resume) the baseline and each encoder, under each method, for each seed.

    With ``presets`` (e.g. ``["sicot", "paper"]``) every encoder is trained under each preset, side
    by side against the one baseline (which no co-training key changes); runs of a preset other
    than the recipe's are named ``<encoder>-<preset>-s<seed>`` and reported as ``encoder[preset]``.
    With ``method_names`` (sicot_cli.methods, e.g. ``["ce", "la-loss", "crt"]``) every encoder,
    the baseline included, is trained with each training method, and each second stage runs on
    the run of its training part (``crt`` on the CE run): ``<encoder>-<method>-s<seed>``.

    Args:
        recipe: the resolved recipe (``model.encoder`` and ``train.seed`` are set per run).
        encoders: encoder names; the baseline is always included.
        seeds: the seeds.
        out: the ablation directory (default ``<train.runs_dir>/ablate-<name>``).
        progress: progress reporting for each run.
        on_run: called after each run (the CLI's live table).
        data: the prepared file (default ``data.out``; prepared first when missing).
        on_start: called before each run as ``on_start(run name, index, number of runs, recipe)``
            (the CLI's progress: which run trains, and the ETA of the whole ablation).
        method_names: long-tail methods (default: ``["ce"]``, the paper's training only).
        data_remedy: what the warning about a prepared file made with other settings advises
            (default: prepare the recipe's own file or pass its --data; None: no warning).
        report_figures: the caller writes the report into the folder at the end (with the figures if
            True): its files' names are checked before the first run (None: no report follows).

    Returns:
        The ablation directory and the status of every run, in training order.
    """
    presets = _check_args(recipe, seeds, presets, method_names)
    plans = _method_plan(method_names or [methods.CE])
    recipe, data_path, prepared = _prepared(recipe, data, progress, data_remedy)
    _check_stages(plans, recipe, data_path, prepared.n_val)
    root = Path(out) if out is not None else default_dir(recipe)
    with runs.hold(root, "--out"):  # a second ablation into the same folder is refused at once
        jobs = _jobs(recipe, root, encoders, seeds, presets, plans)
        _check_out_folder(root, jobs)
        if report_figures is not None:
            from sicot_cli.report import check_report_files

            check_report_files(root, report_figures)
        _write_plan(root, recipe, encoders, seeds, presets, [m.name for m in plans], jobs, (data_path, prepared))
        return root, _run_jobs(jobs, data_path, progress, on_run, on_start)


def fold_data_path(recipe: Recipe, fold: int) -> Path:
    """Validation fold ``fold``'s prepared file: ``data.out`` itself for fold 0 (the carve every
    version makes), else ``<stem>-vf<fold><suffix>`` beside it."""
    from sicot_cli.data.prepare import recipe_out

    base = recipe_out(recipe.data.out)
    return base if fold == 0 else base.with_name(f"{base.stem}-vf{fold}{base.suffix}")


def default_folds_dir(recipe: Recipe) -> Path:
    return Path(recipe.train.runs_dir) / f"ablate-{recipe.name}-folds"


def ablate_folds(
    recipe: Recipe,
    encoders: list[str],
    folds: list[int],
    out: str | Path | None = None,
    progress: Progress | None = None,
    **keys: Any,  # noqa: ANN401 - ablate's on_run, on_start, presets, method_names
) -> tuple[Path, list[Path], list[RunStatus]]:
    """The ablation on each validation fold ``K`` (``data.val_fold = K``, seed ``K``), in ``<out>/fold-<K>``:
    the loop of docs/datasets.md ("Validation folds") as one call, for ``sicot report --split val``.

    Every fold's prepared file (:func:`fold_data_path`) is made or checked first, so a fold that
    cannot be carved is refused before any run trains. Stops after an interrupted run.

    Returns:
        The folds' parent folder, each fold's ablation folder (in order, as far as they ran), and
        every run's status.

    Raises:
        SicotError: ``data.val_fold`` set by the user, no validation rows to re-draw, a fold's file
            holding another fold, or anything :func:`ablate` refuses.
    """
    if "data.val_fold" in recipe.explicit:
        raise SicotError("--val-folds sets data.val_fold for each fold: drop it from the recipe or the overrides")
    if recipe.data.val_fraction == 0:
        raise SicotError(
            "--val-folds re-draws the validation rows, and data.val_fraction = 0 carves none: set data.val_fraction > 0"
        )
    paths = {}
    for k in sorted(folds, key=lambda k: k == 0):  # a fold the manifest cannot re-draw fails before fold 0 is made
        paths[k] = _fold_file(recipe, k, progress)
    root = Path(out) if out is not None else default_folds_dir(recipe)
    dirs: list[Path] = []
    statuses: list[RunStatus] = []
    for k in folds:
        r = copy.deepcopy(recipe)
        r.data.val_fold = k
        # its file's settings were checked (and warned about) by _fold_file, before any run
        fold_root, done = ablate(
            r, encoders, [k], root / f"fold-{k}", progress, data=paths[k], data_remedy=None, **keys
        )
        dirs.append(fold_root)
        statuses += done
        if done and done[-1].state == "interrupted":
            break
    return root, dirs, statuses


def _fold_file(recipe: Recipe, k: int, progress: Progress | None) -> Path:
    """Validation fold ``k``'s prepared file, prepared when missing, checked to hold fold ``k``."""
    from sicot_cli.data.dataset import open_prepared
    from sicot_cli.data.prepare import OwnValidationRows, prepare

    path = fold_data_path(recipe, k)
    if not path.exists():
        r = copy.deepcopy(recipe)
        r.data.val_fold = k
        log.info("%s does not exist yet: preparing validation fold %d", path, k)
        try:
            prepare(r, path, progress=progress)
        except OwnValidationRows as e:
            raise SicotError(
                f"--val-folds {k}: {e.where} names its own val rows, which every fold would keep; re-draw them where "
                "the manifest is made (`sicot datasets import emoji|mdi --val-seed K`) and run an ablation per "
                "manifest, or give --val-folds 0 alone"
            ) from None
    theirs = open_prepared(path).recipe
    held = theirs.get("data", {}).get("val_fold", 0)
    if held != k:
        raise SicotError(
            f"{path}: holds validation fold {held}, not fold {k}; remove it (--val-folds prepares it again) "
            "or set data.out to another file"
        )
    # a file made with other settings than the recipe asks: said here, before any run trains
    remedy = (
        "Prepare it again (`sicot prepare --recipe ... --force`)"
        if k == 0
        else "Remove the file: --val-folds prepares it again with the recipe's settings"
    )
    adopt_prepared(copy.deepcopy(recipe), theirs, path, remedy)
    return path


def _run_jobs(
    jobs: list[_Job],
    data_path: Path,
    progress: Progress | None,
    on_run: Callable[[RunStatus], None] | None,
    on_start: Callable[[str, int, int, Recipe], None] | None,
) -> list[RunStatus]:
    """Every run of the ablation in order, until one is interrupted."""
    statuses: list[RunStatus] = []
    for i, job in enumerate(jobs):
        if on_start is not None:
            on_start(job.run_dir.name, i, len(jobs), job.recipe)
        if job.source is None:
            status = _train_run(job.recipe, job.run_dir, data_path, progress)
        else:
            status = _stage_run(job.source, job.method, job.recipe, job.run_dir, progress)
        status.method = job.method.name
        statuses.append(status)
        if on_run is not None:
            on_run(status)
        if status.state == "interrupted":
            break
    return statuses


@dataclass(frozen=True)
class _Method:
    """A long-tail method of the grid, as :func:`sicot_cli.methods.parse` reads its name."""

    name: str  # canonical (sicot_cli.methods.canonical)
    overrides: dict[str, Any]  # the recipe keys it sets (a second stage: its decouple.* keys too)
    stage: str | None = None  # decouple.method of a second stage
    first: str | None = None  # a second stage: the training method whose run it starts from


@dataclass(frozen=True)
class _Job:
    """One run of the ablation: where, with which recipe, and (a second stage) from which run."""

    run_dir: Path
    recipe: Recipe
    method: _Method
    source: Path | None


def _check_args(
    recipe: Recipe, seeds: list[int], presets: list[str] | None, method_names: list[str] | None
) -> list[str]:
    """The presets (default: the recipe's); seeds, presets and recipe keys the methods own refused in one line."""
    if not seeds:
        raise SicotError("--seeds is empty")
    presets = presets or [recipe.preset]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise SicotError(f"--presets: unknown preset {unknown[0]!r} (known: {', '.join(sorted(PRESETS))})")
    preset_keys = {k for values in PRESETS.values() for k in values}
    set_by_presets = sorted(preset_keys & recipe.explicit) if presets != [recipe.preset] else []
    if set_by_presets:
        raise SicotError(
            f"{set_by_presets[0]} is set by --presets (each preset sets its own; docs/presets.md): drop it from the "
            f"recipe or the overrides, or ablate one preset with the key (--presets {recipe.preset})"
        )
    owned = sorted(methods.METHOD_KEYS & recipe.explicit) if method_names else []
    if owned:
        raise SicotError(
            f"{owned[0]} is set by --methods (each method sets its own, CE none): drop it from the recipe or "
            "the overrides and name the method instead (e.g. --methods ce,balanced-softmax)"
        )
    return presets


def _jobs(
    recipe: Recipe, root: Path, encoders: list[str], seeds: list[int], presets: list[str], plans: list[_Method]
) -> list[_Job]:
    """Every run in training order: per seed, the training runs first (every second stage needs its first run)."""
    plan = [(BASELINE, None)] + [(e, p) for p in presets for e in encoders if e != BASELINE]
    jobs = []
    groups = [[m for m in plans if m.stage is None], [m for m in plans if m.stage is not None]]
    for seed, group, (encoder, preset) in itertools.product(seeds, groups, plan):
        for method in group:
            own = preset is None or preset == recipe.preset
            r = copy.deepcopy(recipe) if own else with_preset(recipe, preset)
            r.model.encoder, r.train.seed = encoder, seed
            _set_keys(r, method.overrides)
            tag = None if own else preset
            source = None if method.first is None else root / run_name(encoder, seed, tag, method.first)
            jobs.append(_Job(root / run_name(encoder, seed, tag, method.name), r, method, source))
    return jobs


def _check_stages(plans: list[_Method], recipe: Recipe, data_path: Path, n_val: int) -> None:
    """A second stage that chooses tau on validation needs validation rows: refused before any run trains."""
    from sicot_cli.data.dataset import val_rows_hint

    for m in plans:
        taus = m.overrides.get("decouple.taus", recipe.decouple.taus)
        if m.stage in ("tau_norm", "logit_adjust") and len(taus) > 1 and n_val == 0:
            raise SicotError(
                f"--methods {m.name}: chooses tau on the validation rows, and {data_path} has none: "
                f"{val_rows_hint(recipe.data.val_fraction)}, or fix tau ({m.name}(tau=1))"
            )


def _method_plan(names: list[str]) -> list[_Method]:
    """Each method, CE first (every gain is measured against it); a second stage's training part is trained too."""
    plans: dict[str, _Method] = {methods.CE: _Method(methods.CE, {})}
    for name in names:
        overrides, stage = methods.parse(name)
        full = methods.canonical(name)
        if stage is None:
            plans[full] = _Method(full, overrides)
            continue
        first = full.rsplit("+", 1)[0] if "+" in full else methods.CE  # the first run it starts from
        training = {k: v for k, v in overrides.items() if not k.startswith("decouple.")}
        plans.setdefault(first, _Method(first, training))
        plans[full] = _Method(full, overrides, stage, first)
    return list(plans.values())


def _prepared(
    recipe: Recipe, data: str | Path | None, progress: Progress | None, remedy: str | None = FILE_REMEDY
) -> tuple[Recipe, Path, Prepared]:
    """The prepared file (prepared first when missing), a copy of the recipe with its settings taken in, and
    the file opened."""
    if data is not None:
        data_path = Path(data)
    else:
        from sicot_cli.data.prepare import recipe_out

        data_path = recipe_out(recipe.data.out)
    if not data_path.exists():
        from sicot_cli.data.prepare import prepare

        log.info("%s does not exist yet: preparing it first", data_path)
        prepare(recipe, data_path, progress=progress)
    # The prepared file's name, settings and boundaries, in ablation.json and every run (as train does).
    from sicot_cli.data.dataset import open_prepared

    recipe = copy.deepcopy(recipe)
    prepared = open_prepared(data_path)
    adopt_prepared(recipe, prepared.recipe, data_path, remedy)
    return recipe, data_path, prepared


def _check_out_folder(root: Path, jobs: list[_Job]) -> None:
    """Refuse, before anything is written, an ``--out`` that is no ablation's: a training run, a
    folder of other files (without ``ablation.json``: runs copied in beforehand, and a report of
    them, are welcome), or a run's place taken by a file or by a folder of files that is no run."""
    if runs.is_run(root):
        raise SicotError(
            f"{root}: is a training run ({runs.CONFIG}), not an ablation folder; pass --out with another folder"
        )
    for job in jobs:
        d = job.run_dir
        if os.path.lexists(d) and not d.is_dir():  # a dangling link too
            raise SicotError(
                f"{d}: a file or link stands where this ablation's run {d.name} goes; move it, or pass another --out"
            )
        if d.is_dir() and not runs.is_run(d) and any(not p.name.startswith(".") for p in d.iterdir()):
            raise SicotError(
                f"{d}: holds files but no run ({runs.CONFIG}), where this ablation's run {d.name} goes; move them, "
                "or pass another --out"
            )
    plan = root / PLAN
    if os.path.lexists(plan) and not plan.is_file():
        raise SicotError(
            f"{plan}: not a file (a folder, or a link to nothing) where this ablation's plan goes; move it, or pass "
            "--out with another folder"
        )
    if plan.is_file():
        state = json_file_state(plan, ("recipe", "encoders"))  # a damaged one is rewritten by _write_plan
        if state == "foreign" or (state == "torn" and not any(runs.is_run(job.run_dir) for job in jobs)):
            raise SicotError(
                f"{plan}: not an ablation plan `sicot ablate` wrote (it reads no recipe and encoders); it is not "
                "replaced: move it, or pass --out with another folder"
            )
        return
    from sicot_cli.report import REPORT_FILES

    ours = {job.run_dir.name for job in jobs} | set(REPORT_FILES)  # a report of its runs, its plan lost
    foreign = sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and p.name not in ours)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise SicotError(
            f"{root}: holds {foreign[0]!r}{more} and no {PLAN}: not an ablation folder; pass --out with a new or "
            "empty folder (or one holding only this ablation's runs)"
        )


def _write_plan(
    root: Path,
    recipe: Recipe,
    encoders: list[str],
    seeds: list[int],
    presets: list[str],
    method_names: list[str],
    jobs: list[_Job],
    data: tuple[Path, Prepared],
) -> None:
    """``ablation.json``; a directory holding an ablation of another recipe or other data is refused,
    and so is a run already there (the plan lost, runs copied in) that was trained with other settings.

    ``data``: the prepared file and its data checksum, recorded; the same data under another name
    (a copy, a moved file) is the same ablation, as it is the same run for ``train --resume``."""
    ensure_dir(root)
    plan_path = root / PLAN
    shared = _shared_recipe(recipe)
    old, old_shared = None, None
    if plan_path.is_file():
        try:
            old = json.loads(plan_path.read_text(encoding="utf-8"))
            # Through the Recipe type, so that keys a newer sicot added (at their defaults) still match.
            old_shared = _shared_recipe(recipe_from_dict(old["recipe"], str(plan_path)))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, SicotError):  # damaged: rewritten
            old, old_shared = None, None
    if old is not None and old_shared is not None and old_shared != shared:
        _check_same_plan(root, old, old_shared, shared, data[1])
    for job in jobs:
        if job.source is None and runs.is_run(job.run_dir):
            check_same_settings(job.run_dir, runs.read_config(job.run_dir)["recipe"], job.recipe, "use another --out")
    write_json(
        plan_path,
        {
            "recipe": shared,
            "encoders": [BASELINE, *encoders],
            "seeds": seeds,
            "presets": presets,
            "methods": method_names,
            "data": {"path": str(data[0]), "content": data[1].data_checksum()},
        },
    )


def _check_same_plan(
    root: Path, old: dict[str, Any], old_shared: dict[str, Any], shared: dict[str, Any], prepared: Prepared
) -> None:
    """Refuse an ablation whose recipe or data differs from the one ``root`` holds, naming each difference.

    The data is compared by its checksum when ``ablation.json`` recorded one (by its path otherwise);
    how ``prepare`` ran (``data.workers``...) and where the file lies are no difference.
    """
    settings = changes(old_shared, shared, neutral=PREPARE_HOW)
    was, now = old_shared.get("data", {}).get("out"), shared.get("data", {}).get("out")
    recorded = old.get("data") if isinstance(old.get("data"), dict) else {}
    other = []
    if recorded.get("content"):
        content = prepared.data_checksum()
        # the checksum a sicot without pixel sums recorded is the same data
        if recorded["content"] not in (content, prepared.checksum_without_pixels()):
            other = [
                f"data: {recorded.get('path', was)} (checksum {recorded['content']}) -> {now} (checksum {content})"
            ]
    elif was != now:  # an ablation.json from before checksums: its path is all there is
        other = [f"data.out: {was!r} -> {now!r}"]
    if not settings and not other:
        return  # the same recipe and the same data (another name, or prepared by other workers)
    prepared = [k for k in settings if k.startswith(("data.", "text.", "embed."))]
    what = ["another recipe"] if len(prepared) < len(settings) else []
    hint = ""
    if other or prepared:
        what.append("other data")
        hint = f", or give it the data it was made with (--data {recorded.get('path', was)})"
    listed = "; ".join([*other, *([described(settings)] if settings else [])])
    raise SicotError(
        f"{root}: holds an ablation of {' and '.join(what)} ({root / PLAN}: {listed}); use another --out{hint}"
    )


def _train_run(r: Recipe, run_dir: Path, data_path: Path, progress: Progress | None) -> RunStatus:
    """Train, resume or skip one run of the ablation; how it went."""
    existed = runs.is_run(run_dir)
    result: TrainResult = train(r, run_dir, resume=existed, data=data_path, progress=progress or NullProgress())
    if result.skipped:
        state = "skipped"
    elif result.interrupted:
        state = "interrupted"
    else:
        state = "resumed" if existed else "trained"
    return RunStatus(r.model.encoder, r.train.seed, run_dir, state, result.final)


def _stage_run(source: Path, method: _Method, r: Recipe, run_dir: Path, progress: Progress | None) -> RunStatus:
    """Run, resume or skip one second stage (``sicot decouple``) on the ablation's run ``source``."""
    from sicot_cli.decouple import decouple

    existed = runs.is_run(run_dir)
    overrides = [f"decouple.method={json.dumps(method.stage)}", f"train.threads={r.train.threads}"]
    taus = method.overrides.get("decouple.taus")
    overrides += [] if taus is None else [f"decouple.taus={json.dumps(taus)}"]
    try:
        result = decouple(source, overrides, run_dir, resume=existed, progress=progress or NullProgress())
    except KeyboardInterrupt:  # the stage saved what it had (sicot decouple's Ctrl-C): say how to go on, as train does
        return RunStatus(r.model.encoder, r.train.seed, run_dir, "interrupted", {})
    state = "skipped" if result.skipped else "resumed" if existed else "trained"
    return RunStatus(r.model.encoder, r.train.seed, run_dir, state, result.final)
