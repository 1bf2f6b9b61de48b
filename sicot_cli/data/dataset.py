"""The prepared dataset: one HDF5 file, written by ``prepare`` and read by everything else.

Layout (format 1):

=====================  ==========================  =============================================
name                   shape, dtype                what
=====================  ==========================  =============================================
images                 (N, 3, S, S) uint8          RGB, uncompressed, chunked by contiguous rows;
                                                   rows ``[0, n_train)`` are the training set,
                                                   ``[n_train, n_train + n_val)`` the validation
                                                   set, the rest the test set
labels                 (N,) int64                  class ids (classes ordered by training count)
tokens                 (N, L) int32                word ids, 0 = padding
lengths                (N,) int32                  real words per title (>= 1)
ids, titles            (N,) utf-8 strings          the source row's id and raw title
classes/names          (C,) utf-8 strings
classes/train_counts   (C,) int64                  descending
classes/test_counts    (C,) int64
vocab/words            (V,) utf-8 strings          ``words[0] == "<pad>"``
vocab/counts           (V,) int64                  counts over the training titles
vectors                (V, d) float32              initial word vectors (row 0 zero)
vocab/removed_words    (R,) utf-8 strings          words the noise filter removed (optional:
vocab/removed_rules    (R,) utf-8 strings          absent in older files) and the rule that did
=====================  ==========================  =============================================

Format 2 (``data.images = "jpeg"``, :mod:`sicot_cli.data.jpegstore`) has no ``images`` dataset: the
images are JPEG-encoded in shard files in the folder named by the ``shard_dir`` attribute (beside
the file), and the file holds where each row's bytes are:

=====================  ==========================  =============================================
images/shard           (N,) int32                  the row's shard
images/offset          (N,) int64                  byte offset in the shard
images/length          (N,) int32                  bytes
shards/names           (K,) utf-8 strings          shard file names
shards/bytes           (K,) int64                  each shard's size
shards/sha256          (K,) utf-8 strings          each shard's sha256
=====================  ==========================  =============================================

with the attributes ``shard_dir`` and ``stored_side`` (the stored square's side). Format 1 files
open as before; the loader reads both.

Attributes: ``format``, ``n_train``, ``n_val`` (0 when absent: files prepared before validation
splits), ``image_size``, ``source``, ``head_threshold``, ``recipe``
(the resolved recipe as JSON), ``versions`` (JSON), ``side`` (the ``<out>.recipe.json`` content,
which ``prepare`` restores from it after a kill), ``content_sha256`` and ``complete`` = 1, set
last: a file without it was not finished and is refused.

Integrity, and what it costs. :func:`open_prepared` reads everything but the images into memory
anyway, so it also verifies ``content_sha256``, the sha256 of those arrays recorded at prepare time
(~0.3 s per 100 MB; the tokens of a million titles are ~128 MB). The images, which can be many GB,
are not hashed on open: that would read the whole file before every command. They get the checks
that cost nothing: the completeness marker, shapes and dtypes consistent with the other arrays, and
a read of the first and last image row. HDF5 itself refuses a file shorter than its recorded end
(truncation), so what can slip through is a bit flip inside the image data, which can only change
pixel values, never crash a command.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from sicot_cli.config import SECTIONS
from sicot_cli.data.jpegstore import Store
from sicot_cli.errors import SicotError

FORMAT = 1  # raw pixels in one file
FORMAT_JPEG = 2  # JPEG shards + this file as the index (sicot_cli.data.jpegstore)
FORMATS = (FORMAT, FORMAT_JPEG)
CHUNK_BYTES = 1 << 21  # ~2 MB image chunks: large sequential reads, small enough to stream
_STR = h5py.string_dtype("utf-8")
REQUIRED = (
    "labels",
    "tokens",
    "lengths",
    "ids",
    "titles",
    "classes/names",
    "classes/train_counts",
    "classes/test_counts",
    "vocab/words",
    "vocab/counts",
    "vectors",
)
STORE = ("images/shard", "images/offset", "images/length", "shards/names", "shards/bytes", "shards/sha256")


def required(fmt: int) -> tuple[str, ...]:
    return (*REQUIRED, *STORE) if fmt == FORMAT_JPEG else ("images", *REQUIRED)


def chunk_rows(image_size: int) -> int:
    """Rows per HDF5 chunk of images for this image size."""
    return max(1, CHUNK_BYTES // (3 * image_size * image_size))


def create(path: Path | Any, n: int, image_size: int, max_tokens: int) -> h5py.File:
    """Open a new file (a path or a file object) for writing with a resizable image dataset of at most ``n`` rows."""
    f = h5py.File(path, "w")
    f.create_dataset(
        "images",
        shape=(n, 3, image_size, image_size),
        maxshape=(None, 3, image_size, image_size),
        dtype=np.uint8,
        chunks=(min(max(n, 1), chunk_rows(image_size)), 3, image_size, image_size),
    )
    f.attrs["format"] = FORMAT
    f.attrs["complete"] = 0
    return f


def create_index(path: Path | Any) -> h5py.File:
    """Open a new format-2 index (a path or a file object) for writing."""
    f = h5py.File(path, "w")
    f.attrs["format"] = FORMAT_JPEG
    f.attrs["complete"] = 0
    return f


def write_store(f: h5py.File, shard: np.ndarray, offset: np.ndarray, length: np.ndarray,
                names: Sequence[str], sizes: Sequence[int], sha256: Sequence[str]) -> None:  # fmt: skip
    """A format-2 index's image locations and shard records (before :func:`write_attrs`)."""
    f["images/shard"] = np.asarray(shard, dtype=np.int32)
    f["images/offset"] = np.asarray(offset, dtype=np.int64)
    f["images/length"] = np.asarray(length, dtype=np.int32)
    f.create_dataset("shards/names", data=np.array(list(names), dtype=object), dtype=_STR)
    f["shards/bytes"] = np.asarray(sizes, dtype=np.int64)
    f.create_dataset("shards/sha256", data=np.array(list(sha256), dtype=object), dtype=_STR)


