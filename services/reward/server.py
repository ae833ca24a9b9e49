"""The reward server: FastAPI app serving rewards over Open Inference Protocol v2 and
Flow-Factory's ``/compute``.

Endpoints (every one but liveness requires ``Authorization: Bearer <token>`` when a token is
configured):

==========================================  =================================================
``GET  /v2/health/live``                    ``{"live": true}`` (never needs the token)
``GET  /v2/health/ready``                   ``{"ready": bool}``; 503 until every model loaded
``GET  /v2``                                server metadata
``POST /v2/repository/index``               ``[{"name", "version", "state"}]`` (Triton extension)
``GET  /v2/models/{name}``                  model metadata (inputs image, prompt[, group_id])
``GET  /v2/models/{name}/ready``            ``{"name", "ready"}``; 503 while not ready
``POST /v2/models/{name}/infer``            v2 inference (JSON or binary tensor extension)
``GET  /health``, ``POST /compute``         Flow-Factory protocol for the first served reward
``GET  /rewards/{name}/health``, ``POST /rewards/{name}/compute``  the same for any reward
``GET  /metrics``                           Prometheus text format
``GET  /openapi.json``                      the OpenAPI document (request bodies included)
==========================================  =================================================

The v2 routes also answer under ``/v2/models/{name}/versions/1/...``. Errors are
``{"error": "..."}`` with the status codes of :mod:`services.reward.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from contextlib import asynccontextmanager

import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.reward import flow_factory, v2
from services.reward.errors import RequestError
from services.reward.images import ImageDecodeError, ImageTooLarge, decode_image, decode_pil
from services.reward.metrics import Metrics
from services.reward.openapi import json_body
from services.reward.settings import RewardServerSettings
from services.reward.state import Models, Slot
from shared.serving import BEARER_HELP, CHALLENGE, bearer_ok

log = logging.getLogger("flowrl.reward")


# --- request plumbing ----------------------------------------------------------------------


async def _authorize(request: Request) -> None:
    """401 unless the request carries the configured bearer token (constant-time compare).

    ``async`` on purpose: FastAPI runs a plain ``def`` dependency in its thread pool, a thread
    hop per request for a few microseconds of work (measured under load: bench/reward_load.py)."""
    if not bearer_ok(request.headers.get("authorization"), request.app.state.token):
        raise RequestError(401, BEARER_HELP, CHALLENGE)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, decompressed (gzip/deflate, as tritonclient can send), at most ``limit`` bytes."""
    too_big = f"request body exceeds max_request_bytes={limit}; send fewer or smaller images per request"
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, too_big)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, too_big)
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise RequestError(415, f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
    inflater = zlib.decompressobj(wbits=47)  # 32 + 15: accepts both gzip and zlib headers
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise RequestError(400, f"body is not valid {encoding} data: {e}") from None
    if len(out) > limit:
        raise RequestError(413, too_big + " (after decompression)")
    if not inflater.eof:
        raise RequestError(400, f"{encoding} body is truncated")
    return out


@contextlib.contextmanager
def _as_request_errors():
    """Image decoding failures as the HTTP errors they are: too large 413, undecodable 422."""
    try:
        yield
    except ImageTooLarge as e:
        raise RequestError(413, str(e)) from None
    except ImageDecodeError as e:
        raise RequestError(422, str(e)) from None


def _decode_images(elements: list, name: str, max_pixels: int) -> list[torch.Tensor]:
    with _as_request_errors():
        return [decode_image(e, f"{name} element {i}", max_pixels=max_pixels) for i, e in enumerate(elements)]


def _decode_videos(rows: list, name: str, max_pixels: int) -> list[torch.Tensor]:
    """Per sample its frames as one ``[F, 3, H, W]`` tensor (every frame of a video one size)."""
    out = []
    for i, row in enumerate(rows):
        frames = _decode_images(row, f"{name} video {i} frame", max_pixels)
        if len({tuple(f.shape) for f in frames}) > 1:
            raise RequestError(422, f"{name} video {i} has frames of different sizes "
                                    f"{sorted({(f.shape[1], f.shape[2]) for f in frames})}; one size per video")
        out.append(torch.stack(frames))
    return out


def _decode_conditions(rows: list | None, name: str, max_pixels: int) -> list[list] | None:
    """Per sample its condition images as RGB PIL (``None`` when none were sent); each distinct
    element is decoded once (group members share their source)."""
    if rows is None:
        return None
    cache: dict = {}
    with _as_request_errors():
        for i, row in enumerate(rows):
            for j, e in enumerate(row):
                if e not in cache:
                    cache[e] = decode_pil(e, f"{name} element [{i}][{j}]", max_pixels=max_pixels)
    return [[cache[e] for e in row] for row in rows]


class _Timed:
    """Counts and times one scoring request under the model's labels."""

    def __init__(self, metrics: Metrics, model: str, protocol: str) -> None:
        self.metrics, self.model, self.protocol = metrics, model, protocol

    def __enter__(self) -> "_Timed":
        self.start = time.perf_counter()
        return self

    def __exit__(self, kind, error, tb) -> None:
        if error is None:
            code = 200
        elif isinstance(error, RequestError):
            code = error.status
        else:  # 499: the client went away before its answer (nginx's convention)
            code = 499 if isinstance(error, asyncio.CancelledError) else 500
        self.metrics.requests.labels(self.model, self.protocol, str(code)).inc()
        self.metrics.request_seconds.labels(self.model, self.protocol).observe(time.perf_counter() - self.start)


async def until_client_leaves(request: Request, scoring):
    """The result of ``scoring`` (a batcher's ``submit``), or :class:`RequestError` 499 as soon as the
    client disconnects: the request is then cancelled, so the batcher skips its samples instead of
    scoring them for nobody (uvicorn does not cancel a handler whose client left, and a client that
    times out and retries would otherwise queue the same work again and again)."""
    task = asyncio.ensure_future(scoring)

    async def gone() -> None:  # the body is read: the next message is the disconnect
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the handler itself was cancelled (shutdown): so is its request
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()  # (cancels the queued request's future: the batcher skips it)
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise RequestError(499, "the client disconnected before its scores were ready")
    return task.result()


# --- routes ----------------------------------------------------------------------------------


def _v2_routes(router: APIRouter) -> None:
    @router.get("/v2/health/ready")
    async def ready(request: Request) -> JSONResponse:
        ok = request.app.state.models.ready
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @router.get("/v2")
    async def server_metadata() -> dict:
        return {"name": "flowrl-reward", "version": _version(), "extensions": ["binary_tensor_data", "model_repository"]}

    @router.post("/v2/repository/index")
    async def repository_index(request: Request) -> list:
        states = {"ready": "READY", "loading": "LOADING", "failed": "UNAVAILABLE"}
        return [{"name": s.name, "version": v2.VERSION, "state": states[s.state]}
                | ({"reason": s.error} if s.error else {}) for s in request.app.state.models.slots.values()]

    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        router.add_api_route(prefix, model_metadata, methods=["GET"])
        router.add_api_route(prefix + "/ready", model_ready, methods=["GET"])
        router.add_api_route(prefix + "/infer", infer, methods=["POST"],
                             openapi_extra=json_body(v2.InferRequest, binary=True))


def _slot(request: Request, name: str, version: str | None = None) -> Slot:
    slot = request.app.state.models.get(name)
    if version is not None and version != v2.VERSION:
        raise RequestError(404, f"model '{name}' has only version {v2.VERSION}, not {version!r}")
    return slot


async def model_metadata(request: Request, name: str, version: str | None = None) -> dict:
    slot = _slot(request, name, version)
    return v2.model_metadata(slot.name, slot.kind, slot.spec.reward_model, slot.conditions, slot.video,
                             slot.metadata)


async def model_ready(request: Request, name: str, version: str | None = None) -> JSONResponse:
    slot = _slot(request, name, version)
    ok = slot.state == "ready"
    return JSONResponse({"name": slot.name, "ready": ok}, status_code=200 if ok else 503)


async def infer(request: Request, name: str, version: str | None = None) -> Response:
    slot = _slot(request, name, version)
    settings: RewardServerSettings = request.app.state.settings
    with _Timed(request.app.state.metrics, slot.name, "v2"):
        batcher = slot.ready_batcher()
        body = await read_body(request, settings.max_request_bytes)

        def decode():
            req, tail = v2.parse_request(body, request.headers.get(v2.HEADER_LENGTH))
            inputs = v2.read_inputs(req, tail, slot.kind, slot.conditions, slot.video, slot.metadata)
            media = (_decode_videos(inputs.videos, f"input '{v2.VIDEO}'", settings.max_image_pixels)
                     if inputs.videos is not None
                     else _decode_images(inputs.images, f"input '{v2.IMAGE}'", settings.max_image_pixels))
            return (inputs, media,
                    _decode_conditions(inputs.condition_images, f"input '{v2.CONDITION_IMAGES}'",
                                       settings.max_image_pixels))

        inputs, images, conditions = await asyncio.to_thread(decode)
        scores = (await until_client_leaves(request, batcher.submit(images, inputs.prompts, inputs.group_ids,
                                                                    conditions, inputs.metadata, abstain=True))
                  if images else torch.zeros(0))
        payload, headers, media_type = v2.infer_response(slot.name, inputs, scores.numpy(), batcher.model.kind)
        return Response(payload, headers=headers, media_type=media_type)


def _flow_factory_routes(router: APIRouter) -> None:
    async def health(request: Request, name: str | None = None) -> JSONResponse:
        models: Models = request.app.state.models
        slot = models.get(name or models.default)
        if slot.state == "ready":
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": slot.state} | ({"error": slot.error} if slot.error else {}), status_code=503)

    async def compute(request: Request, name: str | None = None) -> JSONResponse:
        models: Models = request.app.state.models
        slot = models.get(name or models.default)
        settings: RewardServerSettings = request.app.state.settings
        with _Timed(request.app.state.metrics, slot.name, "compute"):
            batcher = slot.ready_batcher()
            body = await read_body(request, settings.max_request_bytes)

            def decode():
                req = flow_factory.parse_compute(body, video=slot.video)
                media = (_decode_videos(req.video, "'video'", settings.max_image_pixels) if req.video is not None
                         else _decode_images(req.image or [], "'image'", settings.max_image_pixels))
                return (req, media,
                        _decode_conditions(req.condition_images, "'condition_images'", settings.max_image_pixels))

            req, images, conditions = await asyncio.to_thread(decode)
            scores = (await until_client_leaves(request, batcher.submit(images, req.prompt, None, conditions,
                                                                        flow_factory.row_metadata(req)))
                      if images else torch.zeros(0))
            return JSONResponse({"rewards": [float(s) for s in scores]})

    router.add_api_route("/health", health, methods=["GET"])
    body = json_body(flow_factory.ComputeRequest)
    router.add_api_route("/compute", compute, methods=["POST"], openapi_extra=body)
    router.add_api_route("/rewards/{name}/health", health, methods=["GET"])
    router.add_api_route("/rewards/{name}/compute", compute, methods=["POST"], openapi_extra=body)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flowrl")
    except PackageNotFoundError:
        return "0+unknown"


# --- the app -------------------------------------------------------------------------------


def create_app(settings: RewardServerSettings | None = None) -> FastAPI:
    """Build the reward server app.

    Args:
        settings: deployment settings; None reads them from the environment
            (``FLOWRL_REWARD_*``, ``FLOWRL_API_TOKEN``).

    Reward names are resolved here (an unknown name raises the registry's error listing the
    choices); the models themselves load in the background once the app starts, and
    ``/v2/health/ready`` turns true when all have loaded.
    """
    settings = settings if settings is not None else RewardServerSettings()
    metrics = Metrics()
    models = Models(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = asyncio.create_task(models.load_all(), name="load-rewards")
        try:
            yield
        finally:
            loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            await models.stop()

    app = FastAPI(title="flowrl reward server", version=_version(), lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings, app.state.metrics, app.state.models = settings, metrics, models
    app.state.token = settings.token.get_secret_value().encode() if settings.token else None

    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    router = APIRouter(dependencies=[Depends(_authorize)])
    _v2_routes(router)
    _flow_factory_routes(router)

    @router.get("/metrics")
    async def metrics_text() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/openapi.json", include_in_schema=False)
    async def openapi_document() -> JSONResponse:
        return JSONResponse(app.openapi())

    app.include_router(router)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=e)
        return JSONResponse({"error": f"internal server error: {type(e).__name__}: {e}"}, status_code=500)

    return app
