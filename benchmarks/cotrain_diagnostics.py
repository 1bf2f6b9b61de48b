"""Why co-training does or does not move the tail: what an ablation's runs show, on VALIDATION images.

Run ``python -m benchmarks.cotrain_diagnostics runs/ABLATION [--encoder bilinear]`` on the output of
``sicot ablate`` (its ``none-sK`` and ``<encoder>-sK`` runs, format-1 data). For every seed it loads
the checkpoint each run's report scores (``eval.select``) and prints the means over seeds of (head
and tail as the run's ``eval.head_threshold`` draws them):

- **title headroom**: validation top-1, overall and class-averaged over tail classes, of the
  co-trained model scored image-only (x_v, what inference sees) and WITH the validation titles
  (x_m = max(x_v, s)). x_m is an upper bound of what the titles know about an image; co-training can
  transfer at most a part of it into x_v.
- **head pull**: the share of the validation images of tail classes that the image-only model
  predicts as a head class, baseline and co-trained.
- **gradient**: on 512 training rows spread evenly over the training split, the share of x_m's dimensions the title wins, and
  how CE(x_m)'s gradient on x_v compares with CE(x_v)'s (norm ratio and cosine), head and tail rows.
  A cosine near 1 means CE(x_m) mostly repeats the image loss's step.
- **shared words**: the share of tail-class training title tokens whose word also occurs in a
  head-class training title (the paper's premise: about 12 % of words are shared), and the share of
  tail validation titles with no word of the vocabulary.
- **power**: from each pair's TEST tail top-1 (``summary.json``, the reported numbers): the standard
  deviation of the per-seed difference, the power of this many seeds to detect a +1 point tail gain
  (paired t-test, two-sided, 0.05), and the seeds that 80 % power would need. It selects nothing.

docs/demo-pretraining.md, "Three more variants, chosen on validation", quotes its output.
"""

from __future__ import annotations

import argparse
import math
import statistics as st
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import positive_int
from sicot_cli import runs
from sicot_cli.config import Recipe
from sicot_cli.data import dataset as ds
from sicot_cli.errors import SicotError
from sicot_cli.evaluate import load_run_model

GRAD_ROWS = 512
EVAL_ROWS = 1024


def _seeds(ablation: Path, encoder: str) -> list[int]:
    seeds = []
    for run in sorted(ablation.glob(f"{encoder}-s*")):
        seed = run.name.rsplit("-s", 1)[1]
        if (
            seed.isdigit()
            and (run / "summary.json").is_file()
            and (ablation / f"none-s{seed}" / "summary.json").is_file()
        ):
            seeds.append(int(seed))
    if not seeds:
        raise SicotError(f"{ablation}: no finished pair of none-sK and {encoder}-sK runs")
    return sorted(seeds)


