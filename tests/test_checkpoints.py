"""Checkpoint files are streamed to and from disk: never held twice in RAM, same checksummed format."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sicot_cli import runs
from sicot_cli.errors import SicotError

MB = 1 << 20

# A fresh interpreter: allocate one ~SIZE tensor, then save (or load) it, and report how far the
# peak RSS rose DURING the save/load. Holding the file's bytes beside the tensors (BytesIO,
# read_bytes) raises it by about SIZE; streaming by a few MB of buffers.
_PROBE = r"""
import json, resource, sys, torch
from pathlib import Path
from sicot_cli import runs
mode, path, size = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if mode == "save":
    state = {"model": {"w": torch.ones(size // 4)}, "meta": {}}
    before = peak()
    runs.save_checkpoint(path, state)
else:
    torch.ones(size // 4)  # the loaded tensors' size, allocated and freed, so the baseline peak includes them
    before = peak()
    state = runs.load_checkpoint(path)
    assert float(state["model"]["w"].sum()) == size // 4
print(json.dumps({"rise": peak() - before}))
"""


def _rise(mode: str, path: Path, size: int) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode, str(path), str(size)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["rise"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB is Linux's")
def test_save_and_load_stream_instead_of_holding_the_checkpoint_twice(tmp_path: Path) -> None:
    size = 192 * MB
    path = tmp_path / "big.pt"
    save_rise = _rise("save", path, size)
    assert save_rise < size // 4, f"saving a {size // MB} MB state raised the peak RSS by {save_rise // MB} MB"
    load_rise = _rise("load", path, size)
    assert load_rise < size // 4, f"loading a {size // MB} MB state raised the peak RSS by {load_rise // MB} MB"


def test_streamed_file_has_the_checksummed_format(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    state = {"model": {"w": torch.arange(10.0)}, "meta": {"a": 1}}
    runs.save_checkpoint(path, state)
    data = path.read_bytes()
    header = len(runs.MAGIC) + 64 + 1
    assert data.startswith(runs.MAGIC) and data[header - 1 : header] == b"\n"
    assert data[len(runs.MAGIC) : header - 1].decode() == hashlib.sha256(data[header:]).hexdigest()
    assert torch.equal(runs.load_checkpoint(path)["model"]["w"], state["model"]["w"])
    # a file written before checksums (torch.save alone) still loads; a flipped payload byte is refused
    legacy = tmp_path / "legacy.pt"
    torch.save(state, legacy)
    assert runs.load_checkpoint(legacy)["meta"] == {"a": 1}
    damaged = bytearray(data)
    damaged[-10] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(SicotError, match="checksum mismatch"):
        runs.load_checkpoint(path)


@pytest.mark.parametrize(
    "parts",
    [
        [{"file": "../../outside/secret-part.pt", "lo": 0, "hi": 3}],
        [{"file": "/etc/passwd", "lo": 0, "hi": 3}],
        [{"file": "part-0.pt", "lo": "0", "hi": 3}],
        [{"file": "..", "lo": 0, "hi": 3}],
        5,
    ],
)
def test_classifier_parts_are_file_names_beside_the_checkpoint(tmp_path, parts):
    """A downloaded checkpoint's parts named files elsewhere, which were read and used as weights
    (or, for /etc/passwd, the advice was to delete /etc); wrong types were tracebacks."""
    from sicot_cli.checkpoints import PARTS, classifier_rows
    from sicot_cli.errors import SicotError

    with pytest.raises(SicotError, match=r"checkpoint-last.pt: damaged checkpoint \(its classifier_parts must list"):
        classifier_rows({PARTS: parts}, tmp_path / "checkpoint-last.pt", 0, 3, {})
