"""The reward server: settings, v2 + Flow-Factory protocols, batching, auth, limits, metrics.

Unit-level checks use FastAPI's TestClient (lifespan included); the ``integration`` ones run
the real server under uvicorn (tests/services/live_server.py) and talk to it with the real
``tritonclient.http`` client, httpx, and the ``flowrl`` CLI in a subprocess.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from services.reward import RewardServerSettings, create_app
from services.reward.batching import DynamicBatcher
from services.reward.errors import RequestError
from services.reward.metrics import Metrics
from shared.registry import RegistryError
from shared.rewards import build_reward, score_all
from tests.services.live_server import running_server
from tests.services.reward_models import CountingBrightness, SlowLoading

ROOT = Path(__file__).resolve().parents[2]
TOY_PROMPTS = ["a photo of a red circle", "a photo of a blue square", "a photo of two triangles"]
M = "tests.services.reward_models"


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_server_env(monkeypatch):
    """Settings come from the test, not from a developer's FLOWRL_* environment."""
    for key in [k for k in os.environ if k.startswith("FLOWRL_REWARD_")] + ["FLOWRL_API_TOKEN"]:
        monkeypatch.delenv(key, raising=False)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def sample(n: int, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, list[bytes]]:
    """``n`` random uint8 images as (float [n,3,H,W] exactly as the server decodes them, PNG files)."""
    arrays = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div(255.0).contiguous(), [png(a) for a in arrays]


def local(name: str, images: torch.Tensor, prompts: list[str], group_ids=None) -> torch.Tensor:
    group_ids = torch.zeros(len(prompts), dtype=torch.int64) if group_ids is None else torch.tensor(group_ids)
    return score_all(build_reward(name), images, prompts, group_ids, batch_size=4)


def v2_body(pngs: list[bytes], prompts: list[str], group_ids: list[int] | None = None) -> dict:
    inputs = [
        {"name": "image", "shape": [len(pngs)], "datatype": "BYTES", "data": [base64.b64encode(p).decode() for p in pngs]},
        {"name": "prompt", "shape": [len(prompts)], "datatype": "BYTES", "data": prompts},
    ]
    if group_ids is not None:
        inputs.append({"name": "group_id", "shape": [len(group_ids)], "datatype": "INT64", "data": group_ids})
    return {"inputs": inputs}


def scores_of(response: httpx.Response) -> torch.Tensor:
    assert response.status_code == 200, response.text
    (out,) = response.json()["outputs"]
    assert out["name"] == "score" and out["datatype"] == "FP32" and out["shape"] == [len(out["data"])]
    return torch.tensor(out["data"], dtype=torch.float32)


def wait_ready(c: TestClient, path: str = "/v2/health/ready", **kw) -> None:
    deadline = time.monotonic() + 30
    while c.get(path, **kw).status_code != 200:
        assert time.monotonic() < deadline, f"{path} never became ready"
        time.sleep(0.01)


@contextmanager
def client(**settings):
    with TestClient(create_app(RewardServerSettings(**settings))) as c:
        wait_ready(c, headers=_auth(settings.get("token")))
        yield c


def _auth(token: str | None) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


def metric_samples(text: str) -> dict[str, list]:
    """``{sample name: [(labels, value), ...]}`` from the Prometheus text format (strict parser)."""
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


# --- settings and startup ----------------------------------------------------------------------


