"""Open Inference Protocol v2 (KServe / Triton) for reward models: wire models and codecs.

A served reward is a v2 model named after the reward, version ``"1"``:

* inputs, in this order:
    1. ``image``: BYTES ``[B]`` (or ``[B, 1]``), each element an encoded image file (PNG/JPEG);
       raw bytes in the binary tensor extension, base64 text in JSON ``data``;
    2. ``prompt``: BYTES ``[B]``, UTF-8 text;
    3. ``group_id``: INT64 ``[B]``, only for groupwise/pairwise rewards and optional: samples with
       the same id form one group (compared with each other); without it the whole request is
       one group. Send every member of a group in the same request.
       Videos instead: ``video``: BYTES ``[B, F]``, row ``i`` sample ``i``'s ``F`` encoded frames (one
       size per video). A reward that scores whole videos (``RewardModel.video == "native"``) takes
       only ``video``; an image reward takes either (a video's score = the mean over its frames).
    4. ``condition_images``: BYTES ``[B, M]``, only for rewards that compare an image with its
       condition (source) images (``RewardModel.condition_images``), and required by them: row
       ``i`` holds sample ``i``'s ``M`` encoded source images (edit / image-to-video models).
    5. ``metadata``: BYTES ``[B]``, only for rewards that read dataset row metadata
       (``RewardModel.metadata``, e.g. ``geneval``) and optional for them: element ``i`` is sample
       ``i``'s metadata as a JSON object's UTF-8 text (an empty element = ``{}``).
* output ``score``: FP32 ``[B]``, aligned with the inputs.

Binary tensor extension (what ``tritonclient.http`` sends by default): the body is the JSON
header, then each binary input's raw bytes in input order; the header length is in the
``Inference-Header-Content-Length`` HTTP header and each binary input has
``parameters.binary_data_size``. BYTES elements are a 4-byte little-endian length followed by
the payload. Outputs come back binary when the request asks (``parameters.binary_data_output``
or the output's ``parameters.binary_data``), as raw little-endian float32.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from services.reward.errors import RequestError, parse_json

HEADER_LENGTH = "Inference-Header-Content-Length"
IMAGE, PROMPT, GROUP_ID, SCORE = "image", "prompt", "group_id", "score"
CONDITION_IMAGES, VIDEO, METADATA = "condition_images", "video", "metadata"
VERSION = "1"


class InferInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = None


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferInput]
    outputs: list[RequestedOutput] | None = None


@dataclass
class Inputs:
    """A parsed infer request: per-sample elements, not yet decoded into images."""

    images: list[bytes | str]
    prompts: list[str]
    group_ids: list[int] | None
    request_id: str | None
    binary_output: bool
    condition_images: list[list[bytes | str]] | None = None  # [B][M] encoded source images
    videos: list[list[bytes | str]] | None = None  # [B][F] encoded frames (then ``images`` is empty)
    metadata: list[dict] | None = None  # [B] row metadata, for rewards that read it


def model_metadata(name: str, kind: str, reward_model: str, conditions: bool = False,
                   video: bool = False, metadata: bool = False) -> dict[str, Any]:
    """The ``GET /v2/models/{name}`` body. ``parameters`` (kind, reward_model) is our addition;
    ``conditions``: the reward reads condition images (input ``condition_images``); ``video``: it
    scores whole videos (input ``video`` in place of ``image``)."""
    inputs = [
        {"name": VIDEO, "datatype": "BYTES", "shape": [-1, -1]} if video else {"name": IMAGE, "datatype": "BYTES", "shape": [-1]},
        {"name": PROMPT, "datatype": "BYTES", "shape": [-1]},
    ]
    if kind != "pointwise":
        inputs.append({"name": GROUP_ID, "datatype": "INT64", "shape": [-1]})
    if conditions:
        inputs.append({"name": CONDITION_IMAGES, "datatype": "BYTES", "shape": [-1, -1]})
    if metadata:
        inputs.append({"name": METADATA, "datatype": "BYTES", "shape": [-1], "optional": True})
    return {
        "name": name,
        "versions": [VERSION],
        "platform": "flowrl_reward",
        "inputs": inputs,
        "outputs": [{"name": SCORE, "datatype": "FP32", "shape": [-1]}],
        "parameters": {"kind": kind, "reward_model": reward_model},
    }


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    try:
        n = int(header_length)
    except ValueError:
        raise RequestError(400, f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
    if not 0 < n <= len(body):
        raise RequestError(400, f"{HEADER_LENGTH} is {n} but the body has {len(body)} bytes")
    return body[:n], memoryview(body)[n:]


def parse_request(body: bytes, header_length: str | None) -> tuple[InferRequest, memoryview]:
    """The JSON header as an :class:`InferRequest`, and the binary tail (possibly empty)."""
    head, tail = _split_body(body, header_length)
    raw = parse_json(head, "" if header_length else f" (binary tensor data needs the {HEADER_LENGTH} header)")
    try:
        return InferRequest.model_validate(raw), tail
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors())
        raise RequestError(
            422, f"not a v2 inference request ({problems}); expected {{'inputs': [{{'name', 'shape', 'datatype', 'data'}}]}}"
        ) from None


def _flatten(data: Any, where: str) -> list[Any]:
    """``data`` as a flat list (row-major). Shapes are ``[B]`` or ``[B, 1]``, so lists nested
    more than two deep are refused (and never recursed into)."""
    out: list[Any] = []
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, list):
            out.append(item)
        elif depth >= 2:
            raise RequestError(422, f"{where}: 'data' is nested more than two lists deep; send [B] or [[x], ...] ([B, 1])")
        else:
            stack.extend((x, depth + 1) for x in reversed(item))
    return out


def _deserialize_bytes(raw: memoryview, count: int, where: str) -> list[bytes]:
    """Triton's BYTES serialization: ``count`` times (uint32 LE length, payload)."""
    out, pos = [], 0
    for i in range(count):
        if pos + 4 > len(raw):
            raise RequestError(400, f"{where}: binary data ends before element {i} of {count}")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise RequestError(400, f"{where}: element {i} claims {n} bytes but only {len(raw) - pos} remain")
        out.append(bytes(raw[pos : pos + n]))
        pos += n
    if pos != len(raw):
        raise RequestError(400, f"{where}: {len(raw) - pos} bytes left over after {count} BYTES elements")
    return out


