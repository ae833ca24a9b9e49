"""``unifiedreward`` / ``vlm_score`` against a real HTTP server speaking the OpenAI chat completions
API (FastAPI under uvicorn): a stand-in judge that writes ``Final Score: 1 + 4 b`` for an image of
mean brightness b after a decoy in its reasoning, so the reward has a closed form."""

from __future__ import annotations

import math
import re

import pytest
import torch

from shared.rewards import build_reward, score_all
from shared.rewards.remote import RemoteRewardError
from shared.rewards.score_judge import SCORE_PATTERN, read_score
from tests.helpers.fake_judge import judge_state, score_app
from tests.services.live_server import running_app


@pytest.fixture(scope="module")
def judge():
    state = judge_state()
    with running_app(score_app(state), ready_path="/v1/models") as url:
        yield f"{url}/v1", state


def flat(n: int, seed: int = 0, size: int = 8) -> torch.Tensor:
    """Images of one grey level each (brightness survives resizing exactly, up to PNG's uint8)."""
    levels = torch.randint(20, 236, (n, 1, 1, 1), generator=torch.Generator().manual_seed(seed)).float() / 255
    return levels.expand(n, 3, size, size).contiguous()


def test_read_score_takes_the_last_score_on_the_scale():
    pattern = re.compile(SCORE_PATTERN)
    assert read_score("as 'Final Score: 1' ... Final Score: 4.5", pattern, 1, 5) == 4.5
    assert read_score("Final Score:3", pattern, 1, 5) == 3.0
    assert math.isnan(read_score("Final Score: 7", pattern, 1, 5))  # off the scale
    assert math.isnan(read_score("I think it is a four.", pattern, 1, 5))
    assert math.isnan(read_score("", pattern, 1, 5))


def test_the_reward_is_the_judges_score_over_five(judge):
    url, state = judge
    x = flat(6, size=40)
    reward = build_reward("unifiedreward", url=url, token="sk-test", max_concurrent=3)
    got = score_all(reward, x, [f"prompt {i}" for i in range(6)], torch.arange(6), batch_size=6)
    torch.testing.assert_close(got, (1 + 4 * x.mean(dim=(1, 2, 3))) / 5, rtol=0, atol=1e-4)
    body = state["bodies"][-1]
    assert body["model"] == "UnifiedReward-7b-v1.5" and body["temperature"] == 0.0
    assert "Final Score:" in body["messages"][0]["content"][1]["text"]
    assert any(b["messages"][0]["content"][1]["text"].endswith("Text Caption: [prompt 5]") for b in state["bodies"])
    assert state["sizes"][-6:] == [(512, 512)] * 6  # resized as Flow-GRPO sends them
    assert state["auth"][-1] == "Bearer sk-test" and 1 < state["max_inflight"] <= 3
    as_generated = build_reward("unifiedreward", url=url, image_size=None)
    torch.testing.assert_close(as_generated.score(x[:2], ["a", "b"]), got[:2], rtol=0, atol=1e-4)
    assert state["sizes"][-1] == (40, 40)
    video = torch.stack([x[:2], 1 - x[:2]], dim=1)  # [B, F, 3, H, W]: judged on the first frame
    torch.testing.assert_close(as_generated.score(video, ["a", "b"]), got[:2], rtol=0, atol=1e-4)
    # through score_all, as training scores: one request per video, not one per frame averaged
    fresh = build_reward("unifiedreward", url=url, image_size=None)  # (its own cache: every frame is new to it)
    asked = len(state["bodies"])
    torch.testing.assert_close(score_all(fresh, video, ["a", "b"], torch.arange(2), batch_size=2),
                               got[:2], rtol=0, atol=1e-4)
    assert len(state["bodies"]) - asked == 2


def test_another_judge_and_scale(judge):
    url, _ = judge
    x = flat(3, seed=1)
    reward = build_reward("vlm_score", url=url, model="judge", question="Rate {prompt} from 0 to 10. Rating:",
                          score_pattern=r"Rating:\s*(\d+)", min_score=0, max_score=10)
    torch.testing.assert_close(reward.score(x, ["a", "b", "c"]), (10 * x.mean(dim=(1, 2, 3))).round() / 10)


