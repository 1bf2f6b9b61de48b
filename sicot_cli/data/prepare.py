"""``sicot prepare``: raw data (a manifest, or the built-in synthetic dataset) -> ONE HDF5 file.

This is the only code that reads raw data, runs jieba and trains word2vec; ``train`` reads only
what it writes. The steps, in order:

1. read the rows (manifest checks, counted skips);
2. tokenize every title;
3. split train/test when the manifest has no split (seeded; ``data.test_per_class`` test images per
   class, as the paper's roughly balanced test sets, keeping at least ``data.min_train_per_class``
   for training), then carve the validation rows from the training rows (``data.val_fraction``,
   class-stratified, seeded by ``data.split_seed``) unless the manifest names its own ``val`` rows;
4. build the vocabulary from TRAINING titles and apply the noise filter; drop TRAINING rows whose
   title is empty after it (the paper: "throwing away those images without any side
   information"). Validation and test rows are scored image-only, so their titles never drop them;
5. word vectors (word2vec on the training titles, or pretrained);
6. decode and resize the images in parallel processes, training rows first, then validation, then
   test, so each split is one contiguous block of the file (the loader reads blocks);
7. write labels, tokens, classes (ordered by descending training count), vocabulary, vectors and the
   resolved recipe, then rename the temporary file to its final name.

See :mod:`sicot_cli.data.dataset` for the layout.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sicot_cli.config import Recipe, floor_share
from sicot_cli.data import dataset as ds
from sicot_cli.data import jpegstore, jpegwrite
from sicot_cli.data.images import ImageSkip
from sicot_cli.data.manifest import read_manifest
from sicot_cli.data.skips import Skips
from sicot_cli.data.tokenize import tokenize_many
from sicot_cli.data.vocab import FilterRule, Vocab, build_vocab
from sicot_cli.data.word2vec import VectorReport, read_corpus, word_vectors
from sicot_cli.errors import SicotError
from sicot_cli.fsutil import (
    FAULT_DECODE_DELAY,
    atomic_path,
    check_name,
    ensure_dir,
    exclusive,
    guarded_file,
    json_file_state,
    remove_stale_tmp,
    taken,
    write_json,
)
from sicot_cli.progress import NullProgress, Progress
from sicot_cli.provenance import package_versions
from sicot_cli.threads import worker_pool

log = logging.getLogger(__name__)

WRITE_BATCH = 256
# Characters of a title that are tokenised: a product title is a few hundred; gensim's word2vec reads
# at most 10,000 words of a sentence anyway.
TITLE_CHARS = 100_000
DUPLICATE_EXAMPLES = 3


@dataclass
class _Rec:
    where: str
    id: str
    label: str
    title: str
    split: str | None
    source: object  # a Path (manifest) or a SyntheticItem
    tokens: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    image_key: object = None  # see _image_key


@dataclass
class PrepareSummary:
    """What ``prepare`` did, for the summary table and ``<out>.recipe.json``."""

    out: str
    source: str
    rows_read: int
    kept: int
    skipped: dict[str, int]
    skip_examples: dict[str, list[str]]
    classes: int
    train_images: int
    val_images: int
    test_images: int
    head_threshold: int
    many_threshold: int
    few_threshold: int
    boundaries: str  # "fixed" (the recipe's) or "data" (derived from the training counts)
    head_classes: int
    tail_classes: int
    raw_vocab: int
    vocab: int
    filter_rules: list[FilterRule]
    vectors: VectorReport
    test_oov_rate: float  # share of test-title words never seen in a training title
    test_filtered_rate: float  # share of test-title words seen in training but removed by the noise filter
    informative_removed: list[tuple[str, float, str, float]]  # see Vocab.informative_removed
    suggested_boundaries: dict[str, int]  # the data-derived thresholds (shown when fixed ones are used)
    name: str  # the recipe name, carried into every run made from the file
    truncated_titles: int
    seconds: float
    decode_seconds: float
    # validation / test rows whose decoded pixels equal a training (for test: or validation) row's,
    # from another file: split -> [(row, the earlier row it repeats)], at most DUPLICATE_EXAMPLES;
    # counted in duplicate_counts (format 2: from the pixel digest each shard records per row).
    duplicate_counts: dict[str, int] = field(default_factory=dict)
    duplicate_examples: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.kept / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["vectors"]["oov_rate"] = self.vectors.oov_rate
        d["images_per_second"] = self.images_per_second
        return d


def _read_source(recipe: Recipe, skips: Skips) -> tuple[list[_Rec], str]:
    d = recipe.data
    if d.source == "synthetic":
        from sicot_cli.data.synthetic import pretraining_items, synthetic_items

        s = d.synthetic
        args = (s.num_classes, s.max_per_class, s.min_per_class, s.test_per_class, s.language, s.seed)
        if s.pretrain_classes:
            _, items = pretraining_items(*args, s.pretrain_classes, s.pretrain_per_class)
            what = f"built-in synthetic PRETRAINING set ({s.pretrain_classes} classes disjoint from the long-tailed set, seed {s.seed}, {s.language})"
        else:
            _, items = synthetic_items(*args)
            what = f"built-in synthetic dataset (seed {s.seed}, {s.language})"
        recs = [_Rec(f"synthetic:{it.id}", it.id, it.label, it.title, it.split, it) for it in items]
        return recs, what
    rows = read_manifest(d.manifest, skips)
    recs = [_Rec(r.where, r.id, r.label, r.title, r.split, r.image) for r in rows]
    return recs, f"manifest {d.manifest}"


def _image_key(r: _Rec) -> object:
    """What makes two records one image: the same file, however it is named (another relative path,
    a symlink, a hard link: its device and inode); a synthetic item is its own. Computed once."""
    if r.image_key is None:
        if isinstance(r.source, Path):
            try:
                st = os.stat(r.source)
                r.image_key = (st.st_dev, st.st_ino)
            except (OSError, ValueError):  # missing or unreadable: skipped later, when it is decoded
                r.image_key = r.source
        else:
            r.image_key = id(r)
    return r.image_key


def _drop_repeated_rows(recs: list[_Rec], skips: Skips) -> list[_Rec]:
    """A row that repeats an earlier one (the same image, label, title and split: a manifest pasted
    twice) is a counted skip: kept, it would double its class's count and score its test image twice.
    One image under several titles stays several rows."""
    first: dict[tuple[object, ...], str] = {}
    kept = []
    for r in recs:
        key = (_image_key(r), r.label, r.title, r.split)
        if key in first:
            skips.add(
                "row repeats an earlier row (the same image, label, title and split)", f"{r.where} (= {first[key]})"
            )
            continue
        first[key] = r.where
        kept.append(r)
    return kept


def _warn_images_with_several_labels(recs: list[_Rec], source: str) -> None:
    """One image file under two labels: each of its rows trains (or is scored) under its own label,
    and at most one label can be right. Kept as written, and said once."""
    labels: dict[object, dict[str, str]] = {}
    for r in recs:
        labels.setdefault(_image_key(r), {}).setdefault(r.label, r.where)
    several = [rows for rows in labels.values() if len(rows) > 1]
    if several:
        example = "; ".join(f"{where} as {label!r}" for label, where in list(several[0].items())[:3])
        log.warning(
            "%s: %d image file%s more than one label (e.g. %s): each row trains or is scored under its own "
            "label, and at most one can be right: give each image one label",
            source, len(several), "s carry" if len(several) > 1 else " carries", example,
        )  # fmt: skip


def _by_image(members: list[_Rec]) -> list[list[_Rec]]:
    """``members`` grouped by image, in order of first appearance (one group per record when all differ)."""
    groups: dict[object, list[_Rec]] = {}
    for r in members:
        groups.setdefault(_image_key(r), []).append(r)
    return list(groups.values())


def _split(recs: list[_Rec], recipe: Recipe) -> bool:
    """Give every record a split: keep the manifest's, or draw a seeded, class-balanced one.

    Rows that share an image file (one photo listed under several titles) are one unit of the
    draw, so an image is never both trained on and scored; a file drawn to the test side under one
    label and to training under another is trained on. Returns whether the manifest gave the split
    (its conflicts are settled by :func:`_drop_test_rows_of_trained_images`, after the title filter).
    """
    with_split = [r for r in recs if r.split is not None]
    if with_split and len(with_split) < len(recs):
        first = next(r for r in recs if r.split is None)
        raise SicotError(f"{first.where}: no split, but other rows have one: give every row a split or none")
    if with_split:
        return True
    by_class: dict[str, list[_Rec]] = defaultdict(list)
    for r in recs:
        by_class[r.label].append(r)
    rng = np.random.default_rng(recipe.data.split_seed)
    for label in sorted(by_class):
        units = _by_image(sorted(by_class[label], key=lambda r: r.id))
        order = rng.permutation(len(units))
        n_test = max(0, min(recipe.data.test_per_class, len(units) - recipe.data.min_train_per_class))
        for rank, i in enumerate(order):
            for r in units[i]:
                r.split = "test" if rank < n_test else "train"
    trained = {_image_key(r) for r in recs if r.split == "train"}
    for r in recs:
        if r.split == "test" and _image_key(r) in trained:
            r.split = "train"
    return False


def _check_classes_and_test_rows(
    recs: list[_Rec], source: str, given_split: bool, min_train: int, test_per_class: int
) -> None:
    """Refuse data with one training class; warn when no test row is left (``train`` needs one).

    Raises:
        SicotError: naming the one class and the column to check.
    """
    labels = sorted({r.label for r in recs if r.split == "train"})
    if len(labels) < 2:
        raise SicotError(
            f"{source}: only one class has training images ({labels[0]!r}); a classifier needs at least 2: "
            "check the label column"
        )
    if any(r.split == "test" for r in recs):
        return
    if given_split:  # a file to measure or pretrain on may want none
        log.warning(
            "%s: no test row (every row is train or val): `sicot train` will refuse this file; give some rows "
            "split=test, or leave the split column out and prepare draws one (data.test_per_class)",
            source,
        )
        return
    if test_per_class == 0:
        log.warning("%s: no test row (data.test_per_class = 0 draws none): `sicot train` will refuse this file", source)
        return
    sizes = Counter(r.label for r in recs)
    single = sum(1 for n in sizes.values() if n == 1)
    log.warning(
        "%s: no test row could be drawn: a class spares a test image only above data.min_train_per_class = %d "
        "images, and %s (data.test_per_class = %d); `sicot train` will refuse this file%s",
        source, min_train, f"the largest of the {len(sizes)} classes has {max(sizes.values())}", test_per_class,
        f" ({single} of the classes have a single image: is the label column an id?)" if single > len(sizes) // 2 else "",
    )  # fmt: skip


def _drop_test_rows_of_trained_images(recs: list[_Rec], skips: Skips) -> list[_Rec]:
    """A manifest's own split with one file on two sides: its training rows are kept, its
    validation and test rows that repeat a training (or, for test, a validation) file are skipped
    and counted."""
    trained = {_image_key(r) for r in recs if r.split == "train"}
    selected = {_image_key(r) for r in recs if r.split == "val"} - trained
    kept = []
    for r in recs:
        key = _image_key(r)
        if r.split == "val" and key in trained:
            skips.add("validation image also in a training row (the same file)", r.where)
            continue
        if r.split == "test" and (key in trained or key in selected):
            skips.add("test image also in a training or validation row (the same file)", r.where)
            continue
        kept.append(r)
    return kept


class OwnValidationRows(SicotError):
    """``data.val_fold`` > 0 for a manifest that names its own ``val`` rows (``where``: the first one)."""

    def __init__(self, message: str, where: str) -> None:
        super().__init__(message)
        self.where = where


def _carve_validation(recs: list[_Rec], recipe: Recipe) -> None:
    """Move ``floor(data.val_fraction * n)`` training rows of each class to the validation split.

    Class-stratified and seeded by ``data.split_seed`` alone (not the training seed), so every run
    made from one prepared file trains on the same rows and is selected on the same rows; a class
    keeps at least ``data.min_train_per_class`` training rows, so the smallest classes keep all
    theirs. A manifest that names ``val`` rows keeps its own split.
    """
    d = recipe.data
    if d.val_fold and any(r.split == "val" for r in recs):
        first = next(r for r in recs if r.split == "val")
        raise OwnValidationRows(
            f"{first.where}: data.val_fold = {d.val_fold}, but the manifest names its own val rows, which prepare keeps: "
            "re-draw them where the manifest is made (`sicot datasets import emoji|mdi --val-seed K` for the built-in "
            "sets), or leave data.val_fold at 0",
            first.where,
        )
    if d.val_fraction <= 0 or any(r.split == "val" for r in recs):
        return
    by_class: dict[str, list[_Rec]] = defaultdict(list)
    for r in recs:
        if r.split == "train":
            by_class[r.label].append(r)
    # its own stream: the test split is unchanged; fold k > 0 another stream again (fold 0 is unchanged)
    rng = np.random.default_rng([d.split_seed, 1] if not d.val_fold else [d.split_seed, 1, d.val_fold])
    for label in sorted(by_class):
        units = _by_image(sorted(by_class[label], key=lambda r: r.id))  # one image: one side
        n_val = max(0, min(floor_share(d.val_fraction, len(units)), len(units) - d.min_train_per_class))
        for i in rng.permutation(len(units))[:n_val]:
            for r in units[i]:
                r.split = "val"
    trained = {_image_key(r) for r in recs if r.split == "train"}
    for r in recs:  # an image carved into validation under one label but trained under another
        if r.split == "val" and _image_key(r) in trained:
            r.split = "train"


def _drop_untrainable(recs: list[_Rec], min_train: int, skips: Skips) -> list[_Rec]:
    counts = Counter(r.label for r in recs if r.split == "train")
    kept = []
    for r in recs:
        n = counts.get(r.label, 0)
        if n == 0:
            skips.add("label has no training image", r.where)
        elif n < min_train:
            skips.add(f"class has fewer than {min_train} training images", r.where)
        else:
            kept.append(r)
    return kept


_DECODE_DELAY = float(os.environ.get(FAULT_DECODE_DELAY) or 0)  # tests only; read once, not per image


def _decode(job: tuple[object, int, int]) -> np.ndarray | str:
    source, size, max_pixels = job
    if _DECODE_DELAY:
        time.sleep(_DECODE_DELAY)
    try:
        hwc = jpegwrite.source_pixels(source, size, max_pixels)
    except ImageSkip as e:
        return str(e)
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


def _decoded(jobs: Sequence[tuple[object, int, int]], workers: int) -> Iterator[np.ndarray | str]:
    if workers <= 1 or len(jobs) < 64:
        yield from map(_decode, jobs)
        return
    chunk = max(8, min(256, len(jobs) // (workers * 16) or 8))
    with worker_pool(workers) as pool_map:  # Ctrl-C: the workers stop with the generator's close()
        yield from pool_map(_decode, jobs, chunk)


@dataclass
class TextStage:
    """Rows with their tokens and split, the vocabulary and the word vectors (steps 1-5)."""

    recs: list[_Rec]
    source: str
    rows_read: int
    vocab: Vocab
    vectors: np.ndarray
    report: VectorReport
    test_oov_rate: float
    truncated: int
    test_filtered_rate: float = 0.0


def _read_rows(recipe: Recipe, skips: Skips) -> tuple[list[_Rec], str, int]:
    """The source's rows, repeated rows skipped; its name; the rows read. Refuses a source without a usable row."""
    recs, source = _read_source(recipe, skips)
    recs = _drop_repeated_rows(recs, skips)
    _warn_images_with_several_labels(recs, source)
    if not recs and not skips.total:
        raise SicotError(f"{source}: holds no rows (a header alone?): add one row per image")
    if not recs:
        raise SicotError(f"{source}: no usable rows ({skips.described()})")
    return recs, source, len(recs) + skips.total


