"""The report's figures (matplotlib, Agg backend) and the attention views (Fig. 7).

- ``fig6_distribution.png``: training images per class, sorted, head classes red and tail green
  (the paper's colours);
- ``fig7_attention.png``: for sample test titles, the words ordered by learned attention, the
  three highest in green and the three lowest in red;
- ``per_class_gain.png``: per-class top-1 gain of co-training over the baseline against the class's
  training count: where the tail gains come from;
- ``curves.png``: training loss and validation top-1 per epoch for every run (one colour per
  encoder, one line style per seed, one legend).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sicot_cli.errors import SicotError
from sicot_cli.fsutil import atomic_path
from sicot_cli.report import BASELINE, FIGURE_SOFTWARE, Report


def _plt():  # noqa: ANN202 - matplotlib is imported lazily and headless
    # figures are written to files, never shown: a desktop's MPLBACKEND (or a wrong one, a
    # ValueError inside matplotlib's import) has no say
    os.environ.pop("MPLBACKEND", None)
    import matplotlib

    matplotlib.use("Agg")
    # class names, titles and dataset names are the user's text: "$5-$10 shoes" is no formula
    # (mathtext drew it as "5 - 10 shoes", or raised on one it could not parse)
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:  # noqa: ANN001
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png", metadata={"Software": FIGURE_SOFTWARE})
    _plt().close(fig)
    return path


def fig6_distribution(train_counts: np.ndarray, head_threshold: int, title: str, path: Path) -> Path:
    plt = _plt()
    counts = np.sort(np.asarray(train_counts))[::-1]
    head = counts >= head_threshold
    fig, ax = plt.subplots(figsize=(7, 3.2))
    # one filled step outline per group (the head classes come first in this order), each class a
    # bar of width 1 centred on its index: drawing one bar object per class took 11 KB and 0.6 ms a
    # class (11 minutes at a million classes). A group with no class gets no outline and no legend entry.
    n_head = int(head.sum())
    edges = np.arange(len(counts) + 1) - 0.5
    if n_head:
        ax.stairs(counts[:n_head], edges[: n_head + 1], fill=True, color="#d62728", label=f"head (>= {head_threshold})")
    if n_head < len(counts):
        ax.stairs(counts[n_head:], edges[n_head:], fill=True, color="#2ca02c", label=f"tail (< {head_threshold})")
    ax.set_xlabel("classes, sorted by training images")
    ax.set_ylabel("training images")
    ax.set_title(f"Fig. 6: long-tailed training distribution ({title})")
    ax.legend(loc="upper right")  # "best" searches the data for a free corner: slow with many classes
    return _save(fig, path)


def per_class_gain(report: Report, train_counts: np.ndarray, path: Path) -> Path | None:
    """Mean per-class top-1 gain (over paired seeds) against the training count."""
    diffs = []
    for r in report.runs:
        if r.encoder != report.chosen:
            continue
        base = report.run(BASELINE, r.seed)
        if base is None:
            continue
        a = np.array([np.nan if v is None else v for v in r.per_class.get("per_class_top1", [])], dtype=float)
        b = np.array([np.nan if v is None else v for v in base.per_class.get("per_class_top1", [])], dtype=float)
        if len(a) and len(a) == len(b):
            diffs.append(a - b)  # per-class accuracies are already in percent
    if not diffs:
        return None
    plt = _plt()
    stacked = np.stack(diffs)
    seen = ~np.isnan(stacked)
    # mean over the seeds where the class was scored; NaN (no test image) without nanmean's warning
    gain = np.where(
        seen.any(axis=0), np.where(seen, stacked, 0.0).sum(axis=0) / np.maximum(seen.sum(axis=0), 1), np.nan
    )
    counts = np.asarray(train_counts, dtype=float)
    ok = ~np.isnan(gain)
    if not ok.any():
        return None
    head = counts >= report.head_threshold
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.scatter(counts[ok & head], gain[ok & head], s=12, color="#d62728", label="head classes")
    ax.scatter(counts[ok & ~head], gain[ok & ~head], s=12, color="#2ca02c", label="tail classes")
    edges = np.unique(np.quantile(counts[ok], np.linspace(0, 1, 7)))
    if len(edges) > 2:
        centers, means = [], []
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            sel = ok & (counts >= lo) & (counts <= hi)
            if sel.any():
                centers.append(np.sqrt(lo * hi))
                means.append(gain[sel].mean())
        ax.plot(centers, means, color="black", lw=2, label="binned mean")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log)")
    ax.set_ylabel(f"top-1 gain, {report.chosen} - baseline (points)")
    ax.set_title("per-class gain of co-training vs training count")
    ax.legend(fontsize=8)
    return _save(fig, path)


def curves(report: Report, path: Path) -> Path:
    """Both panels share one legend: a colour per encoder, a line style per seed."""
    plt = _plt()
    from matplotlib.lines import Line2D

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    colours = {e: f"C{i % 10}" for i, e in enumerate(report.encoders)}
    styles = ["-", "--", ":", "-."]
    seed_style = {s: styles[i % len(styles)] for i, s in enumerate(report.seeds)}
    for r in report.runs:
        if r.config.get("stage"):  # a second stage (sicot decouple) trains no stream: it has no curve here
            continue
        ep = [h["epoch"] for h in r.history]
        kw = {"color": colours.get(r.encoder, "black"), "linestyle": seed_style.get(r.seed, "-"), "lw": 1.4}
        a1.plot(ep, [h["loss_v"] for h in r.history], **kw)
        a2.plot(ep, [h.get("val_top1", np.nan) for h in r.history], **kw)
    a1.set_title("training loss of x_v (CE or the run's long-tail loss)")
    a2.set_title("validation top-1 (image only)")
    for a in (a1, a2):
        a.set_xlabel("epoch")
    drawn = {r.encoder for r in report.runs if not r.config.get("stage")}
    handles = [
        Line2D([], [], color=colours[e], lw=2, label="baseline" if e == BASELINE else e)
        for e in report.encoders
        if e in drawn
    ]
    if len(report.seeds) > 1:
        handles += [Line2D([], [], color="grey", linestyle=seed_style[s], label=f"seed {s}") for s in report.seeds]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    return _save(fig, path)


@dataclass
class TitleAttention:
    """One title's words with their attention weights, highest first."""

    row: int
    label: str
    words: list[str]
    weights: list[float]