def write_arrays(
    f: h5py.File,
    *,
    labels: np.ndarray,
    tokens: np.ndarray,
    lengths: np.ndarray,
    ids: Sequence[str],
    titles: Sequence[str],
    class_names: Sequence[str],
    train_counts: np.ndarray,
    test_counts: np.ndarray,
    words: Sequence[str],
    word_counts: np.ndarray,
    vectors: np.ndarray,
) -> None:
    """Write everything but the images."""
    f["labels"] = labels
    f["tokens"] = tokens
    f["lengths"] = lengths
    f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=_STR)
    f.create_dataset("titles", data=np.array(titles, dtype=object), dtype=_STR)
    f.create_dataset("classes/names", data=np.array(class_names, dtype=object), dtype=_STR)
    f["classes/train_counts"] = train_counts
    f["classes/test_counts"] = test_counts
    f.create_dataset("vocab/words", data=np.array(words, dtype=object), dtype=_STR)
    f["vocab/counts"] = word_counts
    f["vectors"] = vectors.astype(np.float32)


# What the checksum covers: everything open_prepared holds in memory (not the images, see above).
HASHED = (
    "labels",
    "tokens",
    "lengths",
    "classes/names",
    "classes/train_counts",
    "classes/test_counts",
    "vocab/words",
    "vectors",
)
# ... and the attributes that change a result (which rows are trained on and scored, the image
# size, the head/tail boundary). Files whose checksum starts with "v2:" cover them; older files
# (a bare hex digest) do not, and get the consistency checks of _check_values only.
HASHED_ATTRS = ("format", "n_train", "n_val", "image_size", "head_threshold")
_V2 = "v2:"


def _read_hashed(f: h5py.File) -> dict[str, Any]:
    names = HASHED + (STORE if int(f.attrs.get("format", FORMAT)) == FORMAT_JPEG else ())
    return {name: _strings(f[name]) if f[name].dtype.kind == "O" else f[name][()] for name in names}


