"""``remote``: a reward scored by an HTTP reward server (``flowrl serve reward``, or any server
speaking the same protocol).

Config::

    rewards:
      - name: brightness
        reward_model: remote
        url: http://reward-svc:8000
        protocol: v2            # or flow-factory (POST {url}/compute, Flow-Factory's JSON)
        model: brightness       # v2 model name; default: the server's only model
        kind: pointwise         # groupwise: send one prompt group per request (groupwise/pairwise servers)
        timeout: 60             # seconds per attempt
        retries: 3              # extra attempts after the first
        backoff: 0.5            # seconds before the first retry, doubling each time (capped at 60)
        token: null             # bearer token; default the FLOWRL_API_TOKEN environment variable
        condition_images: false # true: also send each sample's condition (source) images, for a
                                # served reward that compares an edit with its source
        metadata: false         # true: also send each sample's dataset row metadata, for a
                                # served reward that reads it (e.g. geneval)
        video: frames           # videos: frames = score each frame remotely and average here;
                                # native = send whole videos (a served reward that scores videos);
                                # first_frame = send each video's first frame (a served judge)

With ``condition_images: true``, v2 requests carry the input ``condition_images`` (BYTES
``[B, M]``, PNG; every sample of a request needs the same number ``M``) and Flow-Factory
requests the field ``condition_images`` (per prompt a list of base64 PNGs). With ``video: native``
videos ``[B, F, 3, H, W]`` go whole: v2 input ``video`` (BYTES ``[B, F]``, PNG frames) in place of
``image``, Flow-Factory field ``video`` (per prompt a list of base64 PNG frames). With
``metadata: true`` v2 requests carry the input ``metadata`` (BYTES ``[B]``, each a JSON object's
text) and Flow-Factory requests ``kwargs.metadata`` (per prompt a JSON object's text, as
Flow-Factory's own client sends it).

Images are sent as PNG files of the uint8-quantized images (``round(x * 255)``, as Flow-Factory
does), so scores equal local scores of the quantized images. v2 requests use the binary tensor
extension (raw PNG bytes, no base64); Flow-Factory requests use base64 PNG in JSON.

Failures: connection errors, timeouts, HTTP 429 and 5xx are retried with exponential backoff
(each retry is logged); after the last attempt, or at once on another 4xx, a
:class:`RemoteRewardError` names the URL and the cause. A failure never becomes a score.
"""

from __future__ import annotations

import base64
import io
import json
import math
import logging
import os
import struct
import time

import httpx
import numpy as np
import torch
from PIL import Image

from shared.rewards.base import RewardModel
from shared.rewards.builtin import _check_rgb, to_uint8_hwc

log = logging.getLogger("flowrl.reward.remote")

PROTOCOLS = ("v2", "flow-factory")
HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_BACKOFF = 60.0