def attention(
    run_dir: Path, rows: list[int] | None = None, class_name: str | None = None, n: int = 4
) -> list[TitleAttention]:
    """Attention of the run's encoder over the words of sample test titles (or one class's titles).

    Raises:
        SicotError: the run's encoder exposes no attention, or the class is unknown.
    """
    import torch

    from sicot_cli.evaluate import load_run_model

    _, prepared, model, _ = load_run_model(run_dir)
    enc = model.encoder
    if enc is None or not getattr(enc, "has_attention", False):
        raise SicotError(
            f"{run_dir}: encoder {getattr(enc, 'name', 'none') if enc is not None else 'none'} has no word attention (use bilinear or bilstm_attention)"
        )
    if class_name is not None:
        if class_name not in prepared.class_names:
            raise SicotError(f"class {class_name!r} not in the dataset (e.g. {prepared.class_names[0]!r})")
        c = prepared.class_names.index(class_name)
        rows = [int(i) for i in np.flatnonzero((prepared.labels == c) & (prepared.lengths > 0))]
    elif rows is None:
        # test rows with a title (a test row whose title the noise filter emptied is still scored, but has no words to show)
        test = np.arange(prepared.test_start, prepared.n)
        test = test[prepared.lengths[test] > 0]
        rng = np.random.default_rng(0)
        rows = sorted(int(i) for i in rng.choice(test, size=min(n, len(test)), replace=False))
    tokens = torch.from_numpy(prepared.tokens[rows].astype(np.int64))
    mask = tokens != 0
    model.eval()
    with torch.no_grad():
        att = enc.attention(tokens, mask).numpy()
    out = []
    for i, row in enumerate(rows):
        ids = prepared.tokens[row, : prepared.lengths[row]]
        w = att[i, : len(ids)]
        order = np.argsort(-w, kind="stable")
        out.append(
            TitleAttention(
                row,
                prepared.class_names[prepared.labels[row]],
                [prepared.words[ids[j]] for j in order],
                [float(w[j]) for j in order],
            )
        )
    return out


def class_words(items: list[TitleAttention], top: int = 10) -> list[tuple[str, float, int]]:
    """Mean attention of each word over a class's titles: (word, mean weight, titles)."""
    acc: dict[str, list[float]] = {}
    for t in items:
        for w, a in zip(t.words, t.weights, strict=True):
            acc.setdefault(w, []).append(a)
    ranked = sorted(((w, float(np.mean(v)), len(v)) for w, v in acc.items()), key=lambda x: (-x[1], x[0]))
    return ranked[:top]