def _class_mean(ok: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float(np.mean([ok[labels == c].mean() for c in np.unique(labels)])) if len(labels) else math.nan


def _images(prepared: ds.Prepared, lo: int, hi: int, step: int = 1) -> torch.Tensor:
    if prepared.format != ds.FORMAT:
        raise SicotError(f"{prepared.path}: a format-1 (raw pixels) file is needed")
    with h5py.File(prepared.path) as f:
        return torch.from_numpy(f["images"][lo:hi:step])


Loaded = tuple[Recipe, ds.Prepared, torch.nn.Module, np.ndarray]


def _load(run: Path) -> Loaded:
    """The run's recipe, data, model at the checkpoint its report scores (``eval.select``), and head mask."""
    recipe, p, model, _ = load_run_model(run, runs.read_config(run)["recipe"]["eval"]["select"])
    model.eval()
    return recipe, p, model, p.train_counts >= recipe.eval.head_threshold


@torch.no_grad()
def _val(run: Path, loaded: Loaded | None = None) -> dict[str, float]:
    """Validation figures of one run (x_m ones only when it has a text encoder); ``loaded``: its :func:`_load`."""
    _, p, model, head = loaded or _load(run)
    lo, hi = p.split_range("val")
    if hi <= lo:
        raise SicotError(f"{run}: its data has no validation split (data.val_fraction = 0)")
    y = p.labels[lo:hi]
    tail = ~head[y]
    scores: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    for start in range(lo, hi, EVAL_ROWS):  # in batches: the 224 px recipes' validation split is large
        end = min(hi, start + EVAL_ROWS)
        x = model.normalize(_images(p, start, end))
        tokens = torch.from_numpy(p.tokens[start:end]).long()
        scores.append(model(x, tokens, tokens != 0) if model.encoder is not None else (model.logits(x), None))
    z_v = torch.cat([v for v, _ in scores])
    z_m = torch.cat([m for _, m in scores]) if model.encoder is not None else None
    out = {}
    for name, z in (("v", z_v), ("m", z_m)):
        if z is None:
            continue
        ok = (z.argmax(1).numpy() == y).astype(float)
        out[f"{name}_top1"] = 100.0 * ok.mean()
        out[f"{name}_tail"] = _class_mean(ok[tail], y[tail])
    out["head_pull"] = 100.0 * float(head[z_v.argmax(1).numpy()[tail]].mean())
    return out


def _gradient(loaded: Loaded) -> dict[str, float]:
    """CE(x_m)'s gradient on x_v against CE(x_v)'s, on training rows spread over the split, at the last checkpoint."""
    _, p, model, head_classes = loaded
    step = -(-p.n_train // GRAD_ROWS)  # every step-th training row: at most GRAD_ROWS, head and tail alike
    rows = slice(0, p.n_train, step)
    with torch.no_grad():
        x_v = model.features(model.normalize(_images(p, 0, p.n_train, step)))
        tokens = torch.from_numpy(p.tokens[rows]).long()
        s = model.encoder(tokens, tokens != 0)
        if model.semantic_norm is not None:
            s = model.semantic_norm(s.float())
    x_v.requires_grad_(True)
    y = torch.from_numpy(p.labels[rows]).long()
    w, b = model.classifier.weight, model.classifier.bias
    loss_v = F.cross_entropy(F.linear(x_v, w, b), y, reduction="sum")
    loss_m = F.cross_entropy(F.linear(torch.maximum(x_v, s), w, b), y, reduction="sum")
    (g_v,) = torch.autograd.grad(loss_v, x_v)
    (g_m,) = torch.autograd.grad(loss_m, x_v)
    head = torch.from_numpy(head_classes[p.labels[rows]])
    out = {"title_wins": 100.0 * float((s > x_v).float().mean())}
    for name, group in (("head", head), ("tail", ~head)):
        if group.any():
            out[f"ratio_{name}"] = float(g_m[group].norm(dim=1).mean() / g_v[group].norm(dim=1).mean())
            out[f"cos_{name}"] = float(F.cosine_similarity(g_v[group], g_m[group], dim=1).mean())
    return out


def shared_words(prepared: ds.Prepared, head: np.ndarray) -> dict[str, float]:
    """Tail training tokens whose word is in a head title; tail validation titles with no known word.

    ``head``: per class, is it a head class (the run's ``eval.head_threshold``)."""
    t = prepared.tokens[: prepared.n_train]
    y = prepared.labels[: prepared.n_train]
    head_words = set(np.unique(t[head[y]]).tolist()) - {0}
    tail_tokens = t[~head[y]]
    tail_tokens = tail_tokens[tail_tokens > 0]
    lo, hi = prepared.split_range("val")
    val_tail = ~head[prepared.labels[lo:hi]]
    empty = (prepared.tokens[lo:hi] == 0).all(axis=1)
    return {
        "tail_tokens_shared": 100.0 * float(np.isin(tail_tokens, list(head_words)).mean())
        if len(tail_tokens)
        else math.nan,
        "val_tail_empty": 100.0 * float(empty[val_tail].mean()) if val_tail.any() else math.nan,
    }


def power(diffs: list[float], delta: float = 1.0, alpha: float = 0.05) -> tuple[float, float, int | None]:
    """(sd of the paired differences, power of len(diffs) seeds to detect ``delta``, seeds for 80 % power)."""
    from scipy import stats

    sd = st.stdev(diffs)
    if sd == 0:
        return 0.0, math.nan, None

    def pw(n: int) -> float:
        df, nc = n - 1, delta / (sd / math.sqrt(n))
        tc = stats.t.ppf(1 - alpha / 2, df)
        return float(1 - stats.nct.cdf(tc, df, nc) + stats.nct.cdf(-tc, df, nc))

    need = next((n for n in range(2, 10_001) if pw(n) >= 0.8), None)
    return sd, pw(len(diffs)), need


def diagnose(ablation: Path, encoder: str = "bilinear") -> list[str]:
    """The report's lines."""
    seeds = _seeds(ablation, encoder)
    co, grads = [], []
    for k in seeds:  # each co-trained run loaded once for both measures
        run = ablation / f"{encoder}-s{k}"
        loaded = _load(run)
        co.append(_val(run, loaded))
        grads.append(_gradient(loaded))
    base = [_val(ablation / f"none-s{k}") for k in seeds]
    _, prepared, _, head = loaded
    words = shared_words(prepared, head)

    def m(rows: list[dict[str, float]], key: str) -> float:
        return st.mean(r[key] for r in rows)

    def test_tail(run: Path) -> float:
        return float(runs.read_summary(run)["final"]["tail_top1"])

    diffs = [test_tail(ablation / f"{encoder}-s{k}") - test_tail(ablation / f"none-s{k}") for k in seeds]
    lines = [
        f"{ablation} ({encoder}, seeds {','.join(map(str, seeds))}; validation images unless said)",
        f"  title headroom: top-1 x_v {m(co, 'v_top1'):.1f} -> x_m {m(co, 'm_top1'):.1f}; "
        f"tail x_v {m(co, 'v_tail'):.1f} -> x_m {m(co, 'm_tail'):.1f} (baseline x_v: top-1 {m(base, 'v_top1'):.1f}, "
        f"tail {m(base, 'v_tail'):.1f})",
        f"  head pull: tail images predicted as a head class, baseline {m(base, 'head_pull'):.1f} %, "
        f"co-trained {m(co, 'head_pull'):.1f} %",
        f"  gradient ({GRAD_ROWS} training rows at most, spread evenly): the title wins {m(grads, 'title_wins'):.0f} % of x_m's dims; "
        + "; ".join(
            f"{g} |dCE(x_m)/dx_v| / |dCE(x_v)/dx_v| {m(grads, f'ratio_{g}'):.2f}, cosine {m(grads, f'cos_{g}'):.2f}"
            for g in ("head", "tail")
            if all(f"ratio_{g}" in r for r in grads)
        ),
        f"  shared words: {words['tail_tokens_shared']:.0f} % of tail training tokens occur in head titles; "
        f"{words['val_tail_empty']:.0f} % of tail validation titles have no known word",
    ]
    if len(diffs) >= 2:
        sd, pw, need = power(diffs)
        listed = ", ".join(f"{d:+.2f}" for d in diffs)
        verdict = (
            f"{len(diffs)} seeds detect +1.0 with power {pw:.2f}; 80 % power needs {need} seeds"
            if sd > 0
            else "every seed's difference is the same: power undefined"
        )
        lines.append(f"  power (TEST tail top-1, per-seed differences {listed}): sd {sd:.2f}; {verdict}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.cotrain_diagnostics", description=__doc__.split("\n")[0]
    )
    parser.add_argument("ablations", type=Path, nargs="+", help="output directories of `sicot ablate`")
    parser.add_argument("--encoder", default="bilinear")
    parser.add_argument("--threads", type=positive_int, default=1)
    args = parser.parse_args(argv)
    if args.encoder == "none":
        parser.error("--encoder names the co-trained runs (none-sK are the baselines they are compared with)")
    torch.set_num_threads(args.threads)
    for ablation in args.ablations:
        print("\n".join(diagnose(ablation, args.encoder)))


if __name__ == "__main__":
    from benchmarks.common import cli

    cli(main)