class RemoteRewardError(RuntimeError):
    """The reward server could not score a batch; the message names the URL and the cause.

    ``retryable``: the server was unreachable, timed out or overloaded (5xx / 429) on every
    attempt, so trying again later may work (queue workers retry such tasks with backoff);
    False for answers that will not change (4xx, unreadable responses)."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


def encode_png(images: torch.Tensor) -> list[bytes]:
    """``[B, 3, H, W]`` in [0, 1] -> B PNG files of the uint8-quantized images."""
    out = []
    for array in to_uint8_hwc(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
        out.append(buffer.getvalue())
    return out


def _bytes_tensor(items: list[bytes]) -> bytes:
    """Triton's BYTES serialization: each element as uint32 LE length + payload."""
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def v2_request(pngs: list[bytes] | list[list[bytes]], prompts: list[str],
               conditions: list[list[bytes]] | None = None,
               metadata: list[dict] | None = None) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a v2 infer request using the binary tensor extension. ``pngs``: one
    encoded image per sample (input ``image`` ``[B]``), or per sample a video's encoded frames
    (input ``video`` ``[B, F]``); ``conditions``: per sample its encoded condition images (the same
    number for every sample), sent as the input ``condition_images`` ``[B, M]``; ``metadata``: per
    sample its row metadata, sent as the input ``metadata`` ``[B]`` (JSON texts)."""
    n = len(pngs)
    videos = n > 0 and isinstance(pngs[0], list)
    image_raw = _bytes_tensor([f for video in pngs for f in video] if videos else pngs)  # type: ignore[union-attr]
    prompt_raw = _bytes_tensor([p.encode("utf-8") for p in prompts])
    media = ({"name": "video", "shape": [n, len(pngs[0])], "datatype": "BYTES"} if videos
             else {"name": "image", "shape": [n], "datatype": "BYTES"})
    inputs = [
        {**media, "parameters": {"binary_data_size": len(image_raw)}},
        {"name": "prompt", "shape": [n], "datatype": "BYTES", "parameters": {"binary_data_size": len(prompt_raw)}},
    ]
    raws = [image_raw, prompt_raw]
    if conditions is not None:
        counts = sorted({len(row) for row in conditions})
        if len(counts) != 1 or counts[0] < 1:
            raise ValueError(f"remote reward: v2 sends condition images as a [B, M] tensor, but these samples have "
                             f"{counts} images each. Fix: give every row the same number of images, or use "
                             f"protocol: flow-factory (a list per sample).")
        cond_raw = _bytes_tensor([x for row in conditions for x in row])
        inputs.append({"name": "condition_images", "shape": [n, counts[0]], "datatype": "BYTES",
                       "parameters": {"binary_data_size": len(cond_raw)}})
        raws.append(cond_raw)
    if metadata is not None:
        meta_raw = _bytes_tensor([json.dumps(m, sort_keys=True).encode("utf-8") for m in metadata])
        inputs.append({"name": "metadata", "shape": [n], "datatype": "BYTES",
                       "parameters": {"binary_data_size": len(meta_raw)}})
        raws.append(meta_raw)
    header = {"inputs": inputs, "outputs": [{"name": "score", "parameters": {"binary_data": False}}]}
    head = json.dumps(header).encode()
    return head + b"".join(raws), {HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"}


def encode_pil_png(image) -> bytes:
    """One PIL image as a PNG file (RGB)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def v2_head(response: httpx.Response) -> dict:
    """The JSON part of a v2 infer response (all of it, or the part before the binary outputs)."""
    head_len = response.headers.get(HEADER_LENGTH)
    return json.loads(response.content[: int(head_len)] if head_len else response.content)


def v2_scores(response: httpx.Response, head: dict | None = None) -> list[float]:
    """The ``score`` output of a v2 infer response (JSON data or binary FP32); ``head``: its
    :func:`v2_head`, when already read."""
    body = response.content
    head_len = response.headers.get(HEADER_LENGTH)
    head = v2_head(response) if head is None else head
    tail, offset = body[int(head_len):] if head_len else b"", 0
    for output in head.get("outputs", []):
        size = (output.get("parameters") or {}).get("binary_data_size")
        if output.get("name") == "score":
            if size is None:  # (null: the reward abstained on that sample, NaN)
                data = np.asarray(output["data"], dtype=object).ravel()
                return [math.nan if x is None else float(x) for x in data]
            if output.get("datatype") != "FP32":
                raise ValueError(f"binary output 'score' has datatype {output.get('datatype')}, expected FP32")
            return np.frombuffer(tail[offset : offset + size], dtype="<f4").astype(float).tolist()
        offset += size or 0
    raise ValueError(f"the response has no output 'score' (outputs: {[o.get('name') for o in head.get('outputs', [])]})")


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
        if isinstance(body, dict):
            return str(body.get("error") or body.get("detail") or body)
    except ValueError:
        pass
    return response.text[:500] or response.reason_phrase