def _vocabulary(train_recs: list[_Rec], recipe: Recipe, source: str) -> Vocab:
    """The filtered vocabulary of the training titles; refused when empty, saying which filter to lower."""
    t = recipe.text
    vocab = build_vocab(
        [r.tokens for r in train_recs],
        t.drop_most_frequent,
        t.drop_least_frequent,
        t.min_count,
        labels=[r.label for r in train_recs],
        drop_rule=t.drop_rule,
    )
    if len(vocab) <= 1 and vocab.raw_size == 0:  # the filters' advice below could not help
        raise SicotError(
            f"{source}: no training title has a word (each is empty, or punctuation only): the titles are the "
            "side information sicot trains with; fill the title column"
        )
    if len(vocab) <= 1:
        raise SicotError(
            f"{source}: the vocabulary is empty after filtering ({vocab.raw_size} words before): "
            "lower text.drop_most_frequent / text.drop_least_frequent / text.min_count"
        )
    return vocab


def build_text(recipe: Recipe, skips: Skips, progress: Progress | None = None, vectors: bool = True) -> TextStage:
    """Read the rows' titles, split, build the filtered vocabulary and the word vectors (unless not ``vectors``).

    Shared by ``prepare`` and ``embed``; no image is opened here. Deterministic: every machine of a
    ``--shard i/n`` prepare computes the same rows, splits and vocabulary from the same inputs.
    """
    progress = progress or NullProgress()
    d = recipe.data
    with progress.task("reading the rows", None):
        recs, source, rows_read = _read_rows(recipe, skips)
    workers = d.workers or os.cpu_count() or 1

    long = sum(len(r.title) > TITLE_CHARS for r in recs)
    if long:  # a runaway title (a whole page pasted in one cell) tokenised in full takes minutes and gigabytes
        log.warning(
            "%s: %d title(s) longer than %s characters: only the first %s of each are tokenised "
            "(a title keeps data.max_title_tokens words in any case)",
            source, long, f"{TITLE_CHARS:,}", f"{TITLE_CHARS:,}",
        )  # fmt: skip
    with progress.task("tokenizing titles", len(recs)) as task:
        titles = [r.title[:TITLE_CHARS] for r in recs]
        for r, toks in zip(recs, tokenize_many(titles, workers), strict=True):
            r.tokens = toks
        task.advance(len(recs))

    given_split = _split(recs, recipe)
    if given_split and not any(r.split == "train" for r in recs):
        raise SicotError(
            f"{source}: no training rows (every row's split is {' or '.join(sorted({str(r.split) for r in recs}))}): "
            "mark some rows train, or leave the split column out to have the split drawn"
        )
    recs = _drop_untrainable(recs, 1, skips)
    _carve_validation(recs, recipe)
    with progress.task("building the vocabulary", None):
        vocab = _vocabulary([r for r in recs if r.split == "train"], recipe, source)
    truncated = 0
    kept: list[_Rec] = []
    test_tokens = test_oov = test_filtered = 0
    for r in recs:
        if r.split == "test":
            # a word the noise filter removed is not out of vocabulary: it was seen in training
            test_tokens += len(r.tokens)
            test_filtered += sum(1 for t in r.tokens if t in vocab.removed)
            test_oov += sum(1 for t in r.tokens if t not in vocab.index and t not in vocab.removed)
        ids = vocab.encode(r.tokens, 10**9)
        if r.split == "train" and not r.tokens:
            skips.add("empty title", r.where)
            continue
        if r.split == "train" and not ids:
            skips.add("title empty after the noise-word filter", r.where)
            continue
        if len(ids) > d.max_title_tokens:
            truncated += 1
        r.ids = ids[: d.max_title_tokens]
        kept.append(r)
    if given_split:
        kept = _drop_test_rows_of_trained_images(kept, skips)
    recs = _drop_untrainable(kept, d.min_train_per_class, skips)
    if not recs:
        raise SicotError(f"{source}: no row left after filtering ({skips.described()})")
    _check_classes_and_test_rows(recs, source, given_split, d.min_train_per_class, d.test_per_class)
    if vectors:
        with progress.task("word vectors", None):
            vecs, vreport = word_vectors([r.tokens for r in recs if r.split == "train"], vocab, recipe.embed, base=None)
    else:  # a --shard part: the merge step trains them, once; a bad corpus is refused now, not then
        if recipe.embed.corpus:
            read_corpus(recipe.embed.corpus)
        vecs, vreport = (
            np.zeros((len(vocab), recipe.embed.dim), np.float32),
            VectorReport("not built", recipe.embed.dim, len(vocab), 0),
        )

    rate = lambda k: k / test_tokens if test_tokens else 0.0  # noqa: E731
    return TextStage(recs, source, rows_read, vocab, vecs, vreport, rate(test_oov), truncated, rate(test_filtered))


