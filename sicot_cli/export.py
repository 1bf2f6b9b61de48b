"""The deployable image-only model (``sicot export``) and loading it back (``sicot serve --model``).

``sicot export --format torchscript|onnx`` writes the model (uint8 images ``[B, 3, S, S]`` ->
class probabilities, normalisation inside) and, beside it, ``<file>.json``: everything a consumer
needs without sicot (classes and their titles, the preprocessing, input/output names, layout and
dtype, mean/std, the sicot version and the run it came from); ``model.onnx`` gets
``model.onnx.json``. Before the file is renamed into place the export is checked against the eager
PyTorch model on the run's test images (ONNX with onnxruntime): the top-1 classes must be identical
and the largest absolute difference of the probabilities at most :data:`TOLERANCE`, or, for a
model whose logits are so large that float32 itself rounds its probabilities by more (a cRT
classifier's reach 1e5: an ulp of 0.008), at most :data:`ROUNDING_MARGIN` times PyTorch's own
float32 rounding, measured against float64 on the same images. Else nothing is written.

No Triton model repository is written: Triton's onnxruntime backend loads the ``.onnx`` as it is
(dynamic batch axis, input ``images`` UINT8, output ``probabilities`` FP32), and a ``config.pbtxt``
written here would be one more file to keep in step with Triton's schema.

ONNX goes through torch's exporter (``torch.onnx.export(dynamo=True)``) with a dynamic batch axis.
TorchScript is kept for libtorch (C++) users, though ``torch.jit`` is deprecated in torch 2.14
(``torch.jit.load`` prints a FutureWarning); its parameters are frozen so outputs carry no
``grad_fn``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sicot_cli import __version__, runs
from sicot_cli.errors import SicotError
from sicot_cli.evaluate import load_run_model
from sicot_cli.fsutil import atomic_path, check_name, ensure_dir, exclusive, extension, taken, write_json
from sicot_cli.model import ImageOnly
from sicot_cli.predict import Recognizer, representative_titles

log = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
SIDECAR_FORMAT = "sicot-export/1"
INPUT_RECORD = "sicot-input.json"  # inside a TorchScript export: {"image_size": S}
TOLERANCE = 1e-4  # max |p_export - p_torch| over the verification images
# ... or this many times max |p_torch(float32) - p_torch(float64)|, when that is larger: two float32
# computations of one model (other kernels, other summation order) each round about as much, so
# they may differ by twice that; the rest is margin for the other runtime's kernels.
ROUNDING_MARGIN = 4.0
VERIFY_IMAGES = 256  # test images the export is checked on (the first ones of the test split)
INPUT, OUTPUT = "images", "probabilities"
PREPROCESSING = (
    "decode (a JPEG in PIL's draft mode: with s = min(w, h) / image_size, "
    "img.draft('RGB', (max(image_size, round(w / s)), max(image_size, round(h / s)))), the DCT reduction "
    "that keeps the shorter side >= image_size); apply the EXIF orientation (PIL.ImageOps.exif_transpose; "
    "none if the EXIF block is unreadable); "
    "convert to RGB: an image with alpha (modes RGBA, LA, PA) or a tRNS transparency entry (modes P, L, RGB "
    "with 'transparency' in img.info) converted to RGBA and alpha-composited on opaque white "
    "(Image.alpha_composite); integer modes I;16* and I clipped to [0, top] and scaled v -> "
    "(v * 255 + top // 2) // top, with top = 65535 for I;16* and for an I image whose largest value is over 255, "
    "else 255; float mode F stretched per image, (v - min) / (max - min) * 255 truncated to uint8 (all 0 when "
    "max = min; an image with NaN or infinity is refused); those grey results repeated on 3 channels; any other "
    "mode img.convert('RGB'); resize the shorter side to "
    "image_size with PIL's bicubic filter (Image.Resampling.BICUBIC, reducing_gap=3.0); crop the centre "
    "image_size x image_size; HWC -> CHW; uint8, no scaling (the model normalises)"
)


@dataclass
class ExportResult:
    """What ``export`` wrote and how well the written model agrees with PyTorch."""

    path: Path
    sidecar: Path
    format: str
    verified_images: int
    max_abs_diff: float
    top1_equal: bool
    tolerance: float = TOLERANCE  # larger than TOLERANCE: float32's rounding of the model's large logits
    source: str = ""  # which weights: "checkpoint best (epoch 5)", a second stage's method


def sidecar_path(model_path: Path) -> Path:
    """The JSON beside an exported model: ``model.onnx`` -> ``model.onnx.json`` (an .onnx and a .pt of one name may sit together)."""
    return model_path.with_name(model_path.name + ".json")


def format_for(out: Path, fmt: str | None) -> str:
    """The export format: as given, else from the file's extension (``.onnx`` -> onnx, else torchscript).

    Raises:
        SicotError: an unknown format.
    """
    if fmt is None:
        return "onnx" if extension(out) == ".onnx" else "torchscript"
    if fmt not in FORMATS:
        raise SicotError(f"--format must be torchscript or onnx, got {fmt!r}")
    if fmt == "torchscript" and extension(out) == ".onnx":  # every ONNX tool would fail on it
        raise SicotError(f"{out}: an .onnx name for a TorchScript file; name it .pt, or use --format onnx")
    return fmt


def _need_onnx() -> None:
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise SicotError("ONNX export needs the serve extras: pip install 'sicot[serve]'") from None


def _ort_session(path: Path, threads: int | None = None):  # noqa: ANN202 - onnxruntime.InferenceSession
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _test_images(prepared, n: int) -> np.ndarray:  # noqa: ANN001 - Prepared
    """The first ``n`` test images (training ones when the split has no test rows), either format."""
    from sicot_cli.data.loader import BatchLoader

    lo = prepared.test_start if prepared.n > prepared.test_start else 0
    if min(lo + n, prepared.n) <= lo:
        return np.zeros((0, 3, prepared.image_size, prepared.image_size), dtype=np.uint8)
    loader = BatchLoader(prepared, n, lo, min(lo + n, prepared.n), shuffle=False, in_memory=False, prefetch=0)
    return next(iter(loader.epoch(0))).images.numpy()


def _write_torchscript(net: torch.nn.Module, example: torch.Tensor, tmp: Path) -> Any:  # noqa: ANN401
    with warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export, but it is still the format that
        # C++ (libtorch) loads without Python; keep it beside ONNX until those users move.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.trace(net, example)
        # Serialised in memory and written by Python: libtorch's own file writer aborts the process
        # (SIGABRT) on a full disk, while a Python write raises ENOSPC, which atomic_path reports.
        buf = io.BytesIO()
        # the trained input size inside the model file: a TorchScript ResNet takes any size, so an
        # edited JSON could not be caught by scoring an image (ONNX's input shape is fixed)
        torch.jit.save(scripted, buf, _extra_files={INPUT_RECORD: json.dumps({"image_size": example.shape[-1]})})
        with tmp.open("wb") as f:
            f.write(buf.getbuffer())
        loaded = torch.jit.load(str(tmp))
    return lambda x: loaded(torch.from_numpy(x)).numpy()


def _write_onnx(net: torch.nn.Module, example: torch.Tensor, tmp: Path) -> Any:  # noqa: ANN401
    _need_onnx()
    batch = torch.export.Dim("batch", min=1)
    # The exporter prints its progress on stdout and warns about its own internals: a clean
    # command line shows neither (they go to the debug log).
    out = io.StringIO()
    chatty = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [lg.level for lg in chatty]
    try:
        for lg in chatty:
            lg.setLevel(max(logging.WARNING, log.getEffectiveLevel()))
        with warnings.catch_warnings(), contextlib.redirect_stdout(out):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net,
                (example,),
                str(tmp),
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_shapes={"images": {0: batch}},
                dynamo=True,
                external_data=False,
            )
    finally:
        for lg, level in zip(chatty, levels, strict=True):
            lg.setLevel(level)
    log.debug("torch.onnx.export: %s", out.getvalue())
    session = _ort_session(tmp)
    return lambda x: session.run([OUTPUT], {INPUT: x})[0]


def verify(run_exported: Any, reference: torch.nn.Module, images: np.ndarray) -> tuple[float, bool]:  # noqa: ANN401
    """Max |p_export - p_torch| and whether the top-1 classes are identical, on ``images``."""
    with torch.no_grad():
        want = reference(torch.from_numpy(images)).numpy()
    got = run_exported(images)
    if got.shape != want.shape:
        return float("inf"), False
    return float(np.abs(got - want).max()), bool((got.argmax(1) == want.argmax(1)).all())


def float32_rounding(net: ImageOnly, images: np.ndarray) -> float:
    """Max |p| difference between PyTorch's float32 model and the same model in float64, on ``images``."""
    exact = copy.deepcopy(net).double()
    with torch.no_grad():
        want = net(torch.from_numpy(images)).double()
        x = (torch.from_numpy(images).double() - exact.mean) / exact.std
        got = torch.softmax(exact.classifier(exact.visual(x)), dim=1)
    return float((want - got).abs().max())


