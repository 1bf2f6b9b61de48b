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
averaged over the paired seeds, resampled 2,000 times with a fixed seed). A gain is called
significant when the bootstrap interval excludes 0 and, with 2+ seeds, p < 0.05.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sicot_cli import runs
from sicot_cli.errors import SicotError

BASELINE = "none"
GROUP_METRICS = ("head", "tail", "many", "medium", "few")
BOOTSTRAP = 2000
ALPHA = 0.05


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
        import h5py

        path = self.path / runs.PREDICTIONS
        try:
            with h5py.File(path, "r") as f:
                rows = f["rows"][()]
                labels = f["labels"][()]
                topk = f["topk_labels"][()]
        except (OSError, KeyError, ValueError, TypeError) as e:  # truncated, damaged or missing a dataset
            raise SicotError(f"{path}: unreadable predictions ({e}): a damaged run file (retrain it, or leave it out of the report)") from None
        n = len(labels)
        if not (rows.ndim == labels.ndim == 1 and len(rows) == n and topk.ndim == 2 and topk.shape[0] == n and topk.shape[1] >= 1
                and all(a.dtype.kind in "iu" for a in (rows, labels, topk))):
            raise SicotError(f"{path}: field topk_labels/labels/rows: shapes {topk.shape}/{labels.shape}/{rows.shape} do not fit together: a damaged run file")
        return rows, (topk[:, :k] == labels[:, None]).any(axis=1)


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
            raise SicotError(f"{p}: not a run directory and holds none (no config.json); runs are made by `sicot train` or `sicot ablate`")
        found.extend(below)
    return found


def method_label(config: dict[str, Any]) -> str:
    """A run's row in the tables: its encoder, with ``[preset]`` for a preset other than "sicot"."""
    encoder = config["encoder"]
    preset = config.get("recipe", {}).get("preset", "sicot")  # runs older than presets: sicot's keys or explicit ones
    return encoder if encoder == BASELINE or preset == "sicot" else f"{encoder}[{preset}]"


def load_runs(paths: list[Path]) -> tuple[list[Run], list[Path]]:
    """Finished runs under ``paths``, and the unfinished ones (left out of the tables)."""
    done, unfinished = [], []
    for d in find_runs(paths):
        config = runs.read_config(d)
        if not runs.is_finished(d):
            unfinished.append(d)
            continue
        summary = runs.read_summary(d)
        history = runs.read_metrics(d)
        done.append(Run(d, method_label(config), int(config["recipe"]["train"]["seed"]), config, summary.get("final") or (history[-1] if history else {}), history, {k: v for k, v in summary.items() if k.startswith("per_class_")}))
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


def paired_t(differences: list[float]) -> float | None:
    """Two-sided p-value of the paired t-test on per-seed differences (None below 2 seeds).

    NaN when every seed's difference is the same: the statistic is x/0 (or 0/0) and the test is
    undefined, whatever the difference; a report says "p undefined" rather than p=0.000.
    """
    n = len(differences)
    if n < 2:
        return None
    mean, std = mean_std(differences)
    if std == 0:
        return math.nan
    from scipy import stats

    t = mean / (std / math.sqrt(n))
    return float(2 * stats.t.sf(abs(t), df=n - 1))


