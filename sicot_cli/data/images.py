"""Decoding and resizing images for ``prepare``.

Every image becomes a square uint8 RGB array: the shorter side is resized to ``size`` (PIL's
bicubic with reducing_gap for speed on large photos) and the centre is cropped. Colour modes are
normalised first: CMYK, palette, greyscale and alpha images are converted to RGB (alpha composited
on white, as product photos on marketplaces are shown), 16-bit and 32-bit integer images are scaled
to 8 bits, and animated images contribute their first frame.
"""

from __future__ import annotations

import errno
import functools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sicot_cli.fsutil import NotRegularFileError, open_regular

# The decompression-bomb guard is ours (data.max_image_pixels, checked after JPEG draft-mode
# reduction), so PIL's own check, made on the full size at open, is off.
Image.MAX_IMAGE_PIXELS = None
DEFAULT_MAX_PIXELS = 89_478_485
# A 1 x 80M-pixel strip passes the pixel limit, but resizing its short side to `size` would need
# gigabytes; no product photo is that thin.
MAX_ASPECT = 100


class ImageSkip(Exception):
    """An image that cannot be used; the message is the counted skip reason."""


class TooManyPixels(ImageSkip):
    """An image over the pixel limit (a decompression bomb, or just too large to use)."""


# Icon containers decode their embedded images inside PIL's Image.open, before any size can be
# checked (a 256 x 256 directory entry may hold a 30000 x 30000 PNG): they are not read.
ICON_CONTAINERS = ("ICO", "CUR", "ICNS")


def _icon_container(fp: BinaryIO) -> bool:
    from PIL import CurImagePlugin, IcnsImagePlugin, IcoImagePlugin

    head = fp.read(16)
    fp.seek(0)
    return any(m._accept(head) for m in (IcoImagePlugin, CurImagePlugin, IcnsImagePlugin))


@contextmanager
def _opened(fp: BinaryIO) -> Iterator[Image.Image]:
    """``fp`` opened by every format but the icon containers; one that no other format opens and whose
    header is an icon container's is named as one (a TGA header can look like a CUR's: it is read)."""
    try:
        img = Image.open(fp, formats=_readable_formats())
    except UnidentifiedImageError:
        fp.seek(0)
        if _icon_container(fp):
            raise ImageSkip("an icon container (ICO, CUR or ICNS) is not read: save the image as PNG") from None
        raise
    with img:
        yield img


@functools.cache
def _readable_formats() -> tuple[str, ...]:
    """Every format PIL opens but the icon containers (computed once per process, not per image)."""
    Image.init()
    return tuple(f for f in Image.OPEN if f not in ICON_CONTAINERS)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # integer arithmetic: round(v / top * 255) without a float64 copy of a large image
        arr = np.asarray(img)
        top = 65535 if img.mode.startswith("I;16") or arr.max() > 255 else 255
        wide = np.clip(arr, 0, top).astype(np.uint32)
        wide *= 255
        wide += top // 2
        wide //= top
        return Image.fromarray(wide.astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ImageSkip("image has non-finite pixel values (NaN or infinity)")
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    transparent_key = img.mode in ("P", "L", "RGB") and "transparency" in img.info  # a tRNS colour or palette entry
    if img.mode in ("RGBA", "LA", "PA") or transparent_key:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation, as every viewer does: a phone photo stored sideways is shown upright."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a malformed EXIF block leaves the pixels as stored, not the row skipped
        return img


def square_resize(img: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` and centre-crop to ``size`` x ``size``; returns HWC uint8."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def load_image(
    path: Path | BinaryIO,
    size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    limit_name: str | None = "data.max_image_pixels",
) -> np.ndarray:
    """Decode ``path`` (a file path, or an open binary file such as ``io.BytesIO``) into a ``[size, size, 3]`` uint8 array.

    A JPEG is decoded in draft mode, at the smallest power-of-two reduction (up to 1/8) whose
    shorter side is still at least ``size``: a 16000 x 14000 photo is decoded as 2000 x 1750, and
    the pixel limit applies to that size. Other formats are decoded at full size. The size is
    checked from the header, before any pixel is decoded; icon containers (ICO, CUR, ICNS), which
    PIL decodes while opening them, are not read. Library warnings (a corrupt EXIF block, an icon's
    size) are not shown: what matters about the image is its skip reason.

    Args:
        limit_name: what the skip reason names as the pixel limit (``prepare``: the recipe key);
            None: the reason gives the image's and the limit's pixel counts (``predict``, ``serve``).

    Raises:
        ImageSkip: missing, unreadable, truncated, non-image, empty or non-finite image;
            TooManyPixels (an ImageSkip): over ``max_pixels``.
    """

    def too_many(pixels: int | None) -> TooManyPixels:
        if limit_name is None:
            has = f"has {pixels:,} pixels" if pixels is not None else "is over the pixel limit"
            return TooManyPixels(f"image {has} (limit {max_pixels:,})")
        return TooManyPixels(f"image over {limit_name} ({max_pixels / 1e6:.0f} MP)")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's and numpy's: the skip reason says what is wrong
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # a path is opened only if it is a regular file (a FIFO would block); bytes in memory
            # (sicot serve's uploads) are read as they are
            source = nullcontext(path) if hasattr(path, "read") else open_regular(path)
            with source as fp, _opened(fp) as img:
                img.seek(0)
                if img.width < 1 or img.height < 1:
                    raise ImageSkip("image has no pixels")
                if max(img.size) > MAX_ASPECT * min(img.size):
                    raise ImageSkip(f"image aspect ratio over {MAX_ASPECT}:1")
                if img.format == "JPEG":
                    scale = min(img.size) / size
                    img.draft("RGB", (max(size, round(img.width / scale)), max(size, round(img.height / scale))))
                if img.width * img.height > max_pixels:
                    raise too_many(img.width * img.height)
                img.load()
                return square_resize(_to_rgb(_upright(img)), size)
    except FileNotFoundError:
        raise ImageSkip("image file not found") from None
    except IsADirectoryError:
        raise ImageSkip("image path is a directory") from None
    except NotRegularFileError:
        raise ImageSkip("image path is not a regular file (a FIFO, socket or device)") from None
    except PermissionError:
        raise ImageSkip("image file not readable") from None
    except UnidentifiedImageError:
        raise ImageSkip("not an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise too_many(None) from None
    except MemoryError:
        raise ImageSkip("image too large to decode") from None
    except OSError as e:
        if e.errno == errno.ELOOP:  # a link that leads back to itself: no file to be corrupt
            raise ImageSkip("image path is a symbolic link loop") from None
        if e.errno == errno.ENAMETOOLONG:  # a name over 255 bytes, or a path over 4096: no file was opened
            raise ImageSkip("image path too long for this filesystem") from None
        if e.errno in (errno.ENOTDIR, errno.EIO):
            raise ImageSkip("image path cannot be read (a file where a folder should be, or an I/O error)") from None
        # PIL reports truncated and corrupt data as OSError/SyntaxError/ValueError
        raise ImageSkip("truncated or corrupt image") from e
    except (SyntaxError, ValueError, EOFError, TypeError) as e:
        raise ImageSkip("truncated or corrupt image") from e