def check_agreement(out: Path, run_exported: Any, net: ImageOnly, images: np.ndarray) -> dict[str, Any]:  # noqa: ANN401
    """The written model against PyTorch: top-1 identical and probabilities within the tolerance.

    Returns:
        The verification record (``max_abs_diff``, ``top1_equal``, ``tolerance``; ``float32_rounding``
        when it was measured).

    Raises:
        SicotError: they disagree; names the difference, the tolerance, and the TorchScript way out.
    """
    diff, top1 = verify(run_exported, net, images)
    record: dict[str, Any] = {"max_abs_diff": diff, "top1_equal": top1, "tolerance": TOLERANCE}
    if top1 and diff > TOLERANCE:  # large logits: float32 may round the probabilities by more
        rounding = float32_rounding(net, images)
        record |= {"float32_rounding": rounding, "tolerance": max(TOLERANCE, ROUNDING_MARGIN * rounding)}
    if not (diff <= record["tolerance"] and top1):
        rounding = (
            f", PyTorch's own float32 rounding {record['float32_rounding']:.1e}" if "float32_rounding" in record else ""
        )
        raise SicotError(
            f"{out}: the exported model disagrees with PyTorch on {len(images)} test images (max |dp| {diff:.2e} "
            f"> tolerance {record['tolerance']:.1e}{rounding}, top-1 {'equal' if top1 else 'different'}); nothing "
            "written: `--format torchscript` exports the model as PyTorch runs it"
        )
    return record


