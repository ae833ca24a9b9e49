"""``flowrl serve sampler``: the policy as an HTTP image (or video) generator, to look at a run's
checkpoints, compare them, or score them with outside tools, while or after it trains.

    flowrl serve sampler --config CONFIG [--checkpoint runs/<run>/checkpoints/<name>] [--port 8001]

The model is built as the run built it (``model:`` of CONFIG, its ``init_from`` included); a
checkpoint's EMA weights, what evaluation scores, are used where it saved them (``--live`` for
the live ones). Generation is the evaluation's: the ODE sampler, ``eval:``'s steps, guidance and
resolution unless a request says otherwise, sample ``i`` of a request seeded ``seed + i`` (so
``seed: eval.seed + j`` reproduces evaluation sample ``j``'s image).

Endpoints (all but liveness require ``Authorization: Bearer <token>`` when a token is set):

``GET  /health/live``    ``{"live": true}``
``GET  /health/ready``   200 once the model is loaded, else 503 (``{"ready": false, "error": ...}`` when
                         loading failed: the server stays up, ``/admin/load`` can load another)
``GET  /metrics``        Prometheus: ``flowrl_serve_sampler_requests_total{status}``,
                         ``flowrl_serve_sampler_images_total``, ``flowrl_serve_sampler_generate_seconds``
``POST /v1/generate``    ``{"prompts": [...], "negative_prompts"?, "seed"?, "num_inference_steps"?,
                         "guidance_scale"?, "resolution"?, "condition_images"?}`` ->
                         ``{"images": [base64 PNG, ...]}`` (video families: ``"videos"``, per sample
                         its frames), with the seeds and the weights used
``GET  /admin/status``   the model, checkpoint, weights (ema / live / base) and counters
``POST /admin/load``     ``{"checkpoint": DIR, "latest" or null, "ema": true}``: serve another checkpoint
                         (``latest``: the run's newest, ``final`` or ``checkpoint-N``; null or "": the
                         base); a LoRA run's is swapped in place (requests wait for it), a full
                         fine-tune's model is built again while the old one serves (both are in memory
                         until the new one is ready)

The model loads in the background once the server starts, so liveness and readiness answer (and
``/health/ready`` says 503) while a large model loads.

One request generates at a time (a lock; the model is not re-entrant). The host defaults to
127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.sampler.settings import SamplerServerSettings
from shared.images import rgb
from shared.serving import BEARER_HELP, CHALLENGE, bearer_ok

log = logging.getLogger("flowrl.sampler")


MAX_SIDE = 4096  # pixels a requested resolution's side may have (a larger one is an out-of-memory, not an image)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: list[str] = Field(..., min_length=1)
    negative_prompts: list[str | None] | None = None
    seed: int = 0
    num_inference_steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0)
    resolution: int | tuple[int, int] | None = None  # each side in [8, MAX_SIDE]
    condition_images: list[list[str]] | None = None  # per prompt, base64 PNG/JPEG (edit / image-to-video models)


    @field_validator("resolution")
    @classmethod
    def _sides(cls, value):
        sides = (value,) if isinstance(value, int) else value or ()
        if any(not 8 <= side <= MAX_SIDE for side in sides):
            raise ValueError(f"each side of the resolution must be in [8, {MAX_SIDE}] pixels, got {value}")
        return value


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None
    ema: bool = True

    @field_validator("checkpoint")
    @classmethod
    def _empty_is_base(cls, value: str | None) -> str | None:
        return value or None  # "" is the base, as in the settings (not the working directory)


class RequestError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class Served:
    """The loaded model and what it serves."""

    def __init__(self, settings: SamplerServerSettings) -> None:
        from shared.config import load_config

        self.settings = settings
        self.cfg = load_config(settings.config, settings.overrides)
        self.lock = threading.RLock()  # the served model: generation, swapping it, loading into it
        self.loading = threading.Lock()  # one /admin/load at a time
        self.adapter = None
        self.checkpoint: str | None = None
        self.weights = "base"
        self.loaded_at: float | None = None
        self.error: str | None = None  # why the start-up load failed (cleared by a successful load)
        self.requests = self.images = 0

    def resolve(self, checkpoint: str | None) -> str | None:
        """``latest`` -> the run's newest checkpoint, ``final`` or ``checkpoint-N``, by the optimizer step
        its ``trainer_state.json`` records (``final`` on a tie; a run continued past its ``final`` has newer
        numbered ones); the run's folder is ``output_dir/run_name`` of the config. Anything else as it is."""
        if checkpoint != "latest":
            return checkpoint
        from shared.config import ConfigError

        from shared.checkpoints import numbered_checkpoints

        folder = Path(self.cfg.output_dir) / (self.cfg.run_name or "") / "checkpoints"
        found = numbered_checkpoints(folder) + ([folder / "final"] if (folder / "final").is_dir() else [])
        if not found:
            raise ConfigError(f"checkpoint 'latest': {folder} holds no final or checkpoint-N folder yet. Fix: "
                              f"wait for the run's first checkpoint (train.save_freq), or name one, or load "
                              f"null (the base).")
        return str(max(found, key=lambda p: (_optimizer_step(p), p.name == "final")))

    def start(self, checkpoint: str | None, ema: bool) -> None:
        """The start-up load: like :meth:`build`, but a failure is kept in :attr:`error` (readiness
        and ``/admin/status`` report it) instead of stopping the server."""
        try:
            self.build(self.resolve(checkpoint), ema)
            self.error = None
        except Exception as e:  # noqa: BLE001 - reported, and /admin/load can recover
            self.error = f"{type(e).__name__}: {e}"

    def build(self, checkpoint: str | None, ema: bool) -> None:
        """Build the model as the run did, then load ``checkpoint`` (None: the base); the old one serves
        meanwhile, and is swapped out (under :attr:`lock`) once the new one is ready."""
        import torch

        from shared.models import load_adapter
        from shared.models.lora import prepare_transformer
        from shared.models.warm_start import load_checkpoint_into, warm_start

        m = self.cfg.model
        adapter = load_adapter(m, device=torch.device(self.settings.device), seed=self.cfg.train.seed)
        warm_start(m, adapter, "before")
        prepare_transformer(adapter, m)
        warm_start(m, adapter, "after")
        # no checkpoint: the new LoRA's B is 0, so the model computes the base (and its init_from)
        weights = load_checkpoint_into(m, adapter, checkpoint, ema=ema) if checkpoint else "base"
        adapter.transformer.eval()
        with self.lock:
            self.adapter, self.checkpoint, self.weights, self.loaded_at = adapter, checkpoint, weights, time.time()

    def load(self, checkpoint: str | None, ema: bool) -> None:
        """Serve another checkpoint: a LoRA run's in place, otherwise a new model."""
        from shared.models.warm_start import load_checkpoint_into

        checkpoint = self.resolve(checkpoint)
        lora = self.cfg.model.finetune_type == "lora"
        if lora and checkpoint is not None and self.adapter is not None:
            with self.lock:  # into the served model: requests wait
                before = (self.checkpoint, self.weights != "live")
                try:
                    self.weights = load_checkpoint_into(self.cfg.model, self.adapter, checkpoint, ema=ema)
                except Exception:
                    self.build(*before)  # a load that failed half way: back to what was served
                    raise
                self.checkpoint, self.loaded_at = checkpoint, time.time()
        else:
            self.build(checkpoint, ema)
        self.error = None

    def generate(self, req: GenerateRequest) -> dict[str, Any]:
        from shared.sampling import rollout_batches

        e, n = self.cfg.eval, len(req.prompts)
        if n > self.settings.max_images_per_request:
            raise RequestError(413, f"{n} prompts in one request; this server takes at most "
                                    f"{self.settings.max_images_per_request} (max_images_per_request)")
        negatives = req.negative_prompts or [None] * n
        if len(negatives) != n:
            raise RequestError(422, f"negative_prompts has {len(negatives)} entries for {n} prompts")
        conditions = None
        if req.condition_images is not None:
            if len(req.condition_images) != n:
                raise RequestError(422, f"condition_images has {len(req.condition_images)} rows for {n} prompts")
            conditions = [[_decode_image(b, f"condition_images[{i}][{j}]") for j, b in enumerate(row)]
                          for i, row in enumerate(req.condition_images)]
        low, high = self.adapter.condition_images  # (min, max) per sample; (0, 0): text only
        counts = [len(row) for row in conditions] if conditions is not None else [0] * n
        if high == 0 and any(counts):
            raise RequestError(422, f"{self.adapter.model_type} generates from text only: leave out condition_images")
        if any(c < low or (high is not None and c > high) for c in counts):
            raise RequestError(422, f"{self.adapter.model_type} takes {low} to {'any' if high is None else high} "
                                    f"condition images per prompt: send condition_images (per prompt a list of "
                                    f"base64 PNG/JPEG), got {counts}")
        seeds = [req.seed + i for i in range(n)]
        resolution = req.resolution if req.resolution is not None else e.resolution
        try:
            _, roll = rollout_batches(
                self.adapter, list(req.prompts), list(negatives), seeds,
                batch_size=self.settings.batch_size or e.per_device_batch_size, resolution=resolution,
                num_steps=req.num_inference_steps or e.num_inference_steps,
                guidance_scale=e.guidance_scale if req.guidance_scale is None else req.guidance_scale,
                dynamics="ODE", noise_level=0.0, sde_steps=[], keep_means=False, log_prob_reduction="mean",
                transformer=self.adapter.transformer, num_frames=e.num_frames,
                images=conditions if high != 0 else None)
        except ValueError as err:  # a resolution the model cannot take, a prompt too long, ...
            raise RequestError(422, str(err)) from None
        media = roll.images
        self.requests += 1
        self.images += n
        out = {"seeds": seeds, "checkpoint": self.checkpoint, "weights": self.weights}
        if media.ndim == 5:
            out["videos"] = [[_png(frame) for frame in video] for video in media]
        else:
            out["images"] = [_png(image) for image in media]
        return out

    def status(self) -> dict[str, Any]:
        m = self.cfg.model
        return {"model_type": m.model_type, "model_name_or_path": m.model_name_or_path, "init_from": m.init_from,
                "finetune_type": m.finetune_type, "checkpoint": self.checkpoint, "weights": self.weights,
                "loaded_at": self.loaded_at, "requests": self.requests, "images": self.images,
                "device": self.settings.device, "error": self.error}


