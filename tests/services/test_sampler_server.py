"""``flowrl serve sampler`` under uvicorn: a checkpoint's EMA images are the evaluation's images,
checkpoints load and unload at runtime, and bad requests get clear answers."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from services.sampler.server import create_app
from services.sampler.settings import SamplerServerSettings
from shared.models import load_adapter
from shared.sampling import rollout_batches
from tests.helpers.tiny import tiny_config, tiny_raw
from tests.services.live_server import running_app
from trainer.checkpoint import load_checkpoint_weights
from trainer.cli import main
from trainer.loop import train
from trainer.policy import Policy, attach_trainable

FAST = ["train.num_inference_steps=4", "eval.num_inference_steps=4", "train.group_size=4",
        "train.unique_sample_num_per_epoch=2", "train.per_device_batch_size=8",
        "train.gradient_step_per_epoch=1", "train.clip_range=0.01", "train.learning_rate=0.05"]
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    cfg = tiny_config(root, overrides=FAST)
    summary = train(cfg, quiet=True)
    path = root / "cfg.yaml"
    raw = tiny_raw(root)
    raw["train"].update({"num_inference_steps": 4, "group_size": 4})
    raw["eval"]["num_inference_steps"] = 4
    path.write_text(yaml.safe_dump(raw))
    return cfg, path, Path(summary["checkpoint"])


@pytest.fixture(scope="module")
def server(run):
    _, path, ckpt = run
    settings = SamplerServerSettings(config=str(path), checkpoint=str(ckpt), token=TOKEN, max_images_per_request=4)
    with running_app(create_app(settings), ready_path="/health/ready", headers=AUTH) as url:
        yield url


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def evaluation_images(cfg, ckpt, prompts, seeds, use_checkpoint=True) -> list[np.ndarray]:
    """What the trainer's evaluation renders: the checkpoint's EMA, the ODE sampler, eval's settings."""
    adapter = load_adapter(cfg.model, device=torch.device("cpu"), seed=cfg.train.seed)
    policy = Policy(adapter, adapter.transformer, cfg, attach_trainable(adapter, cfg))
    module = adapter.transformer
    if use_checkpoint:
        load_checkpoint_weights(ckpt, cfg, adapter, policy)
        module = policy.eval_module()
    e = cfg.eval
    _, roll = rollout_batches(adapter, prompts, [None] * len(prompts), seeds, batch_size=8, resolution=e.resolution,
                              num_steps=e.num_inference_steps, guidance_scale=e.guidance_scale, dynamics="ODE",
                              noise_level=0.0, sde_steps=[], keep_means=False, log_prob_reduction="mean",
                              transformer=module)
    return [(img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy() for img in roll.images]


def test_a_checkpoints_images_are_the_evaluations_images(run, server):
    cfg, _, ckpt = run
    prompts = ["a red circle", "a blue square"]
    r = httpx.post(f"{server}/v1/generate", json={"prompts": prompts, "seed": 5}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seeds"] == [5, 6] and body["weights"] == "ema" and body["checkpoint"] == str(ckpt)
    got = [decode(b) for b in body["images"]]
    assert got[0].shape == (16, 16, 3)
    want = evaluation_images(cfg, ckpt, prompts, [5, 6])
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_checkpoints_load_and_unload_at_runtime(run, server):
    cfg, _, ckpt = run
    prompts = ["a green circle"]
    trained = httpx.post(f"{server}/v1/generate", json={"prompts": prompts}, headers=AUTH, timeout=60).json()
    status = httpx.post(f"{server}/admin/load", json={"checkpoint": None}, headers=AUTH, timeout=60).json()
    assert status["weights"] == "base" and status["checkpoint"] is None
    base = httpx.post(f"{server}/v1/generate", json={"prompts": prompts}, headers=AUTH, timeout=60).json()
    np.testing.assert_array_equal(decode(base["images"][0]), evaluation_images(cfg, ckpt, prompts, [0], False)[0])
    assert not np.array_equal(decode(base["images"][0]), decode(trained["images"][0]))
    live = httpx.post(f"{server}/admin/load", json={"checkpoint": str(ckpt), "ema": False}, headers=AUTH,
                      timeout=60).json()
    assert live["weights"] == "live"
    back = httpx.post(f"{server}/admin/load", json={"checkpoint": str(ckpt)}, headers=AUTH, timeout=60).json()
    assert back["weights"] == "ema"
    again = httpx.post(f"{server}/v1/generate", json={"prompts": prompts}, headers=AUTH, timeout=60).json()
    assert again["images"] == trained["images"]


def test_bad_requests_get_clear_answers(server, tmp_path):
    assert httpx.get(f"{server}/health/live").status_code == 200  # liveness needs no token
    r = httpx.post(f"{server}/v1/generate", json={"prompts": ["x"]})
    assert r.status_code == 401 and "Bearer" in r.json()["error"]
    assert httpx.post(f"{server}/v1/generate", json={"prompts": ["x"], "sede": 1}, headers=AUTH).status_code == 422
    r = httpx.post(f"{server}/v1/generate", json={"prompts": ["x"] * 5}, headers=AUTH)
    assert r.status_code == 413 and "at most 4" in r.json()["error"]
    r = httpx.post(f"{server}/v1/generate", json={"prompts": ["x"], "negative_prompts": ["a", "b"]}, headers=AUTH)
    assert r.status_code == 422 and "2 entries for 1 prompts" in r.json()["error"]
    r = httpx.post(f"{server}/admin/load", json={"checkpoint": ""}, headers=AUTH, timeout=60)  # "" is the base
    assert r.status_code == 200 and r.json()["checkpoint"] is None and r.json()["weights"] == "base"
    r = httpx.post(f"{server}/admin/load", json={"checkpoint": str(tmp_path / "nope")}, headers=AUTH)
    assert r.status_code == 400 and "does not exist" in r.json()["error"]
    (tmp_path / "empty").mkdir()
    r = httpx.post(f"{server}/admin/load", json={"checkpoint": str(tmp_path / "empty")}, headers=AUTH, timeout=60)
    assert r.status_code == 400 and "is none of" in r.json()["error"]
    assert httpx.get(f"{server}/admin/status", headers=AUTH).json()["weights"] in ("ema", "base", "live")


def test_metrics_count_requests(server):
    httpx.post(f"{server}/v1/generate", json={"prompts": ["a red square"]}, headers=AUTH, timeout=60)
    text = httpx.get(f"{server}/metrics", headers=AUTH).text
    assert 'flowrl_serve_sampler_requests_total{status="200"}' in text
    assert "flowrl_serve_sampler_generate_seconds_count" in text


def test_the_cli_refuses_a_bad_config_with_status_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"rewards": [{"reward_model": "brightness"}], "modle": {}}))
    assert main(["serve", "sampler", "--config", str(bad)]) == 2
    assert "unknown config key `modle`" in capsys.readouterr().err