def export(
    run_dir: str | Path,
    out: str | Path,
    fmt: str | None = None,
    checkpoint: str | None = None,
    data: str | Path | None = None,
) -> ExportResult:
    """Write the image-only model of a run (TorchScript or ONNX) and its JSON, checked against PyTorch.
    ``checkpoint`` (default): the one the run's scores come from (:func:`runs.scored_checkpoint`).

    Raises:
        SicotError: the output exists, an unknown format, missing extras for ONNX, or an export that
            disagrees with PyTorch (nothing is written then).
    """
    out = Path(out)
    fmt = format_for(out, fmt)
    side = sidecar_path(out)
    _check_outputs(out, side)
    if fmt == "onnx":
        _need_onnx()
    # a second export to the same --out is refused while this one writes (it replaced this one's
    # files without a word); under the hold, the outputs are checked again: one may have finished
    with exclusive(out, "--out"):
        _check_outputs(out, side, warn=False)
        return _export(Path(run_dir), out, side, fmt, checkpoint, data)


def _export(
    run_dir: Path, out: Path, side: Path, fmt: str, checkpoint: str | None, data: str | Path | None
) -> ExportResult:
    checkpoint = runs.scored_checkpoint(run_dir, checkpoint)
    recipe, prepared, model, state = load_run_model(run_dir, checkpoint, data)
    net = ImageOnly(model.cpu()).eval()
    for p in net.parameters():
        p.requires_grad_(False)  # outputs without grad_fn: callers need no torch.no_grad()
    size = prepared.image_size
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    images = _test_images(prepared, VERIFY_IMAGES)
    # the JSON first, the model renamed into place last: a model file means a complete export; a stop
    # in between takes the JSON back, and one that could not (SIGKILL) leaves it for the next export
    try:
        with atomic_path(out) as tmp:
            run_exported = (_write_onnx if fmt == "onnx" else _write_torchscript)(net, example, tmp)
            checked = check_agreement(out, run_exported, net, images)
            digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
            verification = {
                "images": len(images),
                **checked,
                "against": "the eager PyTorch model on the run's first test images",
            }
            sicot = _provenance(run_dir, checkpoint, recipe, state, prepared)
            write_json(side, _sidecar(out, fmt, digest, net, prepared, sicot, verification))
    except BaseException:
        if not taken(out):
            side.unlink(missing_ok=True)
        raise
    epoch, stage = sicot["epoch"], sicot.get("stage")
    source = f"checkpoint {checkpoint}" + ("" if epoch is None else f" (epoch {epoch})")
    if stage:
        source += f", second stage {stage['method']} on {stage['from_run']}"
    return ExportResult(
        out, side, fmt, len(images), checked["max_abs_diff"], checked["top1_equal"], checked["tolerance"], source
    )


