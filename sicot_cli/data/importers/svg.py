"""SVG icons -> PNG files that ``prepare`` can decode, with resvg (``resvg-py``, a self-contained wheel).

Icon sets draw in one colour (``currentColor`` or the default black): each icon is rendered once to
its alpha mask at ``size`` x ``size`` pixels and written as an RGBA PNG of one colour, so the ink is
exactly the mask whatever colour it is given (``prepare`` composites alpha on white, as for emoji).
The rasterised folder is built under a temporary name and renamed when complete, with a marker that
records how it was drawn; a complete folder drawn the same way is kept.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from sicot_cli.errors import SicotError
from sicot_cli.fsutil import read_text

MARKER = ".sicot-rasterised.json"  # written last: a rasterised folder without it is incomplete

# Saturated, mutually distinct colours (Tableau 10 without its grey): pretraining icons are tinted
# with one of them so the visual stream sees colour, as emoji have, without colour naming the class.
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#000000")


def render_mask(svg: str, size: int) -> np.ndarray:
    """The icon's coverage at ``size`` x ``size`` pixels: a ``uint8`` array, 0 = empty, 255 = ink.

    Raises:
        SicotError: the text is not an SVG resvg can draw.
    """
    import resvg_py  # lazily: only fetching an icon dataset needs it

    try:
        png = resvg_py.svg_to_bytes(svg_string=svg, width=size, height=size, skip_system_fonts=True)
        img = Image.open(io.BytesIO(bytes(png)))
        img.load()
    except Exception as e:  # noqa: BLE001 - resvg raises plain exceptions with the parser's message
        raise SicotError(f"cannot render the SVG ({e})") from None
    alpha = np.asarray(img.convert("RGBA"))[..., 3]
    if alpha.shape == (size, size):
        return alpha.copy()
    # resvg keeps a non-square viewBox's aspect (one side shorter than asked): centre it on the square
    out = np.zeros((size, size), np.uint8)
    h, w = min(alpha.shape[0], size), min(alpha.shape[1], size)
    top, left = (size - h) // 2, (size - w) // 2
    out[top : top + h, left : left + w] = alpha[:h, :w]
    return out


def tint(mask: np.ndarray, color: str) -> Image.Image:
    """An RGBA image of ``color`` (``#rrggbb``) whose alpha is ``mask``."""
    rgb = tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))
    a = np.empty((*mask.shape, 4), np.uint8)
    a[..., :3] = rgb
    a[..., 3] = mask
    return Image.fromarray(a, "RGBA")


def palette_color(key: str) -> str:
    """A colour from :data:`PALETTE` chosen by a stable hash of ``key`` (never Python's salted hash)."""
    return PALETTE[int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16) % len(PALETTE)]


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1  # missing: reported by name when it is read


def no_png_reason(dest: Path) -> str:
    """The skip reason of an icon without its PNG in ``dest`` (not drawable, or deleted since)."""
    return f"no PNG (resvg cannot draw the SVG, or the PNG was deleted since: remove {dest} to draw them again)"


def rasterise(jobs: Iterable[tuple[Path, str, str]], dest: Path, size: int, scheme: str) -> dict[str, int]:
    """Render SVG files into ``dest`` as PNGs, atomically as a folder.

    Args:
        jobs: ``(svg file, PNG path relative to dest, colour)`` triples.
        dest: the output folder, replaced as a whole when complete.
        size: the PNGs' width and height.
        scheme: a name for how the colours were chosen; with ``size`` and the job list (paths,
            colours, SVG file sizes) it decides whether an existing complete ``dest`` is kept.

    Returns:
        ``{"png": files written, "unrenderable": SVGs skipped}`` (from the marker when kept).

    Raises:
        SicotError: an SVG file missing or unreadable, an unsafe relative path.
    """
    jobs = list(jobs)
    marker = dest / MARKER
    # What was drawn, from what: another icon list, colour or package version draws the folder anew.
    listing = "\n".join(f"{rel}\t{color}\t{_file_size(svg)}" for svg, rel, color in jobs)
    drawn = {"size": size, "scheme": scheme, "jobs": hashlib.sha256(listing.encode("utf-8")).hexdigest()}
    if marker.is_file():
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            info = {}
        if {k: info.get(k) for k in drawn} == drawn:
            return {"png": int(info.get("png", 0)), "unrenderable": int(info.get("unrenderable", 0))}
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {"png": 0, "unrenderable": 0}
    try:
        for svg_path, rel, color in jobs:
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise SicotError(f"unsafe output path {rel!r}")
            again = "; delete its folder and fetch again"
            text = read_text(svg_path, "icon", missing=f"icon not found{again}", hint=again)
            try:
                mask = render_mask(text, size)
            except SicotError:
                counts["unrenderable"] += 1
                continue
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            tint(mask, color).save(out, optimize=False)
            counts["png"] += 1
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / MARKER).write_text(json.dumps({**drawn, **counts}) + "\n", encoding="utf-8")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return counts
