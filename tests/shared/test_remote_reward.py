"""The ``remote`` reward client: options, retries/backoff and errors (with httpx's mock
transport), and scores through ``score_all`` against the real server under uvicorn."""

from __future__ import annotations

import json
import logging
import socket

import httpx
import pytest
import torch

from shared.rewards import REWARDS, build_reward, score_all
from shared.rewards.remote import RemoteReward, RemoteRewardError, encode_png, v2_request

PROMPTS = ["a photo of a red circle", "a photo of a square", "a photo of two triangles", "a photo of a blue square"]


def images(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Images on the uint8 grid (what PNG carries exactly), contiguous like a decoded batch."""
    u8 = torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return u8.float().div(255.0)


def ids(*g: int) -> torch.Tensor:
    return torch.tensor(g, dtype=torch.int64)


def mocked(reward: RemoteReward, handler) -> list[httpx.Request]:
    """Route ``reward``'s HTTP through ``handler``; returns the list of requests it receives."""
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request, len(seen))

    reward._client = httpx.Client(transport=httpx.MockTransport(record))
    return seen


def ok_scores(n: int) -> httpx.Response:
    return httpx.Response(200, json={"model_name": "m", "outputs": [
        {"name": "score", "datatype": "FP32", "shape": [n], "data": [0.25] * n}]})


# --- construction ------------------------------------------------------------------------------


def test_remote_is_registered_and_validates_options():
    assert "remote" in REWARDS
    assert isinstance(build_reward("remote", url="http://127.0.0.1:1", model="m"), RemoteReward)
    for bad, message in [({"url": "127.0.0.1:8000"}, "url must start with http"),
                         ({"url": "http://h", "protocol": "grpc"}, "protocol must be one of v2, flow-factory"),
                         ({"url": "http://h", "kind": "pairwise"}, "kind must be 'pointwise' or 'groupwise'"),
                         ({"url": "http://h", "retries": -1}, "retries >= 0"),
                         ({"url": "http://h", "protocol": "flow-factory", "model": "m"}, "put the model in the url")]:
        with pytest.raises(ValueError, match=message):
            build_reward("remote", **bad)
    with pytest.raises(TypeError, match="did you mean 'retries'"):
        build_reward("remote", url="http://h", retry_attempts=3)


def test_token_from_option_or_env_and_never_in_repr(monkeypatch):
    monkeypatch.setenv("FLOWRL_API_TOKEN", "from-env")
    reward = build_reward("remote", url="http://h", model="m")
    assert reward._http().headers["Authorization"] == "Bearer from-env"
    assert "from-env" not in repr(reward) and "from-env" not in reward.name
    assert build_reward("remote", url="http://h", token="opt")._http().headers["Authorization"] == "Bearer opt"
    monkeypatch.delenv("FLOWRL_API_TOKEN")
    assert "Authorization" not in build_reward("remote", url="http://h")._http().headers


# --- the wire -----------------------------------------------------------------------------------


def test_v2_request_is_binary_tensor_extension_with_pngs():
    x = images(2)
    body, headers = v2_request(encode_png(x), ["a", "bé"])
    n = int(headers["Inference-Header-Content-Length"])
    head = json.loads(body[:n])
    assert [i["name"] for i in head["inputs"]] == ["image", "prompt"]
    sizes = [i["parameters"]["binary_data_size"] for i in head["inputs"]]
    assert n + sum(sizes) == len(body)
    assert body[n + 4 : n + 12] == b"\x89PNG\r\n\x1a\n"
    assert body.endswith(b"\x03\x00\x00\x00" + "bé".encode())


# --- retries and errors (mock transport) --------------------------------------------------------


