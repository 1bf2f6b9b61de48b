"""``sicot report``: the paper's tables from run directories, with seeds and statistics.

Reads only run directories (``config.json``, ``metrics.jsonl``, ``summary.json``,
``predictions.h5``), never retrains, so any run can be re-reported later.

- Table 2: baseline vs co-training (one encoder, default ``bilinear``): top-1 (top-3) and gain;
- Table 3: every encoder's top-1 and its gain over the baseline (the paper's ablation);
- Table 4: head and tail top-1 (top-3) and gains at the run's boundary, then many/medium/few.

The metrics are those of each run's final epoch (no model selection on the test set). With several
seeds every cell is mean ± sample std over seeds, and every gain gets a paired t-test over the seeds
(the gain of seed s is encoder(s) - baseline(s): same data order and initialisation) and a 95 %
bootstrap confidence interval over test images (image-level top-1/top-3, the per-image differences
averaged over the paired seeds, resampled 2,000 times with a fixed seed). The two measure different
things: the t-test, how much the gain varies from one training run (seed) to another; the interval,
how much it varies from one test image to another for these trained models. The verdict rule
(:data:`VERDICT_RULE`): a gain is significant when every test that applies excludes zero (the
interval, and with 2+ seeds p < 0.05); when one does and the other does not, the verdict names the
one that does not ("not significant across seeds": the images agree, the seeds do not).

Without a baseline run (one ``sicot train``), the report keeps what needs none: Table 3's
accuracies, the curves and the per-class table.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sicot_cli import methods, runs
from sicot_cli.config import PRESETS, recipe_from_dict
from sicot_cli.console import abbreviate
from sicot_cli.errors import SicotError
from sicot_cli.resume import TEXT_ONLY

log = logging.getLogger(__name__)

BASELINE = "none"
GROUP_METRICS = ("head", "tail", "many", "medium", "few")
BOOTSTRAP = 2000
ALPHA = 0.05
VERDICT_RULE_VAL = (
    "seeds p: paired t-test over the seed pairs (over the folds, one seed each); validation scores are not kept "
    "per image, so there is no interval over images. Significant: p < 0.05 with 2+ pairs."
)
VERDICT_RULE = (
    "seeds p: paired t-test over seeds (does the gain hold from one training run to another?); "
    "images CI: 95 % bootstrap interval over test images, seeds averaged (does it hold across the test set?). "
    "Significant: every test that applies excludes 0 (p < 0.05 with 2+ seeds, and the CI); "
    "'not significant across seeds' / 'across images' names the test that does not."
)


@dataclass
class Run:
    """One finished run, as read from its directory."""

    path: Path
    encoder: str
    seed: int
    config: dict[str, Any]
    final: dict[str, Any]
    history: list[dict[str, Any]]
    per_class: dict[str, Any] = field(default_factory=dict)

    def hits(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(test rows, top-k hit per row) from ``predictions.h5``."""
        rows, labels, topk = self._predictions
        return rows, (topk[:, :k] == labels[:, None]).any(axis=1)

    @functools.cached_property
    def _predictions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``predictions.h5``'s rows, labels and top-k labels, read and checked once per run (a
        baseline is paired with every encoder, at every k)."""
        import h5py

        path = self.path / runs.PREDICTIONS
        if not path.exists():
            raise SicotError(
                f"{path}: missing, though the run finished (its summary.json is there), and the report's "
                "per-image tests need it: leave the run out of the report, or train it again into a new --run-dir"
            )
        if not path.is_file():  # a FIFO would block the read for ever
            raise SicotError(
                f"{path}: not a regular file (a FIFO, socket, device or folder): a damaged run file (retrain it, or "
                "leave it out of the report)"
            )
        try:
            with h5py.File(path, "r") as f:
                rows = f["rows"][()]
                labels = f["labels"][()]
                topk = f["topk_labels"][()]
        except (OSError, KeyError, ValueError, TypeError) as e:  # truncated, damaged or missing a dataset
            raise SicotError(
                f"{path}: unreadable predictions ({e}): a damaged run file (retrain it, or leave it out of the report)"
            ) from None
        n = len(labels)
        if not (
            rows.ndim == labels.ndim == 1
            and len(rows) == n
            and topk.ndim == 2
            and topk.shape[0] == n
            and topk.shape[1] >= 1
            and all(a.dtype.kind in "iu" for a in (rows, labels, topk))
        ):
            raise SicotError(
                f"{path}: field topk_labels/labels/rows: shapes {topk.shape}/{labels.shape}/{rows.shape} do not fit together: a damaged run file"
            )
        self._check_agrees(path, labels, topk)
        return rows, labels, topk

    def _check_agrees(self, path: Path, labels: np.ndarray, topk: np.ndarray) -> None:
        """Refuse predictions that are not the summary's: labels outside the run's classes, or a
        top-k other than ``summary.json``'s (another run's file copied in, or a hand edit)."""
        classes = len(self.per_class.get("per_class_top1", []))
        for name, a in (("labels", labels), ("topk_labels", topk)):
            if a.size and (a.min() < 0 or (classes and a.max() >= classes)):
                raise SicotError(
                    f"{path}: field {name}: class {int(a.min() if a.min() < 0 else a.max())} outside the run's "
                    f"{classes or 'known'} classes: a damaged run file (retrain it, or leave it out of the report)"
                )
        for k in range(1, topk.shape[1] + 1):  # every top-k the summary states
            stated = self.final.get(f"top{k}")
            if not isinstance(stated, (int, float)) or not len(labels):
                continue
            here = 100.0 * float(np.mean((topk[:, :k] == labels[:, None]).any(axis=1)))
            if abs(here - stated) > 1e-6:
                raise SicotError(
                    f"{path}: top-{k} {here:.2f} from the predictions, {stated:.2f} in {runs.SUMMARY}: the two files "
                    "are not one run's (copied from another, or edited): retrain it, or leave it out of the report"
                )


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories given directly or found one level below (an ablation directory)."""
    found: list[Path] = []
    for p in paths:
        if not p.is_dir():
            raise SicotError(f"{p}: not a directory (give run or ablation directories)")
        if runs.is_run(p):
            found.append(p)
            continue
        below = sorted(c for c in p.iterdir() if c.is_dir() and runs.is_run(c))
        if not below:
            raise SicotError(
                f"{p}: not a run directory and holds none (no config.json); runs are made by `sicot train` or `sicot ablate`"
            )
        found.extend(below)
    return found