class RemoteReward(RewardModel):
    """A reward computed by a reward server (see the module docstring for the options).

    ``kind`` is an instance attribute here: ``pointwise`` (default) sends batches of
    ``batch_size``; ``groupwise`` sends each prompt group in one request, for servers whose
    reward is groupwise or pairwise.
    """

    kind = "pointwise"
    required_fields = ("image", "prompt")

    def __init__(self, *, url: str, protocol: str = "v2", model: str | None = None, kind: str = "pointwise",
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.5, token: str | None = None,
                 condition_images: bool = False, video: str = "frames", metadata: bool = False,
                 **options) -> None:
        super().__init__(**options)
        if video not in ("frames", "native", "first_frame"):
            raise ValueError(f"remote reward: video must be 'frames', 'native' or 'first_frame', got {video!r}")
        self.condition_images = bool(condition_images)  # instance attributes over the class defaults
        self.metadata = bool(metadata)
        self.video = video
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"remote reward: url must start with http:// or https://, got {url!r}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"remote reward: protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        if kind not in ("pointwise", "groupwise"):
            raise ValueError(f"remote reward: kind must be 'pointwise' or 'groupwise', got {kind!r}")
        if protocol == "flow-factory" and model is not None:
            raise ValueError("remote reward: 'model' applies to protocol v2; with flow-factory put the "
                             "model in the url (e.g. http://host:8000/rewards/<name>)")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError(f"remote reward: need timeout > 0, retries >= 0, backoff >= 0; got "
                             f"timeout={timeout}, retries={retries}, backoff={backoff}")
        self.kind = kind
        self.url = url.rstrip("/")
        self.protocol = protocol
        self.model = model
        self.retries, self.backoff = int(retries), float(backoff)
        self._timeout = float(timeout)
        self._token = token or os.environ.get("FLOWRL_API_TOKEN") or None
        self._client: httpx.Client | None = None

    @property
    def name(self) -> str:
        return f"remote({self.model or self.url})"

    def __repr__(self) -> str:  # never shows the token
        return f"RemoteReward(url={self.url!r}, protocol={self.protocol!r}, model={self.model!r}, kind={self.kind!r})"

    # --- RewardModel interface ---------------------------------------------------------------

    def score(self, images: torch.Tensor, prompts: list[str], condition_images=None, metadata=None) -> torch.Tensor:
        return self._score(images, prompts, condition_images, metadata)

    def score_group(self, images: torch.Tensor, prompts: list[str], condition_images=None,
                    metadata=None) -> torch.Tensor:
        return self._score(images, prompts, condition_images, metadata)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # --- transport -----------------------------------------------------------------------------

    def _score(self, images: torch.Tensor, prompts: list[str], condition_images=None, metadata=None) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: got {len(prompts)} prompts for {images.shape[0]} images")
        if images.ndim == 5:  # whole videos (video: native): per sample its PNG frames
            _check_rgb(images.flatten(0, 1), self.name)
            pngs = [encode_png(video) for video in images]
        else:
            _check_rgb(images, self.name)
            pngs = encode_png(images)
        conditions = None
        if condition_images is not None:  # each distinct source encoded once
            cache: dict[int, bytes] = {}
            for row in condition_images:
                for im in row:
                    if id(im) not in cache:
                        cache[id(im)] = encode_pil_png(im)
            conditions = [[cache[id(im)] for im in row] for row in condition_images]
        if self.protocol == "v2":
            body, headers = v2_request(pngs, list(prompts), conditions, metadata)
            response = self._post(f"/v2/models/{self._model_name()}/infer", body, headers)
            parse = self._v2_scores
        else:
            b64 = lambda x: base64.b64encode(x).decode("ascii")  # noqa: E731
            videos = images.ndim == 5
            payload = {"prompt": list(prompts), "image": None if videos else [b64(p) for p in pngs],
                       "video": [[b64(f) for f in video] for video in pngs] if videos else None,
                       "condition_images": None if conditions is None else [[b64(x) for x in row] for row in conditions],
                       "condition_videos": None}
            if metadata is not None:
                payload["kwargs"] = {"metadata": [json.dumps(m, sort_keys=True) for m in metadata]}
            response = self._post("/compute", json.dumps(payload).encode(), {"Content-Type": "application/json"})
            parse = _compute_scores
        try:
            scores = parse(response)
        except (ValueError, KeyError, TypeError) as e:
            raise RemoteRewardError(f"reward server at {response.request.url} sent an unreadable answer: {e}") from None
        if len(scores) != len(prompts):
            raise RemoteRewardError(
                f"reward server at {response.request.url} returned {len(scores)} scores for {len(prompts)} samples")
        return torch.tensor(scores, dtype=torch.float32)

    def _http(self) -> httpx.Client:
        if self._client is None:
            headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
            self._client = httpx.Client(timeout=self._timeout, headers=headers)
        return self._client

    def _model_name(self) -> str:
        """``model``, or the server's only model (asked once with the v2 repository index)."""
        if self.model is None:
            index = self._post("/v2/repository/index", b"{}", {"Content-Type": "application/json"}).json()
            names = [entry["name"] for entry in index]
            if len(names) != 1:
                raise RemoteRewardError(
                    f"reward server at {self.url} serves {len(names)} models ({', '.join(names)}); "
                    f"set the remote reward's 'model' option to one of them")
            self.model = names[0]
        return self.model

    def _v2_scores(self, response: httpx.Response) -> list[float]:
        """The scores of a v2 answer, after checking the kind of model that gave them.

        A server whose model compares a request's samples as one group (pairwise / groupwise: the
        response's ``parameters.kind``) needs ``kind: groupwise`` here, or each batch of ``batch_size``
        samples from several prompt groups is compared as one group. A server that does not say is trusted."""
        head = v2_head(response)
        params = head.get("parameters") if isinstance(head, dict) else None
        served = params.get("kind") if isinstance(params, dict) else None
        if self.kind == "pointwise" and served in ("pairwise", "groupwise"):
            raise RemoteRewardError(
                f"{self.name}: the server's model is {served} (it compares the samples of one request as a "
                f"group), but this remote reward sends batches of batch_size samples across prompt groups "
                f"(kind: pointwise), so its scores would compare other prompts' images. Fix: set the remote "
                f"reward's kind: groupwise (one request per prompt group).")
        return v2_scores(response, head)

    def _post(self, path: str, content: bytes, headers: dict[str, str]) -> httpx.Response:
        """POST with retries on connection errors, timeouts, 429 and 5xx; raise after the last try."""
        return post_with_retries(self._http(), self.url + path, content, headers, self.retries, self.backoff)