def test_settings_defaults_env_and_validation(monkeypatch):
    s = RewardServerSettings(rewards="brightness, toy_geneval")
    assert s.host == "127.0.0.1" and s.port == 8000 and s.token is None
    assert [r.label for r in s.rewards] == ["brightness", "toy_geneval"]
    monkeypatch.setenv("FLOWRL_REWARD_REWARDS", '[{"name": "bright", "reward_model": "brightness", "target": 0.5}]')
    monkeypatch.setenv("FLOWRL_REWARD_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("FLOWRL_API_TOKEN", "s3cret")
    s = RewardServerSettings()
    assert s.rewards[0].label == "bright" and s.rewards[0].options == {"target": 0.5}
    assert s.max_batch_size == 7 and s.token.get_secret_value() == "s3cret" and "s3cret" not in repr(s)
    with pytest.raises(ValueError, match="served twice"):
        RewardServerSettings(rewards="brightness,brightness")
    with pytest.raises(ValueError, match="max_batch_size"):
        RewardServerSettings(rewards="brightness", max_batch_size=0)


def test_unknown_reward_fails_when_the_app_is_built():
    with pytest.raises(RegistryError, match="Did you mean 'brightness'"):
        create_app(RewardServerSettings(rewards="brightnes"))


def test_ready_only_after_every_model_loaded_live_meanwhile():
    SlowLoading.gate.clear()
    app = create_app(RewardServerSettings(rewards=f"brightness,{M}.SlowLoading"))
    with TestClient(app) as c:
        assert c.get("/v2/health/live").json() == {"live": True}
        r = c.get("/v2/health/ready")
        assert r.status_code == 503 and r.json() == {"ready": False}
        slow = f"{M}.SlowLoading"
        assert c.get(f"/v2/models/{slow}/ready").status_code == 503
        r = c.post(f"/v2/models/{slow}/infer", json=v2_body(*_one()))
        assert r.status_code == 503 and "still loading" in r.json()["error"] and r.headers["Retry-After"] == "1"
        assert c.get("/health").status_code == 200  # /health speaks for the first reward (loaded)
        SlowLoading.gate.set()
        wait_ready(c)
        assert c.get(f"/v2/models/{slow}/ready").json() == {"name": slow, "ready": True}


def _one() -> tuple[list[bytes], list[str]]:
    return sample(1)[1], ["p"]


def test_failed_load_keeps_server_unready_and_says_why():
    with TestClient(create_app(RewardServerSettings(rewards=f"{M}.FailsToLoad"))) as c:
        name = f"{M}.FailsToLoad"
        deadline = time.monotonic() + 10
        while c.post("/v2/repository/index").json()[0]["state"] == "LOADING":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        (entry,) = c.post("/v2/repository/index").json()
        assert entry["state"] == "UNAVAILABLE" and "missing.safetensors" in entry["reason"]
        assert c.get("/v2/health/ready").status_code == 503
        r = c.post(f"/v2/models/{name}/infer", json=v2_body(*_one()))
        assert r.status_code == 503 and "failed to load" in r.json()["error"]


# --- v2 protocol -------------------------------------------------------------------------------


def test_v2_metadata_lists_image_first_then_prompt():
    with client(rewards="brightness,pairwise_brightness") as c:
        meta = c.get("/v2/models/brightness").json()
        assert meta["name"] == "brightness" and meta["platform"] == "flowrl_reward" and meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                                  {"name": "prompt", "datatype": "BYTES", "shape": [-1]}]
        assert meta["outputs"] == [{"name": "score", "datatype": "FP32", "shape": [-1]}]
        pair = c.get("/v2/models/pairwise_brightness/versions/1").json()
        assert [i["name"] for i in pair["inputs"]] == ["image", "prompt", "group_id"]
        assert pair["inputs"][2]["datatype"] == "INT64" and pair["parameters"]["kind"] == "pairwise"
        assert c.get("/v2/models/brightness/versions/2").status_code == 404
        r = c.get("/v2/models/nope")
        assert r.status_code == 404 and "serves: brightness, pairwise_brightness" in r.json()["error"]
        assert c.get("/v2").json()["extensions"] == ["binary_tensor_data", "model_repository"]


def test_v2_json_infer_equals_local_scores():
    images, pngs = sample(5, size=12)
    with client(rewards="brightness,toy_geneval", max_batch_size=2) as c:
        got = scores_of(c.post("/v2/models/brightness/infer", json=v2_body(pngs, ["p"] * 5) | {"id": "req-7"}))
        assert torch.equal(got, local("brightness", images, ["p"] * 5))
        r = c.post("/v2/models/brightness/infer", json=v2_body(pngs, ["p"] * 5))
        assert "id" not in r.json()
        assert c.post("/v2/models/brightness/infer", json=v2_body(pngs, ["p"] * 5) | {"id": "x"}).json()["id"] == "x"
        toy = scores_of(c.post("/v2/models/toy_geneval/infer", json=v2_body(pngs[:3], TOY_PROMPTS)))
        assert torch.equal(toy, local("toy_geneval", images[:3], TOY_PROMPTS))


