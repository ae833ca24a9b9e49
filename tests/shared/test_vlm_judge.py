"""``vlm_judge`` against a real HTTP server speaking the OpenAI chat completions API (FastAPI under
uvicorn): a stand-in judge whose probability of "Yes" is the image's mean brightness, so the
reward has a closed form."""

from __future__ import annotations

import math

import pytest
import torch

from shared.rewards import build_reward, score_all
from shared.rewards.remote import RemoteRewardError
from shared.rewards.vlm_judge import VLMJudge, yes_probability
from tests.helpers.fake_judge import judge_app, judge_state
from tests.services.live_server import running_app


@pytest.fixture(scope="module")
def judge():
    state = judge_state()
    with running_app(judge_app(state), ready_path="/v1/models") as url:
        yield f"{url}/v1", state


def images(n: int, seed: int = 0) -> torch.Tensor:
    u8 = torch.randint(20, 236, (n, 3, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return u8.float().div(255.0)


def test_the_reward_is_the_judges_probability_of_yes(judge):
    url, state = judge
    x = images(6)
    reward = build_reward("vlm_judge", url=url, model="judge", token="sk-test", max_concurrent=3)
    got = score_all(reward, x, [f"prompt {i}" for i in range(6)], torch.arange(6), batch_size=6)
    assert torch.allclose(got, x.mean(dim=(1, 2, 3)), atol=1e-6)
    body = state["bodies"][-1]
    assert body["model"] == "judge" and body["max_tokens"] == 1 and body["logprobs"] is True
    assert body["messages"][0]["content"][1]["text"].startswith('Does this image show "prompt ')
    assert state["auth"][-1] == "Bearer sk-test"
    assert 1 < state["max_inflight"] <= 3  # requests overlap, at most max_concurrent at once


def test_a_repeated_image_and_prompt_is_answered_from_the_cache(judge):
    url, _ = judge
    reward = build_reward("vlm_judge", url=url, model="judge")
    x = images(2, seed=3)
    first = reward.score(x, ["a", "b"])
    again = reward.score(torch.cat([x, x]), ["a", "b", "a", "b"])
    assert torch.equal(again, torch.cat([first, first])) and reward.requests == 2
    assert build_reward("vlm_judge", url=url, model="judge", cache_size=0).score(x, ["a", "b"]).shape == (2,)


def test_an_answer_that_is_neither_yes_nor_no_abstains_with_a_warning(judge, caplog):
    url, _ = judge
    reward = build_reward("vlm_judge", url=url, model="judge")
    with caplog.at_level("WARNING"):
        got = reward.score(images(2), ["a riddle", "a cat"])
    assert math.isnan(got[0]) and not math.isnan(got[1])
    assert "'a riddle'" in caplog.text and "abstains" in caplog.text


def test_a_failing_judge_is_retried_then_raises_never_a_score(judge):
    url, state = judge
    reward = build_reward("vlm_judge", url=url, model="judge", retries=2, backoff=0.01)
    assert not math.isnan(reward.score(images(1), ["flaky"])[0])  # two 503s, then an answer
    assert state["flaky"] == 3
    with pytest.raises(RemoteRewardError, match=r"VLM judge at .* failed after 3 attempt\(s\).*judge crashed"):
        reward.score(images(1), ["broken"])


def test_yes_probability_closed_forms():
    alt = [{"token": "Yes", "logprob": math.log(0.6)}, {"token": "No", "logprob": math.log(0.2)}]
    assert yes_probability(alt) == pytest.approx(0.75)
    cased = alt + [{"token": " yes", "logprob": math.log(0.2)}]
    assert yes_probability(cased) == pytest.approx(0.8)  # (0.6 + 0.2) / (0.6 + 0.2 + 0.2)
    assert yes_probability(cased, canonicalize=False) == pytest.approx(0.75)
    only_yes = [{"token": "Yes", "logprob": math.log(0.9)}, {"token": "Sure", "logprob": math.log(0.05)}]
    assert yes_probability(only_yes) == pytest.approx(0.9 / 0.95)  # No bounded by the lowest listed
    assert math.isnan(yes_probability([{"token": "Maybe", "logprob": -0.1}]))
    assert math.isnan(yes_probability([]))


def test_options_are_checked_and_flow_factorys_name_builds_it():
    assert isinstance(build_reward("vllm_evaluate", url="http://h/v1", model="m"), VLMJudge)
    for bad, message in [({"url": "h:8000", "model": "m"}, "OpenAI API root"),
                         ({"url": "http://h/v1", "model": ""}, "name the served model"),
                         ({"url": "http://h/v1", "model": "m", "question": "{image}?"}, "only {prompt}"),
                         ({"url": "http://h/v1", "model": "m", "top_logprobs": 50}, "top_logprobs <= 20")]:
        with pytest.raises(ValueError, match=message):
            build_reward("vlm_judge", **bad)
    assert "sk-secret" not in repr(build_reward("vlm_judge", url="http://h/v1", model="m", token="sk-secret"))