def word_colour(i: int, n: int) -> str | None:
    """Green for the three highest, red for the three lowest (when the title is long enough)."""
    if i < 3:
        return "green"
    if i >= max(3, n - 3):
        return "red"
    return None


def _add_bundled_cjk_font(font_manager) -> None:  # noqa: ANN001
    """Register Noto Sans CJK SC from the ``mplfonts`` package (a dependency) with matplotlib."""
    from importlib.resources import files

    try:
        path = files("mplfonts") / "fonts" / "NotoSansCJKsc-Regular.otf"
    except ModuleNotFoundError:
        return
    if path.is_file() and str(path) not in {f.fname for f in font_manager.fontManager.ttflist}:
        font_manager.fontManager.addfont(str(path))


LABEL_CHARS = 28


def fig7_label(label: str) -> str:
    """A class name for Fig. 7's label column: wrapped at :data:`LABEL_CHARS`, at most 3 lines."""
    import textwrap

    lines = textwrap.wrap(label, LABEL_CHARS, break_long_words=True) or [""]
    if len(lines) > 3:
        lines = [*lines[:2], lines[2][: LABEL_CHARS - 1] + "…"]
    return "\n".join(lines) + ":"


def fig7_attention(items: list[TitleAttention], path: Path, encoder: str) -> Path:
    plt = _plt()
    from matplotlib import font_manager

    _add_bundled_cjk_font(font_manager)
    cjk = [
        f.name
        for f in font_manager.fontManager.ttflist
        if any(s in f.name for s in ("Noto Sans CJK", "WenQuanYi", "Droid Sans Fallback", "AR PL"))
    ]
    if cjk:
        plt.rcParams["font.family"] = [cjk[0], "DejaVu Sans"]
    fig, ax = plt.subplots(figsize=(9, 0.6 + 0.55 * len(items)))
    ax.axis("off")
    # The words start after the widest class label (wrapped at LABEL_CHARS), never on top of it.
    labels = [
        ax.text(
            0.0,
            1 - (i + 0.5) / len(items),
            fig7_label(t.label),
            fontsize=8,
            ha="left",
            va="center",
            transform=ax.transAxes,
        )
        for i, t in enumerate(items)
    ]
    fig.canvas.draw()
    x0 = max((lab.get_window_extent().transformed(ax.transAxes.inverted()).x1 for lab in labels), default=0.0) + 0.02
    for i, t in enumerate(items):
        y = 1 - (i + 0.5) / len(items)
        x = x0
        for j, (w, a) in enumerate(zip(t.words, t.weights, strict=True)):
            colour = {"green": "#1a9641", "red": "#d7191c"}.get(word_colour(j, len(t.words)) or "", "black")
            txt = ax.text(
                x, y, f"{w} {a:.2f}", fontsize=8, color=colour, ha="left", va="center", transform=ax.transAxes
            )
            fig.canvas.draw()
            bbox = txt.get_window_extent().transformed(ax.transAxes.inverted())
            x = bbox.x1 + 0.012
    ax.set_title(f"Fig. 7: words ordered by learned attention ({encoder}); green: 3 highest, red: 3 lowest", fontsize=9)
    if not cjk:
        ax.text(
            0,
            -0.05,
            "(no CJK font installed: Chinese words may show as boxes; install fonts-noto-cjk)",
            fontsize=6,
            transform=ax.transAxes,
        )
    return _save(fig, path)


def render_all(report: Report, out_dir: Path) -> list[Path]:
    """Every figure the runs allow; returns the files written."""
    from sicot_cli.data.dataset import open_prepared

    written = [curves(report, out_dir / "curves.png")]
    try:
        prepared = open_prepared(report.runs[0].config["data"])
    except SicotError:
        prepared = None
    if prepared is not None:
        written.append(
            fig6_distribution(
                prepared.train_counts, report.head_threshold, report.dataset, out_dir / "fig6_distribution.png"
            )
        )
        p = per_class_gain(report, prepared.train_counts, out_dir / "per_class_gain.png")
        if p is not None:
            written.append(p)
        att_run = next((r for r in report.runs if r.encoder == report.chosen), None) or next(
            (r for r in report.runs if r.encoder in ("bilinear", "bilstm_attention")), None
        )
        if att_run is not None:
            try:
                items = attention(att_run.path, n=6)
            except SicotError:
                items = []
            if items:
                written.append(fig7_attention(items, out_dir / "fig7_attention.png", att_run.encoder))
    return written
