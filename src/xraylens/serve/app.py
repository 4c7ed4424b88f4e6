"""The web app: `create_app(run)` builds the FastAPI app, `serve_run` checks the options, loads the run
once and serves it with uvicorn.

Routes: `GET /` (the page), `GET /health`, `GET /model`, `POST /predict`, and FastAPI's `/docs` and
`/openapi.json`. With a token, `/model` and `/predict` need `Authorization: Bearer <token>`; the page,
`/health` and the docs stay open (they hold nothing about the model or the images).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from xraylens.data.decode import decode_bytes, max_pixels_setting
from xraylens.data.records import Geometry
from xraylens.errors import DecodeError, XraylensError
from xraylens.explain.methods import METHODS, resolve_methods
from xraylens.runs import Run, RunLike, open_run
from xraylens.serve.page import PAGE
from xraylens.serve.predictor import Predictor, default_methods, prediction_json
from xraylens.serve.upload import FORMATS, MB, UploadError, check_content, format_size, read_upload

log = logging.getLogger("xraylens.serve")

DEFAULT_MAX_UPLOAD_MB = 50.0
MIN_TOKEN_CHARS = 16
# uploads held in memory at once (each up to the upload limit); more requests wait before reading
MAX_INFLIGHT_UPLOADS = 8
# decodes at once: a decode may hold width x height float64 pixels (DICOM), so their count is bounded
MAX_DECODES = 2
# an upload must arrive within this time (50 MB at 0.5 MB/s): a client trickling bytes would otherwise
# hold one of the upload slots for as long as it likes
UPLOAD_SECONDS = 100.0

_PAGE_HEADERS = {
    # the page is one file with its script and style inline; it talks only to this server
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_API_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


# -- response schemas (for the OpenAPI docs; responses are built as plain dicts) ----------------------


class Detail(BaseModel):
    detail: str = Field(description="What was wrong with the request, in one line.")


class Health(BaseModel):
    status: str = Field(description='"ok"')
    auth: bool = Field(description="Whether /model and /predict need a bearer token.")


class MethodInfo(BaseModel):
    name: str
    summary: str
    needs_gradients: bool


class ModelInfo(BaseModel):
    run: str = Field(description="The run directory's name.")
    epoch: int
    architecture: str
    classes: list[str]
    input_size: list[int] = Field(description="[height, width] of the model input, pixels.")
    in_chans: int
    center_crop: float = Field(description="Central fraction of each side kept before the resize.")
    cam_layers: list[str]
    cam_methods: list[MethodInfo] = Field(description="The methods this server offers.")
    default_methods: list[str]
    targets: list[str] = Field(description='"pred" or a class name.')
    formats: list[str]
    max_upload_bytes: int
    max_pixels: int
    max_batch: int


class Peak(BaseModel):
    input: list[float] = Field(description="(x, y) in model-input pixels (pixel centre).")
    original: list[float] = Field(description="(x, y) in the uploaded image's pixels.")


class Cam(BaseModel):
    png: str = Field(description="Base64 8-bit grey PNG at the input size; grey level / 255 is the map in [0, 1].")
    peak: Peak | None = Field(description="The map's maximum; null for a constant map.")
    constant: bool = Field(description="True when the map was constant (returned as zeros).")


class ImageInfo(BaseModel):
    format: str
    width: int
    height: int
    crop: list[float] = Field(description="(x0, y0, w, h) of the upload that was resized to the input.")


class InputInfo(BaseModel):
    width: int
    height: int
    png: str = Field(description="Base64 grey PNG: what the model saw (the crop, resized).")


class Prediction(BaseModel):
    class_: str = Field(alias="class", description="The predicted class.")
    class_index: int
    probability: float
    probabilities: dict[str, float]
    explained_class: str | None = Field(description="The class the CAMs explain.")
    image: ImageInfo
    input: InputInfo
    cams: dict[str, Cam]
    timing_ms: dict[str, float] = Field(
        description="read, decode, model (queue included), compute (the model pass), encode, total; batch_size."
    )


_ERRORS = {
    400: {"model": Detail, "description": "Empty upload, malformed form, unknown method or target."},
    401: {"model": Detail, "description": "Missing or wrong bearer token (when the server has one)."},
    408: {"model": Detail, "description": "The upload did not arrive in time."},
    413: {"model": Detail, "description": "Upload over the size limit."},
    415: {"model": Detail, "description": "Not a PNG, JPEG or DICOM file."},
    422: {"model": Detail, "description": "The file could not be decoded (the decoder's reason)."},
}

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "The image: form field `file` of a multipart form, or the raw body.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
            **{t: {"schema": {"type": "string", "format": "binary"}} for t in ("image/png", "image/jpeg")},
            "application/dicom": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


# -- the app -------------------------------------------------------------------------------------------


def create_app(
    run: RunLike,
    *,
    token: str | None = None,
    max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * MB),
    methods: Sequence[str] | str | None = None,
    max_batch: int = 4,
    max_pixels: int | None = None,
    allowed_hosts: Sequence[str] | None = None,
    device: str = "auto",
) -> FastAPI:
    """The FastAPI app serving `run` (a path or a loaded `Run`; loaded once, here).

    token: bearer token /model and /predict require (None: open). methods: the CAM methods offered
    (default: all but Score-CAM). max_batch: images per model pass when requests queue up together
    (default 4; on a 2-core CPU, 18 % more requests/s than one at a time; see docs/benchmarks.md).
    max_pixels: the decoder's pixel limit (default `XRAYLENS_MAX_PIXELS`, as in training).
    allowed_hosts: Host header values accepted (None: any); `serve_run` sets the loopback names for a
    loopback bind, so a web page on another site cannot reach the server by DNS rebinding."""
    if max_upload_bytes < 1:
        raise XraylensError(f"max_upload_bytes={max_upload_bytes} must be positive")
    offered = resolve_methods(methods) if methods else default_methods()
    pixel_limit = max_pixels_setting() if max_pixels is None else int(max_pixels)
    run = open_run(run, device=device)
    predictor = Predictor(run, max_batch=max_batch)
    classes = list(run.classes)
    h, w = predictor.input_size
    state: dict = {"uploads": None, "decodes": None}  # anyio primitives: made in the event loop, on first use
    bearer = HTTPBearer(auto_error=False, description="The token in the server's --token-file.")

    def check_token(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if token is None:
            return
        given = cred.credentials if cred is not None else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise UploadError(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        predictor.close()

    app = FastAPI(
        title="xraylens",
        version="1",
        summary=f"Classify and explain one radiograph with the run {run.run_dir.name!r} ({run.config.model.name}).",
        lifespan=lifespan,
    )
    app.state.predictor = predictor
    if allowed_hosts is not None:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, exc: UploadError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        if exc.status == 413:
            headers["Connection"] = "close"  # the rest of the body is not read
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers={**headers, **_API_HEADERS})

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # the traceback goes to the server's log (uvicorn prints it), never to the client
        return JSONResponse({"detail": "internal server error; see the server log"}, status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(PAGE, headers=_PAGE_HEADERS)

    @app.get("/health", response_model=Health, summary="Liveness, and whether a token is needed")
    def health() -> dict:
        return {"status": "ok", "auth": token is not None}

    model_info = {
        "run": run.run_dir.name,
        "epoch": run.epoch,
        "architecture": run.config.model.name,
        "classes": classes,
        "input_size": [h, w],
        "in_chans": run.inputs.in_chans,
        "center_crop": run.inputs.center_crop,
        "cam_layers": list(predictor.engine.layers),
        "cam_methods": [
            {"name": m, "summary": METHODS[m].summary, "needs_gradients": METHODS[m].needs_gradients} for m in offered
        ],
        "default_methods": ["gradcam"] if "gradcam" in offered else offered[:1],
        "targets": ["pred", *classes],
        "formats": list(FORMATS),
        "max_upload_bytes": max_upload_bytes,
        "max_pixels": pixel_limit,
        "max_batch": max_batch,
    }

    @app.get(
        "/model",
        response_model=ModelInfo,
        responses={401: _ERRORS[401]},
        dependencies=[Depends(check_token)],
        summary="The model: classes, architecture, input size, CAM methods",
    )
    def model() -> JSONResponse:
        return JSONResponse(model_info, headers=_API_HEADERS)

    def parse_methods(text: str) -> list[str]:
        names = list(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
        if names in ([], ["none"]):
            return []
        bad = [n for n in names if n not in offered]
        if bad:
            unknown = [n for n in bad if n not in METHODS]
            what = f"unknown CAM method(s) {', '.join(unknown)}" if unknown else f"{', '.join(bad)} not offered here"
            raise UploadError(400, f"{what}; choose from {', '.join(offered)}")
        return names

    def parse_target(text: str) -> str | int:
        t = text.strip()
        if t.lower() == "pred":
            return "pred"
        if t in classes:
            return classes.index(t)
        if t.isdigit() and int(t) < len(classes):
            return int(t)
        raise UploadError(400, f"target {text!r} is not 'pred' or a class of this model ({', '.join(classes)})")

    def prepare(data: bytearray) -> tuple[np.ndarray, Geometry]:
        arr = decode_bytes(data, "upload", pixel_limit)  # same decoders and limits as training
        return run.inputs.prepare(arr)  # the cache's own crop and resize

    @app.post(
        "/predict",
        response_model=Prediction,
        responses=_ERRORS,
        dependencies=[Depends(check_token)],
        openapi_extra=_UPLOAD_BODY,
        summary="Classify one PNG, JPEG or DICOM image and explain it with CAMs",
    )
    async def predict(
        request: Request,
        methods: str = Query(
            "gradcam", description="Comma list of CAM methods (see /model); empty or 'none' for no CAM."
        ),
        target: str = Query("pred", description="Class the CAMs explain: 'pred' (the predicted one) or a class."),
    ) -> JSONResponse:
        t0 = time.perf_counter()
        names, tgt = parse_methods(methods), parse_target(target)  # before reading a byte of the body
        if state["uploads"] is None:
            state["uploads"] = anyio.Semaphore(MAX_INFLIGHT_UPLOADS)
        if state["decodes"] is None:
            state["decodes"] = anyio.CapacityLimiter(MAX_DECODES)
        async with state["uploads"]:
            try:
                with anyio.fail_after(UPLOAD_SECONDS):
                    data = await read_upload(request, max_upload_bytes)
            except TimeoutError:
                raise UploadError(408, f"the upload did not arrive within {UPLOAD_SECONDS:g} s") from None
            fmt = check_content(data)
            t1 = time.perf_counter()
            try:
                image, geom = await anyio.to_thread.run_sync(prepare, data, limiter=state["decodes"])
            except DecodeError as e:
                raise UploadError(422, str(e)) from None
            del data
        t2 = time.perf_counter()
        pred = await asyncio.wrap_future(predictor.submit(image, names, tgt))
        t3 = time.perf_counter()
        body = await run_in_threadpool(prediction_json, pred, classes, image, geom, fmt)
        t4 = time.perf_counter()
        body["timing_ms"] = {
            "read": round((t1 - t0) * 1e3, 2),
            "decode": round((t2 - t1) * 1e3, 2),
            "model": round((t3 - t2) * 1e3, 2),
            "compute": round(pred.compute_ms, 2),
            "encode": round((t4 - t3) * 1e3, 2),
            "total": round((t4 - t0) * 1e3, 2),
            "batch_size": pred.batch_size,
        }
        return JSONResponse(body, headers=_API_HEADERS)

    return app


# -- serving -------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and the name localhost; anything else (0.0.0.0, a LAN address, a name) is not."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def read_token(path: str | Path) -> str:
    """The bearer token in `path`: one line of at least `MIN_TOKEN_CHARS` characters, no spaces."""
    p = Path(path)
    make = "python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE"
    if not p.is_file():
        raise XraylensError(f"--token-file {p} not found; create one with {make}")
    try:
        text = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise XraylensError(f"--token-file {p} cannot be read ({e}); it must hold one line of text") from None
    if len(text) < MIN_TOKEN_CHARS or any(c.isspace() for c in text):
        raise XraylensError(
            f"--token-file {p} must hold one token of at least {MIN_TOKEN_CHARS} characters without spaces; "
            f"create one with {make}"
        )
    return text


def check_serve_options(
    host: str, port: int, token_file: str | Path | None, no_auth: bool, max_upload_mb: float, max_batch: int
) -> str | None:
    """Every serve option checked before the run is loaded; returns the token (None: no auth)."""
    if not 1 <= port <= 65535:
        raise XraylensError(f"--port {port} is not a TCP port; use 1-65535 (default 8000)")
    if not host.strip():
        raise XraylensError("--host is empty; use 127.0.0.1 (default) or an address of this machine")
    if not max_upload_mb > 0 or max_upload_mb > 4096:
        raise XraylensError(
            f"--max-upload-mb {max_upload_mb:g} must lie in (0, 4096]; default {DEFAULT_MAX_UPLOAD_MB:g}"
        )
    if max_batch < 1:
        raise XraylensError(f"--max-batch {max_batch} must be at least 1")
    if no_auth and token_file is not None:
        raise XraylensError("--no-auth and --token-file contradict each other; pass one")
    if token_file is not None:
        return read_token(token_file)
    if not is_loopback(host) and not no_auth:
        raise XraylensError(
            f"--host {host} is reachable from other machines: pass --token-file FILE (clients send "
            "'Authorization: Bearer <token>'), or --no-auth to serve without one"
        )
    return None


def _torch_threads() -> int:
    """Threads for the model's CPU passes: one core fewer than the process may use (at least one), unless
    OMP_NUM_THREADS says. The spare core parses requests, decodes and encodes while a pass runs; with every
    core in the pass, each of its parallel steps waits for a thread the other work has preempted (on 2
    cores under load a resnet18 pass took 3x longer with 2 threads than with 1)."""
    import torch

    if not os.environ.get("OMP_NUM_THREADS"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores - 1))
    return torch.get_num_threads()


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so a taken port is a one-line error, not a uvicorn traceback."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise XraylensError(f"--host {host}: cannot resolve it ({e.strerror}); use an IP address") from None
    family, kind, proto, _, addr = infos[0]
    # proto must say TCP: asyncio sets TCP_NODELAY only on such sockets, and without it every keep-alive
    # response waits ~40 ms for the client's delayed ACK (headers and body are two writes)
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise XraylensError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve_run(
    run: RunLike | Run,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token_file: str | Path | None = None,
    no_auth: bool = False,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    methods: Sequence[str] | str | None = None,
    max_batch: int = 4,
    checkpoint: str = "best",
    device: str = "auto",
    access_log: bool = True,
    log_level: str = "info",
) -> None:
    """Check the options, load the run once, bind, and serve until interrupted (`xraylens serve`)."""
    import uvicorn

    token = check_serve_options(host, port, token_file, no_auth, max_upload_mb, max_batch)
    offered = resolve_methods(methods) if methods else default_methods()
    threads = _torch_threads()
    loaded = open_run(run, which=checkpoint, device=device)
    sock = _bind(host, port)
    app = create_app(
        loaded,
        token=token,
        max_upload_bytes=int(max_upload_mb * MB),
        methods=offered,
        max_batch=max_batch,
        allowed_hosts=["127.0.0.1", "localhost", "[::1]", host, f"[{host}]"] if is_loopback(host) else None,
    )
    shown = f"[{host}]" if ":" in host else host
    log.info(
        "serving %s (%s, %s) on http://%s:%d/ - page at /, API docs at /docs; %s; uploads up to %s",
        loaded.run_dir.name,
        loaded.config.model.name,
        ", ".join(loaded.classes),
        shown,
        port,
        "bearer token required for /model and /predict" if token else "no authentication",
        format_size(int(max_upload_mb * MB)),
    )
    log.info("model passes use %d CPU thread(s) (OMP_NUM_THREADS sets another number)", threads)
    config = uvicorn.Config(
        app, log_level=log_level, access_log=access_log, server_header=False, timeout_keep_alive=5, lifespan="on"
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
