"""The ASGI application: the demo page and a JSON API over one classifier.

Routes::

    GET  /               the page (static/index.html, with app.css and app.js)
    GET  /api/health     {"status": "ok", "model": name}
    GET  /api/model      name, options, parameters, classes, image size, test accuracy if
                         known, limits
    POST /api/predict    multipart/form-data with one or more image files; ?top=K (default 5)

A predict request is one batch and succeeds or fails as a whole: if any file is not a
readable image the answer is 400 naming that file, and no file of the request is predicted
(the page sends one request per file, so one bad file spoils only its own card). Errors are
JSON ``{"error": message}``: 400 bad image or request, 413 body over the upload limit, 415 not
multipart, 503 too many uploads at once. The body is refused from its Content-Length when it
declares one, and is counted while it streams in either way, so nothing over the limit is
ever read into memory; the bodies held at once are bounded by :class:`UploadBudget`.

Decoding and inference run in worker threads (``run_in_threadpool``), never on the event
loop; inference is serialised by a lock. Decoding is bounded by pixels, read from each
file's header before anything is decoded: a request whose images total more than
:data:`MAX_REQUEST_PIXELS` gets 413, and all requests together decode at most
:data:`DECODE_PIXEL_BUDGET` pixels at once, so memory stays bounded under load. Redirects
are relative, never built from the client's Host header. Any failure stays inside its own
request.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cifar_inception.images import MAX_PIXELS, ImageError, image_header, load_cifar_array
from cifar_inception.inference import Classifier, image_size_for, run_test_metrics
from cifar_inception.predict import top_classes

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_FILES = 64
DEFAULT_TOP_K = 5
# Pixels decoded at once, over all requests. Decoding takes about 4 bytes a pixel (155 MB
# measured for a 40-megapixel RGB PNG, 148 MB for a 16-bit one), twice that with
# transparency, which is therefore counted twice: about 640 MB in all.
DECODE_PIXEL_BUDGET = 4 * MAX_PIXELS
# Upload bodies held in memory at once, over all requests, and how many requests may be
# uploading or decoding at once. A body is held whole (Starlette spools it, then it is read
# into memory for decoding) until its answer is sent; it is reserved at its Content-Length,
# or at the upload limit when it declares none. With the decode budget above, the server's
# memory for requests is about 640 + 256 MB.
UPLOAD_BUDGET_BYTES = 256 * 1024 * 1024
MAX_CONCURRENT_UPLOADS = 32
# Pixels in one request, all its images together (16 40-megapixel images would take a
# minute to decode on 2 cores).
MAX_REQUEST_PIXELS = 100_000_000

SECURITY_HEADERS = {
    # The page loads only its own script and style; the 32x32 inputs arrive as data: URLs
    # and the previews as blob: URLs.
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}

log = logging.getLogger(__name__)


class SecurityHeadersMiddleware:
    """Adds :data:`SECURITY_HEADERS` to every HTTP response (a pure ASGI middleware)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    headers.setdefault(key, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def human_bytes(n: int) -> str:
    for unit, size in (("MB", 1024 * 1024), ("KB", 1024)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def model_summary(classifier: Classifier) -> dict[str, Any]:
    """What ``GET /api/model`` answers: the classifier's info, with the test accuracy if known.

    The test accuracy comes from the checkpoint's metrics or ONNX metadata, else from the
    ``eval.json`` of the run folder the checkpoint is in.
    """
    info = dict(classifier.info)
    # A diverged run can leave NaN in its metrics; JSON has no NaN, so they become null.
    metrics = {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
               for key, value in (info.get("metrics") or {}).items()}
    source = info.get("source")
    if "test_top1" not in metrics and source and info.get("format") != "onnx":
        metrics.update(run_test_metrics(Path(source)))
    return {
        "model": classifier.model_name,
        "options": info.get("options", {}),
        "format": info.get("format"),
        "parameters": info.get("params"),
        "num_classes": len(classifier.classes),
        "classes": list(classifier.classes),
        "dataset": info.get("dataset"),
        "image_size": image_size_for(classifier),
        "test_top1": metrics.get("test_top1"),
        "metrics": metrics,
    }


class PixelBudget:
    """A semaphore counted in pixels: a decode waits until its image fits in the budget."""

    def __init__(self, pixels: int):
        self.total = self.free = pixels
        self.condition = threading.Condition()

    def acquire(self, pixels: int) -> int:
        pixels = min(pixels, self.total)  # one image over the budget still gets it all
        with self.condition:
            self.condition.wait_for(lambda: self.free >= pixels)
            self.free -= pixels
        return pixels

    def release(self, pixels: int) -> None:
        with self.condition:
            self.free += pixels
            self.condition.notify_all()


class UploadBudget:
    """Request bodies held at once, in bytes and in requests.

    Used on the event loop only (one thread), so it needs no lock. A request that does not
    fit is refused with 503 at once rather than queued: waiting would keep its connection and
    its body. One body larger than the whole budget is reserved at the whole budget.
    """

    def __init__(self, total_bytes: int, max_uploads: int):
        self.total_bytes, self.max_uploads = total_bytes, max_uploads
        self.used_bytes = self.uploads = 0

    @contextlib.contextmanager
    def hold(self, nbytes: int):
        nbytes = min(nbytes, self.total_bytes)
        if self.uploads >= self.max_uploads or self.used_bytes + nbytes > self.total_bytes:
            raise HTTPException(503, "the server is busy with other uploads; try again in a "
                                     "moment", headers={"retry-after": "1"})
        self.uploads += 1
        self.used_bytes += nbytes
        try:
            yield
        finally:
            self.uploads -= 1
            self.used_bytes -= nbytes


class _Predictor:
    """Decoding and inference, called from worker threads."""

    def __init__(self, classifier: Classifier, max_pixels: int,
                 max_request_pixels: int = MAX_REQUEST_PIXELS,
                 budget_pixels: int = DECODE_PIXEL_BUDGET):
        self.classifier = classifier
        self.image_size = image_size_for(classifier)
        self.max_pixels = max_pixels
        self.max_request_pixels = max_request_pixels
        self.inference_lock = threading.Lock()
        self.budget = PixelBudget(budget_pixels)

    def costs(self, uploads: Sequence[tuple[str, bytes]]) -> list[int]:
        """What decoding each upload takes from the budget, from its header; 413 when the
        request's images total too many pixels."""
        pixels, costs = [], []
        for name, data in uploads:
            if not data:
                raise ImageError(f"{name}: empty file")
            width, height, alpha = image_header(data, name=name)
            # Over max_pixels, an image is refused from its header without being decoded.
            pixels.append(min(width * height, self.max_pixels))
            costs.append(pixels[-1] * (2 if alpha else 1))
        if sum(pixels) > self.max_request_pixels:
            raise HTTPException(413, f"the images of this request total {sum(pixels):,} "
                                     f"pixels, over the limit of {self.max_request_pixels:,} "
                                     "per request; send fewer or smaller images")
        return costs

    def decode(self, uploads: Sequence[tuple[str, bytes]]) -> np.ndarray:
        """Every upload to uint8 (S, S, 3), S the classifier's image size; the first bad
        one raises ImageError."""
        arrays = []
        for (name, data), cost in zip(uploads, self.costs(uploads)):
            held = self.budget.acquire(cost)
            try:
                arrays.append(load_cifar_array(data, name=name, max_pixels=self.max_pixels,
                                               size=self.image_size))
            except (OSError, ValueError) as exc:  # a mode Pillow cannot turn into RGB
                raise ImageError(f"{name}: cannot convert to RGB ({exc})") from None
            finally:
                self.budget.release(held)
        return np.stack(arrays)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        with self.inference_lock:
            return np.asarray(self.classifier.predict_proba(images), dtype=np.float64)


def _png_data_url(image: np.ndarray) -> str:
    """The model input (32x32, or the model's size) as a PNG data: URL, so the page shows
    exactly what was classified."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _parse_top(value: str | None, num_classes: int) -> int:
    if value is None:
        return min(DEFAULT_TOP_K, num_classes)
    try:
        top = int(value)
    except ValueError:
        top = 0
    if not 1 <= top <= num_classes:
        raise HTTPException(400, f"top must be an integer from 1 to {num_classes}, not {value!r}")
    return top


async def _limited_stream(request: Request, max_bytes: int):
    """The request body, chunk by chunk, stopping with 413 as soon as it passes ``max_bytes``."""
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise HTTPException(413, f"upload too large: the limit is {human_bytes(max_bytes)} "
                                     "per request")
        yield chunk


def upload_size(request: Request, max_bytes: int) -> int:
    """The most bytes the body of an upload may bring: its Content-Length, else ``max_bytes``;
    415, 400 or 413 for a request refused from its headers."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise HTTPException(415, "send the images as multipart/form-data (one or more files)")
    declared = request.headers.get("content-length")
    if declared is None:
        return max_bytes
    if not declared.isdigit():
        raise HTTPException(400, "invalid Content-Length header")
    if int(declared) > max_bytes:
        raise HTTPException(413, f"upload too large ({human_bytes(int(declared))}): the limit "
                                 f"is {human_bytes(max_bytes)} per request")
    return int(declared)


async def read_uploads(request: Request, max_bytes: int,
                       max_files: int) -> list[tuple[str, bytes]]:
    """The (file name, content) of each file in a multipart body, within the limits."""
    upload_size(request, max_bytes)
    parser = MultiPartParser(request.headers, _limited_stream(request, max_bytes),
                             max_files=max_files, max_fields=max_files)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise HTTPException(400, f"bad multipart body: {exc.message}") from None
    except ClientDisconnect:
        # Nobody is left to answer; a plain 400 keeps a traceback out of the log.
        raise HTTPException(400, "the client went away during the upload") from None
    try:
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        if not files:
            raise HTTPException(400, "no image file in the request")
        return [(file.filename or f"file {i + 1}", await file.read())
                for i, file in enumerate(files)]
    finally:
        await form.close()


def create_app(classifier: Classifier, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, *,
               max_files: int = DEFAULT_MAX_FILES, max_pixels: int = MAX_PIXELS,
               max_request_pixels: int = MAX_REQUEST_PIXELS,
               upload_budget_bytes: int = UPLOAD_BUDGET_BYTES,
               max_concurrent_uploads: int = MAX_CONCURRENT_UPLOADS) -> Starlette:
    """The demo page and JSON API for ``classifier`` (see the module docstring)."""
    if min(max_upload_bytes, max_files, upload_budget_bytes, max_concurrent_uploads) < 1:
        raise ValueError("the upload and file limits must be positive")
    predictor = _Predictor(classifier, max_pixels, max_request_pixels)
    uploads_in_flight = UploadBudget(upload_budget_bytes, max_concurrent_uploads)
    classes = list(classifier.classes)
    summary = model_summary(classifier)
    summary["limits"] = {"max_upload_bytes": max_upload_bytes, "max_files": max_files,
                         "max_pixels": max_pixels, "max_request_pixels": max_request_pixels,
                         "upload_budget_bytes": upload_budget_bytes,
                         "max_concurrent_uploads": max_concurrent_uploads}
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"cache-control": "no-cache"})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": classifier.model_name})

    async def model(request: Request) -> Response:
        return JSONResponse(summary)

    async def predict(request: Request) -> Response:
        top = _parse_top(request.query_params.get("top"), len(classes))
        # The body is held from its first byte until the answer is built.
        with uploads_in_flight.hold(upload_size(request, max_upload_bytes)):
            return await classify_uploads(request, top)

    async def classify_uploads(request: Request, top: int) -> Response:
        uploads = await read_uploads(request, max_upload_bytes, max_files)
        try:
            images = await run_in_threadpool(predictor.decode, uploads)
        except ImageError as exc:
            raise HTTPException(400, str(exc)) from None
        probs = await run_in_threadpool(predictor.predict_proba, images)
        results = []
        for (name, _), image, row, best in zip(uploads, images, probs,
                                                top_classes(probs, classes, top)):
            results.append({
                "filename": name,
                "top": [{"class": label, "index": classes.index(label), "probability": p}
                        for label, p in best],
                "probabilities": [float(p) for p in row],
                "input_png": _png_data_url(image),
            })
        return JSONResponse({"model": classifier.model_name, "results": results})

    async def static_folder(request: Request) -> Response:
        # A relative Location: Starlette's own slash redirect copies the Host header into it.
        return RedirectResponse("/static/", status_code=307)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code,
                            headers=exc.headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("request %s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": "internal error while handling the request"},
                            status_code=500)

    routes = [
        Route("/", index),
        Route("/api/health", health),
        Route("/api/model", model),
        Route("/api/predict", predict, methods=["POST"]),
        Route("/static", static_folder),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(SecurityHeadersMiddleware)],
        exception_handlers={HTTPException: http_error, 500: server_error},
    )
    app.router.redirect_slashes = False  # its redirects are absolute, from the Host header
    app.state.uploads_in_flight = uploads_in_flight
    return app