def _sha256(values: dict[str, Any]) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in values:  # HASHED, then a format-2 file's STORE
        v = values[name]
        if isinstance(v, list):  # strings: length-prefixed utf-8, so ["ab", "c"] != ["a", "bc"]
            for item in v:
                b = item.encode("utf-8", errors="surrogatepass")
                h.update(len(b).to_bytes(8, "little") + b)
        else:
            a = np.ascontiguousarray(v)
            h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def write_removed(f: h5py.File, removed: dict[str, str]) -> None:
    """The words the noise filter removed and the rule that removed each (``embed --neighbours``)."""
    words = sorted(removed)
    f.create_dataset("vocab/removed_words", data=np.array(words, dtype=object), dtype=_STR)
    f.create_dataset("vocab/removed_rules", data=np.array([removed[w] for w in words], dtype=object), dtype=_STR)


def read_removed(path: str | Path) -> dict[str, str]:
    """word -> rule for the words the noise filter removed ({} for files prepared before this was kept)."""
    with h5py.File(path, "r") as f:
        if "vocab/removed_words" not in f:
            return {}
        return dict(zip(_strings(f["vocab/removed_words"]), _strings(f["vocab/removed_rules"]), strict=False))


def content_sha256(f: h5py.File) -> str:
    """sha256 over the in-memory arrays of a prepared file, as stored (dtype, shape and bytes)."""
    return _sha256(_read_hashed(f))


def _attrs_text(f: h5py.File) -> str:
    values: dict[str, Any] = {
        name: int(f.attrs.get(name, 0) if name == "n_val" else f.attrs[name]) for name in HASHED_ATTRS
    }
    if int(f.attrs["format"]) == FORMAT_JPEG:  # where the images are, and at what size
        values |= {"stored_side": int(f.attrs["stored_side"]), "shard_dir": str(f.attrs["shard_dir"])}
    return json.dumps(values, sort_keys=True)


def _sha256_v2(values: dict[str, Any], f: h5py.File) -> str:
    import hashlib

    return _V2 + hashlib.sha256((_sha256(values) + _attrs_text(f)).encode()).hexdigest()


def write_attrs(f: h5py.File, **attrs: Any) -> None:
    """Write the attributes, then mark the file complete (last, so a partial file never is)."""
    for key, value in attrs.items():
        name = key.removesuffix("_json")
        f.attrs[name] = value
    f.attrs["content_sha256"] = _sha256_v2(_read_hashed(f), f)
    f.flush()
    f.attrs["complete"] = 1


def _strings(ds: h5py.Dataset) -> list[str]:
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in ds[()]]