def data_boundaries(train_counts: np.ndarray) -> dict[str, int]:
    """Head/tail and many/medium/few thresholds derived from the training counts per class.

    head: a class with at least the mean training count per class, rounded to the nearest integer
    (Python's ``round``: halves to even), is a head class; so a class a fraction below the mean can
    be head (mean 15.47: threshold 15). The paper's iMaterialist boundary, 200, sits near that
    dataset's mean of 218 training images per class.
    many/few: the class-count tertiles, so about a third of the classes fall in each of few
    (``< few_threshold``), medium and many (``> many_threshold``).
    """
    counts = np.sort(np.asarray(train_counts, dtype=np.int64))
    if counts.size == 0:
        return {"head_threshold": 1, "many_threshold": 1, "few_threshold": 1}
    few = max(1, int(counts[int(np.floor(counts.size / 3))]))
    many = max(few, int(counts[min(counts.size - 1, int(np.ceil(2 * counts.size / 3)) - 1)]))
    return {"head_threshold": max(1, round(float(counts.mean()))), "many_threshold": many, "few_threshold": few}


def _restore_side_file(out_path: Path) -> None:
    """Rewrite ``<out>.recipe.json`` from the prepared file when a kill came between the two: missing,
    or still describing the file a ``--force`` replaced. A file there that is not a side file (a
    user's own) is never replaced."""
    side = out_path.with_suffix(".recipe.json")
    if side.exists() and not side.is_file():
        return
    import h5py

    try:
        with h5py.File(out_path, "r") as f:
            content = f.attrs.get("side") if int(f.attrs.get("complete", 0)) == 1 else None
    except OSError:
        return
    if content is None:
        return
    want = json.loads(content)
    state = _side_state(side) if os.path.lexists(side) else None
    if state == "foreign":  # not prepare's: someone's own file, left alone
        return
    if state == "ours" and json.loads(side.read_text(encoding="utf-8-sig")) == want:
        return
    write_json(side, want)  # missing, torn, or describing the file a --force replaced
    log.info("restored %s from %s", side, out_path)


