"""Word vectors for the vocabulary: word2vec trained with gensim, or pretrained vectors.

Row ``i`` of the returned matrix is the vector of ``vocab.words[i]``; row 0 (padding) is zero.
Training uses one worker thread and a fixed hash so the same titles and seed give the same vectors
(gensim seeds each word's initial vector from ``hash(word + seed)``, which Python randomises per
process unless told otherwise). Vocabulary words missing from a pretrained file (out of vocabulary
for that file) start from small seeded random vectors and are counted in the report.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sicot_cli.config import EmbedConfig
from sicot_cli.data.vocab import Vocab
from sicot_cli.errors import SicotError

if TYPE_CHECKING:
    from gensim.models import KeyedVectors

log = logging.getLogger(__name__)


@dataclass
class VectorReport:
    """Where the vectors came from and how much of the vocabulary they cover."""

    source: str
    dim: int
    vocab_size: int  # including padding
    oov_words: int  # vocabulary words with no pretrained vector (0 when trained here)
    in_corpus: int | None = None  # vocabulary words that occur in embed.corpus (None: no corpus)

    @property
    def words(self) -> int:
        """The vocabulary's real words (padding left out), at least 1 (a rate's denominator)."""
        return max(self.vocab_size - 1, 1)

    @property
    def oov_rate(self) -> float:
        return self.oov_words / self.words


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


MAX_WORDS = 10_000  # gensim.models.word2vec.MAX_WORDS_IN_BATCH, the longest sentence it trains on


def read_corpus(path: str | Path) -> list[list[str]]:
    """The sentences of an ``embed.corpus`` file: one a line, tokenized like the titles.

    Raises:
        SicotError: a missing, unreadable or non-UTF-8 file, or one without a single word.
    """
    from sicot_cli.data.tokenize import tokenize_many
    from sicot_cli.fsutil import read_text

    p = Path(path)
    text = read_text(
        p,
        "word2vec corpus",
        missing="word2vec corpus not found (embed.corpus; `sicot datasets fetch icons` writes data/icons/icon-words.txt)",
        expected="a text file of sentences, one a line (embed.corpus)",
    )
    lines = tokenize_many([line for line in text.splitlines() if line.strip()])
    # gensim reads at most MAX_WORDS words of a sentence and silently drops the rest (a corpus
    # written as one line, text8-style): such a line is cut into sentences of that length instead
    sentences = [t[i : i + MAX_WORDS] for t in lines for i in range(0, len(t), MAX_WORDS)]
    if not sentences:
        raise SicotError(
            f"{p}: the word2vec corpus (embed.corpus) holds no word: give a text file, one sentence a line"
        )
    return sentences


def train_word2vec(
    train_titles: Sequence[Sequence[str]],
    vocab: Vocab,
    cfg: EmbedConfig,
    corpus: Sequence[Sequence[str]] = (),
    corpus_name: str = "",
) -> tuple[np.ndarray, VectorReport]:
    """Train word2vec on the training titles restricted to the vocabulary, and on ``corpus``.

    Args:
        train_titles: tokenized training titles.
        vocab: the filtered vocabulary; other words are removed from the titles first.
        cfg: dimension, window, epochs, sg/cbow, negative samples, seed.
        corpus: more tokenized sentences (``embed.corpus``), every word kept: a word outside the
            vocabulary still places the vocabulary's words by the company they keep.
        corpus_name: the corpus file's name, for the report.

    Returns:
        The ``[len(vocab), cfg.dim]`` float32 matrix and its report.
    """
    from gensim.models import Word2Vec

    sentences = [[t for t in title if t in vocab.index] for title in train_titles]
    sentences = [s for s in sentences if s]
    if len(vocab) <= 1 or not sentences:
        raise SicotError(
            "the vocabulary is empty after filtering: lower text.drop_most_frequent / text.drop_least_frequent / text.min_count"
        )
    model = Word2Vec(
        sentences=sentences + [list(c) for c in corpus],
        vector_size=cfg.dim,
        window=cfg.window,
        min_count=1,
        sg=int(cfg.sg),
        negative=cfg.negative,
        epochs=cfg.epochs,
        seed=cfg.seed,
        workers=1,
        hashfxn=_stable_hash,
    )
    matrix = np.zeros((len(vocab), cfg.dim), dtype=np.float32)
    for i, word in enumerate(vocab.words[1:], start=1):
        matrix[i] = model.wv[word]
    kind = "skip-gram" if cfg.sg else "CBOW"
    if not corpus:
        return matrix, VectorReport(f"word2vec {kind} trained on training titles", cfg.dim, len(vocab), 0)
    seen = {w for sentence in corpus for w in sentence}
    return matrix, VectorReport(
        f"word2vec {kind} trained on training titles and {len(corpus):,} sentences of {corpus_name}",
        cfg.dim,
        len(vocab),
        0,
        in_corpus=sum(1 for w in vocab.words[1:] if w in seen),
    )


def load_word2vec_file(path: str | Path, binary: bool, *, missing: str, hint: str, given: str) -> KeyedVectors:
    """A word2vec text or binary file as gensim ``KeyedVectors``: the one reader of word-vector files.

    Args:
        path: the file.
        binary: word2vec binary format (else text).
        missing: what to say after the path when it does not exist.
        hint: what to add when it does not parse (how to choose the other format).
        given: where the path came from (``embed.pretrained``, ``--vectors``), for a folder or other non-file.

    Raises:
        SicotError: missing file, a file that is not in word2vec format (the error's type and text),
            or a vector with a value that is not a finite number (``nan``, ``inf``, ``1e39``: beyond float32).
    """
    from gensim.models import KeyedVectors

    p = Path(path)
    fmt = "binary" if binary else "text"
    if p.is_dir():
        raise SicotError(f"{p}: is a folder, expected a word2vec {fmt} file ({given} names the file itself)")
    if not p.is_file():
        if p.exists():  # a FIFO, a device: gensim would block on it or read garbage
            raise SicotError(f"{p}: not a regular file, expected a word2vec {fmt} file ({given})")
        raise SicotError(f"{p}: {missing}")
    if binary and _looks_like_text(p):  # gensim would read the digits as floats: garbage words, no error
        raise SicotError(f"{p}: a word2vec TEXT file (its first vector is written in digits), read as binary{hint}")
    try:
        with np.errstate(over="ignore"):  # 1e39 is inf as float32: refused below, not a numpy warning
            kv = KeyedVectors.load_word2vec_format(str(p), binary=binary, unicode_errors="replace")
    except Exception as e:  # gensim raises ValueError, UnicodeDecodeError, EOFError... on bad files
        raise SicotError(f"{p}: not a word2vec {fmt} file ({type(e).__name__}: {e}){hint}") from None
    _check_finite(p, kv, binary)
    return kv


def _looks_like_text(p: Path) -> bool:
    """Whether a word2vec file is the text format: after the header and the first word, the text
    format writes the first vector in digits, where the binary one writes ``4 * dim`` raw bytes."""
    with open(p, "rb") as f:
        header = f.readline(256).split()
        if len(header) != 2 or not (header[1].isascii() and header[1].isdigit()):
            return False
        dim = int(header[1])
        head = f.read(min(4 * dim, 4096) + 256)
    _, space, rest = head.partition(b" ")
    sample = rest[: 4 * min(dim, 64)]
    return bool(space and sample) and all(c in b"0123456789.-+eE \t\r\nnaNAifIFty" for c in sample)  # nan, inf(inity)


def _check_finite(p: Path, kv: KeyedVectors, binary: bool) -> None:
    """Refuse a vector holding nan, inf or a number float32 cannot hold, naming its line and word.

    Such a vector spreads nan through the text encoder's first step (every loss nan) or, as a
    neighbour, has no cosine with anything.
    """
    n = len(kv.index_to_key)  # a word given twice is read once: the rows past n are not words
    bad = ~np.isfinite(kv.vectors[:n]).all(axis=1)
    if not bad.any():
        return
    i = int(np.argmax(bad))
    word = kv.index_to_key[i]
    where, value = f"{p} (vector {i + 1})", repr(float(kv.vectors[i][~np.isfinite(kv.vectors[i])][0]))
    if not binary:  # the line as written, for the text format
        with open(p, encoding="utf-8", errors="replace") as f, np.errstate(over="ignore"):
            for lineno, line in enumerate(f, start=1):
                parts = line.rstrip().split(" ")
                if lineno == 1 or parts[0] != word:
                    continue
                values = [x for x in parts[1:] if x and not np.isfinite(np.float32(_number(x)))]
                if values:
                    where, value = f"{p}:{lineno}", repr(values[0])
                    break
    raise SicotError(
        f"{where}: word {word!r} has a non-finite value ({value}): nan, inf and numbers beyond float32's range "
        f"(+-3.4e38) are not word vectors; fix or remove {'that word' if binary else 'that line'}"
    )


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


def load_pretrained(path: str | Path, binary: bool, vocab: Vocab, seed: int = 0) -> tuple[np.ndarray, VectorReport]:
    """Look the vocabulary up in a word2vec text or binary file (see :func:`load_word2vec_file`).

    Raises:
        SicotError: missing or unreadable file, or a file that is not in word2vec format.
    """
    p = Path(path)
    kv = load_word2vec_file(
        p,
        binary,
        missing="pretrained word vectors not found (embed.pretrained)",
        hint="; set embed.binary to match the file",
        given="embed.pretrained",
    )
    dim = kv.vector_size
    rng = np.random.default_rng(seed)
    scale = float(np.std(kv.vectors)) if len(kv) else 0.1
    matrix = np.zeros((len(vocab), dim), dtype=np.float32)
    oov = 0
    for i, word in enumerate(vocab.words[1:], start=1):
        if word in kv.key_to_index:
            matrix[i] = kv[word]
        else:
            oov += 1
            matrix[i] = rng.normal(0.0, scale, dim)
    return matrix, VectorReport(f"pretrained {p.name}", dim, len(vocab), oov)


def word_vectors(
    train_titles: Sequence[Sequence[str]], vocab: Vocab, cfg: EmbedConfig, base: Path | None = None
) -> tuple[np.ndarray, VectorReport]:
    """Vectors for the vocabulary as the recipe asks: pretrained when ``embed.pretrained`` is set.

    Raises:
        SicotError: both ``embed.pretrained`` and ``embed.corpus`` set, or an unusable file.
    """

    def resolved(value: str) -> Path:
        path = Path(value)
        return base / path if base is not None and not path.is_absolute() else path

    if cfg.pretrained and cfg.corpus:
        raise SicotError(
            'embed.pretrained loads word vectors and embed.corpus trains them: set one of the two (the other to "")'
        )
    if cfg.pretrained:
        return load_pretrained(resolved(cfg.pretrained), cfg.binary, vocab, cfg.seed)
    if cfg.corpus:
        path = resolved(cfg.corpus)
        return train_word2vec(train_titles, vocab, cfg, read_corpus(path), path.name)
    return train_word2vec(train_titles, vocab, cfg)


def nearest(words: Sequence[str], vectors: np.ndarray, query: str, k: int = 10) -> list[tuple[str, float]]:
    """The ``k`` words closest to ``query`` by cosine similarity (gensim ``most_similar``).

    Raises:
        SicotError: the word is not in the vocabulary.
    """
    from gensim.models import KeyedVectors

    kv = KeyedVectors(vector_size=vectors.shape[1])
    kv.add_vectors(list(words[1:]), vectors[1:])
    if query not in kv.key_to_index:
        raise SicotError(
            f"word {query!r} is not in the vocabulary ({len(words) - 1} words; try `sicot tokenize` to see how it is split)"
        )
    q = kv[query]
    if not (np.all(np.isfinite(q)) and np.any(q)):
        raise SicotError(f"word {query!r} has a zero or non-finite vector: it is near no word")
    # words with a zero or non-finite vector have no cosine with anything: left out, not shown as nan
    with np.errstate(invalid="ignore", divide="ignore"):
        found = kv.most_similar(query, topn=len(kv))
    return [(w, float(s)) for w, s in found if math.isfinite(s)][:k]


def save_word2vec_text(path: str | Path, words: Sequence[str], vectors: np.ndarray) -> None:
    """Write vectors (without the padding row) in word2vec text format, atomically."""
    from gensim.models import KeyedVectors

    from sicot_cli.fsutil import atomic_path, ensure_dir

    path = Path(path)
    kv = KeyedVectors(vector_size=vectors.shape[1])
    # a "count" per word (decreasing: the vocabulary's own order) is what gensim sorts by on saving;
    # without it gensim logs "attribute count not present in KeyedVectors", a warning about nothing
    kv.add_vectors(list(words[1:]), vectors[1:])
    kv.allocate_vecattrs(["count"], [np.int64])
    kv.expandos["count"][:] = np.arange(len(kv), 0, -1)
    ensure_dir(path.parent)  # a user error naming the folder when it cannot be made or written
    with atomic_path(path) as tmp:
        kv.save_word2vec_format(str(tmp), binary=False)
