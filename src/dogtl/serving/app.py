"""`dogtl serve`'s web application (FastAPI): POST /predict (one image), POST /predict/batch
(several), GET /health, GET / (the page); one access-log line per request (logger dogtl.access).

The model is loaded once, by the caller. Each upload is read with a byte limit (413 past it,
whatever Content-Length claims), decoded and preprocessed in a thread pool with dogtl's own
decoder (model.encoded_to_pixels, so the pixels are `dogtl predict`'s; decompression bombs are
refused from the header), then batched with concurrent requests into one model call
(batching.MicroBatcher) of `model.pixel_model` on --runtime (core/runtimes.py), or of an
ONNX/OpenVINO export read from its file. Every bad input is a JSON `{"error": ...}` with a 4xx status and the
server goes on serving.
"""

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources

import numpy as np

from dogtl.core.errors import DogtlError
from dogtl.core.runtimes import file_forward, frozen_forward
from dogtl.data.images import TOO_LARGE, clean_reason
from dogtl.serving.batching import MicroBatcher
from dogtl.serving.model import ServingModel, encoded_to_pixels, pixel_model

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations (Request).
# local: TensorFlow (seconds to import; `dogtl serve` checks its arguments and the serve extra
# first) and FastAPI/Starlette (the serve extra: require_serve_extra says how to install it) are
# imported in the functions that use them.

log = logging.getLogger(__name__)
access_log = logging.getLogger("dogtl.access")
MB = 1024 * 1024
MULTIPART_SLACK = 64 * 1024  # room for the multipart boundaries and part headers
RAW_TYPES = ("image/", "application/octet-stream")