H5_SUFFIXES = (".h5", ".hdf5")


def recipe_out(raw: str) -> Path:
    """``data.out`` as the recipe gives it: the .h5 file itself (``--out`` may also name a folder).

    Raises:
        SicotError: empty, a folder (``.``, a trailing slash, an existing folder), a bare ``.h5``,
            or a name that is not ``.h5``/``.hdf5`` (another file of the user's would be replaced).
    """
    path = Path(raw)
    example = "data/NAME.h5"
    if raw.strip() in ("", ".", "..") or raw.endswith(("/", os.sep)) or path.is_dir():
        raise SicotError(f"data.out = {raw!r}: names a folder; data.out names the .h5 file to write (e.g. {example})")
    if path.name.lower() in H5_SUFFIXES or path.name.startswith("."):
        raise SicotError(
            f"data.out = {raw!r}: a file name needs a name before {path.suffix or path.name}, not a hidden one (e.g. {example})"
        )
    if path.suffix.lower() not in H5_SUFFIXES:
        raise SicotError(
            f"data.out = {raw!r}: not an .h5 name; data.out names the prepared .h5 file (e.g. {path.with_suffix('.h5')})"
        )
    return path


def _check_output(out_path: Path, force: bool) -> None:
    """Refuse an output that exists (without ``force``) or is a folder; clear a killed run's leftovers."""
    check_name(out_path)
    if out_path.exists() and not out_path.is_file() and not out_path.is_dir():  # a FIFO would block the reads below
        raise SicotError(f"{out_path}: exists and is not a regular file (a pipe or a device?); choose another output")
    twin = next((out_path.with_suffix(x) for x in H5_SUFFIXES if x != out_path.suffix.lower()), None)
    if out_path.suffix.lower() in H5_SUFFIXES and twin is not None and taken(twin):
        raise SicotError(
            f"{out_path}: {twin.name} beside it would share its side file {out_path.with_suffix('.recipe.json').name}, "
            "which describes one of the two: choose another name"
        )
    for path in (out_path, out_path.with_suffix(".recipe.json")):
        remove_stale_tmp(path)  # left by a killed prepare
    if taken(out_path) and not force:  # a dangling symbolic link too: the rename would replace it
        _restore_side_file(out_path)
        raise SicotError(f"{out_path}: already exists (pass --force to rebuild it, or --out to write elsewhere)")
    if out_path.is_dir():
        raise SicotError(f"{out_path}: is a directory; --out names the .h5 file to write")
    side = out_path.with_suffix(".recipe.json")
    if taken(side) and not force and _side_state(side) == "foreign":  # a removed .h5's own side file is replaced
        raise SicotError(
            f"{side}: exists and is not the side file `sicot prepare` writes beside {out_path.name}; it is not "
            "replaced: move it, or write the prepared file under another name (prepare --out, or data.out=), or "
            "replace it with `sicot prepare --force`"
        )
    ensure_dir(out_path.parent)


