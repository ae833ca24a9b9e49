"""Fuzz the reward server: schemathesis over its OpenAPI document, plus mutated image bytes.

Bounded: a fixed number of derandomized examples per operation (deterministic, ~20 s on two
cores), against the real server under uvicorn (tests/services/live_server.py) with weight-free
rewards (pointwise ``brightness``, pairwise ``pairwise_brightness``), a bearer token and small
size limits, so oversized bodies and images are part of what gets generated. The property:
no answer is a 5xx (a 5xx here means an input reached code that did not expect it).
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode

from services.reward import RewardServerSettings, create_app
from tests.services.live_server import running_server

pytestmark = pytest.mark.integration

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODELS = ["brightness", "pairwise_brightness"]
EXAMPLES = 25  # per operation and generation mode
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck), print_blob=True)


def _settings() -> RewardServerSettings:
    return RewardServerSettings(rewards=",".join(MODELS), token=TOKEN, max_batch_size=8,
                                max_request_bytes=64 * 1024, max_image_pixels=64 * 64)


@pytest.fixture(scope="module")
def server():
    with running_server(_settings()) as url:
        yield url


def _document(url: str) -> dict:
    """The served OpenAPI document, with path parameters pinned to served names (so most
    examples reach the parsers and the batcher instead of a 404)."""
    r = httpx.get(f"{url}/openapi.json", headers=AUTH)
    assert r.status_code == 200, r.text
    doc = r.json()
    for ops in doc["paths"].values():
        for op in ops.values():
            for p in op.get("parameters", []):
                if p["in"] == "path" and p["name"] == "name":
                    p["schema"] = {"type": "string", "enum": MODELS + ["unknown"]}
                if p["in"] == "path" and p["name"] == "version":
                    p["schema"] = {"type": "string", "enum": ["1", "2"]}
    return doc


def test_openapi_document_needs_the_token_and_describes_the_bodies(server):
    assert httpx.get(f"{server}/openapi.json").status_code == 401
    doc = _document(server)
    infer = doc["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]
    assert set(infer) == {"application/json", "application/octet-stream"}
    assert infer["application/json"]["schema"]["required"] == ["inputs"]
    compute = doc["paths"]["/compute"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert compute["required"] == ["prompt"] and "$ref" not in json.dumps(compute)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_schemathesis_finds_no_5xx(server, mode):
    schema = schemathesis.openapi.from_dict(_document(server))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14, [op.label for op in operations]
    seen: dict[str, set[int]] = {}
    for operation in operations:
        @FUZZ
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case):
            response = case.call(base_url=server, headers=AUTH, timeout=30)
            seen.setdefault(operation.label, set()).add(response.status_code)
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}\n"
                f"reproduce: {case.as_curl_command()}")

        try:
            run()
        except Unsatisfiable:  # negative mode: an operation without parameters or body has nothing to break
            assert mode == GenerationMode.NEGATIVE and not operation.body, operation.label
    # the run reached the scoring routes' parsers, not only their 404s
    assert any(code in seen.get("POST /v2/models/{name}/infer", ()) for code in (400, 413, 422)), seen


def _png(size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@FUZZ
@given(data=st.data())
def _mutated_images(server, data):
    """A valid request whose PNG has bytes flipped, cut or appended: 200 or a 4xx, never a 5xx."""
    raw = bytearray(_png())
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(8, len(raw)))] + data.draw(st.binary(max_size=64))
    b64 = base64.b64encode(bytes(raw)).decode()
    r = httpx.post(f"{server}/v2/models/brightness/infer", headers=AUTH, timeout=30, json={"inputs": [
        {"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]},
        {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["p"]}]})
    assert r.status_code in (200, 413, 422), r.text


def test_mutated_image_bytes_get_200_or_4xx(server):
    _mutated_images(server)


@st.composite
def _valid_requests(draw):
    """A well-formed v2 request: 1-6 real PNGs (two sizes), prompts, and for the pairwise model
    optional group ids; what varies is what a reward can still refuse (groups, sizes, text)."""
    model = draw(st.sampled_from(MODELS))
    n = draw(st.integers(1, 6))
    sizes = [draw(st.sampled_from([4, 8])) for _ in range(n)]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    pngs = []
    for size in sizes:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
        pngs.append(base64.b64encode(buffer.getvalue()).decode())
    prompts = draw(st.lists(st.text(max_size=30), min_size=n, max_size=n))
    inputs = [{"name": "image", "shape": [n], "datatype": "BYTES", "data": pngs},
              {"name": "prompt", "shape": [n], "datatype": "BYTES", "data": prompts}]
    if model == "pairwise_brightness" and draw(st.booleans()):
        ids = draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n))
        inputs.append({"name": "group_id", "shape": [n], "datatype": "INT64", "data": ids})
    return model, {"inputs": inputs}


@FUZZ
@given(request=_valid_requests())
def _valid(server, request):
    model, body = request
    r = httpx.post(f"{server}/v2/models/{model}/infer", headers=AUTH, json=body, timeout=30)
    assert r.status_code in (200, 422), r.text
    if r.status_code == 200:
        assert len(r.json()["outputs"][0]["data"]) == len(body["inputs"][0]["data"])


def test_well_formed_requests_get_scores_or_422(server):
    _valid(server)


def test_inputs_the_fuzzing_found_are_4xx(server):
    """Each of these answered 500 before: JSON nested past the recursion limit (both protocols),
    v2 data nested deeper than [B, 1], a group id beyond INT64, a pairwise group of one (NaN)."""
    infer = f"{server}/v2/models/brightness/infer"
    deep = b"[" * 20_000 + b"]" * 20_000  # 40 kB: under max_request_bytes, far past the recursion limit
    for url, body in ((infer, deep), (f"{server}/compute", b'{"prompt": ' + deep + b"}")):
        r = httpx.post(url, headers=AUTH, content=body)
        assert r.status_code == 400 and "nested too deeply" in r.json()["error"]
    pngs = [base64.b64encode(_png()).decode()] * 2
    nested = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [[[pngs[0]]]]},
                         {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["p"]}]}
    r = httpx.post(infer, headers=AUTH, json=nested)
    assert r.status_code == 422 and "nested more than two lists deep" in r.json()["error"]
    pair = f"{server}/v2/models/pairwise_brightness/infer"
    for ids, message in (([2**70, 1], "fit INT64"), ([0, 1], "group 0 has one member")):
        body = {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": pngs},
                           {"name": "prompt", "shape": [2], "datatype": "BYTES", "data": ["p", "q"]},
                           {"name": "group_id", "shape": [2], "datatype": "INT64", "data": ids}]}
        r = httpx.post(pair, headers=AUTH, json=body)
        assert r.status_code == 422 and message in r.json()["error"], r.text


def test_metadata_nested_past_the_recursion_limit_and_text_flags(server):
    """Row metadata nested past Python's recursion limit is a 422 (it was a 500, on every reward, since
    /compute reads kwargs.metadata for all of them); a flag given as text means what it says ("false"
    returned binary output) and a flag that is neither true nor false is a 422."""
    png = base64.b64encode(_png()).decode()
    deep = "[" * 20_000 + "]" * 20_000  # 40 kB: under the fixture's max_request_bytes
    r = httpx.post(f"{server}/compute", headers=AUTH, json={"prompt": ["p"], "image": [png], "kwargs": {"metadata": [deep]}})
    assert r.status_code == 422 and "nested too deeply" in r.json()["error"], r.text
    infer = f"{server}/v2/models/brightness/infer"
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [png]},
                       {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["p"]}]}
    r = httpx.post(infer, headers=AUTH, json=body | {"parameters": {"binary_data_output": "false"}})
    assert r.status_code == 200 and "data" in r.json()["outputs"][0]
    r = httpx.post(infer, headers=AUTH, json=body | {"parameters": {"binary_data_output": "yes"}})
    assert r.status_code == 422 and "must be true or false, got 'yes'" in r.json()["error"]


def test_16_bit_images_are_scaled_not_clipped(server):
    """A 16-bit grayscale PNG (PIL mode I;16) at mid-gray scores as mid-gray (PIL's convert clipped it
    to white: brightness 1.0)."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(buffer, format="PNG")
    r = httpx.post(f"{server}/compute", headers=AUTH,
                   json={"prompt": ["p"], "image": [base64.b64encode(buffer.getvalue()).decode()]})
    assert r.status_code == 200 and abs(r.json()["rewards"][0] - 128 / 255) < 1e-3, r.text