def test_a_reply_without_a_score_on_the_scale_abstains_and_is_asked_again(judge, caplog):
    url, _ = judge
    reward = build_reward("unifiedreward", url=url)
    x = flat(3, seed=2)
    with caplog.at_level("WARNING"):
        got = reward.score(x, ["a riddle", "offscale", "fine"])
    assert math.isnan(got[0]) and math.isnan(got[1]) and not math.isnan(got[2])
    assert "'a riddle'" in caplog.text and "abstains" in caplog.text and "I cannot judge" in caplog.text
    sent = reward.requests
    reward.score(x, ["a riddle", "offscale", "fine"])
    assert reward.requests == sent + 2  # the two abstentions were not cached; the score was


def test_transient_failures_are_retried_and_a_dead_judge_raises(judge):
    url, state = judge
    reward = build_reward("unifiedreward", url=url, backoff=0.01)
    assert not math.isnan(reward.score(flat(1, seed=3), ["flaky"])[0])
    with pytest.raises(RemoteRewardError):
        build_reward("unifiedreward", url=url, retries=1, backoff=0.01).score(flat(1), ["broken"])


def test_the_question_can_come_from_a_file(judge, tmp_path):
    url, state = judge
    (tmp_path / "q.txt").write_text("<image>\nJudge it {strictly}.\nText Caption: [{prompt}]\n")
    reward = build_reward("unifiedreward", url=url, question_file=str(tmp_path / "q.txt"))
    x = flat(1, seed=5)
    torch.testing.assert_close(reward.score(x, ["a fox"]), (1 + 4 * x.mean(dim=(1, 2, 3))) / 5, rtol=0, atol=1e-4)
    assert state["bodies"][-1]["messages"][0]["content"][1]["text"] == \
        "<image>\nJudge it {strictly}.\nText Caption: [a fox]"


@pytest.mark.parametrize("options, message", [
    ({"question": "  "}, "question is empty"),
    ({"question_file": "/nowhere/q.txt"}, "cannot read question_file"),
    ({"score_pattern": r"Final Score: \d"}, "needs a group"),
    ({"score_pattern": "(["}, "not a regular expression"),
    ({"min_score": 5, "max_score": 5}, "min_score < max_score"),
    ({"image_size": 0}, "image_size"),
    ({"url": "sglang:17140"}, "OpenAI API root"),
])
def test_bad_options_say_what_to_do(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_reward("unifiedreward", **{"url": "http://127.0.0.1:9/v1", **options})


def test_a_served_judge_takes_images(judge):
    """Judging a video on its first frame ("first_frame") leaves the judge an image reward when served:
    marked "native" (whole videos), the reward server took only videos and refused every image (422)."""
    import base64

    from fastapi.testclient import TestClient

    from services.reward import RewardServerSettings
    from services.reward.server import create_app
    from shared.rewards.remote import encode_png

    url, _ = judge
    x = flat(2, seed=4)
    local = build_reward("unifiedreward", url=url, image_size=None).score(x, ["a", "b"])
    served = RewardServerSettings(rewards=f'[{{"name": "judge", "reward_model": "unifiedreward", "url": "{url}", '
                                          f'"image_size": null}}]')
    with TestClient(create_app(served)) as c:
        inputs = c.get("/v2/models/judge").json()["inputs"]
        assert [i["name"] for i in inputs] == ["image", "prompt"]
        pngs = encode_png(x)
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                            "data": [base64.b64encode(p).decode() for p in pngs]},
                           {"name": "prompt", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]}]}
        r = c.post("/v2/models/judge/infer", json=body)
        assert r.status_code == 200, r.text
        torch.testing.assert_close(torch.tensor(r.json()["outputs"][0]["data"]), local, rtol=0, atol=1e-4)
