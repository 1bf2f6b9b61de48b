"""Format 2's images: JPEG-encoded, in shard files beside the prepared file (the index).

Why: format 1 stores raw pixels at the training size (150 KB per image at 224 px), so a WebVision-size
set is hundreds of GB and augmentation can only crop inside the training-size image. Format 2 stores
each image once, centre-cropped to a square of ``data.stored_side`` pixels (larger than the training
size, so a random resized crop has pixels to take) and JPEG-encoded at ``data.jpeg_quality``.

Layout: the shards live in a folder ``<out stem>.shards-<fingerprint>/`` beside the index. Shard ``k``
holds the encoded images of the candidate rows ``[k * shard_rows, (k + 1) * shard_rows)`` in file
order (training rows first, then validation, then test), concatenated in ``k.jpgs`` (six digits), and
``k.json`` records each row's byte length (or why it was skipped) and pixel digest, the shard's size, its sha256 and the
fingerprint of the text stage that chose the rows. Because a shard is a fixed range of candidate rows,
n machines (``sicot prepare --shard i/n``) write exactly the shards one machine writes, and a merge
step (``--merge``) checks them and writes the index. A shard already complete is kept when prepare
runs again: an interrupted prepare resumes.

Integrity: the index records every shard's size and sha256 (inside its content checksum). Opening the
index checks that every shard is there with its size (a stat per shard: truncation is caught before
training); the loader reads whole shards and checks each one's sha256 when it reads it (tampering is
caught before a pixel is used), naming the shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sicot_cli.errors import SicotError
from sicot_cli.fsutil import atomic_path

SUFFIX = ".jpgs"


def shard_name(k: int) -> str:
    return f"{k:06d}{SUFFIX}"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class ShardInfo:
    """What ``k.json`` records about one shard."""

    index: int
    fingerprint: str
    lengths: list[int]  # bytes per candidate row, -1 when the row was skipped
    skips: dict[str, str]  # candidate row (within the shard, as a string) -> skip reason
    size: int
    sha256: str
    # per candidate row, the digest of its pixels before JPEG encoding ("" when skipped): prepare's
    # check for copies across splits. A record without them (written before they were) is incomplete:
    # its shard is encoded again.
    digests: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


def write_shard(folder: Path, k: int, fingerprint: str, results: Sequence[tuple[bytes, str] | str]) -> ShardInfo:
    """Write shard ``k`` (its bytes, then its json, each atomically) from the rows' encode results
    (JPEG bytes and pixel digest, or a skip reason)."""
    data = b"".join(r[0] for r in results if not isinstance(r, str))
    info = ShardInfo(
        index=k,
        fingerprint=fingerprint,
        lengths=[-1 if isinstance(r, str) else len(r[0]) for r in results],
        skips={str(i): r for i, r in enumerate(results) if isinstance(r, str)},
        size=len(data),
        sha256=sha256_bytes(data),
        digests=["" if isinstance(r, str) else r[1] for r in results],
    )
    with atomic_path(folder / shard_name(k)) as tmp:
        tmp.write_bytes(data)
    with atomic_path(folder / f"{k:06d}.json") as tmp:
        tmp.write_text(info.to_json(), encoding="utf-8")
    return info


def read_info(folder: Path, k: int, fingerprint: str, rows: int) -> ShardInfo | None:
    """Shard ``k``'s record if the shard is complete, belongs to this text stage and its bytes check out."""
    meta, path = folder / f"{k:06d}.json", folder / shard_name(k)
    try:
        info = ShardInfo(**json.loads(meta.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    if info.fingerprint != fingerprint or info.index != k or not _well_formed(info, rows):
        return None
    try:
        data = path.read_bytes()
    except OSError:
        return None
    ok = len(data) == info.size == sum(n for n in info.lengths if n > 0) and sha256_bytes(data) == info.sha256
    return info if ok else None


def predates_digests(folder: Path, k: int) -> bool:
    """Whether shard ``k``'s record was written before records held pixel digests (an earlier sicot)."""
    try:
        record = json.loads((folder / f"{k:06d}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "lengths" in record and "digests" not in record


def _well_formed(info: ShardInfo, rows: int) -> bool:
    """A record with a length and a pixel digest per row, of the right types."""
    lengths, digests = info.lengths, info.digests
    return (
        isinstance(lengths, list)
        and len(lengths) == rows
        and all(type(n) is int for n in lengths)
        and isinstance(info.skips, dict)
        and isinstance(digests, list)
        and len(digests) == rows
        and all(isinstance(d, str) for d in digests)
    )


@dataclass
class Store:
    """The image side of a format-2 index: where each row's bytes are and what each shard must be."""

    folder: Path
    side: int  # stored square side
    shard: np.ndarray  # [N] int32: the row's shard
    offset: np.ndarray  # [N] int64: byte offset in the shard
    length: np.ndarray  # [N] int32: bytes
    names: list[str]  # shard file names
    sizes: np.ndarray  # [K] int64
    sha256: list[str]  # [K]

    def check_files(self, index: Path, rebuild: str) -> None:
        """Every shard present with its recorded size (a stat each; the hashes are checked as the loader reads)."""
        if not self.folder.is_dir():
            raise SicotError(
                f"{index}: its image shards folder {self.folder.name} is not beside it (a format-2 dataset is the .h5 "
                f"AND that folder: copy or move both), or {rebuild}"
            )
        for name, size in zip(self.names, self.sizes.tolist(), strict=True):
            path = self.folder / name
            try:
                st = path.stat()
            except OSError:
                raise SicotError(f"{path}: image shard missing: {rebuild}") from None
            if not stat.S_ISREG(st.st_mode):  # a folder's "size" would be compared as if it were the shard's
                raise SicotError(f"{path}: the image shard is not a file (a folder or device stands there): {rebuild}")
            got = st.st_size
            if got != size:
                raise SicotError(
                    f"{path}: image shard is {got} bytes, the index records {size} (truncated or replaced): {rebuild}"
                )

    def read_shard(self, k: int) -> bytes:
        """Shard ``k``'s bytes, checked against the index's sha256."""
        path = self.folder / self.names[k]
        try:
            data = path.read_bytes()
        except OSError as e:
            raise SicotError(
                f"{path}: cannot read the image shard ({e.strerror or e}): rebuild the dataset with `sicot prepare --force`"
            ) from None
        if len(data) != int(self.sizes[k]) or sha256_bytes(data) != self.sha256[k]:
            raise SicotError(
                f"{path}: image shard damaged (its sha256 differs from the index's): rebuild the dataset with `sicot prepare --force`"
            )
        return data

    def blocks(self, start: int, stop: int) -> np.ndarray:
        """Starts (relative to ``start``) of the pieces of ``[start, stop)`` that lie in one shard each."""
        if stop <= start:
            return np.zeros(0, dtype=np.int64)
        sh = self.shard[start:stop]
        return np.flatnonzero(np.r_[True, sh[1:] != sh[:-1]]).astype(np.int64)

    def nbytes(self, start: int, stop: int) -> int:
        return int(self.length[start:stop].sum())


def decode_row(data: bytes, size: int, box: tuple[float, float, float, float] | None, flip: bool) -> np.ndarray:
    """JPEG bytes -> ``[3, size, size]`` uint8: the crop ``box`` (pixels, PIL order) resized to ``size``, or the whole image.

    The JPEG decoder's draft mode decodes at a power-of-two reduction when the crop is still at least
    ``size`` pixels there (2x-8x fewer pixels to decode for small crops of large stored images).
    """
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # a shard holding a 30000 x 30000 image: not one prepare wrote
        raise ValueError(f"over PIL's pixel limit: {e}") from None
    w, h = img.size
    if box is None:
        box = (0.0, 0.0, float(w), float(h))
    bw, bh = box[2] - box[0], box[3] - box[1]
    img.draft("RGB", (max(1, round(w * size / bw)), max(1, round(h * size / bh))))
    sx, sy = img.size[0] / w, img.size[1] / h
    box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    img = img.convert("RGB")
    if box == (0.0, 0.0, float(img.size[0]), float(img.size[1])) and img.size == (size, size):
        out = np.asarray(img)
    else:
        out = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=None))
    if flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def crop_boxes(theta: Any, side: int) -> list[tuple[tuple[float, float, float, float], bool]]:  # noqa: ANN401
    """Affine crop parameters (:func:`sicot_cli.data.augment.crop_flip_params`) -> pixel boxes and flips.

    The same crops the device augmentation of format 1 takes, in the stored image's pixels: the
    affine maps output x in [-1, 1] to input ``w * flip * x + cx``, so the crop spans
    ``[cx - w, cx + w]`` of the normalised width.
    """
    out = []
    for t in theta.tolist():
        w, cx, h, cy = abs(t[0][0]), t[0][2], t[1][1], t[1][2]
        box = ((cx - w + 1) / 2 * side, (cy - h + 1) / 2 * side, (cx + w + 1) / 2 * side, (cy + h + 1) / 2 * side)
        out.append((box, t[0][0] < 0))
    return out


def uses_jpeg(d: Any) -> bool:  # noqa: ANN401 - a DataConfig
    """Format 2 for this recipe's ``data`` section (``data.images``; "auto": from 96 px on)."""
    return d.images == "jpeg" or (d.images == "auto" and d.image_size >= 96)


def stored_side(d: Any) -> int:  # noqa: ANN401 - a DataConfig
    """The stored square's side: ``data.stored_side``, or 8/7 of the training size (256 for 224)."""
    return max(d.stored_side, d.image_size) if d.stored_side else round(d.image_size * 8 / 7)


def folder_for(out_path: Path, fingerprint: str) -> Path:
    return out_path.parent / f"{out_path.stem}.shards-{fingerprint[:12]}"


def stale_folders(out_path: Path, keep: Path | None) -> list[Path]:
    """This output's shard folders other than ``keep`` (left by earlier prepares of another recipe)."""
    return sorted(p for p in out_path.parent.glob(f"{out_path.stem}.shards-*") if p.is_dir() and p != keep)
