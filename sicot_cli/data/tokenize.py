"""Title tokenization: jieba for runs of CJK characters, lower-cased latin words and numbers.

Punctuation and symbols are dropped here (the first of the paper's §4.1 noise rules). Text is
NFKC-normalised first, so full-width letters and digits (common in marketplace titles) become
their ASCII forms, and control characters, NUL and bidirectional marks are never part of a token.

Combining marks (Unicode Mn, Mc: Devanagari vowel signs and viramas, Arabic harakat, Thai vowels)
stay inside their word ("हिन्दी" is one token), and invisible format characters (Cf: soft hyphen,
zero-width joiner and non-joiner, word joiner, BOM, bidirectional marks) are dropped, joining the
word they sit in ("Kinder<soft hyphen>garten" -> "kindergarten"); the zero-width space separates words as
a space does. Variation selectors and enclosing marks (emoji presentation, keycaps) are not part of
a word. A dotted capital I lowercases to "i" ("İstanbul" -> "istanbul"), not to "i" and a
combining dot.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import re
import unicodedata
from collections.abc import Sequence

from sicot_cli.threads import worker_pool

log = logging.getLogger(__name__)

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff"
_ZWSP = "\u200b"  # a format character (Cf) that is a space: it separates words
_VARIATION_SELECTORS = {*range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0)}  # Mn, but emoji presentation


@functools.cache
def _tables() -> tuple[re.Pattern[str], dict[int, str | None]]:
    """The word pattern and the format-character table (built once: a scan of the assigned planes, ~0.1 s).

    A word is a run of CJK ideographs, or a run of letters/digits of any other script, each
    followed by any combining marks ("_" is a symbol here; a mark with no letter before it is dropped).
    """
    marks, fmt = [], {}
    for cp in itertools.chain(range(0x20000), range(0xE0000, 0xE1000)):  # no Mn, Mc or Cf in planes 2-13
        cat = unicodedata.category(chr(cp))
        if cat in ("Mn", "Mc") and cp not in _VARIATION_SELECTORS:
            marks.append(chr(cp))
        elif cat == "Cf":
            fmt[cp] = " " if chr(cp) == _ZWSP else None
    mark = re.escape("".join(marks))
    return re.compile(rf"([{_CJK}]+)|((?:[^\W_{_CJK}][{mark}]*)+)"), fmt


_jieba = None
# Below this many titles the process pool costs more than it saves (jieba: ~14k titles/s/core).
PARALLEL_THRESHOLD = 20_000


def _get_jieba():  # noqa: ANN202 - jieba has no types
    global _jieba
    if _jieba is None:
        import jieba

        jieba.setLogLevel(logging.WARNING)
        jieba.initialize()
        _jieba = jieba
    return _jieba


def tokenize(text: str) -> list[str]:
    """Split one title into tokens.

    Args:
        text: any string (mixed scripts, emoji, control characters are fine).

    Returns:
        The tokens in order: jieba words for CJK runs, lower-cased runs of letters/digits for the
        rest; punctuation, symbols, emoji and whitespace produce no token.
    """
    run, fmt = _tables()
    # format characters go first: NFKC then composes the letters and marks they stood between
    text = unicodedata.normalize("NFKC", text.translate(fmt)).replace("\u0130", "i").lower()
    tokens: list[str] = []
    for m in run.finditer(text):
        cjk, other = m.groups()
        if cjk:
            tokens.extend(w for w in _get_jieba().lcut(cjk, HMM=True) if w.strip())
        else:
            tokens.append(other)
    return tokens


def _tokenize_chunk(texts: Sequence[str]) -> list[list[str]]:
    return [tokenize(t) for t in texts]


def tokenize_many(texts: Sequence[str], workers: int = 0) -> list[list[str]]:
    """Tokenize many titles, over processes when there are enough of them to pay for it.

    Args:
        texts: the titles.
        workers: processes to use; 0 = one per core. Inputs under ``PARALLEL_THRESHOLD`` titles
            run in this process.

    Returns:
        One token list per title, in input order.
    """
    workers = workers or os.cpu_count() or 1
    if workers <= 1 or len(texts) < PARALLEL_THRESHOLD:
        return _tokenize_chunk(texts)
    _get_jieba()  # load the dictionary (and the tables) once, before the fork, so children share them
    _tables()
    size = max(1000, len(texts) // (workers * 8))
    chunks = [texts[i : i + size] for i in range(0, len(texts), size)]
    out: list[list[str]] = []
    with worker_pool(workers) as pool_map:
        for part in pool_map(_tokenize_chunk, chunks):
            out.extend(part)
    return out