def _optimizer_step(checkpoint: Path) -> int:
    """The optimizer step a checkpoint was saved at (its ``trainer_state.json``; -1 when unreadable)."""
    import json

    try:
        return int(json.loads((checkpoint / "trainer_state.json").read_text())["optimizer_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def _png(image) -> str:
    """One image ``[3, H, W]`` in [0, 1] as base64 PNG (8-bit, :func:`shared.images.encode_png`)."""
    from shared.images import encode_png

    return base64.b64encode(encode_png(image)).decode("ascii")


def _decode_image(b64: str, where: str):
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
        image.load()
    except Exception as e:  # noqa: BLE001 - any decoding failure is the client's
        raise RequestError(422, f"{where} is not a base64 PNG/JPEG image ({type(e).__name__})") from None
    try:
        return rgb(image)  # 16-bit images scaled, not clipped
    except ValueError as e:
        raise RequestError(422, f"{where}: {e}") from None


async def _authorize(request: Request) -> None:
    if not bearer_ok(request.headers.get("authorization"), request.app.state.token):
        raise RequestError(401, BEARER_HELP, CHALLENGE)


class ServeMetrics:
    """Every metric the server exports; ``registry`` is what ``/metrics`` serves."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("flowrl_serve_sampler_requests", "Generate requests by status.", ["status"], registry=r)
        self.images = Counter("flowrl_serve_sampler_images", "Images (or videos) generated.", registry=r)
        self.seconds = Histogram("flowrl_serve_sampler_generate_seconds", "Seconds per generate request.",
                                 buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160), registry=r)


def create_app(settings: SamplerServerSettings) -> FastAPI:
    """The app; the model is built in the background once it starts (readiness says when it is done)."""
    from prometheus_client import generate_latest

    served = Served(settings)  # reads and checks the config now: a bad one fails before serving
    metrics_ = ServeMetrics()
    registry, requests, images, seconds = metrics_.registry, metrics_.requests, metrics_.images, metrics_.seconds

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        def start():
            with served.loading:
                served.start(settings.checkpoint, not settings.live)
        loading = asyncio.create_task(asyncio.to_thread(start))
        yield
        await asyncio.shield(loading)  # a load in progress finishes (its thread cannot be stopped)

    # no /docs, /redoc, /openapi.json: they would answer without the token
    app = FastAPI(title="flowrl sampler", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.token = settings.token.get_secret_value().encode() if settings.token else None
    app.state.served = served

    @app.get("/health/live")
    async def live() -> dict:
        return {"live": True}

    router = APIRouter(dependencies=[Depends(_authorize)])

    @router.get("/health/ready")
    async def ready() -> JSONResponse:
        ok = served.adapter is not None
        body = {"ready": ok} if served.error is None else {"ready": ok, "error": served.error}
        return JSONResponse(body, status_code=200 if ok else 503)

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    @router.post("/v1/generate")
    async def generate(req: GenerateRequest) -> dict:
        start, status = time.perf_counter(), "500"

        def run():
            with served.lock:
                if served.adapter is None:
                    if served.error is not None:
                        raise RequestError(503, f"no model is loaded: the start-up load failed ({served.error}); "
                                                f"POST /admin/load loads another checkpoint")
                    raise RequestError(503, "the model is still loading (GET /health/ready says when it is done)")
                return served.generate(req)
        try:
            try:
                out = await asyncio.to_thread(run)
            except RequestError:
                raise
            except Exception as e:  # noqa: BLE001 - answered as JSON, counted, and logged with its traceback
                log.exception("generation failed")
                raise RequestError(500, f"generation failed: {type(e).__name__}: {e}") from None
            status = "200"
            images.inc(len(req.prompts))
            seconds.observe(time.perf_counter() - start)
            return out
        except RequestError as e:
            status = str(e.status)
            raise
        finally:
            requests.labels(status=status).inc()

    @router.get("/admin/status")
    async def status() -> dict:
        return served.status()

    @router.post("/admin/load")
    async def load(req: LoadRequest) -> dict:
        from shared.config import ConfigError

        if req.checkpoint not in (None, "latest") and not Path(req.checkpoint).expanduser().exists():
            raise RequestError(400, f"checkpoint {req.checkpoint!r} does not exist on the server's machine")

        def run():
            with served.loading:  # the model is swapped under served.lock once the new one is ready
                served.load(req.checkpoint, req.ema)
        try:
            await asyncio.to_thread(run)
        except ConfigError as e:  # WarmStartError: not a checkpoint of this model
            raise RequestError(400, str(e)) from None
        return served.status()

    app.include_router(router)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)

    return app