def test_v2_nested_shape_b_by_1_and_data_uri_base64():
    images, pngs = sample(2)
    body = v2_body(pngs, ["a", "b"])
    body["inputs"][0] |= {"shape": [2, 1], "data": [[f"data:image/png;base64,{base64.b64encode(p).decode()}"] for p in pngs]}
    with client(rewards="brightness") as c:
        assert torch.equal(scores_of(c.post("/v2/models/brightness/infer", json=body)), local("brightness", images, ["a", "b"]))


def test_v2_groupwise_uses_group_ids_or_one_group():
    images, pngs = sample(5, seed=3)
    prompts = ["p"] * 5
    with client(rewards="pairwise_brightness") as c:
        url = "/v2/models/pairwise_brightness/infer"
        got = scores_of(c.post(url, json=v2_body(pngs, prompts, [7, 3, 7, 3, 3])))
        assert torch.allclose(got, local("pairwise_brightness", images, prompts, [7, 3, 7, 3, 3]))
        whole = scores_of(c.post(url, json=v2_body(pngs, prompts)))
        assert torch.allclose(whole, local("pairwise_brightness", images, prompts, [0] * 5))
        assert not torch.allclose(got, whole)


def test_v2_binary_output_and_binary_inputs_by_hand():
    """The binary tensor extension as the spec writes it (tritonclient is checked separately)."""
    images, pngs = sample(3)
    prompts = ["one", "two", "three"]
    raw_images = b"".join(struct.pack("<I", len(p)) + p for p in pngs)
    raw_prompts = b"".join(struct.pack("<I", len(p.encode())) + p.encode() for p in prompts)
    head = json.dumps({"inputs": [
        {"name": "image", "shape": [3], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw_images)}},
        {"name": "prompt", "shape": [3], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw_prompts)}}],
        "parameters": {"binary_data_output": True}}).encode()
    with client(rewards="brightness") as c:
        r = c.post("/v2/models/brightness/infer", content=head + raw_images + raw_prompts,
                   headers={"Inference-Header-Content-Length": str(len(head))})
    n = int(r.headers["Inference-Header-Content-Length"])
    out = json.loads(r.content[:n])["outputs"][0]
    assert out["parameters"] == {"binary_data_size": 12} and "data" not in out
    got = torch.from_numpy(np.frombuffer(r.content[n:], dtype="<f4").copy())
    assert torch.equal(got, local("brightness", images, prompts))


def _malformed_cases():
    _, pngs = sample(2)
    good = v2_body(pngs, ["a", "b"])

    def edit(i, **kw):
        body = json.loads(json.dumps(good))
        body["inputs"][i] |= kw
        return body

    return [
        ("bad json", b"{not json", {}, 400, "not valid JSON"),
        ("no inputs key", {"input": []}, {}, 422, "not a v2 inference request"),
        ("missing prompt", {"inputs": good["inputs"][:1]}, {}, 422, "missing input 'prompt'"),
        ("unknown input", edit(1, name="text"), {}, 422, "unknown input 'text'"),
        ("wrong datatype", edit(0, datatype="FP32"), {}, 422, "input 'image' must have datatype BYTES, got FP32"),
        ("shape vs data", edit(0, shape=[3]), {}, 422, "shape [3] means 3 elements but data has 2"),
        ("bad shape", edit(0, shape=[1, 2]), {}, 422, "shape must be [B]"),
        ("lengths differ", edit(1, shape=[1], data=["a"]), {}, 422, "different batch sizes: image 2, prompt 1"),
        ("not base64", edit(0, data=["%%%", "%%%"]), {}, 422, "element 0 is neither an encoded image"),
        ("not an image", edit(0, data=[base64.b64encode(b"hello").decode()] * 2), {}, 422, "element 0 decodes from base64"),
        ("corrupt png", edit(0, data=[base64.b64encode(pngs[0][:40]).decode()] * 2), {}, 422, "element 0 could not be decoded"),
        ("number prompt", edit(1, data=[1, 2]), {}, 422, "input 'prompt' element 0 must be a string"),
        ("unknown output", good | {"outputs": [{"name": "logits"}]}, {}, 422, "unknown output 'logits'"),
        ("header length too big", b'{"inputs": []}', {"Inference-Header-Content-Length": "99"}, 400, "body has 14 bytes"),
        ("binary size too big", {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                             "parameters": {"binary_data_size": 50}}]}, "binary", 400, "does not fit"),
    ]