def _provenance(run_dir: Path, checkpoint: str, recipe: Any, state: dict[str, Any], prepared: Any) -> dict[str, Any]:
    """The JSON's "sicot" block: where the weights come from. A second stage (``sicot decouple``)
    is named with its method, the run it started from and its tau; the encoder is the one the
    visual stream was trained with (the stage's own recipe has none)."""
    config = runs.read_config(run_dir)
    encoder = config.get("encoder") if isinstance(config.get("encoder"), str) else recipe.model.encoder
    block: dict[str, Any] = {
        "version": __version__,
        "run": str(run_dir.resolve()),
        "checkpoint": checkpoint,
        "epoch": state.get("epoch") if isinstance(state.get("epoch"), int) else None,  # epochs the weights trained
        "recipe": recipe.name,
        "encoder": encoder,
        "backbone": recipe.model.backbone,
        "dataset": prepared.fingerprint(),
    }
    final = runs.read_summary(run_dir).get("final", {}) if runs.is_finished(run_dir) else {}
    stage = config.get("stage")
    if isinstance(stage, dict):
        block["stage"] = {"method": stage.get("method"), "from_run": stage.get("from_run"), "tau": final.get("tau")}
    if isinstance(state.get("logit_adjust_tau"), (int, float)):  # folded into this checkpoint's classifier bias
        block["logit_adjust_tau"] = state["logit_adjust_tau"]
    return block


def _check_outputs(out: Path, side: Path, warn: bool = True) -> None:
    """Refuse a .json model name and an existing model or side file; create the folder."""
    if extension(out) == ".json":
        raise SicotError(f"{out}: the model file cannot be a .json (that name is for the file beside it)")
    for p in (out, side):
        check_name(p)
        if p == side and not taken(out) and _left_by_export(side, out):
            if warn:
                log.warning("%s: left by an export stopped before its model was written: replaced", side)
            continue
        if taken(p):  # a dangling symbolic link too
            raise SicotError(f"{p}: already exists (choose another --out)")
    ensure_dir(out.parent)


def _left_by_export(side: Path, out: Path) -> bool:
    """``side`` is a regular file, the JSON an export writes before renaming ``out`` into place."""
    if side.is_symlink() or not side.is_file():
        return False
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(meta, dict)
        and meta.get("format") == SIDECAR_FORMAT
        and meta.get("model", {}).get("file") == out.name
    )


def _sidecar(
    out: Path, fmt: str, digest: str, net: ImageOnly, prepared: Any, sicot: dict[str, Any], verification: dict[str, Any]
) -> dict[str, Any]:
    """The JSON beside the model: input contract, normalisation, classes, provenance, verification."""
    size = prepared.image_size
    titles = representative_titles(prepared, set(range(prepared.num_classes)))
    return {
        "format": SIDECAR_FORMAT,
        "model": {
            "file": out.name,
            "format": fmt,
            "sha256": digest,
            "runtime": "onnxruntime" if fmt == "onnx" else "torch.jit.load",
        },
        "input": {
            "name": INPUT,
            "dtype": "uint8",
            "shape": ["batch", 3, size, size],
            "layout": "NCHW",
            "channels": "RGB",
            "range": [0, 255],
            "image_size": size,
            "preprocessing": PREPROCESSING,
        },
        "normalization": {
            "mean": net.mean.flatten().tolist(),
            "std": net.std.flatten().tolist(),
            "applied": "inside the model: (x - mean) / std on 0-255 values; feed raw uint8",
        },
        "output": {
            "name": OUTPUT,
            "dtype": "float32",
            "shape": ["batch", prepared.num_classes],
            "meaning": "softmax probabilities; index i is classes[i]",
        },
        "classes": [{"index": i, "name": name, "title": titles.get(i)} for i, name in enumerate(prepared.class_names)],
        "sicot": sicot,
        "verification": verification,
    }


def read_sidecar(model_path: Path) -> dict[str, Any]:
    """The JSON beside an exported model.

    Raises:
        SicotError: missing, unreadable or not a sicot export's JSON.
    """
    side = sidecar_path(model_path)
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if model_path.name.lower().endswith(".json"):
            raise SicotError(
                f"{model_path}: is an export's JSON; name the model file beside it ({model_path.name[:-5]})"
            ) from None
        raise SicotError(
            f"{side}: not found; an exported model is served with the JSON `sicot export` writes beside it"
        ) from None
    except (OSError, ValueError, RecursionError) as e:
        raise SicotError(f"{side}: unreadable ({e or 'nested too deeply'})") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise SicotError(f"{side}: not the JSON of a sicot export (format {SIDECAR_FORMAT})")
    _check_sidecar(side, meta)
    return meta


