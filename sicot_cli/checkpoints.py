"""Training checkpoints whose shared classifier may be split by class across ranks.

One process (or a replicated classifier) writes one file, as always: ``checkpoint-last.pt`` holds
the model, optimiser, scheduler, RNG and loop state. A class-sharded classifier is saved sharded:
every rank writes its rows (weight, bias and their SGD momentum) to
``checkpoint-last.<tag>.classifier-RRR-of-NNN.pt`` with the class range recorded, then rank 0
writes the main file, which lists the parts (``classifier_parts``) and holds everything else. The
main file is renamed into place last, so a kill at any point leaves the previous main file and the
parts it names intact; parts no main file names are removed after the next save.

On load, a rank that holds classes ``[lo, hi)`` reads the rows it needs from whichever parts cover
them (:func:`classifier_rows`), so a checkpoint written by N ranks resumes on M ranks, sharded or
not, and ``sicot evaluate`` / ``predict`` / ``export`` read it in one process. This is the
re-sharding Partial FC users ask for (insightface #2027).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sicot_cli import runs
from sicot_cli.distributed import DistContext
from sicot_cli.errors import SicotError

WEIGHT, BIAS = "classifier.weight", "classifier.bias"
PARTS = "classifier_parts"


def param_index(model: nn.Module) -> dict[str, int]:
    """Parameter name -> its index in ``model.parameters()`` (the optimiser's state keys)."""
    return {name: i for i, (name, _) in enumerate(model.named_parameters())}


def _part_name(path: Path, tag: str, rank: int, world: int) -> str:
    return f"{path.stem}.{tag}.classifier-{rank:03d}-of-{world:03d}.pt"


def _remove_stale_parts(path: Path, keep: set[str]) -> None:
    pattern = re.compile(re.escape(path.stem) + r"\.[^.]+\.classifier-\d{3}-of-\d{3}\.pt$")
    for f in path.parent.iterdir():
        if pattern.match(f.name) and f.name not in keep:
            f.unlink(missing_ok=True)


def save(
    path: Path,
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    ctx: DistContext,
    sharded: bool,
    tag: str,
) -> None:
    """Write a checkpoint: ``state`` (loop state, meta) plus the model's and optimiser's state.

    Collective when distributed: every rank must call it. Unsharded, only rank 0 writes.
    """
    model_sd = model.state_dict()
    opt_sd = optimizer.state_dict() if optimizer is not None else None
    if not sharded:
        if ctx.is_main:
            full = {**state, "model": model_sd}
            if opt_sd is not None:
                full["optimizer"] = opt_sd
            runs.save_checkpoint(path, full)
        ctx.barrier()
        return
    import torch.distributed as dist

    clf = model.classifier
    idx = param_index(model)
    part: dict[str, Any] = {
        "model": {"weight": model_sd.pop(WEIGHT), "bias": model_sd.pop(BIAS)},
        "meta": {"lo": clf.lo, "hi": clf.hi, "num_classes": clf.num_classes, "tag": tag},
    }
    if opt_sd is not None:
        opt_sd = {**opt_sd, "state": dict(opt_sd["state"])}
        part["momentum"] = {
            k: opt_sd["state"].pop(idx[name], {}).get("momentum_buffer")
            for k, name in (("weight", WEIGHT), ("bias", BIAS))
        }
    name = _part_name(path, tag, ctx.rank, ctx.world)
    runs.save_checkpoint(path.parent / name, part)
    ranges: list[Any] = [None] * ctx.world
    dist.all_gather_object(ranges, {"lo": clf.lo, "hi": clf.hi, "file": name})
    ctx.barrier()  # every part is on disk before the main file names it
    if ctx.is_main:
        full = {**state, "model": model_sd, PARTS: ranges, "num_classes": clf.num_classes}
        if opt_sd is not None:
            full["optimizer"] = opt_sd
        runs.save_checkpoint(path, full)
        _remove_stale_parts(path, {r["file"] for r in ranges})
    ctx.barrier()


def _parts(parts: object, path: Path) -> list[dict[str, Any]]:
    """A checkpoint's list of classifier part files, each a plain file name beside it (never a path
    elsewhere: a downloaded checkpoint must not make sicot read files outside its run folder) with
    an integer class range.

    Raises:
        SicotError: naming the checkpoint.
    """
    ok = isinstance(parts, list) and all(
        isinstance(p, dict)
        and isinstance(p.get("file"), str)
        and Path(p["file"]).name == p["file"]
        and p["file"] not in ("", ".", "..")
        and all(type(p.get(k)) is int and p[k] >= 0 for k in ("lo", "hi"))
        for p in parts
    )
    if not ok:
        raise SicotError(
            f"{path}: damaged checkpoint (its classifier_parts must list file names beside it with integer class "
            "ranges); retrain the run, or use a checkpoint from its source"
        )
    return parts  # type: ignore[return-value]


def classifier_rows(
    state: dict[str, Any], path: Path, lo: int, hi: int, index: dict[str, int]
) -> dict[str, torch.Tensor | None]:
    """Rows ``[lo, hi)`` of the classifier (weight, bias, and their momentum when saved) from a checkpoint.

    Raises:
        SicotError: a part is missing or the checkpoint does not cover the classes.
    """
    out: dict[str, list[torch.Tensor]] = {"weight": [], "bias": [], "momentum_weight": [], "momentum_bias": []}
    if PARTS not in state:
        opt = state.get("optimizer", {}).get("state", {})
        sources = [
            (
                0,
                state["model"][WEIGHT].shape[0],
                {"weight": state["model"][WEIGHT], "bias": state["model"][BIAS]},
                {k: opt.get(index[name], {}).get("momentum_buffer") for k, name in (("weight", WEIGHT), ("bias", BIAS))}
                if opt
                else None,
            )
        ]
    else:
        sources = []
        for p in _parts(state[PARTS], path):
            if p["hi"] <= lo or p["lo"] >= hi:
                continue  # a part this rank does not need is never read
            part = runs.load_checkpoint(path.parent / p["file"])
            sources.append((p["lo"], p["hi"], part["model"], part.get("momentum")))
    covered = 0
    for plo, phi, weights, momentum in sorted(sources, key=lambda s: s[0]):
        a, b = max(plo, lo), min(phi, hi)
        if a >= b:
            continue
        out["weight"].append(weights["weight"][a - plo : b - plo])
        out["bias"].append(weights["bias"][a - plo : b - plo])
        for k in ("weight", "bias"):
            m = None if momentum is None else momentum.get(k)
            if m is not None:
                out[f"momentum_{k}"].append(m[a - plo : b - plo])
        covered += b - a
    if covered != hi - lo and PARTS not in state:
        raise SicotError(
            f"{path}: checkpoint of another model (its classifier has {covered} classes of [{lo}, {hi}): the run's data "
            "has others)"
        )
    if covered != hi - lo:
        raise SicotError(
            f"{path}: the classifier parts cover {covered} of classes [{lo}, {hi}): a part file is missing; resume from the other checkpoint or retrain"
        )
    rows: dict[str, torch.Tensor | None] = {}
    for k, parts in out.items():
        if k.startswith("momentum") and len(parts) != len(out["weight"]):
            rows[k] = None
        else:
            rows[k] = torch.cat(parts) if parts else torch.empty(0)
    return rows


def restore(
    state: dict[str, Any], path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Load a checkpoint's weights (and optimiser state) into ``model``, whatever the sharding.

    ``model.classifier`` may be a full ``nn.Linear`` or a :class:`~sicot_cli.distributed.ShardedLinear`.

    Raises:
        SicotError: the checkpoint is of another model.
    """
    clf = model.classifier
    lo, hi = (clf.lo, clf.hi) if hasattr(clf, "lo") else (0, clf.weight.shape[0])
    index = param_index(model)
    try:
        rows = classifier_rows(state, path, lo, hi, index)
        model_sd = {k: v for k, v in state["model"].items() if k not in (WEIGHT, BIAS)}
        model_sd[WEIGHT], model_sd[BIAS] = rows["weight"], rows["bias"]
        model.load_state_dict(model_sd)
    except (RuntimeError, KeyError) as e:
        raise SicotError(
            f"{path}: checkpoint of another model ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    except (TypeError, ValueError, AttributeError, IndexError) as e:  # a value of the wrong kind
        raise _damaged(path, e) from None
    if optimizer is None or "optimizer" not in state:
        return
    try:
        opt_sd = {**state["optimizer"], "state": dict(state["optimizer"]["state"])}
        for k, name in (("weight", WEIGHT), ("bias", BIAS)):
            m = rows[f"momentum_{k}"]
            if m is None:
                opt_sd["state"].pop(index[name], None)
            else:
                opt_sd["state"][index[name]] = {**opt_sd["state"].get(index[name], {}), "momentum_buffer": m}
        optimizer.load_state_dict(opt_sd)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise _damaged(path, e) from None


def _damaged(path: Path, e: Exception) -> SicotError:
    why = str(e).splitlines()[0] if str(e) else ""
    return SicotError(
        f"{path}: damaged checkpoint ({type(e).__name__}{': ' + why if why else ''}): use the other checkpoint, "
        "or retrain the run"
    )