@dataclass
class Prepared:
    """The small, always-in-memory part of a prepared dataset (everything but the images)."""

    path: Path
    n_train: int
    image_size: int
    head_threshold: int
    source: str
    recipe: dict[str, Any]
    labels: np.ndarray
    tokens: np.ndarray
    lengths: np.ndarray
    class_names: list[str]
    train_counts: np.ndarray
    test_counts: np.ndarray
    words: list[str]
    vectors: np.ndarray
    n_val: int = 0
    format: int = FORMAT
    store: Store | None = None  # format 2: the JPEG shards (sicot_cli.data.jpegstore)
    pixels_sha256: str = ""  # the images' sha256, recorded by prepare ("" in files prepared before it was recorded)
    identity: tuple[int, ...] = ()  # the file as opened: device, inode, size, mtime (check_unchanged)

    def check_unchanged(self) -> None:
        """Refuse to read images again from ``path`` once another file is there (``prepare --force``
        while a run trains): the labels and splits in memory are the opened file's, and the new
        file's images scored against them would be silently wrong.

        Raises:
            SicotError: naming the file and what to do.
        """
        if self.identity and _identity(self.path) != self.identity:
            raise SicotError(
                f"{self.path}: replaced or changed since this run opened it (prepared again?): its labels and "
                "splits in memory are the old file's, so the run stopped; resume it (`--resume`) to check the "
                "file it finds, or train a new run on the new file"
            )

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def test_start(self) -> int:
        """The first test row: rows ``[test_start, n)`` are the test set."""
        return self.n_train + self.n_val

    def split_range(self, split: str) -> tuple[int, int]:
        """The rows ``[start, stop)`` of ``"train"``, ``"val"`` or ``"test"``."""
        return {"train": (0, self.n_train), "val": (self.n_train, self.test_start), "test": (self.test_start, self.n)}[
            split
        ]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def titles(self, rows: Sequence[int] | None = None) -> list[str]:
        """Raw titles (read on demand: they are only needed by reports and predict)."""
        with h5py.File(self.path, "r") as f:
            ds = f["titles"]
            if rows is None:
                return _strings(ds)
            return [ds[int(i)].decode("utf-8") if isinstance(ds[int(i)], bytes) else str(ds[int(i)]) for i in rows]

    def ids(self) -> list[str]:
        with h5py.File(self.path, "r") as f:
            return _strings(f["ids"])

    def checksum_without_pixels(self, text: bool = True) -> str | None:
        """What sicot versions before ``pixels_sha256`` recorded for this data (:meth:`data_checksum`
        without the pixels); None for a file without ``pixels_sha256``, whose checksum is that already."""
        return dataclasses.replace(self, pixels_sha256="").data_checksum(text) if self.pixels_sha256 else None

    def data_checksum(self, text: bool = True) -> str:
        """sha256 of the data a run computes from: labels, classes, splits and image size, and with
        ``text`` the tokens, vocabulary and vectors. Unlike ``content_sha256`` it leaves out where the
        file and its shards are, so the same data under another name has the same checksum; a
        baseline (no text encoder) is checked with ``text=False``. The pixels are covered by the
        ``pixels_sha256`` prepare recorded (files prepared before it was recorded: not covered, and
        their checksum is the one earlier versions computed, so their runs still match)."""
        import hashlib

        h = hashlib.sha256(json.dumps([self.n_train, self.n_val, self.image_size, self.class_names]).encode())
        if self.pixels_sha256:
            h.update(f"pixels:{self.pixels_sha256}".encode())
        arrays = [self.labels, self.train_counts, self.test_counts]
        if text:
            arrays += [self.tokens, self.lengths, self.vectors]
            h.update(json.dumps(self.words).encode())
        for a in arrays:
            h.update(f"{a.dtype.str}{a.shape}".encode() + np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:32]

    def fingerprint(self) -> dict[str, Any]:
        """What a trained model depends on: classes and vocabulary (checked on resume/evaluate/predict)."""
        import hashlib

        h = hashlib.sha256()
        for item in (*self.class_names, "\x00", *self.words):
            h.update(item.encode("utf-8") + b"\x00")
        return {"classes": self.num_classes, "vocab": len(self.words), "sha256": h.hexdigest()[:16]}


def val_rows_hint(val_fraction: float) -> str:
    """How to get validation rows into a prepared file that has none, given its ``data.val_fraction``."""
    if val_fraction <= 0:
        return "rebuild it with data.val_fraction > 0 (`sicot prepare --force`)"
    return (
        f"its data.val_fraction = {val_fraction:g} spared none (a class gives floor({val_fraction:g} x its training "
        "images), so each needs more images): rebuild it with a larger data.val_fraction or more images per class "
        "(`sicot prepare --force`)"
    )


def rebuild_hint(path: Path) -> str:
    """How to rebuild a damaged prepared file: the same inputs and settings, not the built-in demo's.

    A file that does not look like a prepared dataset (no ``.h5`` name, no ``.recipe.json`` beside
    it: a manifest given by mistake) gets no rebuild command: ``--out`` would name the user's file.
    """
    try:
        side: Path | None = path.with_suffix(".recipe.json")
    except ValueError:  # "", ".", "..": no file name
        side = None
    recorded = side is not None and side.is_file()
    if path.suffix.lower() not in (".h5", ".hdf5") and not recorded:
        return "--data names a prepared dataset, the .h5 file `sicot prepare` writes"
    where = f" (its settings are in {side.name})" if recorded and side is not None else ""
    return (
        f"rebuild it with the command that made it plus --force: `sicot prepare --recipe R (or --manifest M) "
        f"--out {path} --force`{where}"
    )