def method_label(config: dict[str, Any], extra: str = "") -> str:
    """A run's row in the tables: its encoder and long-tail method (sicot_cli.methods), ``[preset]`` for
    a preset other than "sicot", then ``extra`` (co-training keys that differ between rows)."""
    encoder = config["encoder"]
    preset = config.get("recipe", {}).get("preset", "sicot")  # runs older than presets: sicot's keys or explicit ones
    return methods.label(config, ("" if encoder == BASELINE or preset == "sicot" else f"[{preset}]") + extra)


def load_runs(paths: list[Path]) -> tuple[list[Run], list[Path]]:
    """Finished runs under ``paths``, and the unfinished ones (left out of the tables)."""
    done, unfinished = [], []
    for d in find_runs(paths):
        config = runs.read_config(d)
        if not runs.is_finished(d):
            unfinished.append(d)
            continue
        # the saved recipe resolved (a key it lacks takes its default; a bad value names the file), as
        # every other reader of a run does: the report reads seeds and boundaries from it
        config = {**config, "recipe": recipe_from_dict(config["recipe"], str(d / runs.CONFIG)).to_dict()}
        summary = runs.read_summary(d)
        history = runs.read_metrics(d)
        if isinstance(summary.get("epochs"), int) and len(history) < summary["epochs"]:
            log.warning(
                "%s: %d of the %d epochs' records (a damaged or hand-edited file): the learning curves show those only",
                d / runs.METRICS,
                len(history),
                summary["epochs"],
            )
        done.append(
            Run(
                d,
                method_label(config),
                int(config["recipe"]["train"]["seed"]),
                config,
                summary.get("final") or (history[-1] if history else {}),
                history,
                {k: v for k, v in summary.items() if k.startswith("per_class_")},
            )
        )
    if not done:
        raise SicotError(f"no finished run under {', '.join(map(str, paths))} ({len(unfinished)} unfinished)")
    return done, unfinished


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; None for one value; both None for none)."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def paired_t(treated: list[float], reference: list[float]) -> float | None:
    """Two-sided p-value of the paired t-test (``scipy.stats.ttest_rel``) over seeds (None below 2).

    ``treated[i]`` and ``reference[i]`` are the same seed's metric with and without the encoder; the
    test is on their differences. NaN when every seed's difference is the same: the statistic is x/0
    (or 0/0) and the test is undefined, whatever the difference; a report says "p undefined" rather
    than p=0.000. (Checked on the differences rounded to :data:`DIFF_DECIMALS` places: one more
    test image right on every seed is 100 * (h + 1) / n - 100 * h / n, equal in exact arithmetic
    but not always in the last bit, and scipy would divide by a spread of 1e-15 and return
    p ~ 1e-14; it can also see a spread in identical values such as 0.1, 0.1, 0.1.)
    """
    if len(treated) != len(reference):
        raise ValueError(f"paired_t: {len(treated)} treated values, {len(reference)} reference values")
    if len(treated) < 2:
        return None
    diffs = differences(treated, reference)
    if len(set(diffs)) == 1:
        return math.nan
    from scipy import stats

    return float(stats.ttest_1samp(diffs, 0.0).pvalue)  # = ttest_rel(treated, reference) on exact differences


# Metrics are percentages: differences are rounded to 1e-9 points, far below one image of any
# test set, so that float noise in the last bit is neither a spread nor a "-0.00" gain.
DIFF_DECIMALS = 9


def differences(treated: list[float], reference: list[float]) -> list[float]:
    """``treated[i] - reference[i]`` rounded to :data:`DIFF_DECIMALS` places (``+ 0.0``: never -0.0)."""
    return [round(a - b, DIFF_DECIMALS) + 0.0 for a, b in zip(treated, reference, strict=True)]


BOOTSTRAP_BATCH_VALUES = 8_000_000  # resampled values held at once by bootstrap_ci


