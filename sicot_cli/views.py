"""Rich renderings of library results (tables printed by the CLI)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

from sicot_cli.console import abbreviate, clean, data_text, safe

if TYPE_CHECKING:
    from sicot_cli.data.embed import EmbedSummary
    from sicot_cli.data.prepare import PrepareSummary
    from sicot_cli.data.vocab import FilterRule
    from sicot_cli.data.word2vec import VectorReport


def _rules_rows(table: Table, rules: list[FilterRule]) -> None:
    for r in rules:
        table.add_row(
            Text.assemble("  removed: ", safe(r.rule)),
            # titles_emptied is cumulative: a title is emptied by the rules up to this one together
            f"{r.words:,} words, {r.tokens:,} occurrences; {r.titles_emptied:,} titles empty after this rule",
        )


def _informative_rows(table: Table, informative: list, rules: list) -> None:
    """The removed words most associated with a label (a filter removing class names shows here)."""
    if not informative or informative[0][1] <= 0:
        return
    shown = ", ".join(
        f"{data_text(abbreviate(w))} ({mi:.2f} bits; {share:.0%} in {data_text(abbreviate(label))})"
        for w, mi, label, share in informative[:6]
        if mi > 0
    )
    paper_rule = any("most frequent" in (r["rule"] if isinstance(r, dict) else r.rule) for r in rules)
    hint = "  [dim](text.drop_rule=label_entropy keeps such words)[/]" if paper_rule else ""
    table.add_row("  removed words most tied to a label", f"{shown}{hint}")


def _test_words_rows(table: Table, oov: float, filtered: float) -> None:
    table.add_row("test-title words unseen in training titles (OOV)", f"{oov:.1%}")
    table.add_row("test-title words removed by the noise filter", f"{filtered:.1%}")


def _vectors_row(table: Table, v: VectorReport) -> None:
    table.add_row("word vectors", Text.assemble(safe(v.source), f", dim {v.dim}"))
    if v.in_corpus is not None:
        table.add_row(
            "  vocabulary words in the corpus", f"{v.in_corpus:,} of {v.words:,} ({v.in_corpus / v.words:.1%})"
        )
    else:
        table.add_row("  vocabulary OOV (no pretrained vector)", f"{v.oov_words:,} words ({v.oov_rate:.1%})")


def prepare_table(s: PrepareSummary) -> Table:
    """The summary printed at the end of ``sicot prepare``."""
    t = Table(title=Text.assemble("prepared ", safe(s.out)), show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("source", safe(s.source))
    t.add_row("rows read / kept / skipped", f"{s.rows_read:,} / {s.kept:,} / {sum(s.skipped.values()):,}")
    for reason, n in s.skipped.items():
        example = (s.skip_examples.get(reason) or [""])[0]
        t.add_row(
            Text.assemble("  skipped: ", safe(reason)),
            Text.assemble(f"{n:,}  ", safe(f"(e.g. {clean(example)})", "dim")) if example else f"{n:,}",
        )
    t.add_row("classes", f"{s.classes:,}")
    t.add_row("train / validation / test images", f"{s.train_images:,} / {s.val_images:,} / {s.test_images:,}")
    t.add_row(
        f"head / tail classes (head: >= {s.head_threshold} train images)", f"{s.head_classes:,} / {s.tail_classes:,}"
    )
    sug = s.suggested_boundaries
    if s.boundaries == "data":
        how = "derived from this data (eval.boundaries=data): head at the mean count per class, many/few at the class tertiles"
    else:
        how = "fixed by the recipe (eval.boundaries=fixed)"
        if sug and (sug["head_threshold"], sug["many_threshold"], sug["few_threshold"]) != (
            s.head_threshold,
            s.many_threshold,
            s.few_threshold,
        ):
            how += f"; from this data they would be head {sug['head_threshold']}, many {sug['many_threshold']}, few {sug['few_threshold']} (eval.boundaries=data)"
    t.add_row(
        "boundaries head / many / few",
        f"{s.head_threshold} / {s.many_threshold} / {s.few_threshold}: {how}; recorded in the file, runs and reports use them",
    )
    t.add_row("vocabulary (before -> after filter)", f"{s.raw_vocab:,} -> {s.vocab:,}")
    _rules_rows(t, s.filter_rules)
    _informative_rows(t, s.informative_removed, s.filter_rules)
    _vectors_row(t, s.vectors)
    _test_words_rows(t, s.test_oov_rate, s.test_filtered_rate)
    if s.truncated_titles:
        t.add_row("titles truncated to data.max_title_tokens", f"{s.truncated_titles:,}")
    rate = (
        f"{s.images_per_second:,.0f} images/s decode+write" if s.decode_seconds > 0 else "merged: nothing decoded here"
    )
    t.add_row("time", f"{s.seconds:.1f} s ({rate})")
    return t


def embed_table(s: EmbedSummary) -> Table:
    """The report printed by ``sicot embed``."""
    t = Table(title="vocabulary and word vectors", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("source", safe(s.source))
    t.add_row("training titles", f"{s.train_titles:,}")
    t.add_row("vocabulary (before -> after filter)", f"{s.raw_vocab:,} -> {s.vocab:,}")
    _rules_rows(t, s.rules)
    _informative_rows(t, s.informative_removed, s.rules)
    _vectors_row(t, s.vectors)
    _test_words_rows(t, s.test_oov_rate, s.test_filtered_rate)
    for reason, n in s.skipped.items():
        t.add_row(Text.assemble("  skipped rows: ", safe(reason)), f"{n:,}")
    if s.saved_to:
        t.add_row("saved", safe(s.saved_to))
    return t


def _fmt(v: object) -> str | Text:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    return safe(v)


def epochs_table(history: list[dict], title: str) -> Table:
    """One row per epoch: losses, lr, images/s and the headline VALIDATION metrics (never test)."""
    t = Table(title=safe(title), title_justify="left")
    cols = [
        ("epoch", "epoch", "{}"),
        ("lr", "lr", "{:.2e}"),
        ("loss", "loss", "{:.3f}"),
        ("CE(x_v)", "loss_v", "{:.3f}"),
        ("CE(x_m)", "loss_m", "{:.3f}"),
        ("λ", "lam", "{:g}"),
        ("img/s", "train_images_per_s", "{:.0f}"),
        ("val top-1", "val_top1", "{:.2f}"),
        ("val top-3", "val_top3", "{:.2f}"),
        ("val head", "val_head_top1", "{:.2f}"),
        ("val tail", "val_tail_top1", "{:.2f}"),
    ]
    for name, _, _ in cols:
        t.add_column(name, justify="right", no_wrap=True)
    for rec in history:
        t.add_row(*("-" if rec.get(key) is None else fmt.format(rec[key]) for _, key, fmt in cols))
    return t


def metrics_table(m: dict, title: str) -> Table:
    """Top-k overall and per group."""
    t = Table(title=safe(title), title_justify="left")
    ks = sorted(int(k[3:]) for k in m if k.startswith("top") and k[3:].isascii() and k[3:].isdigit())
    t.add_column("")
    for k in ks:
        t.add_column(f"top-{k}", justify="right")
    t.add_column("classes", justify="right")
    t.add_row("all images", *(_fmt(m.get(f"top{k}")) for k in ks), _fmt(m.get("num_classes")))
    labels = {
        "head": f"head (>= {m.get('head_threshold')})",
        "tail": f"tail (< {m.get('head_threshold')})",
        "many": f"many (> {m.get('many_threshold')})",
        "medium": "medium",
        "few": f"few (< {m.get('few_threshold')})",
    }
    for g, label in labels.items():
        t.add_row(f"{label}, class-averaged", *(_fmt(m.get(f"{g}_top{k}")) for k in ks), _fmt(m.get(f"{g}_classes")))
    return t


def predictions_table(preds: list) -> Table:
    t = Table("image", "rank", "class", "score", "title", title="predictions (image only)", title_justify="left")
    for p in preds:
        for i, (c, s, title) in enumerate(zip(p.classes, p.scores, p.titles, strict=True)):
            t.add_row(safe(p.image) if i == 0 else "", str(i + 1), safe(c), f"{s:.3f}", safe(title) if title else "-")
    return t


def _run_figures(s, split: str) -> list[str]:  # noqa: ANN001 - sicot_cli.ablate.RunStatus
    """A finished run's top-1, top-3, head and tail top-1 on ``split`` (``val``: the validation figures)."""
    f, k = s.final or {}, "val_" if split == "val" else ""
    return [_fmt(f.get(k + m)) for m in ("top1", "top3", "head_top1", "tail_top1")]