def _identity(path: Path) -> tuple[int, ...]:
    try:
        st = path.stat()
    except OSError:
        return ()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def open_prepared(path: str | Path) -> Prepared:
    """Open a prepared file and check it is complete and of a known format.

    Raises:
        SicotError: missing, not HDF5, unfinished, of another format or missing a dataset; the
            message names the file and the command that rebuilds it.
    """
    path = Path(path)
    rebuild = rebuild_hint(path)
    if not path.is_file():
        if path.exists():
            raise SicotError(
                f"{path}: not a regular file (a directory, FIFO, socket or device); a prepared dataset is an .h5 file"
            )
        raise SicotError(f"{path}: prepared dataset not found (create it with `sicot prepare`)")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise SicotError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {rebuild}") from None
    try:
        with f:
            if "format" not in f.attrs:  # another tool's HDF5: never suggest writing over it
                raise SicotError(
                    f"{path}: not a sicot prepared dataset (an HDF5 file without sicot's format mark): "
                    "give the .h5 that `sicot prepare` wrote (a run's own is named in its config.json)"
                )
            fmt = int(f.attrs.get("format", -1))
            if fmt not in FORMATS:
                raise SicotError(f"{path}: not a sicot prepared dataset of format 1 or 2: {rebuild}")
            if int(f.attrs.get("complete", 0)) != 1:
                raise SicotError(f"{path}: incomplete (prepare was interrupted): {rebuild}")
            missing = [k for k in required(fmt) if k not in f]
            if missing:
                raise SicotError(f"{path}: dataset {missing[0]!r} is missing: {rebuild}")
            values = _read_hashed(f)
            want = f.attrs.get("content_sha256")  # absent in files prepared before checksums
            if want is not None and str(want) != (
                _sha256_v2(values, f) if str(want).startswith(_V2) else _sha256(values)
            ):
                raise SicotError(
                    f"{path}: corrupt prepared dataset (content checksum mismatch: damaged on disk): {rebuild}"
                )
            _check_shapes(f, path, rebuild)
            prepared = Prepared(
                path=path,
                n_train=int(f.attrs["n_train"]),
                n_val=int(f.attrs.get("n_val", 0)),
                image_size=int(f.attrs["image_size"]),
                head_threshold=int(f.attrs["head_threshold"]),
                source=str(f.attrs["source"]),
                recipe=json.loads(f.attrs["recipe"]),
                labels=values["labels"],
                tokens=values["tokens"],
                lengths=values["lengths"],
                class_names=values["classes/names"],
                train_counts=values["classes/train_counts"],
                test_counts=values["classes/test_counts"],
                words=values["vocab/words"],
                vectors=values["vectors"],
                format=fmt,
                store=_store(f, path, values, rebuild) if fmt == FORMAT_JPEG else None,
                pixels_sha256=str(f.attrs.get("pixels_sha256", "")),
                identity=_identity(path),
            )
            _check_values(prepared, rebuild)
            return prepared
    except SicotError:
        raise
    except (OSError, KeyError, ValueError, TypeError, UnicodeDecodeError) as e:
        raise SicotError(f"{path}: corrupt prepared dataset ({e}): {rebuild}") from None
    except RecursionError:  # a recorded recipe nested thousands deep
        raise SicotError(
            f"{path}: corrupt prepared dataset (its recorded recipe is nested too deeply): {rebuild}"
        ) from None


def _store(f: h5py.File, path: Path, values: dict[str, Any], rebuild: str) -> Store:
    """A format-2 index's shards: locations consistent with the shard sizes, every shard file present."""
    store = Store(
        folder=path.parent / str(f.attrs["shard_dir"]),
        side=int(f.attrs["stored_side"]),
        shard=values["images/shard"],
        offset=values["images/offset"],
        length=values["images/length"],
        names=values["shards/names"],
        sizes=values["shards/bytes"],
        sha256=values["shards/sha256"],
    )
    k = len(store.names)
    bad = ""
    if any(Path(name).name != name or name in ("", ".", "..") for name in [*store.names, str(f.attrs["shard_dir"])]):
        bad = "a shard name that is a path"
    elif len(store.shard) and (store.shard.min() < 0 or store.shard.max() >= k):
        bad = "rows in shards the index does not list"
    elif len(store.shard) and (store.length.min() <= 0 or store.offset.min() < 0
                               or np.any(store.offset + store.length > store.sizes[store.shard])):  # fmt: skip
        bad = "image bytes outside their shard"
    if bad:
        raise SicotError(f"{path}: corrupt prepared dataset ({bad}): {rebuild}")
    store.check_files(path, rebuild)
    return store