def test_the_preview_server_listens_on_loopback_and_warns_when_exposed_without_a_token(run, monkeypatch, capsys):
    import uvicorn

    _, path, _ = run
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    assert main(["serve", "sampler", "--config", str(path)]) == 0
    assert main(["serve", "sampler", "--config", str(path), "--host", "0.0.0.0", "--port", "9011"]) == 0
    assert [(c["host"], c["port"]) for c in calls] == [("127.0.0.1", 8001), ("0.0.0.0", 9011)]
    err = capsys.readouterr().err
    assert err.count("without a bearer token") == 1 and "listening on 0.0.0.0:9011" in err


def test_a_failed_start_up_load_keeps_the_server_up_and_latest_recovers(run, tmp_path):
    _, path, ckpt = run
    settings = SamplerServerSettings(config=str(path), checkpoint=str(tmp_path / "not-yet"), token=TOKEN)
    with running_app(create_app(settings), headers=AUTH) as url:
        deadline = time.monotonic() + 60
        while (r := httpx.get(f"{url}/health/ready", headers=AUTH)).json().get("error") is None:
            assert r.status_code == 503 and time.monotonic() < deadline
        assert r.status_code == 503 and "not-yet" in r.json()["error"]
        assert httpx.get(f"{url}/health/live").status_code == 200  # alive: no restart loop
        g = httpx.post(f"{url}/v1/generate", json={"prompts": ["x"]}, headers=AUTH)
        assert g.status_code == 503 and "start-up load failed" in g.json()["error"] and "/admin/load" in g.json()["error"]
        # latest: the run's final checkpoint (the config names the run's output_dir and run_name)
        status = httpx.post(f"{url}/admin/load", json={"checkpoint": "latest"}, headers=AUTH, timeout=60).json()
        assert status["checkpoint"] == str(ckpt) and ckpt.name == "final" and status["error"] is None
        assert httpx.get(f"{url}/health/ready", headers=AUTH).status_code == 200


