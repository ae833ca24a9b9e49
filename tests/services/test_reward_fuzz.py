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


def test_schema_of_a_fresh_app_matches_the_served_one():
    """The document comes from the app, not from a file that could drift."""
    app = create_app(_settings())
    assert "/v2/models/{name}/infer" in app.openapi()["paths"]