def _side_state(path: Path) -> str:
    """``<out>.recipe.json``: prepare's own ("ours", or "torn": damaged) or someone's ("foreign")."""
    return json_file_state(path, ("recipe", "summary", "versions"))


class _ImageWriter:
    """Decoded images into the file's ``images`` dataset, ``WRITE_BATCH`` at a time, and the sha256 of
    their pixels in row order (the file's ``pixels_sha256``: the data checksum of runs covers it)."""

    def __init__(self, images: Any, fobj: Any) -> None:
        self.images, self.fobj = images, fobj
        self.buf: list[np.ndarray] = []
        self.n = 0  # rows in the file
        self.sha = hashlib.sha256()

    def add(self, image: np.ndarray) -> None:
        self.buf.append(image)
        if len(self.buf) >= WRITE_BATCH:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            block = np.ascontiguousarray(np.stack(self.buf))
            self.images[self.n : self.n + len(self.buf)] = block
            self.sha.update(block)
            self.n += len(self.buf)
            self.buf.clear()
            self.fobj.check()  # stop at the first failed write, not after decoding everything


class _Duplicates:
    """Validation and test images whose pixels equal an earlier split's (another file with the same
    picture: the same file is refused earlier). They are kept, counted and named: the scores on
    them measure memory, not recognition."""

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}  # digest -> the first row (train, then val) with these pixels
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[tuple[str, str]]] = {}

    def add(self, phase: str, r: _Rec, key: str) -> None:
        """Row ``r`` of ``phase`` holds the pixels whose :func:`jpegwrite.pixel_digest` is ``key``."""
        first = self.seen.get(key)
        if first is not None and not first.startswith(phase + ":"):
            self.counts[phase] += 1
            shown = self.examples.setdefault(phase, [])
            if len(shown) < DUPLICATE_EXAMPLES:
                shown.append((r.where, first.partition(":")[2]))
        if first is None and phase != "test":
            self.seen[key] = f"{phase}:{r.where}"