def _count(shape: list[int], where: str, matrix: bool = False) -> int:
    """Elements of a ``[B]`` / ``[B, 1]`` input (``matrix``: any ``[B, M]``, M >= 1)."""
    if matrix:
        if len(shape) != 2 or shape[0] < 0 or shape[1] < 1:
            raise RequestError(422, f"{where}: shape must be [B, M] (M >= 1 images per sample), got {shape}")
        return shape[0] * shape[1]
    if any(d < 0 for d in shape) or not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise RequestError(422, f"{where}: shape must be [B] (or [B, 1]), got {shape}")
    return shape[0]


def _elements(inp: InferInput, tail: memoryview, offset: int) -> tuple[list[Any], int]:
    """The flat elements of one input and the new offset into the binary tail."""
    where = f"input '{inp.name}'"
    count = _count(inp.shape, where, matrix=inp.name in (CONDITION_IMAGES, VIDEO))
    params = inp.parameters or {}
    if "shared_memory_region" in params:
        raise RequestError(422, f"{where}: shared memory is not supported; send the data in the request")
    size = params.get("binary_data_size")
    if size is not None:
        if inp.data is not None:
            raise RequestError(422, f"{where} has both 'data' and parameters.binary_data_size; send one")
        if not isinstance(size, int) or size < 0 or offset + size > len(tail):
            raise RequestError(
                400, f"{where}: binary_data_size {size!r} does not fit the {len(tail) - offset} binary bytes left"
            )
        raw = tail[offset : offset + size]
        if inp.datatype == "BYTES":
            return _deserialize_bytes(raw, count, where), offset + size
        if inp.datatype == "INT64":
            if size != 8 * count:
                raise RequestError(400, f"{where}: {size} binary bytes for {count} INT64 elements (need {8 * count})")
            return np.frombuffer(raw, dtype="<i8").tolist(), offset + size
        raise RequestError(422, f"{where}: binary data is supported for BYTES and INT64 only, got {inp.datatype}")
    if inp.data is None:
        raise RequestError(422, f"{where} has no 'data' (and no parameters.binary_data_size)")
    flat = _flatten(inp.data, where)
    if len(flat) != count:
        raise RequestError(422, f"{where}: shape {inp.shape} means {count} elements but data has {len(flat)}")
    return flat, offset