def test_schema_of_a_fresh_app_matches_the_served_one():
    """The document comes from the app, not from a file that could drift."""
    app = create_app(_settings())
    assert "/v2/models/{name}/infer" in app.openapi()["paths"]


def test_encodings_and_image_formats_the_server_does_not_take(server):
    """Unsupported Content-Encoding -> 415; broken gzip -> 400; a GIF (not PNG/JPEG/WEBP/BMP) -> 422."""
    import gzip

    body = json.dumps({"prompt": ["p"], "image": [base64.b64encode(_png()).decode()]}).encode()
    url = f"{server}/compute"
    r = httpx.post(url, headers=AUTH | {"Content-Encoding": "br"}, content=body)
    assert r.status_code == 415 and "use gzip, deflate or none" in r.json()["error"]
    for broken, message in ((gzip.compress(body)[:-12], "truncated"), (b"\x1f\x8b" + b"x" * 20, "not valid gzip")):
        r = httpx.post(url, headers=AUTH | {"Content-Encoding": "gzip"}, content=broken)
        assert r.status_code == 400 and message in r.json()["error"], r.text
    gif = "R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw=="
    r = httpx.post(url, headers=AUTH, json={"prompt": ["p"], "image": [gif]})
    assert r.status_code == 422 and "not a PNG/JPEG/WEBP/BMP file (first bytes b'GIF89a" in r.json()["error"]