def _decode_splits(
    writer: _ImageWriter, parts: dict[str, list[_Rec]], recipe: Recipe, skips: Skips, progress: Progress, workers: int,
    dups: _Duplicates,
) -> tuple[list[_Rec], dict[str, int], Counter[str]]:  # fmt: skip
    """Decode train, then val, then test images into the file; an undecodable image is a counted skip.

    Returns:
        The rows written (file order), each split's end row, and the training images per label.
    """
    d = recipe.data
    written: list[_Rec] = []
    train_labels: Counter[str] = Counter()
    ends: dict[str, int] = {}  # split -> rows written up to its end
    for phase, part in parts.items():
        if phase != "train":
            # rows of a class whose training images all failed to decode cannot be scored
            for r in part:
                if train_labels[r.label] == 0:
                    skips.add("label has no training image", r.where)
            part = [r for r in part if train_labels[r.label] > 0]
        jobs = [(r.source, d.image_size, d.max_image_pixels) for r in part]
        # closing(): an interrupt or error stops the decoding workers at once, not when the generator is collected
        with (
            progress.task(f"decoding {phase} images", len(part)) as task,
            contextlib.closing(_decoded(jobs, workers)) as results,
        ):
            for r, result in zip(part, results, strict=True):
                task.advance(1)
                if isinstance(result, str):
                    skips.add(result, f"{r.where} ({r.source})" if isinstance(r.source, Path) else r.where)
                    continue
                written.append(r)
                writer.add(result)
                dups.add(phase, r, jpegwrite.pixel_digest(result))
                if phase == "train":
                    train_labels[r.label] += 1
        ends[phase] = len(written)
    writer.flush()
    return written, ends, train_labels


def _warn_duplicates(s: PrepareSummary) -> None:
    for phase, n in s.duplicate_counts.items():
        row, first = s.duplicate_examples[phase][0]
        log.warning(
            "%s: %d %s image%s the same pixels as a %s image (e.g. %s repeats %s); kept, but a score on %s "
            "measures memory, not recognition: give such copies one split (a split column) or remove one",
            s.source, n, "validation" if phase == "val" else "test", "s have" if n > 1 else " has",
            "training" if phase == "val" else "training or validation", row, first, "them" if n > 1 else "it",
        )  # fmt: skip


def _write_rows(
    f: Any, recipe: Recipe, written: list[_Rec], ends: dict[str, int], train_labels: Counter[str], text: TextStage
) -> tuple[list[str], np.ndarray, dict[str, int]]:
    """Labels (class ids by training count), tokens, titles, vocabulary and vectors into the file.

    Returns:
        The class names, their training counts, and the boundaries the data suggests (taken into
        ``recipe.eval`` when ``eval.boundaries = "data"``).
    """
    n = len(written)
    test_labels = Counter(r.label for r in written[ends["val"] :])
    classes = sorted(train_labels, key=lambda c: (-train_labels[c], c))
    class_id = {c: i for i, c in enumerate(classes)}
    tokens = np.zeros((n, recipe.data.max_title_tokens), dtype=np.int32)
    lengths = np.zeros(n, dtype=np.int32)
    for i, r in enumerate(written):
        tokens[i, : len(r.ids)] = r.ids
        lengths[i] = len(r.ids)
    train_counts = np.array([train_labels[c] for c in classes], dtype=np.int64)
    suggested = data_boundaries(train_counts)
    if recipe.eval.boundaries == "data":
        # recorded in the file's recipe: runs and reports take them from there
        for key, value in suggested.items():
            setattr(recipe.eval, key, value)
    ds.write_arrays(
        f,
        labels=np.array([class_id[r.label] for r in written], dtype=np.int64),
        tokens=tokens,
        lengths=lengths,
        ids=[r.id for r in written],
        titles=[r.title for r in written],
        class_names=classes,
        train_counts=train_counts,
        test_counts=np.array([test_labels.get(c, 0) for c in classes], dtype=np.int64),
        words=text.vocab.words,
        word_counts=np.array(text.vocab.counts, dtype=np.int64),
        vectors=text.vectors,
    )
    ds.write_removed(f, text.vocab.removed)
    return classes, train_counts, suggested


def _summary(
    out_path: Path, recipe: Recipe, text: TextStage, skips: Skips, ends: dict[str, int], n: int,
    train_counts: np.ndarray, suggested: dict[str, int], seconds: float, decode_seconds: float,
) -> PrepareSummary:  # fmt: skip
    head = int((train_counts >= recipe.eval.head_threshold).sum())
    return PrepareSummary(
        out=str(out_path),
        source=text.source,
        rows_read=text.rows_read,
        kept=n,
        skipped=skips.as_dict(),
        skip_examples=skips.examples,
        classes=len(train_counts),
        train_images=ends["train"],
        val_images=ends["val"] - ends["train"],
        test_images=n - ends["val"],
        head_threshold=recipe.eval.head_threshold,
        many_threshold=recipe.eval.many_threshold,
        few_threshold=recipe.eval.few_threshold,
        boundaries=recipe.eval.boundaries,
        head_classes=head,
        tail_classes=len(train_counts) - head,
        raw_vocab=text.vocab.raw_size,
        vocab=len(text.vocab) - 1,
        filter_rules=text.vocab.rules,
        vectors=text.report,
        test_oov_rate=text.test_oov_rate,
        test_filtered_rate=text.test_filtered_rate,
        informative_removed=text.vocab.informative_removed,
        suggested_boundaries=suggested,
        name=recipe.name,
        truncated_titles=text.truncated,
        seconds=seconds,
        decode_seconds=decode_seconds,
    )


def _write_attrs(f: Any, recipe: Recipe, summary: PrepareSummary, side: dict[str, Any], **extra: Any) -> None:
    side_json = json.dumps(side, sort_keys=True, ensure_ascii=False)
    ds.write_attrs(
        f,
        n_train=summary.train_images,
        n_val=summary.val_images,
        image_size=recipe.data.image_size,
        source=summary.source,
        head_threshold=recipe.eval.head_threshold,
        recipe_json=recipe.to_json(),
        versions_json=json.dumps(package_versions(), sort_keys=True),
        **extra,
        # the side file's content, so a kill between the rename and the side file loses
        # nothing (HDF5 attributes stay small: a huge one would need dense storage)
        **({"side_json": side_json} if len(side_json.encode()) < 48_000 else {}),
    )