@pytest.mark.parametrize("case", _malformed_cases(), ids=lambda c: c[0])
def test_malformed_v2_requests_get_4xx_naming_the_problem(case):
    _, body, headers, status, message = case
    if headers == "binary":
        content = json.dumps(body).encode()
        headers = {"Inference-Header-Content-Length": str(len(content))}
    else:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with client(rewards="brightness") as c:
        r = c.post("/v2/models/brightness/infer", content=content, headers=headers)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_groupwise_group_with_two_image_sizes_is_refused():
    _, small = sample(1, size=8)
    _, big = sample(1, size=16)
    with client(rewards="pairwise_brightness") as c:
        r = c.post("/v2/models/pairwise_brightness/infer", json=v2_body(small + big, ["a", "b"], [1, 1]))
    assert r.status_code == 422 and "group 1 mixes image sizes 8x8 and 16x16" in r.json()["error"]


def test_pointwise_mixed_image_sizes_are_scored_per_size():
    small_images, small = sample(2, size=8)
    big_images, big = sample(2, size=16, seed=1)
    with client(rewards="brightness") as c:
        got = scores_of(c.post("/v2/models/brightness/infer", json=v2_body([small[0], big[0], small[1], big[1]], ["p"] * 4)))
    want = torch.stack([local("brightness", small_images, ["p"] * 2), local("brightness", big_images, ["p"] * 2)], 1)
    assert torch.equal(got, want.flatten())


def test_non_finite_scores_and_model_errors_name_reward_and_sample():
    _, pngs = sample(3)
    with client(rewards=f"{M}.BadAt,{M}.Crashes,toy_geneval") as c:
        r = c.post(f"/v2/models/{M}.BadAt/infer", json=v2_body(pngs, ["ok", "inf", "ok"]))
        assert r.status_code == 500, r.text
        assert f"reward '{M}.BadAt'" in r.json()["error"] and "sample 1" in r.json()["error"]
        # NaN is the reward contract's abstention: JSON null over v2 (FP32 NaN when binary); /compute
        # (Flow-Factory's protocol, a list of floats) has no way to say it
        r = c.post(f"/v2/models/{M}.BadAt/infer", json=v2_body(pngs, ["ok", "nan", "ok"]))
        assert r.status_code == 200 and r.json()["outputs"][0]["data"][1] is None, r.text
        assert r.json()["parameters"] == {"kind": "pointwise"}
        r = c.post(f"/rewards/{M}.BadAt/compute",
                   json={"prompt": ["ok", "nan", "ok"], "image": [base64.b64encode(p).decode() for p in pngs]})
        assert r.status_code == 500 and "travels over the v2 protocol only" in r.json()["error"], r.text
        r = c.post(f"/v2/models/{M}.Crashes/infer", json=v2_body(pngs, ["a"] * 3))
        assert r.status_code == 500 and "device-side assert" in r.json()["error"]
        r = c.post("/v2/models/toy_geneval/infer", json=v2_body(pngs[:1], ["not a toy prompt"]))
        assert r.status_code == 422 and "reward 'toy_geneval' rejected the inputs" in r.json()["error"]


def test_oversized_bodies_and_images_get_413():
    _, pngs = sample(4, size=32)
    body = json.dumps(v2_body(pngs, ["p"] * 4)).encode()
    with client(rewards="brightness", max_request_bytes=len(body) - 1, max_image_pixels=32 * 32) as c:
        r = c.post("/v2/models/brightness/infer", content=body)
        assert r.status_code == 413 and "max_request_bytes" in r.json()["error"]
        bomb = gzip.compress(body)  # small on the wire, too big once inflated
        r = c.post("/v2/models/brightness/infer", content=bomb, headers={"Content-Encoding": "gzip"})
        assert r.status_code == 413 and "after decompression" in r.json()["error"]
        r = c.post("/compute", json={"prompt": ["p"], "image": [base64.b64encode(sample(1, size=40)[1][0]).decode()]})
        assert r.status_code == 413 and "max_image_pixels" in r.json()["error"]
        small = json.dumps(v2_body(pngs[:1], ["p"])).encode()
        r = c.post("/v2/models/brightness/infer", content=gzip.compress(small), headers={"Content-Encoding": "gzip"})
        assert r.status_code == 200


# --- Flow-Factory protocol ---------------------------------------------------------------------