def test_an_empty_checkpoint_setting_is_the_base_and_latest_needs_a_checkpoint(tmp_path, monkeypatch):
    from services.sampler.server import Served
    from shared.config import ConfigError

    monkeypatch.setenv("FLOWRL_SAMPLER_CHECKPOINT", "")  # as compose passes an unset FLOWRL_PREVIEW_CHECKPOINT
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(tmp_path)))
    settings = SamplerServerSettings(config=str(path))
    assert settings.checkpoint is None
    with pytest.raises(ConfigError, match="holds no final or checkpoint-N folder yet"):
        Served(settings).resolve("latest")
    numbered = tmp_path / "runs" / "tiny_grpo" / "checkpoints"
    for name, step in (("checkpoint-2", 4), ("checkpoint-10", 20), ("final", 24), ("checkpoint-12.tmp", 99)):
        (numbered / name).mkdir(parents=True)
        (numbered / name / "trainer_state.json").write_text(json.dumps({"optimizer_step": step}))
    assert Served(settings).resolve("latest") == str(numbered / "final")
    # the run continued past its final (max_epochs raised, resumed): the newer numbered one
    (numbered / "checkpoint-14").mkdir()
    (numbered / "checkpoint-14" / "trainer_state.json").write_text(json.dumps({"optimizer_step": 28}))
    assert Served(settings).resolve("latest") == str(numbered / "checkpoint-14")


def test_resolutions_the_model_cannot_make_and_failures_are_json_and_counted(run, monkeypatch):
    """A side outside [8, 4096] is a 422 naming the bound (0 or -16 was a plain-text 500); an unexpected
    failure is a JSON 500; the metrics count every answer, 503s and 500s included; no API document is
    served without the token."""
    from fastapi.testclient import TestClient

    _, path, ckpt = run
    app = create_app(SamplerServerSettings(config=str(path), checkpoint=str(ckpt), token=TOKEN))
    with TestClient(app) as c:
        assert c.get("/openapi.json").status_code == 404 and c.get("/docs").status_code == 404
        for bad in (0, -16, [16, 0], 5000):
            r = c.post("/v1/generate", json={"prompts": ["x"], "resolution": bad}, headers=AUTH)
            assert r.status_code == 422 and "must be in [8, 4096]" in r.text, r.text
        while c.get("/health/ready", headers=AUTH).status_code != 200:
            time.sleep(0.05)

        def broken(req):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        monkeypatch.setattr(app.state.served, "generate", broken)
        r = c.post("/v1/generate", json={"prompts": ["x"]}, headers=AUTH)
        assert r.status_code == 500 and r.json()["error"] == ("generation failed: RuntimeError: CUDA error: an "
                                                              "illegal memory access was encountered")
        monkeypatch.setattr(app.state.served, "adapter", None)
        assert c.post("/v1/generate", json={"prompts": ["x"]}, headers=AUTH).status_code == 503
        text = c.get("/metrics", headers=AUTH).text
    assert 'flowrl_serve_sampler_requests_total{status="500"} 1.0' in text
    assert 'flowrl_serve_sampler_requests_total{status="503"} 1.0' in text


def test_a_model_built_again_serves_the_old_one_meanwhile(run, monkeypatch):
    """/admin/load of a model built anew (here: the base, slowed by 2 s) leaves the old model serving
    until the new one is ready (requests waited for the whole rebuild)."""
    import threading

    import shared.models
    from fastapi.testclient import TestClient

    _, path, ckpt = run
    app = create_app(SamplerServerSettings(config=str(path), checkpoint=str(ckpt), token=TOKEN))
    with TestClient(app) as c:
        while c.get("/health/ready", headers=AUTH).status_code != 200:
            time.sleep(0.05)
        real = shared.models.load_adapter

        def slow(*args, **kwargs):
            time.sleep(2)
            return real(*args, **kwargs)

        monkeypatch.setattr(shared.models, "load_adapter", slow)
        loaded = {}
        loader = threading.Thread(target=lambda: loaded.update(
            c.post("/admin/load", json={"checkpoint": None}, headers=AUTH).json()))
        loader.start()
        time.sleep(0.3)
        start = time.monotonic()
        r = c.post("/v1/generate", json={"prompts": ["a red square"]}, headers=AUTH)
        waited = time.monotonic() - start
        loader.join()
    assert r.status_code == 200 and r.json()["weights"] == "ema" and waited < 1.5, waited
    assert loaded["weights"] == "base"