@dataclass
class PartSummary:
    """What ``prepare --shard i/n`` did: its shards of a format-2 dataset (no index yet)."""

    out: str
    folder: str
    part: tuple[int, int]
    shards: range
    resumed: int  # shards already complete, kept
    images: int
    skipped: int
    seconds: float


def prepare(
    recipe: Recipe,
    out: str | Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
    part: tuple[int, int] | None = None,
    merge: bool = False,
) -> PrepareSummary | PartSummary:
    """Turn the recipe's raw data into one prepared HDF5 file (format 1), or an index and JPEG shards (format 2).

    Args:
        recipe: the resolved recipe (``data``, ``text``, ``embed``, ``eval`` sections are used).
        out: the output file; defaults to ``recipe.data.out``.
        force: replace an existing output (the old file stays until the new one is complete).
        progress: progress reporting (the CLI passes a rich one).
        part: ``(i, n)``: write only part ``i`` of ``n`` of a format-2 dataset's shards (one
            machine's share); ``merge`` then writes the index once every part is done.
        merge: check that every shard of a format-2 dataset is there and write its index.

    Returns:
        The summary of what was read, kept and skipped (a :class:`PartSummary` for a part).

    Raises:
        SicotError: any user error (bad manifest, unwritable output, empty vocabulary, nothing left).
    """
    t0 = time.perf_counter()
    progress = progress or NullProgress()
    recipe = copy.deepcopy(recipe)  # eval.boundaries = "data" fills in the thresholds: not the caller's
    out_path = Path(out) if out else recipe_out(recipe.data.out)
    jpeg = jpegstore.uses_jpeg(recipe.data)
    if (part is not None or merge) and not jpeg:
        raise SicotError(
            f'{out_path}: --shard and --merge write format 2 (JPEG shards); set data.images = "jpeg" (format 1 is one file)'
        )
    check_name(out_path)
    ensure_dir(out_path.parent)
    # One writer per output: a second prepare to the same --out is refused at once (its existence
    # check below would pass while the first still works, and the last to finish would win). A
    # --shard part holds only its own part: the parts of one dataset may run side by side.
    held = out_path if part is None else out_path.with_name(f"{out_path.name}.part-{part[0]}-of-{part[1]}")
    with exclusive(held):
        if part is None:
            _check_output(out_path, force)
        return _prepare(recipe, out_path, progress, part, merge, jpeg, t0)


def _prepare(
    recipe: Recipe, out_path: Path, progress: Progress, part: tuple[int, int] | None, merge: bool, jpeg: bool, t0: float
) -> PrepareSummary | PartSummary:
    """:func:`prepare` once its output is held and checked."""
    d = recipe.data
    skips = Skips(strict=d.strict)
    workers = d.workers or os.cpu_count() or 1
    text = build_text(recipe, skips, progress, vectors=part is None)  # titles -> tokens -> vocabulary -> word2vec
    if jpeg:
        return _prepare_jpeg(recipe, out_path, text, skips, progress, workers, part, merge, t0)
    parts = {split: [r for r in text.recs if r.split == split] for split in ("train", "val", "test")}
    t_decode = time.perf_counter()
    with atomic_path(out_path) as tmp, guarded_file(tmp) as fobj:  # a full disk: one clean error, not a crash in HDF5
        with ds.create(fobj, len(text.recs), d.image_size, d.max_title_tokens) as f:
            writer = _ImageWriter(f["images"], fobj)
            dups = _Duplicates()
            written, ends, train_labels = _decode_splits(writer, parts, recipe, skips, progress, workers, dups)
            if ends["train"] == 0:
                raise SicotError(f"{text.source}: no training image could be decoded ({skips.described()})")
            f["images"].resize(len(written), axis=0)
            decode_seconds = time.perf_counter() - t_decode
            classes, train_counts, suggested = _write_rows(f, recipe, written, ends, train_labels, text)
            seconds = time.perf_counter() - t0
            summary = _summary(
                out_path, recipe, text, skips, ends, len(written), train_counts, suggested, seconds, decode_seconds
            )
            summary.duplicate_counts, summary.duplicate_examples = dict(dups.counts), dups.examples
            _warn_duplicates(summary)
            side = {"recipe": recipe.to_dict(), "summary": summary.as_dict(), "versions": package_versions()}
            _write_attrs(f, recipe, summary, side, pixels_sha256=writer.sha.hexdigest())
    write_json(out_path.with_suffix(".recipe.json"), side)
    _remove_stale_shards(out_path, None)  # a format-2 file this one replaced
    log.debug("prepared %s: %d images, %d classes", out_path, len(written), len(classes))
    return summary


def _remove_stale_shards(out_path: Path, keep: Path | None) -> None:
    """The shard folders of the format-2 file ``out_path`` replaced (all but ``keep``)."""
    for stale in jpegstore.stale_folders(out_path, keep):
        shutil.rmtree(stale, ignore_errors=True)
        log.info("removed %s (the shards of the file %s replaced)", stale, out_path)


def _candidates(text: TextStage) -> list[_Rec]:
    """Format 2's rows in file order (training, validation, test), before any image is decoded."""
    return [r for split in ("train", "val", "test") for r in text.recs if r.split == split]