def test_flow_factory_health_and_compute():
    images, pngs = sample(3)
    b64 = [base64.b64encode(p).decode() for p in pngs]
    body = {"prompt": TOY_PROMPTS, "image": b64, "video": None, "condition_images": None, "condition_videos": None}
    with client(rewards="brightness,toy_geneval") as c:
        assert c.get("/health").json() == {"status": "ok"}
        r = c.post("/compute", json=body)
        assert r.status_code == 200 and set(r.json()) == {"rewards"}
        assert torch.equal(torch.tensor(r.json()["rewards"]), local("brightness", images, TOY_PROMPTS))
        assert c.get("/rewards/toy_geneval/health").json() == {"status": "ok"}
        toy = c.post("/rewards/toy_geneval/compute", json=body).json()["rewards"]
        assert torch.equal(torch.tensor(toy), local("toy_geneval", images, TOY_PROMPTS))
        assert c.post("/rewards/nope/compute", json=body).status_code == 404
        for bad, status, message in [
            (b"[", 400, "not valid JSON"),
            (json.dumps({"prompt": ["a"]}).encode(), 422, "'image' is null"),
            (json.dumps(body | {"prompt": ["a"]}).encode(), 422, "got 3 images and 1 prompts"),
            (json.dumps(body | {"video": [[b64[0]]]}).encode(), 422, "'image' and 'video' both given"),
            (json.dumps(body | {"condition_videos": [[b64[0]]]}).encode(), 422, "'condition_videos' is not supported"),
            (json.dumps(body | {"images": b64}).encode(), 422, "images: Extra inputs are not permitted"),
            (json.dumps(body | {"image": ["@@"] * 3}).encode(), 422, "'image' element 0 is neither"),
        ]:
            r = c.post("/compute", content=bad)
            assert r.status_code == status and message in r.json()["error"], r.text


# --- auth, metrics ------------------------------------------------------------------------------


def test_bearer_token_guards_everything_but_liveness():
    _, pngs = sample(1)
    with client(rewards="brightness", token="s3cret") as c:
        assert c.get("/v2/health/live").status_code == 200
        calls = [("get", "/v2/health/ready"), ("get", "/v2/models/brightness"), ("get", "/v2/models/brightness/ready"),
                 ("post", "/v2/models/brightness/infer"), ("get", "/health"), ("post", "/compute"),
                 ("get", "/metrics"), ("post", "/v2/repository/index"), ("get", "/v2")]
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}, {"Authorization": "s3cret"}):
            for method, path in calls:
                r = c.request(method, path, headers=headers, json=v2_body(pngs, ["p"]))
                assert r.status_code == 401, (path, headers)
                assert "Bearer" in r.json()["error"] and r.headers["WWW-Authenticate"] == 'Bearer, Basic realm="flowrl"'
        ok = {"Authorization": "Bearer s3cret"}
        assert c.post("/v2/models/brightness/infer", json=v2_body(pngs, ["p"]), headers=ok).status_code == 200
        assert c.get("/metrics", headers=ok).status_code == 200


def test_metrics_parse_and_count_requests_batches_and_codes():
    _, pngs = sample(3)
    with client(rewards="brightness") as c:
        for _ in range(2):
            scores_of(c.post("/v2/models/brightness/infer", json=v2_body(pngs, ["p"] * 3)))
        c.post("/compute", json={"prompt": ["p"], "image": [base64.b64encode(pngs[0]).decode()]})
        c.post("/v2/models/brightness/infer", json={"inputs": []})
        c.post("/v2/models/unknown-model/infer", json={"inputs": []})
        r = c.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    m = metric_samples(r.text)
    requests = {(s["protocol"], s["code"]): v for s, v in m["flowrl_reward_requests_total"] if s["model"] == "brightness"}
    assert requests == {("v2", "200"): 2, ("compute", "200"): 1, ("v2", "422"): 1}
    assert all(s["model"] == "brightness" for s, _ in m["flowrl_reward_requests_total"])  # no label for unknown names
    assert dict((s["protocol"], v) for s, v in m["flowrl_reward_request_seconds_count"]) == {"v2": 3, "compute": 1}
    assert [v for _, v in m["flowrl_reward_batch_size_count"]] == [3] and [v for _, v in m["flowrl_reward_batch_size_sum"]] == [7]
    assert [v for _, v in m["flowrl_reward_samples_total"]] == [7]
    assert [v for _, v in m["flowrl_reward_model_ready"]] == [1]


