"""The vocabulary of the training titles and the paper's noise-word filter (§4.1).

"We preprocess these side information by discarding the punctuation marks and 5 percent of very
frequent and very infrequent words, and throwing away those images without any side information."

Punctuation is dropped by the tokenizer. Here words are ranked by their count over the TRAINING
titles (descending count); the first ``floor(drop_most_frequent * V)`` and the last
``floor(drop_least_frequent * V)`` of the ranking are removed, then words seen fewer than
``min_count`` times. Index 0 is reserved for padding.

Ties at a cut are broken by a hash of the word (sha256 of its UTF-8 bytes): deterministic, and
unrelated to the word's script. Broken by the word itself, code-point order would put every Latin
word before every CJK word, so a cut through a tie dropped the Chinese words first.

``drop_rule = "label_entropy"`` ranks the top cut by the entropy of each word's label distribution
over the training titles instead of by count (the words spread most evenly over the labels, which
say least about the label, go first); the bottom cut stays the frequency one. Either way the
vocabulary reports, for the words the top cut removed, those most associated with a label (mutual
information between the word's presence in a title and the title's label), so a rule that removes
the words naming the classes shows it.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from sicot_cli.config import floor_share

PAD = "<pad>"


@dataclass
class FilterRule:
    """What one rule of the noise filter removed."""

    rule: str
    words: int  # distinct vocabulary words removed by this rule
    tokens: int  # word occurrences removed (over the training titles)
    titles_emptied: int  # training titles left with no word after this rule (cumulative rules)


@dataclass
class Vocab:
    """Words by id (``words[0]`` is the padding token) and their training counts."""

    words: list[str]
    counts: list[int]
    rules: list[FilterRule] = field(default_factory=list)
    raw_size: int = 0  # distinct words before filtering
    removed: dict[str, str] = field(default_factory=dict)  # word -> the rule that removed it
    # removed by the top cut and most associated with a label: (word, MI in bits, top label, share)
    informative_removed: list[tuple[str, float, str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, tokens: Sequence[str], max_len: int) -> list[int]:
        """Token ids of the words kept by the filter, truncated to ``max_len``."""
        ids = [self.index[t] for t in tokens if t in self.index and t != PAD]
        return ids[:max_len]


def tie_key(word: str) -> bytes:
    """The order of words with equal counts: a hash, so no script sorts before another."""
    return hashlib.sha256(word.encode("utf-8", errors="surrogatepass")).digest()


def _label_stats(train_titles: Sequence[Sequence[str]], labels: Sequence[str]) -> dict[str, Counter[str]]:
    """word -> Counter of labels over the training titles that contain it (once per title)."""
    by_word: dict[str, Counter[str]] = defaultdict(Counter)
    for title, label in zip(train_titles, labels, strict=True):
        for w in set(title):
            by_word[w][label] += 1
    return by_word


def _entropy(counter: Counter[str]) -> float:
    total = sum(counter.values())
    return -sum(c / total * math.log2(c / total) for c in counter.values() if c)


def label_information(
    word_labels: Counter[str], label_counts: Counter[str], n_titles: int, labelled: int | None = None
) -> float:
    """Mutual information (bits) between "the title contains the word" and the title's label.

    In time proportional to the labels the word occurs with: each label without it adds
    ``n_c / N * log2(N / (N - n_w))``, so together they add their titles' share times that log
    (a loop over every label made the noise-filter report cost removed words x classes: hours at a
    million classes). ``labelled``: ``sum(label_counts.values())``, when the caller has it.
    """
    n_w = sum(word_labels.values())
    if n_w == 0 or n_w == n_titles:
        return 0.0
    mi = 0.0
    present = 0
    for label, both in word_labels.items():
        n_c = label_counts[label]
        present += n_c
        for joint, marginal in ((both, n_w), (n_c - both, n_titles - n_w)):
            if joint:
                mi += joint / n_titles * math.log2(joint * n_titles / (marginal * n_c))
    absent = (sum(label_counts.values()) if labelled is None else labelled) - present
    if absent:
        mi += absent / n_titles * math.log2(n_titles / (n_titles - n_w))
    return mi


def _top_cut(
    ranked: list[str], counts: Counter[str], n_top: int, drop_rule: str, stats: dict[str, Counter[str]] | None
) -> set[str]:
    """The ``n_top`` words the top cut removes: the most frequent, or the most evenly spread over labels."""
    if drop_rule != "label_entropy":
        return set(ranked[:n_top])
    if stats is None:
        raise ValueError("drop_rule 'label_entropy' needs the titles' labels")
    spread = {w: _entropy(stats[w]) for w in ranked}
    # equal spread (e.g. words seen in one class only): the rarer word goes first, since a
    # frequent word confined to one class is the one that names it
    return set(sorted(ranked, key=lambda w: (-spread[w], counts[w], tie_key(w)))[:n_top])


def _rule_reports(
    cuts: Sequence[tuple[str, set[str]]], train_titles: Sequence[Sequence[str]], counts: Counter[str]
) -> tuple[list[FilterRule], dict[str, str]]:
    """What each rule removed (titles emptied counted cumulatively), and the rule that removed each word."""
    rules: list[FilterRule] = []
    gone: set[str] = set()
    removed_by: dict[str, str] = {}
    for name, removed in cuts:
        gone |= removed
        removed_by.update(dict.fromkeys(removed, name))
        emptied = sum(1 for title in train_titles if title and all(t in gone for t in title))
        rules.append(FilterRule(name, len(removed), sum(counts[w] for w in removed), emptied))
    return rules, removed_by


def _informative(
    removed: set[str], stats: dict[str, Counter[str]], labels: Sequence[str], n_titles: int
) -> list[tuple[str, float, str, float]]:
    """Removed words by their information about the label: (word, bits, its top label, share there)."""
    label_counts = Counter(labels)
    labelled = len(labels)
    scored = []
    for w in removed:
        top_label, top_n = max(stats[w].items(), key=lambda kv: (kv[1], tie_key(kv[0])))
        bits = label_information(stats[w], label_counts, n_titles, labelled)
        scored.append((w, bits, top_label, top_n / sum(stats[w].values())))
    return sorted(scored, key=lambda x: (-x[1], tie_key(x[0])))


def build_vocab(
    train_titles: Sequence[Sequence[str]],
    drop_most_frequent: float = 0.05,
    drop_least_frequent: float = 0.05,
    min_count: int = 1,
    labels: Sequence[str] | None = None,
    drop_rule: str = "frequency",
    report_top: int = 10,
) -> Vocab:
    """Count words over the training titles and apply the noise filter.

    Args:
        train_titles: tokenized TRAINING titles only (test titles must not shape the vocabulary).
        drop_most_frequent: fraction of the distinct words removed from the top of the ranking.
        drop_least_frequent: fraction removed from the bottom.
        min_count: words seen fewer times are removed after the two fractions.
        labels: the label of each training title (for ``label_entropy`` and the report of removed
            words associated with a label); None skips both.
        drop_rule: ``"frequency"`` (the paper's) or ``"label_entropy"``: how the top cut ranks words.
        report_top: how many removed words the association report keeps.

    Returns:
        The vocabulary (``<pad>`` first, then kept words by rank) with a report of each rule.
    """
    counts = Counter(t for title in train_titles for t in title)
    ranked = sorted(counts, key=lambda w: (-counts[w], tie_key(w)))
    n = len(ranked)
    n_top = floor_share(drop_most_frequent, n)
    n_bottom = floor_share(drop_least_frequent, n)
    stats = _label_stats(train_titles, labels) if labels is not None else None
    removed_top = _top_cut(ranked, counts, n_top, drop_rule, stats)
    removed_bottom = set(ranked[n - n_bottom :]) if n_bottom else set()
    removed_bottom -= removed_top
    middle = [w for w in ranked if w not in removed_top and w not in removed_bottom]
    removed_min = {w for w in middle if counts[w] < min_count}
    kept = [w for w in middle if w not in removed_min]
    top_name = (
        f"{drop_most_frequent * 100:g}% most frequent"
        if drop_rule == "frequency"
        else f"{drop_most_frequent * 100:g}% most spread over labels"
    )
    cuts = (
        (top_name, removed_top),
        (f"{drop_least_frequent * 100:g}% least frequent", removed_bottom),
        (f"seen < {min_count} times", removed_min),
    )
    rules, removed_by = _rule_reports(cuts, train_titles, counts)
    informative: list[tuple[str, float, str, float]] = []
    if stats is not None and removed_top:
        informative = _informative(removed_top, stats, labels or [], len(train_titles))[:report_top]
    return Vocab(
        [PAD, *kept],
        [0, *(counts[w] for w in kept)],
        rules,
        raw_size=n,
        removed=removed_by,
        informative_removed=informative,
    )
