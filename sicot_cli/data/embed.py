"""``sicot embed``: the vocabulary and word vectors on their own, to inspect before ``prepare``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sicot_cli.config import Recipe
from sicot_cli.data.prepare import build_text
from sicot_cli.data.skips import Skips
from sicot_cli.data.vocab import FilterRule
from sicot_cli.data.word2vec import VectorReport, load_word2vec_file, nearest, save_word2vec_text
from sicot_cli.errors import SicotError
from sicot_cli.fsutil import check_name, ensure_dir, exclusive, taken
from sicot_cli.progress import Progress


@dataclass
class EmbedSummary:
    """The noise filter's report and the vectors' coverage."""

    source: str
    train_titles: int
    raw_vocab: int
    vocab: int
    rules: list[FilterRule]
    vectors: VectorReport
    test_oov_rate: float  # test-title words never seen in a training title
    test_filtered_rate: float  # test-title words the noise filter removed
    informative_removed: list[tuple[str, float, str, float]]
    skipped: dict[str, int]
    saved_to: str | None


def embed(recipe: Recipe, out: str | Path | None = None, progress: Progress | None = None) -> EmbedSummary:
    """Build the vocabulary from the training titles and train (or load) its word vectors.

    Args:
        recipe: the resolved recipe (``data``, ``text`` and ``embed`` are used; no image is read).
        out: if given, the vectors are written there in word2vec text format (atomically).
        progress: progress reporting.
    """
    if out is None:
        return _embed(recipe, None, progress)
    out = Path(out)
    check_name(out)
    ensure_dir(out.parent)
    with exclusive(out):  # a second embed to the same --out is refused at once, not overwritten at its end
        if taken(out):  # a dangling symbolic link too
            raise SicotError(f"{out}: already exists (choose another --out)")
        return _embed(recipe, out, progress)


def _embed(recipe: Recipe, out: Path | None, progress: Progress | None) -> EmbedSummary:
    skips = Skips(strict=recipe.data.strict)
    text = build_text(recipe, skips, progress)
    if out is not None:
        save_word2vec_text(out, text.vocab.words, text.vectors)
    return EmbedSummary(
        source=text.source,
        train_titles=sum(1 for r in text.recs if r.split == "train"),
        raw_vocab=text.vocab.raw_size,
        vocab=len(text.vocab) - 1,
        rules=text.vocab.rules,
        vectors=text.report,
        test_oov_rate=text.test_oov_rate,
        test_filtered_rate=text.test_filtered_rate,
        informative_removed=text.vocab.informative_removed,
        skipped=skips.as_dict(),
        saved_to=str(out) if out is not None else None,
    )


def _as_tokenized(word: str, words: list[str]) -> str:
    """``word`` as typed when the vocabulary has it, else its one token when it tokenizes to one."""
    if word in words:
        return word
    from sicot_cli.data.tokenize import tokenize

    tokens = tokenize(word)
    return tokens[0] if len(tokens) == 1 else word


def neighbours(
    word: str, k: int, data: str | Path | None = None, vectors: str | Path | None = None, binary: bool = False
) -> list[tuple[str, float]]:
    """Nearest words to ``word`` in a prepared dataset's vectors or in a word2vec file.

    A word the vectors do not hold as typed is looked up as the tokenizer writes it when that is
    one token (``APPLE`` -> ``apple``, as every title was lower-cased)."""
    if data is not None:
        from sicot_cli.data.dataset import open_prepared

        prepared = open_prepared(data)
        words, matrix = prepared.words, prepared.vectors
        word = _as_tokenized(word, words)
        if word not in prepared.words[1:]:
            from sicot_cli.data.dataset import read_removed

            rule = read_removed(data).get(word)
            if rule is not None:
                raise SicotError(
                    f"word {word!r} was seen in the training titles but removed by the noise filter ({rule}), so it has no "
                    f"vector in {data} (see text.drop_most_frequent / text.drop_least_frequent / text.drop_rule)"
                )
    elif vectors is not None:
        from sicot_cli.data.vocab import PAD

        kv = load_word2vec_file(
            vectors,
            binary,
            missing="word vectors not found",
            hint="; --binary for a binary file, without it for a text file",
            given="--vectors",
        )
        words = [PAD, *kv.index_to_key]  # a word given twice is read once (gensim warns): as many rows as words
        matrix = np.vstack([np.zeros((1, kv.vector_size), np.float32), kv.vectors[: len(kv.index_to_key)]])
        word = _as_tokenized(word, words)
    else:
        raise SicotError("--neighbours needs --data PREPARED.h5 or --vectors FILE")
    return nearest(words, matrix, word, k)