def _expect(inp: InferInput, datatype: str) -> None:
    if inp.datatype != datatype:
        raise RequestError(422, f"input '{inp.name}' must have datatype {datatype}, got {inp.datatype}")


def read_inputs(req: InferRequest, tail: memoryview, kind: str, conditions: bool = False,
                video: bool = False, metadata: bool = False) -> Inputs:
    """Check the inputs against the model's signature and return them per sample (``conditions``:
    the model reads condition images, input ``condition_images`` ``[B, M]``; ``video``: it scores
    whole videos, input ``video`` ``[B, F]`` only; ``metadata``: it reads row metadata, optional
    input ``metadata`` ``[B]``).

    Raises:
        RequestError: 400 for broken binary framing, 422 for anything else invalid; the message
            names the input and what was expected.
    """
    media = [VIDEO] if video else [IMAGE, VIDEO]
    accepted = (media + [PROMPT] + ([GROUP_ID] if kind != "pointwise" else [])
                + ([CONDITION_IMAGES] if conditions else []) + ([METADATA] if metadata else []))
    signature = ((f"{VIDEO} (BYTES [B, F])" if video else f"{IMAGE} (BYTES) or {VIDEO} (BYTES [B, F])")
                 + f", {PROMPT} (BYTES)" + (f", optional {GROUP_ID} (INT64)" if kind != "pointwise" else "")
                 + (f", {CONDITION_IMAGES} (BYTES [B, M])" if conditions else "")
                 + (f", optional {METADATA} (BYTES, JSON objects)" if metadata else ""))
    by_name: dict[str, list[Any]] = {}
    offset = 0
    for inp in req.inputs:
        if inp.name not in accepted:
            raise RequestError(422, f"unknown input '{inp.name}'; this model takes {signature}")
        if inp.name in by_name:
            raise RequestError(422, f"input '{inp.name}' appears twice")
        _expect(inp, "INT64" if inp.name == GROUP_ID else "BYTES")
        by_name[inp.name], offset = _elements(inp, tail, offset)
    if offset != len(tail):
        raise RequestError(400, f"{len(tail) - offset} bytes of binary data are not claimed by any input")
    if IMAGE in by_name and VIDEO in by_name:
        raise RequestError(422, f"inputs '{IMAGE}' and '{VIDEO}' both given; send one; this model takes {signature}")
    medium = VIDEO if VIDEO in by_name else IMAGE
    for required in (medium, PROMPT) + ((CONDITION_IMAGES,) if conditions else ()):
        if required not in by_name:
            raise RequestError(422, f"missing input '{required}'; this model takes {signature}")
    prompts = [_text(p, i) for i, p in enumerate(by_name[PROMPT])]
    images, videos = (by_name[IMAGE], None) if medium == IMAGE else ([], _encoded_rows(req, by_name, VIDEO))
    if any(not isinstance(x, (str, bytes)) for x in images):
        raise RequestError(422, f"input '{IMAGE}': elements must be strings (base64 of an encoded image)")
    group_ids = by_name.get(GROUP_ID)
    if group_ids is not None and any(isinstance(g, bool) or not isinstance(g, int) or not -2**63 <= g < 2**63
                                     for g in group_ids):
        raise RequestError(422, f"input '{GROUP_ID}': elements must be integers that fit INT64")
    lengths = ({medium: len(videos if videos is not None else images), PROMPT: len(prompts)}
               | ({GROUP_ID: len(group_ids)} if group_ids is not None else {}))
    rows = _encoded_rows(req, by_name, CONDITION_IMAGES) if conditions else None
    if rows is not None:
        lengths[CONDITION_IMAGES] = len(rows)
    meta = [json_object(x, f"input '{METADATA}' element {i}") for i, x in enumerate(by_name[METADATA])] \
        if METADATA in by_name else None
    if meta is not None:
        lengths[METADATA] = len(meta)
    if len(set(lengths.values())) > 1:
        raise RequestError(422, "inputs have different batch sizes: " + ", ".join(f"{k} {v}" for k, v in lengths.items()))
    return Inputs(images, prompts, group_ids, req.id, _binary_output(req), rows, videos, meta)


