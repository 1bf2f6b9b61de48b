"""``sicot serve``: the image-only model as an HTTP recognition service (FastAPI on uvicorn).

The paper's online flow (§3.1) as a service: ``POST /predict`` takes images (a multipart upload, or
a JSON list of base64 strings) and answers each one's top-k classes with their titles and scores;
``GET /classes`` lists the classes, ``GET /healthz`` says the model is loaded and how busy it is.

- The model is loaded once (from a run, or an exported ONNX/TorchScript file and its JSON) and
  images go through :func:`sicot_cli.predict.preprocess`, the pipeline of ``sicot predict``.
- Dynamic micro-batching (:class:`sicot_cli.batcher.MicroBatcher`): requests that arrive together
  share one forward pass of at most ``max_batch`` images; the first image waits at most
  ``max_wait_ms`` for company, and only while other requests are on their way. The model runs in
  one worker thread, so the event loop keeps receiving uploads meanwhile.
- Limits (:class:`ServeLimits`): body size, images per request, pixels per image (read from the
  header, so a decompression bomb is refused before it is decoded), a per-request deadline (a
  client too slow to send its upload gets 408, a request the model cannot reach in time 503), a
  bounded queue (503 when full) and content types (415). Every error is a JSON ``{"error": ...}``
  with a 4xx status (5xx only for overload or a bug), and the service keeps serving.
- SIGTERM (or Ctrl-C): uvicorn stops accepting connections, the requests already accepted are
  answered (the batcher runs until they are), then the process exits.
- Binds 127.0.0.1 unless told otherwise.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run
# time, and those name classes imported inside create_app (fastapi is an optional dependency).
import asyncio
import base64
import binascii
import json
import logging
import os
import re
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sicot_cli.batcher import Busy, MicroBatcher
from sicot_cli.data.images import ImageSkip, TooManyPixels
from sicot_cli.errors import SicotError
from sicot_cli.predict import Recognizer, check_top, preprocess
from sicot_cli.threads import MAX_THREADS

log = logging.getLogger(__name__)

IMAGE_TYPES = ("image/", "application/octet-stream")  # what a multipart image part may declare


# The largest --max-pixels accepted: decoding an RGB image this large takes ~3 GB. sicot's image
# loading turns PIL's own decompression-bomb check off and applies its limits itself
# (data.max_image_pixels in prepare, this one in serve, read from the header before decoding).
MAX_PIXELS_CAP = 1_000_000_000


DEFAULT_TOP = 5  # classes per image when neither --top nor ?k= says (at most every class)


@dataclass
class ServeLimits:
    """How much one request may ask, and how requests are batched."""

    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_upload_bytes: int = 10_000_000
    max_pixels: int = 40_000_000
    max_images: int = 32
    timeout_s: float = 30.0
    max_queue: int = 1024
    top_k: int | None = None  # classes per image unless a request asks ?k=N; None: DEFAULT_TOP, at most every class

    def check(self) -> None:
        """Raises SicotError for a limit out of range."""
        # the command-line flag each limit comes from (max_upload_bytes is --max-upload-mb x 1e6)
        flags = {"max_upload_bytes": "--max-upload-mb", "top_k": "--top"}
        for name in ("max_batch", "max_upload_bytes", "max_pixels", "max_images", "max_queue", "top_k"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                flag = flags.get(name, f"--{name.replace('_', '-')}")
                got = getattr(self, name) / 1e6 if name == "max_upload_bytes" else getattr(self, name)
                least = "0.000001" if name == "max_upload_bytes" else "1"
                raise SicotError(f"{flag} must be at least {least}, got {got}")
        if self.max_queue < self.max_images:  # a request of max_images images would be refused forever (503)
            raise SicotError(
                f"--max-queue {self.max_queue} is below --max-images {self.max_images}: a request of "
                f"{self.max_images} images could never be queued; raise --max-queue or lower --max-images"
            )
        if self.max_pixels > MAX_PIXELS_CAP:
            raise SicotError(f"--max-pixels must be at most {MAX_PIXELS_CAP:,}, got {self.max_pixels:,}")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise SicotError(f"--max-wait-ms must be between 0 and 10000, got {self.max_wait_ms}")
        if not 0 < self.timeout_s <= 3600:
            raise SicotError(f"--timeout must be in (0, 3600] seconds, got {self.timeout_s}")


class ApiError(Exception):
    """An answer other than 200: its status and the message of the JSON error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def need_extras() -> None:
    """Raises SicotError when FastAPI/uvicorn are not installed."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "python_multipart") if importlib.util.find_spec(m) is None]
    if missing:
        raise SicotError(
            f"sicot serve needs the serve extras ({', '.join(missing)} missing): pip install 'sicot[serve]'"
        )


async def _read_body(request: Any, limit: int, deadline: float) -> bytes:  # noqa: ANN401 - starlette Request
    """The request body, at most ``limit`` bytes, received before ``deadline`` (loop time)."""
    length = request.headers.get("content-length")
    number = length is not None and length.isascii() and length.isdigit()  # not '²' (isdigit alone)
    if length is not None and (not number or int(length) > limit):
        raise ApiError(
            413 if number else 400,
            f"upload over the limit of {limit:,} bytes" if number else "bad Content-Length",
        )
    from starlette.requests import ClientDisconnect

    chunks, size = [], 0
    try:
        async with asyncio.timeout_at(deadline):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"upload over the limit of {limit:,} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, "the upload was not received in time") from None
    except ClientDisconnect:  # nobody to answer; no traceback in the log for it
        raise ApiError(400, "the client closed the connection during the upload") from None
    return b"".join(chunks)


async def _images_from_multipart(request: Any, body: bytes, limits: ServeLimits) -> list[tuple[str, bytes]]:  # noqa: ANN401
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException
    from starlette.requests import Request

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    boundary = re.search(r'boundary="?([^";]+)"?', request.headers.get("content-type", ""), re.IGNORECASE)
    if boundary and b"--" + boundary.group(1).strip().encode("latin-1") + b"--" not in body:
        # the parser takes the parts it finished and drops the rest without a word
        raise ApiError(400, "bad multipart body: it does not end with its closing boundary (a truncated upload?)")

    try:
        # one file over the limit parsed, so that the count below answers as it does for JSON
        form = await Request(request.scope, replay).form(max_files=limits.max_images + 1, max_fields=limits.max_images)
    except (MultiPartException, HTTPException) as e:
        detail = str(getattr(e, "detail", None) or e)
        if detail.startswith("Too many files"):
            raise ApiError(
                413, f"more than {limits.max_images + 1} images in one request (limit {limits.max_images})"
            ) from None
        raise ApiError(400, f"bad multipart body: {detail}") from None
    out = []
    try:
        for name, value in form.multi_items():
            if not isinstance(value, UploadFile):  # a part without a filename: text, which was skipped silently
                raise ApiError(
                    400,
                    f"form field {name!r} is no file upload (its part has no filename): send each image as a file, "
                    f"e.g. curl -F '{name}=@photo.jpg'",
                )
            ctype = (value.content_type or "application/octet-stream").lower()
            if not ctype.startswith(IMAGE_TYPES):
                raise ApiError(415, f"{value.filename or 'upload'}: content type {ctype!r} is not an image")
            out.append((value.filename or f"image{len(out)}", await value.read()))
    finally:
        await form.close()
    return out


def _images_from_json(body: bytes) -> list[tuple[str, bytes]]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "body is not valid JSON") from None
    except RecursionError:
        raise ApiError(400, "body is not valid JSON (nested too deeply)") from None
    items = doc.get("images") if isinstance(doc, dict) else doc
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ApiError(400, 'JSON body must be a list of base64 strings, or {"images": [...]}')
    out = []
    for i, s in enumerate(items):
        if s.startswith("data:"):  # a data URL: data:image/png;base64,....
            s = s.partition(",")[2]
        s = "".join(s.split())  # base64 wrapped at 76 columns (`base64`, MIME), as many encoders write it
        try:
            out.append((f"images[{i}]", base64.b64decode(s, validate=True)))
        except (binascii.Error, ValueError):
            raise ApiError(400, f"images[{i}] is not valid base64") from None
    return out


# Requests decoding images at once: each may hold an image of --max-pixels being converted (a
# 40 MP one takes 0.6-0.9 GB at its peak); the others wait. Decoding runs on its own DECODE_SLOTS
# threads, not on the server's pool of ~40: glibc keeps the memory a thread freed in that thread's
# arena, so 8 large images decoded on 8 pool threads held 7 GB after they were done (measured),
# where the same threads decoding in turn reuse what they freed.
DECODE_SLOTS = max(1, min(4, os.cpu_count() or 1))


def _decode(images: list[tuple[str, bytes]], size: int, max_pixels: int) -> np.ndarray:
    arrays = []
    for name, data in images:
        try:
            arrays.append(preprocess(data, size, max_pixels))
        except TooManyPixels as e:
            raise ApiError(413, f"{name}: {e}") from None
        except ImageSkip as e:
            raise ApiError(422, f"{name}: {e}") from None
    return np.stack(arrays)


def create_app(recognizer: Recognizer, limits: ServeLimits) -> Any:  # noqa: ANN401 - fastapi.FastAPI
    """The FastAPI application serving ``recognizer`` (the batcher starts with the app's lifespan)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request

    limits.check()
    state: dict[str, Any] = {}
    # titles read once here, so no request touches the dataset file
    recognizer.titles(set(range(recognizer.num_classes)))

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        batcher = MicroBatcher(recognizer.probabilities, limits.max_batch, limits.max_wait_ms, limits.max_queue)
        batcher.start()
        state["batcher"] = batcher
        state["decoder"] = ThreadPoolExecutor(DECODE_SLOTS, thread_name_prefix="sicot-decode")
        try:
            yield
        finally:
            state["decoder"].shutdown(wait=False, cancel_futures=True)
            await batcher.stop()

    # no /docs, /redoc or /openapi.json: the API is the three routes below (README), and the docs
    # page would load its UI from a CDN
    app = FastAPI(
        title="sicot",
        summary="Image-only product recognition (SICoT, CIKM'20)",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    _install_error_handlers(app)

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz() -> dict[str, Any]:
        b: MicroBatcher = state["batcher"]
        return {
            "status": "ok",
            "model": recognizer.source,
            "classes": recognizer.num_classes,
            "image_size": recognizer.image_size,
            "waiting": b.waiting,
            "batches": b.batches,
            "images": b.images,
            "max_batch": limits.max_batch,
        }

    @app.get("/classes")
    async def classes() -> dict[str, Any]:
        titles = recognizer.titles(set(range(recognizer.num_classes)))
        return {
            "classes": [{"index": i, "name": n, "title": titles.get(i)} for i, n in enumerate(recognizer.class_names)]
        }

    @app.post("/predict")
    async def predict(request: Request, k: int | None = None) -> dict[str, Any]:
        return await _predict(request, k, recognizer, limits, state["batcher"], state["decoder"])

    return app


def _install_error_handlers(app: Any) -> None:  # noqa: ANN401 - fastapi.FastAPI
    """Every error answers ``{"error": message}`` with its status (API errors, HTTP errors, bad requests)."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return error(e.status, e.message)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        return error(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        return error(422, f"{'.'.join(str(p) for p in first.get('loc', ()))}: {first.get('msg', 'invalid request')}")


async def _predict(
    request: Any,
    k: int | None,
    recognizer: Recognizer,
    limits: ServeLimits,
    batcher: MicroBatcher,
    decoder: ThreadPoolExecutor,
) -> dict[str, Any]:
    """``POST /predict``: the request's images (multipart files or base64 JSON), decoded on
    ``decoder``'s threads, batched, top-k each."""
    unknown = sorted(set(request.query_params) - {"k"})
    if unknown:  # ?top=1 answered with the default k, without a word
        raise ApiError(422, f"unknown query parameter {unknown[0]!r}: /predict takes k (classes per image), e.g. ?k=3")
    if len(request.query_params.getlist("k")) > 1:  # ?k=1&k=2: the last won, without a word
        raise ApiError(422, "k given more than once: give ?k=N once")
    k = (limits.top_k or min(DEFAULT_TOP, recognizer.num_classes)) if k is None else k
    if not 1 <= k <= recognizer.num_classes:
        raise ApiError(422, f"k must be between 1 and {recognizer.num_classes}, got {k}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.timeout_s
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("multipart/form-data", "application/json"):
        raise ApiError(
            415,
            f"content type {ctype or '(none)'!r}: send multipart/form-data (image files) or application/json (base64 images)",
        )
    with batcher.arriving():
        body = await _read_body(request, limits.max_upload_bytes, deadline)
        images = (
            await _images_from_multipart(request, body, limits)
            if ctype == "multipart/form-data"
            else _images_from_json(body)
        )
        if not images:
            raise ApiError(400, "no image in the request")
        if len(images) > limits.max_images:
            raise ApiError(413, f"{len(images)} images in one request (limit {limits.max_images})")
        x = await loop.run_in_executor(decoder, _decode, images, recognizer.image_size, limits.max_pixels)
    try:
        async with asyncio.timeout_at(deadline):
            probs = await batcher.submit(x)
    except Busy:
        raise ApiError(503, "the service is busy (queue full); retry later") from None
    except TimeoutError:
        raise ApiError(503, f"no answer from the model within {limits.timeout_s:g} s; retry later") from None
    preds = recognizer.top(probs, [name for name, _ in images], k)
    return {"predictions": [p.as_dict() for p in preds]}


def load(
    run: Path | None,
    model: Path | None,
    checkpoint: str | None = None,
    data: Path | None = None,
    device: str = "auto",
    threads: int | None = None,
) -> Recognizer:
    """The model to serve: a run's (``--run``) or an exported file (``--model``), exactly one.

    Raises:
        SicotError: neither or both given, or the model does not load.
    """
    if (run is None) == (model is None):
        raise SicotError("give exactly one of --run DIR or --model FILE")
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise SicotError(f"--threads must be 1..{MAX_THREADS}, got {threads}")
    import torch

    if threads:
        torch.set_num_threads(threads)
    if run is not None:
        from sicot_cli.predict import load_recognizer

        return load_recognizer(run, checkpoint, data, device)
    from sicot_cli.export import load_exported

    return load_exported(model, threads)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (bound here, so a busy port is one clear error and ``--port 0`` works).

    Raises:
        SicotError: the address cannot be bound.
    """
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except (OSError, OverflowError) as e:  # OverflowError: a port outside 0-65535
        raise SicotError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e})") from None
    return sock


def serve(
    run: Path | None,
    model: Path | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServeLimits | None = None,
    checkpoint: str | None = None,
    data: Path | None = None,
    device: str = "auto",
    threads: int | None = None,
    on_ready: Callable[[str, str], None] | None = None,
) -> None:
    """Load the model once and serve it until SIGTERM/SIGINT (then answer what was accepted, and return).

    Raises:
        SicotError: missing extras, a bad model or limits, or an address that cannot be bound.
    """
    need_extras()
    import uvicorn

    limits = limits or ServeLimits()
    limits.check()
    recognizer = load(run, model, checkpoint, data, device, threads)
    check_top(limits.top_k, recognizer.num_classes, DEFAULT_TOP)  # as ?k=N above the classes: refused
    app = create_app(recognizer, limits)
    sock = bind(host, port)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: reachable from other machines; sicot serve has no authentication", host)
    actual = sock.getsockname()[1]
    # The grace period covers the longest an accepted request may take (its deadline), plus a margin.
    config = uvicorn.Config(
        app,
        http=head_deadline_protocol(limits.timeout_s),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(limits.timeout_s) + 5,
        timeout_keep_alive=5,
    )
    server = uvicorn.Server(config)
    if on_ready is not None:
        on_ready(f"http://{host}:{actual}", recognizer.source)
    t0 = time.perf_counter()
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again for the process's own
    # handler: ours makes that a normal exit (0), as the accepted requests have all been answered.
    previous = signal.signal(signal.SIGTERM, _stopped)
    try:
        server.run(sockets=[sock])
    except _Stopped:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    log.info("stopped after %.0f s", time.perf_counter() - t0)


def head_deadline_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol with a deadline on each request's head: a client that opens a connection
    and sends its request line and headers slower than ``seconds`` (or never) is disconnected.
    uvicorn times out an idle kept-alive connection, and the body has the app's own deadline, but a
    head that never ends held its connection (and a file descriptor) for ever: a thousand such
    clients would exhaust the process."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadline(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def _waiting_for_head(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(seconds, self._head_expired)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_expired(self) -> None:
            self._head_timer = None
            if self._waiting_for_head() and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._waiting_for_head():
                self._arm()  # a new request begins: its head must be complete by the deadline
            super().data_received(data)
            if not self._waiting_for_head():
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeadDeadline


class _Stopped(Exception):
    """SIGTERM after the graceful shutdown."""


def _stopped(signum: int, frame: Any) -> None:  # noqa: ANN401
    raise _Stopped
