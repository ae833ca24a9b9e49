"""Videos through the reward server: a reward that scores whole videos (``video = "native"``) is
served with the v2 input ``video`` (BYTES ``[B, F]``) and Flow-Factory's ``video`` field, and the
``remote`` client with ``video: native`` sends them; an image reward given a video scores its
frames and averages, as it does locally. Scores equal local scores of the 8-bit frames."""

from __future__ import annotations

import base64
import json

import httpx
import pytest
import torch

from shared.rewards import build_reward, score_all
from shared.rewards.remote import encode_png, v2_request

NATIVE = "tests.helpers.rewards.FrameChange"


def videos(n: int = 3, frames: int = 3, size: int = 8) -> torch.Tensor:
    """``[n, F, 3, size, size]`` exact in 8 bits, frame ``f`` of video ``i`` at level ``(i + 1) f / 20``."""
    levels = torch.tensor([[min((i + 1) * f * 13, 255) / 255 for f in range(frames)] for i in range(n)])
    return levels[:, :, None, None, None].expand(n, frames, 3, size, size).contiguous()


@pytest.fixture(scope="module")
def server():
    from services.reward import RewardServerSettings
    from tests.services.live_server import running_server

    settings = RewardServerSettings(rewards=[{"reward_model": NATIVE, "name": "change"},
                                             {"reward_model": "brightness"}],
                                    max_queue_delay_ms=0, log_level="warning")
    with running_server(settings) as url:
        yield url


def test_whole_videos_in_both_protocols(server):
    meta = httpx.get(f"{server}/v2/models/change").json()
    assert [(i["name"], i["shape"]) for i in meta["inputs"]] == [("video", [-1, -1]), ("prompt", [-1])]
    v = videos()
    local = score_all(build_reward(NATIVE), v, ["a"] * 3, torch.arange(3), 8)
    assert local.unique().numel() == 3  # the videos differ in how much they change
    for protocol, extra in (("v2", {"model": "change"}), ("flow-factory", {})):
        remote = build_reward("remote", url=server, protocol=protocol, video="native", **extra)
        got = score_all(remote, v, ["a"] * 3, torch.arange(3), 2)
        torch.testing.assert_close(got, local, rtol=0, atol=1e-6)


def test_an_image_reward_scores_a_videos_frames(server):
    v = videos()
    local = score_all(build_reward("brightness"), v, ["a"] * 3, torch.arange(3), 8)  # frame mean
    body, headers = v2_request([encode_png(x) for x in v], ["a"] * 3)
    r = httpx.post(f"{server}/v2/models/brightness/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    torch.testing.assert_close(torch.tensor(r.json()["outputs"][0]["data"]), local, rtol=0, atol=1e-6)


def test_wrong_media_are_refused_with_the_fix(server):
    v = videos(1)
    frames = encode_png(v[0])
    body, headers = v2_request(frames[:1], ["a"])  # an image for a video reward
    r = httpx.post(f"{server}/v2/models/change/infer", content=body, headers=headers)
    assert r.status_code == 422 and "unknown input 'image'" in r.json()["error"] and "video (BYTES [B, F])" in r.json()["error"]
    b64 = [base64.b64encode(f).decode() for f in frames]
    r = httpx.post(f"{server}/compute", content=json.dumps({"prompt": ["a"], "image": b64[:1]}))
    assert r.status_code == 422 and "send 'video'" in r.json()["error"]
    r = httpx.post(f"{server}/compute", content=json.dumps({"prompt": ["a", "b"], "video": [b64]}))
    assert r.status_code == 422 and "one non-empty list of base64 frames per prompt" in r.json()["error"]
    small = base64.b64encode(encode_png(videos(1, 1, 4)[0])[0]).decode()
    r = httpx.post(f"{server}/compute", content=json.dumps({"prompt": ["a"], "video": [b64[:1] + [small]]}))
    assert r.status_code == 422 and "frames of different sizes" in r.json()["error"]