def _check_sidecar(side: Path, meta: dict[str, Any]) -> None:
    """The fields a served model relies on, each of the type ``sicot export`` writes (an edited or
    damaged JSON is named here, once, instead of failing on every request)."""
    model, inp, classes = meta.get("model"), meta.get("input"), meta.get("classes")
    size = inp.get("image_size") if isinstance(inp, dict) else None
    problems = [
        (
            isinstance(model, dict) and model.get("format") in FORMATS,
            f"model.format must be one of {', '.join(FORMATS)}",
        ),
        (
            isinstance(model, dict) and isinstance(model.get("sha256"), str),
            "model.sha256 must be the model file's sha256",
        ),
        (
            type(size) is int and 8 <= size <= 4096,
            f"input.image_size must be an integer between 8 and 4096, got {json.dumps(size)}",
        ),
        (
            isinstance(classes, list)
            and bool(classes)
            and all(
                isinstance(c, dict)
                and c.get("index") == i
                and type(c.get("index")) is int
                and isinstance(c.get("name"), str)
                for i, c in enumerate(classes)
            ),
            'classes must list {"index": i, "name": ...} for i = 0, 1, 2 ...',
        ),
    ]
    for ok, what in problems:
        if not ok:
            raise SicotError(f"{side}: {what} (export the run again: `sicot export --run RUN`)")


def _check_recorded_size(path: Path, meta: dict[str, Any], record: str | bytes) -> None:
    """A TorchScript export records its trained input size inside the file (exports before this did not)."""
    try:
        size = json.loads(record)["image_size"] if record else None
    except (ValueError, KeyError, TypeError):
        size = None
    if size is not None and size != meta["input"]["image_size"]:
        raise SicotError(
            f"{sidecar_path(path)}: input.image_size is {meta['input']['image_size']}, but {path.name} was trained "
            f"on {size} px images: export the run again (`sicot export --run RUN`)"
        )


def _check_model(path: Path, meta: dict[str, Any], probabilities: Any) -> None:
    """The model file is the one the JSON describes: its sha256, and one image through it."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != meta["model"]["sha256"]:
        raise SicotError(
            f"{path}: not the model {sidecar_path(path).name} describes (its sha256 differs): "
            "export the run again, or put the two files of one export together"
        )
    size, n = meta["input"]["image_size"], len(meta["classes"])
    try:
        scores = np.asarray(probabilities(np.zeros((1, 3, size, size), np.uint8)))
    except Exception as e:  # onnxruntime raises its own types for an input the graph does not take
        raise SicotError(
            f"{path}: does not take {size} px images as {sidecar_path(path).name} says "
            f"({type(e).__name__}): export the run again"
        ) from None
    if scores.shape != (1, n):
        raise SicotError(
            f"{path}: scores {scores.shape[-1]} classes, but {sidecar_path(path).name} lists {n}: export the run again"
        )


def load_exported(model_path: str | Path, threads: int | None = None) -> Recognizer:
    """An exported model (ONNX with onnxruntime, or TorchScript) and its JSON, as a :class:`Recognizer`.

    Raises:
        SicotError: a missing model or JSON, a model that does not load, or missing extras for ONNX.
    """
    path = Path(model_path)
    if not path.is_file():
        raise SicotError(f"{path}: model file not found")
    meta = read_sidecar(path)
    fmt = meta["model"]["format"]
    try:
        if fmt == "onnx":
            _need_onnx()
            session = _ort_session(path, threads)

            def probabilities(x: np.ndarray) -> np.ndarray:
                return session.run([OUTPUT], {INPUT: np.ascontiguousarray(x)})[0]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                recorded = {INPUT_RECORD: ""}
                scripted = torch.jit.load(str(path), map_location="cpu", _extra_files=recorded)
            _check_recorded_size(path, meta, recorded[INPUT_RECORD])

            @torch.no_grad()
            def probabilities(x: np.ndarray) -> np.ndarray:
                return scripted(torch.from_numpy(np.ascontiguousarray(x))).numpy()
    except SicotError:
        raise
    except Exception as e:  # onnxruntime and torch.jit raise their own types for a bad file
        raise SicotError(
            f"{path}: cannot load the {fmt} model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    _check_model(path, meta, probabilities)
    classes = meta["classes"]
    titles = {int(c["index"]): str(c["title"]) for c in classes if c.get("title") is not None}
    return Recognizer(
        int(meta["input"]["image_size"]),
        [c["name"] for c in classes],
        probabilities,
        lambda cs: {c: titles[c] for c in cs if c in titles},
        f"{fmt} {path}",
    )