def _check_shapes(f: h5py.File, path: Path, rebuild: str) -> None:
    """Shapes and dtypes that must agree, and the first and last image rows readable (cheap)."""
    n = len(f["labels"])
    size = int(f.attrs["image_size"])
    n_train = int(f.attrs["n_train"])
    n_val = int(f.attrs.get("n_val", 0))
    jpeg = int(f.attrs["format"]) == FORMAT_JPEG
    images = f["images/shard"] if jpeg else f["images"]
    expect = {
        **({name: (n,) for name in STORE[:3]} if jpeg else {"images": (n, 3, size, size)}),
        "shards/bytes": f["shards/names"].shape if jpeg else None,
        "shards/sha256": f["shards/names"].shape if jpeg else None,
        "tokens": (n, f["tokens"].shape[1] if f["tokens"].ndim == 2 else -1),
        "lengths": (n,),
        "ids": (n,),
        "titles": (n,),
        "classes/train_counts": f["classes/names"].shape,
        "classes/test_counts": f["classes/names"].shape,
        "vocab/counts": f["vocab/words"].shape,
        "vectors": (len(f["vocab/words"]), f["vectors"].shape[1] if f["vectors"].ndim == 2 else -1),
    }
    for name, shape in expect.items():
        if shape is not None and f[name].shape != shape:
            raise SicotError(f"{path}: dataset {name!r} has shape {f[name].shape}, expected {shape}: {rebuild}")
    if not (0 <= n_train and 0 <= n_val and n_train + n_val <= n):
        raise SicotError(
            f"{path}: corrupt prepared dataset (n_train {n_train} and n_val {n_val} do not fit its {n} rows): {rebuild}"
        )
    if images.dtype != np.uint8 and not jpeg:
        raise SicotError(f"{path}: images are {images.dtype}, expected uint8: {rebuild}")
    if jpeg and not 1 <= int(f.attrs["stored_side"]) <= 65_535:
        raise SicotError(
            f"{path}: corrupt prepared dataset (stored_side {int(f.attrs['stored_side'])} is no image side): {rebuild}"
        )
    if n:
        images[0]
        images[n - 1]


def _check_values(p: Prepared, rebuild: str) -> None:
    """Ids in range: a file from a buggy or foreign writer fails here, not as an index error mid-training."""
    bad = ""
    if p.n and (p.labels.min() < 0 or p.labels.max() >= p.num_classes):
        bad = "labels outside the class list"
    elif p.tokens.size and (p.tokens.min() < 0 or p.tokens.max() >= len(p.words)):
        bad = "word ids outside the vocabulary"
    elif p.n and (p.lengths.min() < 0 or p.lengths.max() > p.tokens.shape[1]):
        bad = "title lengths outside [0, max_title_tokens]"
    elif not p.words or p.words[0] != "<pad>":
        bad = "vocabulary without the <pad> word first"
    elif not isinstance(p.recipe, dict) or not all(isinstance(v, dict) for k, v in p.recipe.items() if k in SECTIONS):
        bad = "its recorded recipe is not a recipe"
    elif p.vectors.size and not np.isfinite(p.vectors).all():
        bad = "word vectors that are NaN or infinite"
    elif not (
        np.array_equal(np.bincount(p.labels[: p.n_train], minlength=p.num_classes), p.train_counts)
        and np.array_equal(np.bincount(p.labels[p.test_start :], minlength=p.num_classes), p.test_counts)
    ):
        # n_train decides which rows are trained on and which are scored: the class counts,
        # recorded by prepare, must agree with it (an edited n_train would silently move rows)
        bad = f"n_train {p.n_train} / n_val {p.n_val} disagree with the recorded train/test counts per class"
    if bad:
        raise SicotError(f"{p.path}: corrupt prepared dataset ({bad}): {rebuild}")