# --- dynamic batching (the batcher alone) ---------------------------------------------------------


def _batcher(model, **kw) -> DynamicBatcher:
    opts = dict(batch_size=64, max_batch_size=8, max_queue_delay_ms=100, max_queue_size=100, metrics=Metrics()) | kw
    return DynamicBatcher("counting", model, **opts)


def test_batcher_merges_concurrent_requests_up_to_max_batch_size():
    images, _ = sample(10)
    CountingBrightness.calls.clear()
    model = build_reward(f"{M}.CountingBrightness")

    async def main():
        b = _batcher(model, max_batch_size=8)
        b.start()
        sizes = [1, 2, 3, 2, 2]  # 10 samples: one batch of 8 (a request is never split), then 2
        starts = np.cumsum([0] + sizes)
        outs = await asyncio.gather(*(b.submit(list(images[s:s + n]), ["p"] * n, None) for s, n in zip(starts, sizes)))
        await b.stop()
        return outs

    outs = asyncio.run(main())
    assert CountingBrightness.calls == [8, 2]
    assert torch.equal(torch.cat(outs), local("brightness", images, ["p"] * 10))


def test_batcher_isolates_a_failing_request_and_limits_the_queue():
    images, _ = sample(3)
    model = build_reward("toy_geneval")

    async def main():
        b = _batcher(model, max_queue_size=2)
        b.start()
        good = b.submit([images[0]], [TOY_PROMPTS[0]], None)
        bad = b.submit([images[1]], ["no toy grammar here"], None)
        results = await asyncio.gather(good, bad, return_exceptions=True)
        await b.stop()
        b = _batcher(model, max_queue_size=2, max_queue_delay_ms=10_000)
        b.start()
        first = asyncio.ensure_future(b.submit(list(images[:2]), TOY_PROMPTS[:2], None))
        await asyncio.sleep(0)
        with pytest.raises(RequestError) as full:
            await b.submit([images[2]], TOY_PROMPTS[2:], None)
        await b.stop()
        with pytest.raises(RequestError, match="shutting down"):
            await first
        return results, full.value

    (good, bad), full = asyncio.run(main())
    assert torch.equal(good, local("toy_geneval", images[:1], TOY_PROMPTS[:1]))
    assert isinstance(bad, RequestError) and bad.status == 422 and "toy_geneval" in bad.message
    assert full.status == 503 and "queue full" in full.message and full.headers == {"Retry-After": "1"}


# --- integration: real uvicorn, real clients ---------------------------------------------------------


@pytest.mark.integration
def test_tritonclient_infer_binary_and_json_matches_local_scores():
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    images, pngs = sample(4, seed=5)
    want = local("brightness", images, ["p"] * 4)
    with running_server(RewardServerSettings(rewards="brightness,pairwise_brightness", token="tok")) as url:
        auth = {"Authorization": "Bearer tok"}

        def headers():  # a fresh dict per call: tritonclient writes its own headers into the one it gets
            return dict(auth)

        c = triton.InferenceServerClient(url.removeprefix("http://"))
        assert c.is_server_live() and c.is_server_ready(headers=headers()) and not c.is_server_ready()
        assert c.is_model_ready("brightness", headers=headers())
        meta = c.get_model_metadata("brightness", headers=headers())
        assert [i["name"] for i in meta["inputs"]] == ["image", "prompt"]
        for binary in (True, False):
            image = triton.InferInput("image", [4], "BYTES")
            elements = pngs if binary else [base64.b64encode(p).decode() for p in pngs]
            image.set_data_from_numpy(np.array(elements, dtype=object), binary_data=binary)
            prompt = triton.InferInput("prompt", [4], "BYTES")
            prompt.set_data_from_numpy(np.array(["p"] * 4, dtype=object), binary_data=binary)
            for outputs in (None, [triton.InferRequestedOutput("score", binary_data=False)],
                            [triton.InferRequestedOutput("score", binary_data=True)]):
                result = c.infer("brightness", [image, prompt], outputs=outputs, headers=headers(), request_id="r1")
                assert torch.equal(torch.from_numpy(result.as_numpy("score").copy()), want), (binary, outputs)
                assert result.get_response()["id"] == "r1"
        compressed = c.infer("brightness", [image, prompt], headers=headers(), request_compression_algorithm="gzip")
        assert torch.equal(torch.from_numpy(compressed.as_numpy("score").copy()), want)
        group = triton.InferInput("group_id", [4], "INT64")
        group.set_data_from_numpy(np.array([0, 1, 0, 1], dtype=np.int64))
        pair = c.infer("pairwise_brightness", [image, prompt, group], headers=headers()).as_numpy("score")
        assert np.allclose(pair, local("pairwise_brightness", images, ["p"] * 4, [0, 1, 0, 1]).numpy())
        with pytest.raises(InferenceServerException, match="Bearer"):
            c.infer("brightness", [image, prompt])
        with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
            c.get_model_metadata("nope", headers=headers())
        c.close()