def _fingerprint(recipe: Recipe, cands: list[_Rec]) -> str:
    """What the shards depend on: the rows (source, size of each image file, split, words) and the image settings.

    Every ``--shard`` part computes it; the merge refuses shards made from anything else, and a
    rerun keeps the shards that still match (resume).
    """
    d = recipe.data
    h = hashlib.sha256()
    settings = {"side": jpegstore.stored_side(d), "quality": d.jpeg_quality, "shard_rows": d.shard_rows, "format": 2}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for r in cands:
        # paths as written, folded: `recipes/../data/x.csv` (a recipe file's relative manifest) and
        # `data/x.csv` (the same built-in recipe by name) are one manifest and give one fingerprint
        source = os.path.normpath(r.source) if isinstance(r.source, Path) else ""
        if isinstance(r.source, Path):
            try:
                # the size, not the time: copies of the images on n machines keep their sizes, not
                # always their times (cp), and must give one fingerprint
                stamp: object = [source, r.source.stat().st_size]
            except OSError:
                stamp = [source, "missing"]
        else:
            stamp = ["synthetic", r.id]
        where = os.path.normpath(r.where)
        h.update(json.dumps([where, r.id, r.label, r.split, r.ids, stamp], ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def _prepare_jpeg(
    recipe: Recipe, out_path: Path, text: TextStage, skips: Skips, progress: Progress, workers: int,
    part: tuple[int, int] | None, merge: bool, t0: float,
) -> PrepareSummary | PartSummary:  # fmt: skip
    """Format 2: the shards (this part's, or all), then (unless a part) the index."""
    d = recipe.data
    cands = _candidates(text)
    fingerprint = _fingerprint(recipe, cands)
    folder = jpegstore.folder_for(out_path, fingerprint)
    side = jpegstore.stored_side(d)
    jobs = [(r.source, side, d.max_image_pixels, d.jpeg_quality) for r in cands]
    n_shards = -(-len(cands) // d.shard_rows)
    t_decode = time.perf_counter()
    if merge:
        infos = jpegwrite.collect_shards(folder, fingerprint, len(cands), d.shard_rows)
    else:
        mine = jpegwrite.part_shards(n_shards, part or (0, 1))
        infos, resumed = jpegwrite.run_shards(folder, fingerprint, jobs, d.shard_rows, mine, workers, progress)
        if part is not None:
            images = sum(n > 0 for k in mine for n in infos[k].lengths)
            return PartSummary(
                str(out_path), str(folder), part, mine, resumed, images,
                sum(len(infos[k].skips) for k in mine), time.perf_counter() - t0,
            )  # fmt: skip
    # a merge decodes nothing (the shards were written by the --shard runs): no throughput to report
    decode_seconds = 0.0 if merge else time.perf_counter() - t_decode
    dups = _Duplicates()
    written, loc, ends, train_labels = _index_rows(cands, infos, d.shard_rows, skips, dups)
    if ends["train"] == 0:
        raise SicotError(f"{text.source}: no training image could be decoded ({skips.described()})")
    with atomic_path(out_path) as tmp, guarded_file(tmp) as fobj:
        with ds.create_index(fobj) as f:
            classes, train_counts, suggested = _write_rows(f, recipe, written, ends, train_labels, text)
            ks = range(n_shards)
            ds.write_store(
                f, loc[:, 0], loc[:, 1], loc[:, 2], [jpegstore.shard_name(k) for k in ks],
                [infos[k].size for k in ks], [infos[k].sha256 for k in ks],
            )  # fmt: skip
            seconds = time.perf_counter() - t0
            summary = _summary(
                out_path, recipe, text, skips, ends, len(written), train_counts, suggested, seconds, decode_seconds
            )
            summary.duplicate_counts, summary.duplicate_examples = dict(dups.counts), dups.examples
            _warn_duplicates(summary)
            side_file = {"recipe": recipe.to_dict(), "summary": summary.as_dict(), "versions": package_versions()}
            _write_attrs(
                f, recipe, summary, side_file, shard_dir=folder.name, stored_side=side,
                pixels_sha256=_store_sha256(loc, [infos[k].sha256 for k in ks]),
            )  # fmt: skip
    write_json(out_path.with_suffix(".recipe.json"), side_file)
    _remove_stale_shards(out_path, folder)  # earlier prepares' shards: the new index replaced them
    return summary


def _store_sha256(loc: np.ndarray, shard_sha256: list[str]) -> str:
    """A format-2 index's pixels: every row's place in its shard, and every shard's sha256."""
    h = hashlib.sha256(np.ascontiguousarray(loc, dtype=np.int64))
    for digest in shard_sha256:
        h.update(digest.encode())
    return h.hexdigest()


def _index_rows(
    cands: list[_Rec], infos: dict[int, jpegstore.ShardInfo], shard_rows: int, skips: Skips, dups: _Duplicates
) -> tuple[list[_Rec], np.ndarray, dict[str, int], Counter[str]]:
    """The rows the index keeps (decoded; a validation or test row only if its class kept a training
    image) and where their bytes are; copies across splits are counted in ``dups``."""
    written: list[_Rec] = []
    loc: list[tuple[int, int, int]] = []
    train_labels: Counter[str] = Counter()
    ends: dict[str, int] = {}
    offsets = {k: np.concatenate([[0], np.cumsum([max(n, 0) for n in info.lengths])]) for k, info in infos.items()}
    for phase in ("train", "val", "test"):
        for i, r in enumerate(cands):
            if r.split != phase:
                continue
            k, j = divmod(i, shard_rows)
            length = infos[k].lengths[j]
            if length < 0:
                reason = infos[k].skips.get(str(j), "image could not be decoded")
                skips.add(reason, f"{r.where} ({r.source})" if isinstance(r.source, Path) else r.where)
                continue
            if phase != "train" and train_labels[r.label] == 0:
                skips.add("label has no training image", r.where)
                continue
            written.append(r)
            loc.append((k, int(offsets[k][j]), length))
            dups.add(phase, r, infos[k].digests[j])
            if phase == "train":
                train_labels[r.label] += 1
        ends[phase] = len(written)
    return written, np.array(loc, dtype=np.int64).reshape(-1, 3), ends, train_labels