def bootstrap_ci(diff: np.ndarray, n_boot: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval (``scipy.stats.bootstrap``) of the mean of per-image differences, in percent points.

    Deterministic: the resamples come from ``numpy.random.default_rng(seed)``. One image gives the
    interval [d, d] (scipy needs two observations; every resample of one value is that value).
    """
    if len(diff) == 1:
        d = float(diff[0] * 100.0)
        return d, d
    from scipy import stats

    res = stats.bootstrap(
        (diff,),
        lambda x, axis: np.mean(x, axis=axis) * 100.0,
        n_resamples=n_boot,
        confidence_level=1 - ALPHA,
        method="percentile",
        rng=np.random.default_rng(seed),
        # resamples drawn a batch at a time: ~16 bytes x BOOTSTRAP_BATCH_VALUES at most (it held
        # n_boot x len(diff) values and indices, 31 KB an image: 5 GB at 171k test images); the
        # same random stream, so the same interval
        batch=max(1, BOOTSTRAP_BATCH_VALUES // len(diff)),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


@dataclass
class Cell:
    """A metric over seeds."""

    values: list[float]

    @property
    def mean(self) -> float | None:
        return mean_std(self.values)[0]

    @property
    def std(self) -> float | None:
        return mean_std(self.values)[1]

    def as_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": len(self.values), "values": self.values}


@dataclass
class Gain:
    """encoder - baseline, paired by seed."""

    values: list[float]
    p_value: float | None
    ci: tuple[float, float] | None = None

    @property
    def mean(self) -> float | None:
        m = mean_std(self.values)[0]
        return None if m is None else round(m, DIFF_DECIMALS) + 0.0  # +1.1 and -1.1: 0, not -1e-16

    @property
    def t_undefined(self) -> bool:
        """The paired t-test had 2+ seeds but identical differences (see :func:`paired_t`)."""
        return self.p_value is not None and math.isnan(self.p_value)

    @property
    def significant(self) -> bool | None:
        p = None if self.t_undefined else self.p_value
        if not self.values or (self.ci is None and p is None):
            return None
        ok = True
        if self.ci is not None:
            ok = ok and (self.ci[0] > 0 or self.ci[1] < 0)
        if p is not None:
            ok = ok and p < ALPHA
        return ok

    def verdict(self) -> str:
        """The verdict in words, naming the test that fails when the two disagree."""
        sig = self.significant
        if sig is None:
            return "-"
        if sig:
            return "significant"
        p = None if self.t_undefined else self.p_value
        seeds_ok = None if p is None else p < ALPHA
        images_ok = None if self.ci is None else (self.ci[0] > 0 or self.ci[1] < 0)
        if seeds_ok is False and images_ok:
            return "not significant across seeds"
        if images_ok is False and seeds_ok:
            return "not significant across images"
        return "not significant"

    def as_dict(self) -> dict[str, Any]:
        p = None if self.t_undefined else self.p_value
        return {
            "mean": self.mean,
            "std": mean_std(self.values)[1],
            "values": self.values,
            "p_value": p,
            "t_test": "undefined" if self.t_undefined else "ok" if p is not None else None,
            "ci95": list(self.ci) if self.ci else None,
            "significant": self.significant,
        }


def _metric_keys(runs_: list[Run]) -> list[str]:
    ks = sorted(
        {int(k[3:]) for r in runs_ for k in r.final if k.startswith("top") and k[3:].isascii() and k[3:].isdigit()}
    )
    keys = [f"top{k}" for k in ks]
    keys += [f"{g}_top{k}" for g in GROUP_METRICS for k in ks]
    return keys


@dataclass
class Report:
    """Everything the tables and figures need, computed once."""

    runs: list[Run]
    unfinished: list[Path]
    encoders: list[str]  # baseline first
    seeds: list[int]
    chosen: str
    cells: dict[str, dict[str, Cell]]
    gains: dict[str, dict[str, Gain]]
    head_threshold: int
    many_threshold: int
    few_threshold: int
    dataset: str
    protocol: str = ""  # which split and which checkpoint the numbers come from, in words
    # label -> trained with titles; filled when a run used a long-tail method (the methods table)
    titles: dict[str, bool] = field(default_factory=dict)
    # "<encoder>+<method>" -> its tail top-1 gain over "<method>" alone, paired by seed: what the titles add
    title_gains: dict[str, Gain] = field(default_factory=dict)
    rule: str = VERDICT_RULE  # the evidence rule printed under the tables

    def run(self, encoder: str, seed: int) -> Run | None:
        return next((r for r in self.runs if r.encoder == encoder and r.seed == seed), None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "seeds": self.seeds,
            "encoders": self.encoders,
            "chosen_encoder": self.chosen,
            "head_threshold": self.head_threshold,
            "many_threshold": self.many_threshold,
            "few_threshold": self.few_threshold,
            "protocol": self.protocol,
            "runs": [{"dir": str(r.path), "encoder": r.encoder, "seed": r.seed} for r in self.runs],
            "unfinished": [str(p) for p in self.unfinished],
            "metrics": {e: {k: c.as_dict() for k, c in m.items()} for e, m in self.cells.items()},
            "gains": {e: {k: g.as_dict() for k, g in m.items()} for e, m in self.gains.items()},
            "tables": {name: rows for name, rows in self.tables().items()},
        }

    # --- the tables, as rows of strings -------------------------------------------------------

    def fmt(self, encoder: str, key: str) -> str:
        c = self.cells.get(encoder, {}).get(key)
        if c is None or not c.values:
            return "-"
        return f"{c.mean:.2f}" if c.std is None else f"{c.mean:.2f}±{c.std:.2f}"

    def fmt_gain(self, encoder: str, key: str) -> str:
        g = self.gains.get(encoder, {}).get(key)
        if g is None or not g.values:
            return "-"
        return f"{g.mean:+.2f}"

    def pair(self, encoder: str, key: str) -> str:
        top3 = key.replace("top1", "top3")
        return f"{self.fmt(encoder, key)} ({self.fmt(encoder, top3)})"

    def pair_gain(self, encoder: str, key: str) -> str:
        return f"{self.fmt_gain(encoder, key)} ({self.fmt_gain(encoder, key.replace('top1', 'top3'))})"

    def evidence(self, encoder: str, key: str) -> str:
        g = self.gains.get(encoder, {}).get(key)
        if g is None or not g.values:
            return "-"
        parts = []
        if g.t_undefined:
            parts.append("seeds p undefined: the same difference on every seed")
        elif g.p_value is not None:
            parts.append(f"seeds p={g.p_value:.3f}")
        if g.ci is not None:
            parts.append(f"images CI [{g.ci[0]:+.2f}, {g.ci[1]:+.2f}]")
        verdict = g.verdict()
        return f"{verdict} ({'; '.join(parts)})" if parts else verdict

    def tables(self) -> dict[str, list[dict[str, str]]]:
        # Tables 2 and 4 compare a method with the baseline: none when the baseline is all there is
        has_base = BASELINE in self.cells and self.chosen != BASELINE
        # a long-tail method on the baseline (no titles) is compared, but it is no co-training
        titled = any(methods.needs_titles(r.config) for r in self.runs if r.encoder == self.chosen)
        versus = f"co-training ({self.chosen})" if titled else self.chosen
        t2 = (
            []
            if not has_base
            else [
                {
                    "dataset": self.dataset,
                    "baseline": self.pair(BASELINE, "top1"),
                    versus: self.pair(self.chosen, "top1"),
                    "gain": self.pair_gain(self.chosen, "top1"),
                    "evidence (top-1 gain)": self.evidence(self.chosen, "top1"),
                }
            ]
            if self.chosen in self.cells
            else []
        )
        t3 = [
            {
                "method": "baseline" if e == BASELINE else e,
                "top-1": self.fmt(e, "top1"),
                "gain": "-" if e == BASELINE else self.fmt_gain(e, "top1"),
                "evidence": "-" if e == BASELINE else self.evidence(e, "top1"),
            }
            for e in self.encoders
        ]
        h = self.head_threshold
        groups = [
            ("head", f"{h} - max"),
            ("tail", f"1 - {h}"),
            ("many", f"> {self.many_threshold}"),
            ("medium", f"{self.few_threshold} - {self.many_threshold}"),
            ("few", f"< {self.few_threshold}"),
        ]
        t4 = []
        if self.chosen in self.cells and has_base:
            for g, span in groups:
                t4.append(
                    {
                        "classes": g,
                        "#training samples": span,
                        "baseline": self.pair(BASELINE, f"{g}_top1"),
                        versus: self.pair(self.chosen, f"{g}_top1"),
                        "gain": self.pair_gain(self.chosen, f"{g}_top1"),
                        "evidence (top-1 gain)": self.evidence(self.chosen, f"{g}_top1"),
                    }
                )
        out = {
            f"Table 2: baseline vs {'co-training' if titled else self.chosen}, top-1 (top-3)": t2,
            "Table 3: encoders, top-1": t3,
            "Table 4: head/tail and many/medium/few, class-averaged top-1 (top-3)": t4,
        }
        if self.titles:
            out[METHODS_TABLE] = self.methods_table()
        return out

    def methods_table(self) -> list[dict[str, str]]:
        """Long-tail methods against CE (the baseline): top-1 over all test images, class-averaged top-1 per
        group, tail gain and its evidence."""
        rows = []
        for e in self.encoders:
            row = {"method": "CE (baseline)" if e == BASELINE else e, "titles": "yes" if self.titles.get(e) else "no"}
            row["top-1"] = self.fmt(e, "top1")
            for g in ("head", "tail", "many", "medium", "few"):
                row[g] = self.fmt(e, f"{g}_top1")
            base = e == BASELINE
            row["tail gain"] = "-" if base else self.fmt_gain(e, "tail_top1")
            row["evidence (tail)"] = "-" if base else self.evidence(e, "tail_top1")
            row["evidence (top-1)"] = "-" if base else self.evidence(e, "top1")
            row["titles add (tail)"] = _gain_text(self.title_gains.get(e))
            rows.append(row)
        return rows


# "top-1" is over all test images (Table 2's figure); the groups are class-averaged (Table 4's)
METHODS_TABLE = "Long-tail methods: top-1 over all images, class-averaged top-1 by group, tail gain over CE"


def _gain_text(g: Gain | None) -> str:
    """``+1.23 (p=0.045)``: a paired gain and its t-test, for a table cell."""
    if g is None or not g.values:
        return "-"
    if g.t_undefined:
        return f"{g.mean:+.2f} (p undefined)"
    return f"{g.mean:+.2f}" + ("" if g.p_value is None else f" (p={g.p_value:.3f})")


def _title_gains(runs_: list[Run]) -> dict[str, Gain]:
    """Each ``<encoder>+<method>`` against ``<method>`` alone (``<encoder>`` against CE): tail top-1, paired by seed."""
    by = {(r.encoder, r.seed): r for r in runs_}
    out = {}
    for label in sorted({r.encoder for r in runs_ if methods.needs_titles(r.config)}):
        method = methods.method_of(next(r.config for r in runs_ if r.encoder == label))
        alone = BASELINE if method == methods.CE else method  # the same method without titles
        pairs = [(r, by[(alone, r.seed)]) for r in runs_ if r.encoder == label and (alone, r.seed) in by]
        out[label] = _paired_gain(pairs, "tail_top1")
    return out


def _paired_gain(pairs: list[tuple[Run, Run]], key: str) -> Gain:
    """``treated - reference`` of a metric over the (treated, reference) runs of each seed, with the paired t-test."""
    both = [
        (float(a.final[key]), float(b.final[key]))
        for a, b in pairs
        if a.final.get(key) is not None and b.final.get(key) is not None
    ]
    treated, reference = [a for a, _ in both], [b for _, b in both]
    return Gain(differences(treated, reference), paired_t(treated, reference))


# The recipe keys every run of one report shares: the visual stream's training and the class groups.
# A report pairs runs by seed as one experiment, so a baseline trained with another lr, backbone,
# pretraining or epoch count would turn a difference of settings into a "gain". The keys that may
# differ are the ones an ablation varies: the seed, the encoder and its co-training keys (lam, the
# preset's keys, distillation ...), the long-tail method, and how a run is executed (device, threads).
SHARED_KEYS = (
    ("model", "backbone"),
    ("model", "pretrained"),
    ("data", "image_size"),
    ("train", "epochs"),
    ("train", "batch_size"),
    ("train", "lr"),
    ("train", "momentum"),
    ("train", "weight_decay"),
    ("train", "step_size"),
    ("train", "gamma"),
    ("train", "augment"),
    ("train", "crop_scale"),
    ("train", "class_sample_rate"),
    ("train", "classifier_dtype"),
    ("eval", "head_threshold"),
    ("eval", "many_threshold"),
    ("eval", "few_threshold"),
    ("eval", "boundaries"),
    ("eval", "select"),
)


# Recipe keys that say how a run was executed or where its files are, not what it computed: the
# seeds of one row of a table may differ in these (and in train.seed) and nothing else.
HOW_IT_RAN = {
    ("train", k)
    for k in (
        "seed", "device", "threads", "loader_workers", "runs_dir", "in_memory", "memory_limit_gb", "block_rows",
        "shuffle_blocks", "eval_batch_size", "compile", "rank_shards", "keep_best", "classifier_parallel",
        "classifier_parallel_min_classes", "amp", "channels_last",
    )
} | {("data", k) for k in ("out", "manifest", "workers", "strict")} | {("", "name")}  # fmt: skip


# The co-training settings every encoder of one report shares (within a preset, which its label shows).
COTRAIN_KEYS = tuple(
    (k.partition(".")[0], k.partition(".")[2]) for k in TEXT_ONLY if "." in k and k != "model.encoder_options"
)


def _flat(recipe: dict[str, Any]) -> dict[tuple[str, str], Any]:
    """``{(section, key): value}`` of a saved recipe (top-level keys under section "")."""
    out: dict[tuple[str, str], Any] = {}
    for k, v in recipe.items():
        if isinstance(v, dict) and k not in ("encoder_options",):
            out.update({(k, kk): vv for kk, vv in v.items()})
        else:
            out[("", k)] = v
    return out


def _check_shared_settings(
    runs_: list[Run], also_free: frozenset[tuple[str, str]] | set[tuple[str, str]] = frozenset()
) -> None:
    """Refuse runs that are not one experiment: :data:`SHARED_KEYS` differ between any two runs,
    or two seeds of one table row (same label) differ in any key but :data:`HOW_IT_RAN`.

    Raises:
        SicotError: naming two runs and every key on which they differ.
    """

    def refuse(a: Run, b: Run, keys: list[tuple[str, str]], why: str) -> None:
        fa, fb = flat[a.path], flat[b.path]
        diff = [f"{'.'.join(x for x in key if x)} ({fa.get(key)!r} vs {fb.get(key)!r})" for key in keys]
        raise SicotError(f"{a.path} and {b.path} {why}: {', '.join(diff)}; report them separately")

    flat = {r.path: _flat(r.config.get("recipe", {})) for r in runs_}  # each recipe flattened once
    first = runs_[0]
    for r in runs_[1:]:
        fa, fb = flat[first.path], flat[r.path]
        keys = [k for k in SHARED_KEYS if fa.get(k) != fb.get(k)]
        if keys:
            refuse(
                first, r, keys, "were trained with different settings (a report pairs runs by seed as one experiment)"
            )
    by_label: dict[str, Run] = {}
    for r in runs_:
        a = by_label.setdefault(r.encoder, r)
        fa, fb = flat[a.path], flat[r.path]
        keys = sorted(k for k in set(fa) | set(fb) if k not in HOW_IT_RAN | also_free and fa.get(k) != fb.get(k))
        if keys:
            refuse(a, r, keys, f"are both {r.encoder!r} in the tables but were trained differently")


def _label_cotraining_differences(runs_: list[Run]) -> None:
    """Rows are labelled by encoder, preset and method: encoders co-trained with another lambda,
    normalisation, step... would be compared as if the encoder were the only difference. Each
    co-training key (:data:`COTRAIN_KEYS`) on which the titled rows differ is added to their
    labels, ``bilinear[lam=0.5]`` (a key a preset sets: only where two rows of one preset differ,
    the preset's own label tells the rest). Called once the seeds of each row are known to agree."""
    titled = [r for r in runs_ if methods.needs_titles(r.config)]
    flat = {r.path: _flat(r.config.get("recipe", {})) for r in titled}
    preset_keys = {tuple(k.split(".", 1)) for values in PRESETS.values() for k in values}

    def differs(key: tuple[str, str]) -> bool:
        groups: dict[Any, set[str]] = {}
        for r in titled:
            group = flat[r.path].get(("", "preset")) if key in preset_keys else None
            groups.setdefault(group, set()).add(json.dumps(flat[r.path].get(key), sort_keys=True))
        return any(len(values) > 1 for values in groups.values())

    shown = [k for k in COTRAIN_KEYS if differs(k)]
    for r in titled if shown else ():
        extra = ", ".join(f"{k[1]}={_value_text(flat[r.path].get(k))}" for k in shown)
        r.encoder = method_label(r.config, f"[{extra}]")


def _value_text(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    return f"{v:g}" if isinstance(v, float) else str(v)


SPLITS = ("test", "val")
# Keys that only draw the validation rows: runs on several validation folds of one dataset
# (data.val_fold, or data.split_seed where the test rows are the manifest's) are one experiment
# for `sicot report --split val`.
FOLD_KEYS = {("data", "val_fold"), ("data", "split_seed")}


def _dataset_key(r: Run) -> str:
    return json.dumps(r.config.get("dataset"), sort_keys=True)


def _on_validation(r: Run) -> Run:
    """``r`` with its validation figures in place of its test figures: those of the scored
    checkpoint's epoch, as ``metrics.jsonl`` logged them (``val_*``).

    Raises:
        SicotError: the run changed its classifier after training (a second stage, post-hoc
            logit adjustment), or logged no validation figures for that epoch.
    """
    if r.final.get("stage") or r.final.get("logit_adjust_tau") is not None:
        what = f"second stage {r.final['stage']}" if r.final.get("stage") else "post-hoc logit adjustment"
        raise SicotError(
            f"{r.path}: its {what} changed the classifier after training, so metrics.jsonl's validation figures are "
            "not the scored model's: report it on test, or leave it out of --split val"
        )
    if not r.history:
        raise SicotError(
            f"{r.path / runs.METRICS}: missing, empty or not a file, and --split val reads the validation figures "
            "there: report the run on test, or leave it out"
        )
    epoch = r.final.get("checkpoint_epoch", r.history[-1].get("epoch"))
    row = next((h for h in r.history if h.get("epoch") == epoch), None)
    if row is None:
        raise SicotError(
            f"{r.path / runs.METRICS}: no record of epoch {epoch}, the scored checkpoint's (the line is missing or "
            "damaged): report the run on test, or leave it out of --split val"
        )
    if not isinstance(row.get("val_top1"), (int, float)):
        raise SicotError(
            f"{r.path / runs.METRICS}: no validation figures for epoch {epoch}, the scored checkpoint's (a file "
            "prepared without validation rows, data.val_fraction = 0?): report it on test"
        )
    final = {k[4:]: v for k, v in row.items() if k.startswith("val_")}
    final |= {k: r.final[k] for k in ("checkpoint", "checkpoint_epoch", "selected_on") if k in r.final}
    final |= {"split": "val", "test_images": final.get("n_test", r.final.get("val_images", "?"))}
    return Run(r.path, r.encoder, r.seed, r.config, final, r.history, {})


def _warn_unpaired(encoder: str, mine: list[Run], baselines: list[Run], key: Callable[[Run], Any]) -> None:
    """A run without its partner is in its row's mean and not in the gain: the columns would not agree."""
    if not baselines:
        return
    theirs = {key(b) for b in baselines}
    ours = {key(r) for r in mine}
    alone = [r for r in mine if key(r) not in theirs] + [b for b in baselines if key(b) not in ours]
    if alone:
        names = ", ".join(str(r.path) for r in alone[:3]) + (f" and {len(alone) - 3} more" if len(alone) > 3 else "")
        log.warning(
            "%s: no run of the same seed to pair with (%s against the baseline): in the means, not in %s's gain, so "
            "the columns disagree; give both runs of every seed, or leave these out",
            names,
            encoder,
            encoder,
        )


def _check_folds(runs_: list[Run]) -> None:
    """Runs on several prepared files are validation folds of one dataset only if the files hold the
    same classes, the same test rows and the same rows to train and validate on (drawn otherwise).

    Raises:
        SicotError: another dataset (naming two runs), or a prepared file that cannot be read to check.
    """
    from sicot_cli.data.dataset import open_prepared

    by_file: dict[str, Run] = {}
    for r in runs_:
        by_file.setdefault(_dataset_key(r), r)
    if len(by_file) < 2:
        return
    seen: dict[tuple[Any, ...], Run] = {}
    for r in by_file.values():
        try:
            p = open_prepared(r.config.get("data", ""))
        except SicotError as e:
            raise SicotError(
                f"{r.path}: its prepared file is needed to check that the runs are validation folds of one dataset "
                f"(the same classes and test rows): {e}"
            ) from None
        ids = p.ids()
        lo, hi = p.split_range("test")
        seen[(tuple(p.class_names), tuple(sorted(ids[lo:hi])), tuple(sorted(ids[:lo] + ids[hi:])))] = r
    if len(seen) > 1:
        a, b = list(seen.values())[:2]
        raise SicotError(
            f"{a.path} and {b.path} were trained on different datasets (not validation folds of one: their classes, "
            "test rows or training rows differ): report them separately"
        )


def _check_one_run_a_pair(runs_: list[Run], pair_key: Callable[[Run], Any], on_val: bool) -> None:
    """Refuse a run given twice, and two runs of one encoder that would pair with the same baseline."""
    seen: dict[tuple[str, Any], Path] = {}
    for r in runs_:
        key = (r.encoder, pair_key(r))
        if key in seen and seen[key].resolve() == r.path.resolve():
            raise SicotError(f"{r.path}: the same run is given twice; give each run or ablation directory once")
        if key in seen:
            raise SicotError(
                f"two runs of encoder {r.encoder!r} with seed {r.seed}{' on one prepared file' if on_val else ''}: "
                f"{seen[key]} and {r.path}; report them separately"
            )
        seen[key] = r.path


def _images_ci(pairs: list[tuple[Run, Run]], k: int) -> tuple[float, float]:
    """Bootstrap interval of the top-``k`` gain over test images, seeds averaged, rows aligned by id."""
    per_seed = []
    for a, b in pairs:
        rows_a, hit_a = a.hits(k)
        rows_b, hit_b = b.hits(k)
        order_a, order_b = np.argsort(rows_a), np.argsort(rows_b)
        if not np.array_equal(rows_a[order_a], rows_b[order_b]):
            raise SicotError(f"{a.path} and {b.path} were scored on different test rows")
        per_seed.append(hit_a[order_a].astype(float) - hit_b[order_b].astype(float))
    return bootstrap_ci(np.mean(per_seed, axis=0))


def _protocol(runs_: list[Run], on_val: bool) -> str:
    """Which split and checkpoints the numbers come from, in words (and how validation folds pair)."""
    protocol = "; ".join(sorted({runs.selection_line(r.final) for r in runs_}))
    if on_val:
        folds = len({_dataset_key(r) for r in runs_})
        protocol += (
            f"{f', {folds} validation folds (prepared files), runs paired by seed within each' if folds > 1 else ''}; "
            "validation figures as logged at that epoch, for choosing; seeds p only (no per-image validation predictions)"
        )
    return protocol


def build_report(paths: list[Path], chosen: str = "bilinear", bootstrap: bool = True, split: str = "test") -> Report:
    """Read the runs and compute every cell, gain, p-value and interval.

    ``split = "val"``: the validation figures of each run's scored epoch (what choosing between
    settings may look at), paired by seed within each prepared file, so runs on several validation
    folds of one dataset (``data.val_fold``) are one experiment; seeds p only (validation predictions
    are not kept per image).

    Raises:
        SicotError: no run, no baseline run, or runs of different datasets or settings (:data:`SHARED_KEYS`) mixed.
    """
    if split not in SPLITS:
        raise SicotError(f"--split must be test or val, got {split!r}")
    runs_, unfinished = load_runs(paths)
    on_val = split == "val"
    if on_val:
        runs_ = [_on_validation(r) for r in runs_]
        bootstrap = False
        _check_folds(runs_)
    elif len({_dataset_key(r) for r in runs_}) > 1:
        raise SicotError("the runs were trained on different datasets: report them separately")
    _check_shared_settings(runs_, FOLD_KEYS if on_val else frozenset())
    _label_cotraining_differences(runs_)
    # a pair is one seed on one prepared file (on validation, folds are different files)
    pair_key = (lambda r: (_dataset_key(r), r.seed)) if on_val else (lambda r: r.seed)
    _check_one_run_a_pair(runs_, pair_key, on_val)
    encoders = sorted({r.encoder for r in runs_}, key=lambda e: (e != BASELINE, e))
    # Without a baseline there are no gains: Table 3 (accuracies), the curves and the per-class
    # table still say how the runs did (a single `sicot train` run is reported, not refused).
    if chosen not in encoders:  # the first plain encoder (no long-tail method), else the first label
        plain = [r.encoder for r in runs_ if r.encoder != BASELINE and methods.method_of(r.config) == methods.CE]
        asked = sorted(e for e in plain if e.startswith(chosen + "["))  # bilinear[lam=0.5] for bilinear
        chosen = (asked or sorted(plain) or [next((e for e in encoders if e != BASELINE), BASELINE)])[0]
    seeds = sorted({r.seed for r in runs_})
    keys = _metric_keys(runs_)
    cells = {
        e: {k: Cell([float(r.final[k]) for r in runs_ if r.encoder == e and r.final.get(k) is not None]) for k in keys}
        for e in encoders
    }
    gains: dict[str, dict[str, Gain]] = {}
    base_by_seed = {pair_key(r): r for r in runs_ if r.encoder == BASELINE}
    for e in encoders:
        if e == BASELINE:
            continue
        pairs = [(r, base_by_seed[pair_key(r)]) for r in runs_ if r.encoder == e and pair_key(r) in base_by_seed]
        _warn_unpaired(e, [r for r in runs_ if r.encoder == e], list(base_by_seed.values()), pair_key)
        gains[e] = {k: _paired_gain(pairs, k) for k in keys}
        if bootstrap and pairs:
            for k in ("top1", "top3"):
                if k in gains[e]:
                    gains[e][k].ci = _images_ci(pairs, int(k[3:]))
    recipe = runs_[0].config["recipe"]
    with_methods = any(methods.method_of(r.config) != methods.CE for r in runs_)
    titles = {r.encoder: methods.needs_titles(r.config) for r in runs_} if with_methods else {}
    protocol = _protocol(runs_, on_val)
    return Report(
        runs_,
        unfinished,
        encoders,
        seeds,
        chosen,
        cells,
        gains,
        int(runs_[0].final.get("head_threshold", recipe["eval"]["head_threshold"])),
        int(runs_[0].final.get("many_threshold", recipe["eval"]["many_threshold"])),
        int(runs_[0].final.get("few_threshold", recipe["eval"]["few_threshold"])),
        str(recipe.get("name", "dataset")),
        f"scored on the {protocol}",
        titles,
        _title_gains(runs_) if with_methods else {},
        VERDICT_RULE_VAL if on_val else VERDICT_RULE,
    )


# --- renderings ------------------------------------------------------------------------------


def md_cell(text: str) -> str:
    """A table cell of report.md: ``|`` escaped, a line break (a label typed with Alt+Enter in a
    spreadsheet) as ``<br>``, so that a class name never ends its table row."""
    return "<br>".join(text.replace("|", "\\|").splitlines()) if text else text


def to_markdown(report: Report) -> str:
    out = [
        f"# sicot report: {report.dataset}",
        "",
        f"Seeds: {', '.join(map(str, report.seeds))}; runs: {len(report.runs)}"
        + (f"; unfinished (left out): {len(report.unfinished)}" if report.unfinished else ""),
        "",
        f"Every number is image-only, {report.protocol}.",
        "",
    ]
    for title, rows in report.tables().items():
        if not rows:
            continue
        out += [f"## {title}", ""]
        cols = list(rows[0])
        out.append("| " + " | ".join(md_cell(c) for c in cols) + " |")
        out.append("|" + "|".join("---" for _ in cols) + "|")
        out += ["| " + " | ".join(md_cell(r[c]) for c in cols) + " |" for r in rows]
        out.append("")
    if report.gains:
        out += [f"Evidence: {report.rule}", ""]
    return "\n".join(out)


def _text_cell(value: Any) -> Any:
    """A name from the data (a class label, an encoder's name) as a CSV cell a spreadsheet shows as text:
    one starting with = + - @ (or a tab or CR) would be run as a formula (CSV injection), so it gets a
    leading quote. Numbers are left alone."""
    return f"'{value}" if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def to_csv(report: Report) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")  # also printed to stdout, where a CR would be escaped
    w.writerow(["encoder", "metric", "mean", "std", "n", "gain", "p_value", "ci95_low", "ci95_high", "significant"])
    for e in report.encoders:
        for k, c in report.cells[e].items():
            g = report.gains.get(e, {}).get(k)
            w.writerow(
                [
                    _text_cell(e),
                    k,
                    c.mean if c.values else "",
                    "" if c.std is None else c.std,
                    len(c.values),
                    "" if g is None or not g.values else g.mean,
                    "" if g is None or g.p_value is None else "undefined" if g.t_undefined else g.p_value,
                    "" if g is None or g.ci is None else g.ci[0],
                    "" if g is None or g.ci is None else g.ci[1],
                    "" if g is None or g.significant is None else g.significant,
                ]
            )
    return buf.getvalue()


def to_json(report: Report) -> str:
    return json.dumps(report.as_dict(), indent=2, ensure_ascii=False)


def _class_info(report: Report) -> tuple[list[str], list[int]] | None:
    """Class names and training counts from the runs' prepared file (None when it is gone)."""
    from sicot_cli.data.dataset import open_prepared

    try:
        prepared = open_prepared(report.runs[0].config["data"])
    except (SicotError, KeyError, TypeError):
        return None
    return list(prepared.class_names), [int(c) for c in prepared.train_counts]


def per_class_rows(report: Report, info: tuple[list[str], list[int]] | None) -> list[dict[str, Any]]:
    """One row per class: its name, training images and each encoder's test top-1 (mean over seeds)."""
    n = max((len(r.per_class.get("per_class_top1", [])) for r in report.runs), default=0)
    names, counts = info if info is not None else ([str(i) for i in range(n)], [None] * n)
    if len(names) != n:
        return []
    rows = []
    for c in range(n):
        row: dict[str, Any] = {"class": names[c], "train_images": counts[c]}
        for e in report.encoders:
            vals = [
                r.per_class["per_class_top1"][c]
                for r in report.runs
                if r.encoder == e and r.per_class.get("per_class_top1")
            ]
            vals = [v for v in vals if v is not None]
            row[f"top1 {'baseline' if e == BASELINE else e}"] = round(sum(vals) / len(vals), 2) if vals else None
        rows.append(row)
    return rows


def confused_pairs(report: Report, names: list[str] | None, encoder: str, top: int = 10) -> list[tuple[str, str, int]]:
    """The (true class, predicted class) pairs most often confused by ``encoder``'s runs (test top-1, all seeds)."""
    import h5py

    pairs: dict[tuple[int, int], int] = {}
    for r in report.runs:
        if r.encoder != encoder or not (r.path / runs.PREDICTIONS).is_file():  # a FIFO: Run.hits refused it
            continue
        try:
            with h5py.File(r.path / runs.PREDICTIONS, "r") as f:
                labels, pred = f["labels"][()], f["topk_labels"][:, 0]
        except (OSError, KeyError, ValueError, TypeError, IndexError) as e:
            log.warning(
                "%s: unreadable predictions (%s): the most confused class pairs leave this run out",
                r.path / runs.PREDICTIONS,
                type(e).__name__,
            )
            continue
        for t, p in zip(labels.tolist(), pred.tolist(), strict=True):
            if t != p:
                pairs[(t, p)] = pairs.get((t, p), 0) + 1
    name = lambda i: names[i] if names is not None and 0 <= i < len(names) else str(i)  # noqa: E731
    ranked = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return [(name(t), name(p), n) for (t, p), n in ranked]


def _per_class_csv(rows: list[dict[str, Any]]) -> str:
    """The per-class table; with no row, its header alone (an empty file would not be recognised as
    a report's, and the next report into the folder would refuse to replace it)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["class", "train_images"])
    w.writeheader()
    w.writerows({k: _text_cell(v) for k, v in row.items()} for row in rows)
    return buf.getvalue()


def _removed_words_line(report: Report) -> str | None:
    """The prepared file's removed words most tied to a label, as ``prepare`` reported them."""
    side = Path(str(report.runs[0].config.get("data", ""))).with_suffix(".recipe.json")
    try:
        summary = json.loads(side.read_text(encoding="utf-8"))["summary"]
        rules = summary["filter_rules"]
        words = [w for w in summary.get("informative_removed", []) if w[1] > 0]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not words:
        return None
    shown = ", ".join(
        f"{abbreviate(str(w))} ({mi:.2f} bits; {share:.0%} in {abbreviate(str(label))})"
        for w, mi, label, share in words[:8]
    )
    return f"Noise-word filter ({rules[0]['rule']}: {rules[0]['words']} words): the removed words most tied to a label: {shown}."


def _extras_markdown(report: Report, info: tuple[list[str], list[int]] | None) -> str:
    """The most confused class pairs (per encoder shown) and the noise filter's removed words for report.md."""
    names = info[0] if info is not None else None
    out = []
    removed = _removed_words_line(report)
    if removed:
        out += [removed, ""]
    for e in dict.fromkeys([BASELINE, report.chosen]):
        if e not in report.cells:
            continue
        pairs = confused_pairs(report, names, e)
        if not pairs:
            continue
        out += [
            f"## Most confused class pairs ({'baseline' if e == BASELINE else e}, test top-1, all seeds)",
            "",
            "| true class | predicted as | images |",
            "|---|---|---:|",
        ]
        out += [f"| {md_cell(t)} | {md_cell(p)} | {n} |" for t, p, n in pairs]
        out.append("")
    return "\n".join(out)


# How each file an earlier `sicot report` wrote begins: only such a file is replaced.
_REPORT_STARTS = {
    "report.md": "# sicot report",
    "report.csv": "encoder,metric,",
    "report.json": '{\n  "dataset":',
    "per_class.csv": "class,",
}
# Everything a report writes into an ablation folder (the figures: sicot_cli.figures.render_all).
REPORT_FILES = (*_REPORT_STARTS, "curves.png", "fig6_distribution.png", "per_class_gain.png", "fig7_attention.png")


FIGURE_FILES = REPORT_FILES[len(_REPORT_STARTS) :]
# The PNG text chunk sicot's figures carry (sicot_cli.figures); figures of earlier versions carry
# matplotlib's own, and are replaced too.
FIGURE_SOFTWARE = "sicot report"
_PNG_SOFTWARE = (b"tEXtSoftware\x00" + FIGURE_SOFTWARE.encode(), b"tEXtSoftware\x00Matplotlib")


def _written_by_report(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(512)
    except OSError:
        return False
    if path.name in _REPORT_STARTS:
        return head.decode("utf-8", errors="replace").startswith(_REPORT_STARTS[path.name])
    return head.startswith(b"\x89PNG\r\n\x1a\n") and any(tag in head for tag in _PNG_SOFTWARE)


def _check_replaceable(path: Path) -> None:
    """Refuse to replace a file at a report's name that no ``sicot report`` wrote (a user's own notes,
    a picture of their own)."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_file() or not _written_by_report(path):
        figure = ", or leave the figures out (--no-figures)" if path.name in FIGURE_FILES else ""
        raise SicotError(
            f"{path}: exists and was not written by `sicot report`; it is not replaced: move it, or write the "
            f"report elsewhere (--out FOLDER){figure}"
        )


def check_report_files(out_dir: Path, figures: bool) -> None:
    """Refuse a report into ``out_dir`` where a file of one of its names was not written by ``sicot
    report`` (``ablate`` asks before its first run, not after its last)."""
    for name in [*_REPORT_STARTS, *(FIGURE_FILES if figures else ())]:
        _check_replaceable(out_dir / name)


def write_report(report: Report, out_dir: Path, figures: bool = False) -> list[Path]:
    """report.md, report.csv, report.json and per_class.csv (atomically) in ``out_dir``; with
    ``figures``, the figures' names are checked too (before anything is written), for the caller
    to render them after."""
    from sicot_cli.fsutil import atomic_path

    info = _class_info(report)
    written = []
    md = (
        to_markdown(report)
        + "\n"
        + _extras_markdown(report, info)
        + "\nPer-class results: per_class.csv (class name, training images, test top-1 per encoder).\n"
    )
    files = [
        ("report.md", md),
        ("report.csv", to_csv(report)),
        ("report.json", to_json(report)),
        ("per_class.csv", _per_class_csv(per_class_rows(report, info))),
    ]
    check_report_files(out_dir, figures)
    for name, text in files:
        path = out_dir / name
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        written.append(path)
    return written