def post_with_retries(client: httpx.Client, url: str, content: bytes, headers: dict[str, str], retries: int,
                      backoff: float, what: str = "reward server",
                      token_hint: str = "the remote reward's 'token' or FLOWRL_API_TOKEN") -> httpx.Response:
    """POST ``content`` to ``url``; connection errors, timeouts, 429 and 5xx are retried ``retries``
    times with exponential backoff from ``backoff`` seconds (at least the server's Retry-After,
    at most 60 s), each retry logged. Raises :class:`RemoteRewardError`: at once on another 4xx
    (not retryable), after the last attempt otherwise (retryable). ``what`` names the server in
    messages; ``token_hint`` says where a token goes when the answer is 401."""
    attempts = retries + 1
    for attempt in range(1, attempts + 1):
        retry_after = 0.0
        try:
            response = client.post(url, content=content, headers=headers)
        except httpx.TransportError as e:  # connect/read/write errors and timeouts
            cause = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        else:
            if response.status_code < 400:
                return response
            cause = f"HTTP {response.status_code}: {_error_text(response)}"
            if response.status_code < 500 and response.status_code != 429:
                hint = f" (set {token_hint})" if response.status_code == 401 else ""
                raise RemoteRewardError(f"{what} at {url} refused the request: {cause}{hint}")
            retry_after = _seconds(response.headers.get("Retry-After"))
        if attempt == attempts:
            break
        delay = min(max(backoff * 2 ** (attempt - 1), retry_after), MAX_BACKOFF)
        log.warning("%s: attempt %d/%d to %s failed (%s); retrying in %.2f s",
                    what, attempt, attempts, url, cause, delay)
        time.sleep(delay)
    raise RemoteRewardError(f"{what} at {url} failed after {attempts} attempt(s); last error: {cause}",
                            retryable=True)


def _compute_scores(response: httpx.Response) -> list[float]:
    body = response.json()
    if "error" in body:
        raise RemoteRewardError(f"reward server at {response.request.url} answered an error: {body['error']}")
    return [float(x) for x in body["rewards"]]


def _seconds(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0