def bootstrap_ci(diff: np.ndarray, n_boot: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean of per-image differences (in percent points)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), (n_boot, len(diff)))
    means = diff[idx].mean(axis=1) * 100.0
    lo, hi = np.percentile(means, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
    return float(lo), float(hi)


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
        return mean_std(self.values)[0]

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

    def as_dict(self) -> dict[str, Any]:
        p = None if self.t_undefined else self.p_value
        return {
            "mean": self.mean, "std": mean_std(self.values)[1], "values": self.values, "p_value": p,
            "t_test": "undefined" if self.t_undefined else "ok" if p is not None else None,
            "ci95": list(self.ci) if self.ci else None, "significant": self.significant,
        }


def _metric_keys(runs_: list[Run]) -> list[str]:
    ks = sorted({int(k[3:]) for r in runs_ for k in r.final if k.startswith("top") and k[3:].isdigit()})
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
            parts.append("p undefined: the same difference on every seed")
        elif g.p_value is not None:
            parts.append(f"p={g.p_value:.3f}")
        if g.ci is not None:
            parts.append(f"CI [{g.ci[0]:+.2f}, {g.ci[1]:+.2f}]")
        verdict = {True: "significant", False: "not significant", None: "-"}[g.significant]
        return f"{verdict} ({', '.join(parts)})" if parts else verdict

    def tables(self) -> dict[str, list[dict[str, str]]]:
        t2 = [{"dataset": self.dataset, "baseline": self.pair(BASELINE, "top1"), f"co-training ({self.chosen})": self.pair(self.chosen, "top1"), "gain": self.pair_gain(self.chosen, "top1"), "evidence (top-1 gain)": self.evidence(self.chosen, "top1")}] if self.chosen in self.cells else []
        t3 = [{"method": "baseline" if e == BASELINE else e, "top-1": self.fmt(e, "top1"), "gain": "-" if e == BASELINE else self.fmt_gain(e, "top1"), "evidence": "-" if e == BASELINE else self.evidence(e, "top1")} for e in self.encoders]
        h = self.head_threshold
        groups = [("head", f"{h} - max"), ("tail", f"1 - {h}"), ("many", f"> {self.many_threshold}"), ("medium", f"{self.few_threshold} - {self.many_threshold}"), ("few", f"< {self.few_threshold}")]
        t4 = []
        if self.chosen in self.cells:
            for g, span in groups:
                t4.append({"classes": g, "#training samples": span, "baseline": self.pair(BASELINE, f"{g}_top1"), f"co-training ({self.chosen})": self.pair(self.chosen, f"{g}_top1"), "gain": self.pair_gain(self.chosen, f"{g}_top1"), "evidence (top-1 gain)": self.evidence(self.chosen, f"{g}_top1")})
        return {"Table 2: baseline vs co-training, top-1 (top-3)": t2, "Table 3: encoders, top-1": t3, "Table 4: head/tail and many/medium/few, class-averaged top-1 (top-3)": t4}


def build_report(paths: list[Path], chosen: str = "bilinear", bootstrap: bool = True) -> Report:
    """Read the runs and compute every cell, gain, p-value and interval.

    Raises:
        SicotError: no run, no baseline run, or runs of different datasets/settings mixed.
    """
    runs_, unfinished = load_runs(paths)
    datasets = {json.dumps(r.config.get("dataset"), sort_keys=True) for r in runs_}
    if len(datasets) > 1:
        raise SicotError("the runs were trained on different datasets: report them separately")
    seen: dict[tuple[str, int], Path] = {}
    for r in runs_:
        if (r.encoder, r.seed) in seen:
            raise SicotError(f"two runs of encoder {r.encoder!r} with seed {r.seed}: {seen[(r.encoder, r.seed)]} and {r.path}; report them separately")
        seen[(r.encoder, r.seed)] = r.path
    encoders = sorted({r.encoder for r in runs_}, key=lambda e: (e != BASELINE, e))
    if BASELINE not in encoders:
        raise SicotError("no baseline run (encoder 'none') among the runs: gains need one (sicot train --encoder none, or sicot ablate)")
    if chosen not in encoders:
        chosen = next((e for e in encoders if e != BASELINE), BASELINE)
    seeds = sorted({r.seed for r in runs_})
    keys = _metric_keys(runs_)
    cells = {e: {k: Cell([float(r.final[k]) for r in runs_ if r.encoder == e and r.final.get(k) is not None]) for k in keys} for e in encoders}
    gains: dict[str, dict[str, Gain]] = {}
    base_by_seed = {r.seed: r for r in runs_ if r.encoder == BASELINE}
    for e in encoders:
        if e == BASELINE:
            continue
        pairs = [(r, base_by_seed[r.seed]) for r in runs_ if r.encoder == e and r.seed in base_by_seed]
        gains[e] = {}
        for k in keys:
            diffs = [float(a.final[k]) - float(b.final[k]) for a, b in pairs if a.final.get(k) is not None and b.final.get(k) is not None]
            gains[e][k] = Gain(diffs, paired_t(diffs))
        if bootstrap and pairs:
            for k in ("top1", "top3"):
                if k not in gains[e]:
                    continue
                kk = int(k[3:])
                per_seed = []
                for a, b in pairs:
                    rows_a, hit_a = a.hits(kk)
                    rows_b, hit_b = b.hits(kk)
                    order_a, order_b = np.argsort(rows_a), np.argsort(rows_b)
                    if not np.array_equal(rows_a[order_a], rows_b[order_b]):
                        raise SicotError(f"{a.path} and {b.path} were scored on different test rows")
                    per_seed.append(hit_a[order_a].astype(float) - hit_b[order_b].astype(float))
                gains[e][k].ci = bootstrap_ci(np.mean(per_seed, axis=0))
    recipe = runs_[0].config["recipe"]
    protocol = "; ".join(sorted({runs.selection_line(r.final) for r in runs_}))
    return Report(
        runs_, unfinished, encoders, seeds, chosen, cells, gains,
        int(runs_[0].final.get("head_threshold", recipe["eval"]["head_threshold"])),
        int(recipe["eval"]["many_threshold"]), int(recipe["eval"]["few_threshold"]),
        recipe.get("name", "dataset"),
        f"scored on the {protocol}",
    )


# --- renderings ------------------------------------------------------------------------------


def to_markdown(report: Report) -> str:
    out = [
        f"# sicot report: {report.dataset}", "",
        f"Seeds: {', '.join(map(str, report.seeds))}; runs: {len(report.runs)}" + (f"; unfinished (left out): {len(report.unfinished)}" if report.unfinished else ""), "",
        f"Every number is image-only, {report.protocol}.", "",
    ]
    for title, rows in report.tables().items():
        if not rows:
            continue
        out += [f"## {title}", ""]
        cols = list(rows[0])
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "|".join("---" for _ in cols) + "|")
        out += ["| " + " | ".join(r[c].replace("|", "\\|") for c in cols) + " |" for r in rows]
        out.append("")
    return "\n".join(out)


def to_csv(report: Report) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["encoder", "metric", "mean", "std", "n", "gain", "p_value", "ci95_low", "ci95_high", "significant"])
    for e in report.encoders:
        for k, c in report.cells[e].items():
            g = report.gains.get(e, {}).get(k)
            w.writerow([e, k, c.mean if c.values else "", "" if c.std is None else c.std, len(c.values), "" if g is None or not g.values else g.mean, "" if g is None or g.p_value is None else "undefined" if g.t_undefined else g.p_value, "" if g is None or g.ci is None else g.ci[0], "" if g is None or g.ci is None else g.ci[1], "" if g is None or g.significant is None else g.significant])
    return buf.getvalue()


def to_json(report: Report) -> str:
    return json.dumps(report.as_dict(), indent=2, ensure_ascii=False)


def write_report(report: Report, out_dir: Path) -> list[Path]:
    """report.md, report.csv and report.json (atomically) in ``out_dir``."""
    from sicot_cli.fsutil import atomic_path

    written = []
    for name, text in (("report.md", to_markdown(report)), ("report.csv", to_csv(report)), ("report.json", to_json(report))):
        path = out_dir / name
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        written.append(path)
    return written
