"""The vocabulary of the training titles and the paper's noise-word filter (§4.1).

"We preprocess these side information by discarding the punctuation marks and 5 percent of very
frequent and very infrequent words, and throwing away those images without any side information."

Punctuation is dropped by the tokenizer. Here words are ranked by their count over the TRAINING
titles (descending count, ties broken by the word itself so the result is deterministic); the first
``floor(drop_most_frequent * V)`` and the last ``floor(drop_least_frequent * V)`` of the ranking are
removed, then words seen fewer than ``min_count`` times. Index 0 is reserved for padding.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

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

    def __post_init__(self) -> None:
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, tokens: Sequence[str], max_len: int) -> list[int]:
        """Token ids of the words kept by the filter, truncated to ``max_len``."""
        ids = [self.index[t] for t in tokens if t in self.index and t != PAD]
        return ids[:max_len]


def build_vocab(
    train_titles: Sequence[Sequence[str]],
    drop_most_frequent: float = 0.05,
    drop_least_frequent: float = 0.05,
    min_count: int = 1,
) -> Vocab:
    """Count words over the training titles and apply the noise filter.

    Args:
        train_titles: tokenized TRAINING titles only (test titles must not shape the vocabulary).
        drop_most_frequent: fraction of the distinct words removed from the top of the ranking.
        drop_least_frequent: fraction removed from the bottom.
        min_count: words seen fewer times are removed after the two fractions.

    Returns:
        The vocabulary (``<pad>`` first, then kept words by rank) with a report of each rule.
    """
    counts = Counter(t for title in train_titles for t in title)
    ranked = sorted(counts, key=lambda w: (-counts[w], w))
    n = len(ranked)
    n_top = math.floor(drop_most_frequent * n)
    n_bottom = math.floor(drop_least_frequent * n)
    removed_top = set(ranked[:n_top])
    removed_bottom = set(ranked[n - n_bottom :]) if n_bottom else set()
    removed_bottom -= removed_top
    middle = [w for w in ranked if w not in removed_top and w not in removed_bottom]
    removed_min = {w for w in middle if counts[w] < min_count}
    kept = [w for w in middle if w not in removed_min]

    rules: list[FilterRule] = []
    gone: set[str] = set()
    for name, removed in (
        (f"{drop_most_frequent * 100:g}% most frequent", removed_top),
        (f"{drop_least_frequent * 100:g}% least frequent", removed_bottom),
        (f"seen < {min_count} times", removed_min),
    ):
        gone |= removed
        emptied = sum(1 for title in train_titles if title and all(t in gone for t in title))
        rules.append(FilterRule(name, len(removed), sum(counts[w] for w in removed), emptied))
    return Vocab([PAD, *kept], [0, *(counts[w] for w in kept)], rules, raw_size=n)