def json_object(value: Any, where: str) -> dict:
    """One sample's row metadata: a JSON object's text (bytes or str; empty = ``{}``) or a dict."""
    if isinstance(value, dict):
        return value
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(422, f"{where} is not UTF-8 text") from None
    if not isinstance(value, str):
        raise RequestError(422, f"{where} must be a JSON object's text, got {type(value).__name__}")
    if not value.strip():
        return {}
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as e:
        raise RequestError(422, f"{where} is not valid JSON ({e.msg}); send one JSON object per sample") from None
    except RecursionError:
        raise RequestError(422, f"{where} is nested too deeply to read; send a flat JSON object per sample") from None
    if not isinstance(obj, dict):
        raise RequestError(422, f"{where} must be a JSON object, got {type(obj).__name__}")
    return obj


def _encoded_rows(req: InferRequest, by_name: dict[str, list[Any]], name: str) -> list[list[bytes | str]]:
    """The ``[B, M]`` input ``name`` (``video`` frames, ``condition_images``) as ``B`` rows of ``M``
    encoded images (each raw bytes or base64 text)."""
    flat = by_name[name]
    if any(not isinstance(x, (str, bytes)) for x in flat):
        raise RequestError(422, f"input '{name}': elements must be strings (base64 of an encoded image)")
    b, m = next(i.shape for i in req.inputs if i.name == name)
    return [flat[i * m:(i + 1) * m] for i in range(b)]


def _text(value: Any, index: int) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(422, f"input '{PROMPT}' element {index} is not UTF-8 text") from None
    if not isinstance(value, str):
        raise RequestError(422, f"input '{PROMPT}' element {index} must be a string, got {type(value).__name__}")
    return value


def _flag(value: Any, where: str) -> bool:
    """A boolean request parameter: JSON true / false (or their text, any case); anything else is refused
    (``bool("false")`` is True)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise RequestError(422, f"{where} must be true or false, got {value!r}")


def _binary_output(req: InferRequest) -> bool:
    binary = _flag((req.parameters or {}).get("binary_data_output", False), "parameter 'binary_data_output'")
    for out in req.outputs or []:
        if out.name != SCORE:
            raise RequestError(422, f"unknown output '{out.name}'; this model has one output, '{SCORE}' (FP32)")
        if out.parameters and "binary_data" in out.parameters:
            binary = _flag(out.parameters["binary_data"], f"output '{SCORE}' parameter 'binary_data'")
    return binary


def infer_response(model_name: str, inputs: Inputs, scores: np.ndarray,
                   kind: str = "pointwise") -> tuple[bytes, dict[str, str], str]:
    """``(body, headers, media_type)`` of the infer response for ``scores`` ``[B]`` float32. Its
    ``parameters.kind`` (our addition, as in the model metadata) lets a client tell that a pairwise or
    groupwise model compared the request's samples as one group."""
    scores = np.asarray(scores, dtype="<f4")
    output: dict[str, Any] = {"name": SCORE, "datatype": "FP32", "shape": [int(scores.shape[0])]}
    body: dict[str, Any] = {"model_name": model_name, "model_version": VERSION, "parameters": {"kind": kind}}
    if inputs.request_id is not None:
        body["id"] = inputs.request_id
    body["outputs"] = [output]
    if not inputs.binary_output:
        # no inf (the batcher rejects it); NaN, a reward abstaining on a sample, is JSON null
        output["data"] = [None if math.isnan(s) else float(s) for s in scores]
        return json.dumps(body).encode(), {}, "application/json"
    raw = scores.tobytes()
    output["parameters"] = {"binary_data_size": len(raw)}
    head = json.dumps(body).encode()
    return head + raw, {HEADER_LENGTH: str(len(head))}, "application/octet-stream"