def test_5xx_and_timeouts_are_retried_with_backoff_then_succeed(caplog, monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr("shared.rewards.remote.time.sleep", sleeps.append)
    reward = build_reward("remote", url="http://h", model="m", retries=3, backoff=0.1)

    def handler(request, n):
        if n == 1:
            return httpx.Response(503, json={"error": "model 'm' is still loading"})
        if n == 2:
            raise httpx.ReadTimeout("timed out", request=request)
        return ok_scores(2)

    seen = mocked(reward, handler)
    with caplog.at_level(logging.WARNING, logger="flowrl.reward.remote"):
        out = score_all(reward, images(2), ["a", "b"], ids(0, 0), batch_size=8)
    assert out.tolist() == [0.25, 0.25] and len(seen) == 3
    assert sleeps == [0.1, 0.2]
    assert [r.message.split(" failed ")[1].split(";")[0] for r in caplog.records] == [
        "(HTTP 503: model 'm' is still loading)", "(ReadTimeout: timed out)"]
    assert str(seen[0].url) == "http://h/v2/models/m/infer"


def test_after_the_last_try_the_error_names_url_and_cause(monkeypatch):
    monkeypatch.setattr("shared.rewards.remote.time.sleep", lambda s: None)
    reward = build_reward("remote", url="http://h/", model="m", retries=2)
    seen = mocked(reward, lambda r, n: httpx.Response(500, json={"error": "reward 'm' failed: CUDA OOM"}))
    with pytest.raises(RemoteRewardError, match=r"http://h/v2/models/m/infer failed after 3 attempt\(s\); "
                                                r"last error: HTTP 500: reward 'm' failed: CUDA OOM"):
        reward.score(images(1), ["a"])
    assert len(seen) == 3


def test_4xx_is_not_retried_and_401_says_how_to_fix(monkeypatch):
    monkeypatch.delenv("FLOWRL_API_TOKEN", raising=False)
    reward = build_reward("remote", url="http://h", model="m", retries=5)
    seen = mocked(reward, lambda r, n: httpx.Response(422, json={"error": "input 'image' element 0 could not be decoded"}))
    with pytest.raises(RemoteRewardError, match="refused the request: HTTP 422: input 'image' element 0"):
        reward.score(images(1), ["a"])
    assert len(seen) == 1
    mocked(reward, lambda r, n: httpx.Response(401, json={"error": "missing or wrong bearer token"}))
    with pytest.raises(RemoteRewardError, match="FLOWRL_API_TOKEN"):
        reward.score(images(1), ["a"])


def test_wrong_number_of_scores_or_garbage_is_an_error_not_a_default():
    reward = build_reward("remote", url="http://h", model="m", retries=0)
    mocked(reward, lambda r, n: ok_scores(1))
    with pytest.raises(RemoteRewardError, match="returned 1 scores for 2 samples"):
        reward.score(images(2), ["a", "b"])
    mocked(reward, lambda r, n: httpx.Response(200, text="<html>proxy</html>"))
    with pytest.raises(RemoteRewardError, match="unreadable answer"):
        reward.score(images(1), ["a"])
    ff = build_reward("remote", url="http://h", protocol="flow-factory", retries=0)
    mocked(ff, lambda r, n: httpx.Response(200, json={"error": "model crashed"}))
    with pytest.raises(RemoteRewardError, match="answered an error: model crashed"):
        ff.score(images(1), ["a"])


def test_dead_port_raises_after_retries_with_a_clear_message(caplog):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reward = build_reward("remote", url=f"http://127.0.0.1:{port}", model="m", retries=2, backoff=0.001, timeout=2)
    with caplog.at_level(logging.WARNING, logger="flowrl.reward.remote"), pytest.raises(RemoteRewardError) as e:
        score_all(reward, images(2), ["a", "b"], ids(0, 0), batch_size=2)
    message = str(e.value)
    assert f"http://127.0.0.1:{port}/v2/models/m/infer failed after 3 attempt(s)" in message
    assert "ConnectError" in message
    assert len(caplog.records) == 2 and all("retrying in" in r.message for r in caplog.records)


# --- against the live server -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    from services.reward import RewardServerSettings
    from tests.services.live_server import running_server

    settings = RewardServerSettings(rewards="brightness,toy_geneval,pairwise_brightness", token="tok",
                                    max_batch_size=3)
    with running_server(settings) as url:
        yield url


@pytest.fixture(scope="module")
def single_model_server():
    from services.reward import RewardServerSettings
    from tests.services.live_server import running_server

    with running_server(RewardServerSettings(rewards="toy_geneval")) as url:
        yield url


def local(name: str, x: torch.Tensor, prompts: list[str], group_ids: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    return score_all(build_reward(name), x, prompts, group_ids, batch_size)


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["v2", "flow-factory"])
def test_remote_scores_equal_local_scores(server, protocol):
    x, g = images(4), ids(0, 0, 1, 1)
    for name in ("brightness", "toy_geneval"):
        if protocol == "v2":
            reward = build_reward("remote", url=server, model=name, token="tok")
        else:
            reward = build_reward("remote", url=f"{server}/rewards/{name}", protocol="flow-factory", token="tok")
        got = score_all(reward, x, PROMPTS, g, batch_size=3)
        assert torch.equal(got, local(name, x, PROMPTS, g)), (name, protocol)
        reward.close()


@pytest.mark.integration
def test_remote_groupwise_sends_whole_groups(server):
    x, g = images(6, seed=2), ids(4, 9, 4, 9, 9, 4)
    reward = build_reward("remote", url=server, model="pairwise_brightness", kind="groupwise", token="tok")
    got = score_all(reward, x, ["p"] * 6, g, batch_size=2)
    assert torch.allclose(got, local("pairwise_brightness", x, ["p"] * 6, g, batch_size=2), atol=1e-6)


@pytest.mark.integration
def test_a_pointwise_remote_of_a_pairwise_model_is_refused(server):
    """Left at kind: pointwise, batches of batch_size spanning prompt groups were compared as one group on
    the server (a dark group's images against a bright group's), and nothing said so."""
    reward = build_reward("remote", url=server, model="pairwise_brightness", token="tok")
    with pytest.raises(RemoteRewardError, match="model is pairwise.*Fix: set the remote reward's kind: groupwise"):
        score_all(reward, images(4), ["p"] * 4, ids(0, 0, 1, 1), batch_size=4)


@pytest.mark.integration
def test_a_served_reward_that_abstains_abstains_remotely_too():
    """NaN is the reward contract's abstention (an OCR prompt without text, a judge's unreadable answer):
    served, it was a 500 for the whole batch, retried as if the server were down, then the run's error."""
    from services.reward import RewardServerSettings
    from tests.services.live_server import running_server

    x, prompts = images(3, seed=3), ["ok", "nan", "ok"]
    want = local("tests.services.reward_models.BadAt", x, prompts, ids(0, 1, 2))
    assert bool(torch.isnan(want[1])) and not bool(torch.isnan(want[::2]).any())
    with running_server(RewardServerSettings(rewards="tests.services.reward_models.BadAt")) as url:
        reward = build_reward("remote", url=url, retries=0)
        got = score_all(reward, x, prompts, ids(0, 1, 2), batch_size=3)
        assert torch.allclose(got, want, atol=1e-6, equal_nan=True)
        reward.close()


@pytest.mark.integration
def test_remote_against_live_server_errors(server, monkeypatch):
    monkeypatch.delenv("FLOWRL_API_TOKEN", raising=False)
    with pytest.raises(RemoteRewardError, match="HTTP 401"):
        build_reward("remote", url=server, model="brightness").score(images(1), ["a"])
    with pytest.raises(RemoteRewardError, match="serves 3 models .*set the remote reward's 'model'"):
        build_reward("remote", url=server, token="tok").score(images(1), ["a"])
    with pytest.raises(RemoteRewardError, match="HTTP 422: reward 'toy_geneval' rejected the inputs"):
        build_reward("remote", url=server, model="toy_geneval", token="tok").score(images(1), ["not a toy prompt"])


@pytest.mark.integration
def test_remote_finds_the_only_model(single_model_server):
    reward = build_reward("remote", url=single_model_server)
    x = images(2)
    assert torch.equal(reward.score(x, PROMPTS[:2]), local("toy_geneval", x, PROMPTS[:2], ids(0, 1)))
    assert reward.model == "toy_geneval"


def test_first_frame_sends_each_videos_first_frame_once():
    """video: first_frame, for a served judge: one image per video (frames sent every frame and averaged)."""
    reward = build_reward("remote", url="http://h", model="m", video="first_frame")
    seen = mocked(reward, lambda request, n: ok_scores(3))
    videos = torch.stack([images(3, seed=s) for s in range(4)], dim=1)  # [3, 4 frames, 3, H, W]
    assert score_all(reward, videos, PROMPTS[:3], ids(0, 1, 2), batch_size=8).tolist() == [0.25] * 3
    assert len(seen) == 1
    frames = build_reward("remote", url="http://h", model="m")
    every = mocked(frames, lambda request, n: ok_scores(3))
    score_all(frames, videos, PROMPTS[:3], ids(0, 1, 2), batch_size=8)
    assert len(every) == 4  # one request per frame
    with pytest.raises(ValueError, match="'frames', 'native' or 'first_frame'"):
        build_reward("remote", url="http://h", video="last_frame")