def ablation_row(s, split: str = "test") -> str:  # noqa: ANN001 - sicot_cli.ablate.RunStatus
    """One finished run of ``sicot ablate``, as a line printed when it ends: its ``split``'s figures
    (``val`` on validation folds, where nothing should look at test)."""
    top1, top3, head, tail = _run_figures(s, split)
    return f"{data_text(s.run_dir.name)}: {s.state}; {split} top-1 {top1}, top-3 {top3}, head {head}, tail {tail}"


def ablation_table(statuses: list, split: str = "test") -> Table:
    """The table of ``sicot ablate``: the runs of this call, with their ``split``'s figures."""
    title = "ablation (test)" if split == "test" else "ablation (validation)"
    t = Table("run", "state", "top-1", "top-3", "head top-1", "tail top-1", title=title, title_justify="left")
    for s in statuses:
        t.add_row(safe(s.run_dir.name), safe(s.state), *_run_figures(s, split))
    return t


def report_tables(report) -> list[Table]:  # noqa: ANN001 - sicot_cli.report.Report
    """Tables 2-4 as rich tables."""
    out = []
    for title, rows in report.tables().items():
        if not rows:
            continue
        t = Table(title=safe(title), title_justify="left")
        for k in rows[0]:
            t.add_column(safe(k))  # a Text header (Table(*headers) takes only str or Column)
        for r in rows:
            t.add_row(*(safe(v) for v in r.values()))
        out.append(t)
    if report.unfinished:
        out.append(
            Table(
                title=Text.assemble(
                    f"{len(report.unfinished)} unfinished run(s) left out: ",
                    safe(", ".join(p.name for p in report.unfinished)),
                ),
                title_justify="left",
            )
        )
    return out


def attention_view(items: list, encoder: str) -> Table:
    """Fig. 7 in the terminal: words by attention, 3 highest green, 3 lowest red."""
    from sicot_cli.figures import word_colour

    t = Table(
        "class",
        "words by attention (highest first)",
        title=Text.assemble("Fig. 7: learned word attention (", safe(encoder), ")"),
        title_justify="left",
    )
    for it in items:
        words = []
        for j, (w, a) in enumerate(zip(it.words, it.weights, strict=True)):
            words.append(safe(f"{clean(w)} {a:.2f}", word_colour(j, len(it.words)) or ""))
        t.add_row(safe(it.label), Text("  ").join(words))
    return t


def class_words_table(ranked: list, class_name: str) -> Table:
    t = Table(
        "word",
        "mean attention",
        "titles",
        title=Text.assemble("words carrying the attention of ", safe(class_name)),
        title_justify="left",
    )
    for w, a, n in ranked:
        t.add_row(safe(w), f"{a:.3f}", str(n))
    return t