class BadUpload(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def require_serve_extra():
    """Import FastAPI, or say how to install it."""
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401  (for uploads)
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise DogtlError(f"dogtl serve needs the serve extra ({(e.name or '').replace('_', '-')} is missing): "
                         "pip install 'dogtl[serve]'") from None


def page_html() -> str:
    return resources.files("dogtl.serving").joinpath("page.html").read_text(encoding="utf-8")


class Predictor:
    """The loaded model as the server uses it: bytes -> pixels (any thread), pixels -> rows, on
    `runtime` in `precision` (an export: read from its file by its runtime)."""

    def __init__(self, sm: ServingModel, top_k: int = 5, runtime: str = "auto", precision: str = "auto"):
        import tensorflow as tf

        self.sm, self.top_k = sm, min(int(top_k), len(sm.classes))
        self._decode = tf.function(lambda data: encoded_to_pixels(data, sm.inputs),
                                   input_signature=[tf.TensorSpec([], tf.string)])
        if sm.exported:
            self.forward = file_forward(sm.path, runtime, precision)
        else:
            self.forward = frozen_forward(pixel_model(sm), runtime=runtime, precision=precision,
                                          label=f"{sm.name}-pixels-{sm.size}")

    def decode(self, data: bytes) -> tuple:
        """The model's inputs for one encoded image, or BadUpload saying why it cannot be read."""
        import tensorflow as tf

        try:
            return tuple(x.numpy() for x in self._decode(tf.constant(data)))
        except tf.errors.OpError as e:
            reason = clean_reason(getattr(e, "message", str(e)))
        if TOO_LARGE in reason:
            raise BadUpload(413, f"{reason}: send a smaller image")
        if data[:2] == b"\xff\xd8" and data[-2:] != b"\xff\xd9":
            reason = "truncated JPEG (premature end of data)"
        elif reason.startswith("Unknown image file format"):
            reason = "not an image: send a JPEG, PNG, GIF, BMP or WebP file"
        raise BadUpload(400, f"cannot read the image ({reason[:200]})")

    @property
    def runtime(self) -> str:
        return self.forward.runtime

    def predict(self, inputs: tuple) -> np.ndarray:
        with self.forward:
            return np.asarray(self.forward(list(inputs)))

    def warm_up(self) -> None:
        """Trace the decoder and the model once, so the first request is not slow."""
        import tensorflow as tf

        png = tf.io.encode_png(tf.zeros([8, 8, 3], tf.uint8)).numpy()
        jpeg = tf.io.encode_jpeg(tf.zeros([8, 8, 3], tf.uint8)).numpy()
        self.decode(jpeg)
        self.predict(tuple(np.stack([x]) for x in self.decode(png)))

    def top(self, row: np.ndarray) -> list[dict]:
        order = np.argsort(-row)[: self.top_k]
        return [{"class": self.sm.classes[j], "probability": float(row[j])} for j in order]


async def read_limited(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadUpload(413, f"upload of {int(declared) / MB:.1f} MB is over the limit of {limit / MB:.1f} MB "
                             "(--max-upload-mb)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadUpload(413, f"upload is over the limit of {limit / MB:.1f} MB (--max-upload-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


async def upload_bytes(request, max_upload: int) -> bytes:
    """The image bytes of a multipart field `file` or of a raw image body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return (await multipart_files(request, max_upload, 1))[0][1]
    if ctype and not ctype.startswith(RAW_TYPES):
        raise BadUpload(415, f"content type {ctype!r} is not an image: send multipart/form-data with a "
                             "field 'file', or the raw image as image/* or application/octet-stream")
    return await read_limited(request, max_upload)


async def multipart_files(request, max_upload: int, max_files: int) -> list[tuple[str, bytes]]:
    """(file name, bytes) of every file field of a multipart upload, in order: at most
    `max_files`, each at most `max_upload` bytes."""
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException
    from starlette.requests import Request

    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise BadUpload(415, "send the images as multipart/form-data, one file field each (curl -F file=@a.jpg "
                             "-F file=@b.jpg)")
    body = await read_limited(request, max_files * max_upload + MULTIPART_SLACK)

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=max_files, max_fields=max_files + 10,
                                                         max_part_size=max_upload)
    except (HTTPException, MultiPartException) as e:  # a malformed upload, or one of too many files
        detail = getattr(e, "detail", None) or getattr(e, "message", str(e))
        raise BadUpload(400, f"{detail} (at most {max_files} files of {max_upload / MB:.1f} MB)") from None
    files = [(getattr(v, "filename", None) or f"file {k + 1}", v) for k, (field, v) in enumerate(form.multi_items())
             if field in ("file", "files") and not isinstance(v, str)]
    if not files:
        raise BadUpload(400, "a multipart upload needs the image in a file field named 'file' (one per image)")
    out = []
    for name, upload in files:
        data = await upload.read()
        if len(data) > max_upload:
            raise BadUpload(413, f"{name}: upload is over the limit of {max_upload / MB:.1f} MB (--max-upload-mb)")
        out.append((name, data))
    return out


class AccessLog:
    """ASGI middleware: one line per HTTP request on the logger dogtl.access (client, method, path,
    status, images predicted, milliseconds), as web servers keep."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), {"code": 500}

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            client = scope.get("client") or ("-", 0)
            images = scope.get("state", {}).get("images")
            access_log.info('%s "%s %s" %d%s %.1f ms', client[0], scope["method"], scope["path"], status["code"],
                            f" {images} image{'s' if images != 1 else ''}" if images is not None else "",
                            (time.perf_counter() - started) * 1000)


def create_app(sm: ServingModel, *, max_batch: int = 32, max_upload_mb: float = 20, batch_wait_ms: float = 5,
               top_k: int = 5, decode_threads: int | None = None, max_files: int = 16, runtime: str = "auto",
               precision: str = "auto"):
    """The web application serving `sm`: the model loaded on `runtime` and warmed up, its batcher
    running while the application does."""
    require_serve_extra()
    from fastapi import FastAPI

    if max_upload_mb <= 0:
        raise DogtlError(f"--max-upload-mb {max_upload_mb} must be positive")
    if max_files < 1:
        raise DogtlError(f"--max-files {max_files} must be at least 1")
    predictor = Predictor(sm, top_k, runtime, precision)
    predictor.warm_up()
    batcher = MicroBatcher(predictor.predict, max_batch=max_batch, max_wait_s=batch_wait_ms / 1000)
    pool = ThreadPoolExecutor(max_workers=decode_threads or min(8, os.cpu_count() or 2),
                              thread_name_prefix="dogtl-decode")

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        log.info("serving %s (%d classes) on %s", sm.name, len(sm.classes), predictor.runtime)
        yield
        await batcher.stop()  # the server has finished its in-flight requests by now
        pool.shutdown(wait=True)

    app = FastAPI(title=f"dogtl: {sm.name}", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(AccessLog)
    app.state.batcher, app.state.predictor = batcher, predictor
    _add_page_routes(app, sm, predictor)
    _add_predict_routes(app, sm, predictor, batcher, pool, int(max_upload_mb * MB), max_files)
    return app


def _error(status: int, message: str):
    """The JSON answer to a request the server refuses: {"error": message}."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


def _add_page_routes(app, sm: ServingModel, predictor: Predictor) -> None:
    """GET / (the page), GET /health, and HTTP errors as JSON."""
    from fastapi.responses import HTMLResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return _error(exc.status_code, str(exc.detail))

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(page_html().replace("{{MODEL}}", sm.name))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": sm.name, "classes": len(sm.classes), "runtime": predictor.runtime}


def _add_predict_routes(app, sm: ServingModel, predictor: Predictor, batcher: MicroBatcher,
                        pool: ThreadPoolExecutor, max_upload: int, max_files: int) -> None:
    """POST /predict and POST /predict/batch: uploads decoded in `pool`, predicted by `batcher`."""
    from fastapi import Request
    from starlette.requests import ClientDisconnect

    @app.post("/predict")
    async def predict(request: Request):
        started = time.perf_counter()
        try:
            data = await upload_bytes(request, max_upload)
            if not data:
                raise BadUpload(400, "empty upload (0 bytes): send an image file")
            inputs = await asyncio.get_running_loop().run_in_executor(pool, predictor.decode, data)
        except BadUpload as e:
            return _error(e.status, e.message)
        except ClientDisconnect:
            log.info("client disconnected during the upload")
            return _error(400, "client disconnected during the upload")
        request.state.images = 1
        row = await batcher.submit(inputs)
        return {"model": sm.name, "predictions": predictor.top(row),
                "ms": round((time.perf_counter() - started) * 1000, 2)}

    @app.post("/predict/batch")
    async def predict_batch(request: Request):
        """Several images in one request (multipart, one file field each): one result per file, in
        order, each its predictions or its own error; the images join the model calls together."""
        started = time.perf_counter()
        try:
            files = await multipart_files(request, max_upload, max_files)
        except BadUpload as e:
            return _error(e.status, e.message)
        except ClientDisconnect:
            return _error(400, "client disconnected during the upload")
        loop = asyncio.get_running_loop()

        async def one(name: str, data: bytes) -> dict:
            try:
                if not data:
                    raise BadUpload(400, "empty upload (0 bytes): send an image file")
                inputs = await loop.run_in_executor(pool, predictor.decode, data)
            except BadUpload as e:
                return {"file": name, "error": e.message}
            return {"file": name, "predictions": predictor.top(await batcher.submit(inputs))}

        results = await asyncio.gather(*(one(name, data) for name, data in files))
        request.state.images = sum("predictions" in r for r in results)
        return {"model": sm.name, "results": list(results), "ms": round((time.perf_counter() - started) * 1000, 2)}
