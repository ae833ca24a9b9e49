"""Flow-Factory's remote reward protocol (``rewards/my_reward_remote.py`` in Flow-Factory).

``GET /health`` -> ``{"status": "ok"}`` once the model is ready (503 ``{"status": "loading"}``
before). ``POST /compute`` with the JSON body::

    {"prompt": [str, ...], "image": [base64 PNG, ...] | null, "video": ... | null,
     "condition_images": ... | null, "condition_videos": ... | null}

answers ``{"rewards": [float, ...]}`` (same order and length) or ``{"error": "..."}`` with a
non-2xx status. Images are PNG (or JPEG) files, base64 without a data-URI prefix (one is
tolerated). ``video`` (per sample a list of base64 frames, one size per video) replaces
``image`` for videos: a reward that scores whole videos (``RewardModel.video == "native"``) needs
it, an image reward scores the frames and averages. ``condition_images`` (per sample a list of
base64 images: the sources of an edit) go to rewards that read them
(``RewardModel.condition_images``); condition videos are refused with 422. ``kwargs`` (what
Flow-Factory's client sends) or ``extra`` (what its example server reads) may carry
``metadata``: per sample its dataset row metadata, a JSON object's text (Flow-Factory's form) or
an object, passed to rewards that read it (``RewardModel.metadata``, e.g. ``geneval``); other
keys are ignored.
A groupwise reward treats one request as one group, as Flow-Factory's groupwise client sends.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from services.reward.errors import RequestError, parse_json


class ComputeRequest(BaseModel):
    """The ``/compute`` body. ``kwargs`` / ``extra``: only their ``metadata`` is read (module docstring)."""

    model_config = ConfigDict(extra="forbid")
    prompt: list[str]
    image: list[str] | None = None
    video: Any = None
    condition_images: Any = None
    condition_videos: Any = None
    extra: dict[str, Any] | None = None
    kwargs: dict[str, Any] | None = None


def row_metadata(req: ComputeRequest) -> list[dict] | None:
    """Per prompt its row metadata from ``kwargs`` / ``extra`` (``None`` when neither has any)."""
    from services.reward.v2 import json_object

    values = (req.kwargs or {}).get("metadata")
    if values is None:
        values = (req.extra or {}).get("metadata")
    if values is None:
        return None
    if isinstance(values, (str, dict)) and len(req.prompt) == 1:
        values = [values]
    if not isinstance(values, list) or len(values) != len(req.prompt):
        raise RequestError(422, f"'metadata' must be a list with one JSON object (or its text) per prompt "
                                f"({len(req.prompt)}), got {type(values).__name__}"
                                + (f" of {len(values)}" if isinstance(values, list) else ""))
    return [json_object(v, f"'metadata' element {i}") for i, v in enumerate(values)]


def _empty(value: Any) -> bool:
    """None, or nested lists holding nothing but None/empty lists."""
    return value is None or (isinstance(value, list) and all(_empty(v) for v in value))


def _rows_of_strings(value: Any, n: int) -> bool:
    return (isinstance(value, list) and len(value) == n
            and all(isinstance(row, list) and row and all(isinstance(x, str) for x in row) for row in value))


def parse_compute(body: bytes, video: bool = False) -> ComputeRequest:
    """Parse and check a ``/compute`` body (400 for bad JSON, 422 for the wrong shape); ``video``:
    the reward scores whole videos (field ``video`` required)."""
    raw = parse_json(body)
    try:
        req = ComputeRequest.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors())
        raise RequestError(
            422, f"not a Flow-Factory /compute request ({problems}); expected "
                 f"{{'prompt': [str], 'image': [base64 PNG]}}") from None
    if not _empty(req.condition_videos):
        raise RequestError(422, "'condition_videos' is not supported by this server")
    if _empty(req.video):
        req.video = None
        if video:
            raise RequestError(422, "this reward scores whole videos: send 'video' (per prompt a list of base64 "
                                    "frames), not 'image'")
    else:
        if req.image is not None and not _empty(req.image):
            raise RequestError(422, "'image' and 'video' both given; send one")
        if not _rows_of_strings(req.video, len(req.prompt)):
            raise RequestError(422, "'video' must be one non-empty list of base64 frames per prompt "
                                    "([[base64 PNG, ...], ...], aligned with 'prompt')")
        return _check_conditions(req)
    _check_conditions(req)
    if req.image is None:
        raise RequestError(422, "'image' is null: this server scores images; send base64 PNGs in 'image'")
    if len(req.image) != len(req.prompt):
        raise RequestError(422, f"got {len(req.image)} images and {len(req.prompt)} prompts; they must align")
    return req


def _check_conditions(req: ComputeRequest) -> ComputeRequest:
    if _empty(req.condition_images):
        req.condition_images = None
    elif not _rows_of_strings(req.condition_images, len(req.prompt)):
        raise RequestError(422, "'condition_images' must be one list of base64 images per prompt "
                                "([[base64 PNG, ...], ...], aligned with 'prompt')")
    return req