@pytest.mark.integration
def test_live_server_merges_concurrent_requests():
    images, pngs = sample(8)
    settings = RewardServerSettings(rewards="brightness", max_batch_size=64, max_queue_delay_ms=300)
    with running_server(settings) as url:
        async def fire():
            async with httpx.AsyncClient(base_url=url) as c:
                return await asyncio.gather(*(c.post("/v2/models/brightness/infer", json=v2_body(pngs[i:i + 1], ["p"]))
                                              for i in range(8)))

        responses = asyncio.run(fire())
        got = torch.cat([scores_of(r) for r in responses])
        m = metric_samples(httpx.get(f"{url}/metrics").text)
    assert torch.equal(got, local("brightness", images, ["p"] * 8))
    (batches,) = [v for _, v in m["flowrl_reward_batch_size_count"]]
    (merged,) = [v for _, v in m["flowrl_reward_batch_requests_sum"]]
    assert merged == 8 and batches < 8, f"8 concurrent requests were scored in {batches} batches"


@pytest.mark.integration
def test_a_request_whose_client_left_is_not_scored():
    """A client that times out (and would retry, as Flow-Factory's does) leaves: its request is cancelled
    and answered 499 in the metrics, and the requests queued behind the one being scored are skipped, so
    a fresh request waits for that one batch only (before: for every abandoned request's 0.5 s)."""
    _, pngs = sample(4)
    slow = '[{"name": "slow", "reward_model": "tests.services.reward_models.CountingBrightness", "delay": 0.5}]'
    with running_server(RewardServerSettings(rewards=slow, max_batch_size=4, max_queue_delay_ms=0)) as url:
        for _ in range(4):
            with pytest.raises(httpx.TimeoutException):
                httpx.post(f"{url}/v2/models/slow/infer", json=v2_body(pngs, ["p"] * 4), timeout=0.2)
        start = time.monotonic()
        fresh = httpx.post(f"{url}/v2/models/slow/infer", json=v2_body(pngs[:1], ["p"]), timeout=30)
        waited = time.monotonic() - start
        m = metric_samples(httpx.get(f"{url}/metrics").text)
    assert fresh.status_code == 200
    codes = {labels["code"]: v for labels, v in m["flowrl_reward_requests_total"]}
    assert codes == {"499": 4, "200": 1}, codes
    (scored,) = [v for _, v in m["flowrl_reward_samples_total"]]
    assert scored < 4 * 4 + 1 and waited < 4 * 0.5, (scored, waited)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_bad_settings_exit_2_with_the_reason(capsys, monkeypatch):
    from trainer.cli import main as flowrl

    assert flowrl(["serve", "reward", "--rewards", "brightnes"]) == 2
    assert "Did you mean 'brightness'" in capsys.readouterr().err
    assert flowrl(["serve", "reward", "--rewards", "brightness", "--max-batch-size", "0"]) == 2
    assert "max_batch_size" in capsys.readouterr().err
    assert flowrl(["serve", "reward"]) == 2
    assert "rewards" in capsys.readouterr().err


@pytest.mark.integration
def test_cli_serve_reward_subprocess_serves_and_stops():
    env = os.environ | {"PYTHONPATH": str(ROOT), "FLOWRL_API_TOKEN": ""}
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "trainer.cli", "serve", "reward", "--rewards", "brightness",
                             "--port", str(port), "--max-batch-size", "4", "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "flowrl serve reward never became ready"
            time.sleep(0.1)
        images, pngs = sample(2)
        r = httpx.post(f"http://127.0.0.1:{port}/v2/models/brightness/infer", json=v2_body(pngs, ["a", "b"]))
        assert torch.equal(scores_of(r), local("brightness", images, ["a", "b"]))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode is not None
