"""``rational_rewards_t2i`` / ``rational_rewards_edit`` against a real HTTP server speaking the
OpenAI chat completions API (FastAPI under uvicorn): a stand-in judge that writes rubric judgements
whose scores are functions of the images' brightness, so the reward has a closed form. The parser
and the mapping onto [0, 1] are checked on their own against hand-written judgements."""

from __future__ import annotations

import math

import pytest
import torch

from shared.rewards import build_reward, score_all
from shared.rewards.rational import (EDIT_ASPECTS, T2I_ASPECTS, RationalRewardsEdit, RationalRewardsT2I,
                                     parse_aspect_scores, rubric_reward)
from shared.rewards.remote import RemoteRewardError
from tests.helpers.fake_judge import judge_state, rational_app, rational_scores
from tests.services.live_server import running_app


@pytest.fixture(scope="module")
def judge():
    state = judge_state()
    with running_app(rational_app(state), ready_path="/v1/models") as url:
        yield f"{url}/v1", state


def q(v: float) -> float:
    """``v`` rounded to 8 bits, as a PNG holds it."""
    return round(v * 255) / 255


def flat(*values: float, size: int = 8) -> torch.Tensor:
    """``[N, 3, size, size]``, image ``i`` flat at ``q(values[i])``."""
    return torch.stack([torch.full((3, size, size), q(v)) for v in values])


def pil(value: float, size: int = 12):
    from PIL import Image
    return Image.new("RGB", (size, size), (round(value * 255),) * 3)


def expected(scores: dict, aspects) -> float:
    values = [min(max(scores[a], 1.0), 4.0) for a in aspects if scores.get(a) is not None]
    return (sum(values) / len(values) - 1) / 3


# --- the pure functions ---------------------------------------------------------------------------

JUDGEMENT = """# User Request Analysis
The user wants a red cube; a detailed judgement follows.
1. Text Faithfulness:
## Score: 1
<think>
# Detailed Judgement
1. Text Faithfulness:
## Score: 2
</think>
# Detailed Judgement
1. Text Faithfulness:
## Justification: the cube is red.
Text rendering is judged below, so only the cube counts here.
Physical and visual quality aside, the colour is right.
## Score: 3.5
2. **Physical and Visual Quality**:
## Justification: a faint seam.
Score: [2.75]
3. Text Rendering:
## Justification: no text was asked for.
**Summary:** good.
## Score: 1
"""


def test_parse_reads_each_sections_score_and_ignores_the_analysis_drafts_and_summary():
    # the analysis and the <think> draft score text faithfulness 1 and 2, the summary gives text
    # rendering a 1, and two sentences of the first section start with later aspects' names
    assert parse_aspect_scores(JUDGEMENT, T2I_ASPECTS) == {"text_faithfulness": 3.5, "physical_quality": 2.75}
    na = JUDGEMENT.replace("**Summary:** good.\n## Score: 1", "## Score: N/A (no text)")
    assert parse_aspect_scores(na, T2I_ASPECTS)["text_rendering"] is None


def test_parse_reads_scores_written_other_ways():
    j = "# Detailed Judgement\n"
    for text, want in [("1. Text Faithfulness: 3.5\n", 3.5),  # on the heading line
                       ("1. Text Faithfulness (Score: 2.5)\n", 2.5),
                       ("1. Text Faithfulness: ## Score: 3\n", 3.0),
                       ("**1. Text Faithfulness:**\n**Score:** 3.25\n", 3.25),
                       ("1. Text Faithfulness:\nFinal score: 3\n", 3.0),
                       ("1. Text Faithfulness:\n## Score (1-4): 2\n", 2.0),
                       ("1. Text Faithfulness:\n## Score: 3.5/4\n", 3.5),
                       ("1. Text Faithfulness:\n## Score：4\n", 4.0)]:
        assert parse_aspect_scores(j + text, T2I_ASPECTS) == {"text_faithfulness": want}, text
    # no Detailed Judgement heading: the sections are read anyway, and a summary that mentions one
    # does not hide them
    bare = "1. Text Faithfulness:\n## Score: 3\n2. Physical and Visual Quality:\n## Score: 2\n# Summary: a detailed judgement."
    assert parse_aspect_scores(bare, T2I_ASPECTS) == {"text_faithfulness": 3.0, "physical_quality": 2.0}


def test_parse_leaves_out_what_it_cannot_read():
    text = "# Detailed Judgement\n1. Text Faithfulness:\n## Score: excellent\n## Score: 4\n2. Text Rendering:\nnone"
    assert parse_aspect_scores(text, T2I_ASPECTS) == {"text_faithfulness": 4.0}  # first readable score
    assert parse_aspect_scores("I cannot judge this image.", T2I_ASPECTS) == {}
    # sections in another order, headings without numbers (a line with the name alone)
    swapped = "**Physical and Visual Quality**\nScore: 2\nText Faithfulness:\nScore: 1.5"
    assert parse_aspect_scores(swapped, T2I_ASPECTS) == {"physical_quality": 2.0, "text_faithfulness": 1.5}


def test_edit_sections_are_told_apart():
    text = ("# Detailed Judgement\n1. Text Faithfulness:\nImage faithfulness is next.\n## Score: 4\n"
            "2. Image Faithfulness:\n## Score: 2\n"
            "3. Physical and Visual Quality:\n## Score: 3\n4. Text Rendering:\n## Score: n/a\n")
    assert parse_aspect_scores(text, EDIT_ASPECTS) == {"text_faithfulness": 4.0, "image_faithfulness": 2.0,
                                                       "physical_quality": 3.0, "text_rendering": None}


def test_rubric_reward_closed_forms():
    scores = {"text_faithfulness": 3.5, "physical_quality": 2.75, "text_rendering": None}
    assert rubric_reward(scores, T2I_ASPECTS) == pytest.approx((3.125 - 1) / 3)  # N/A skipped
    assert rubric_reward(scores, ["text_faithfulness"]) == pytest.approx(2.5 / 3)
    assert rubric_reward({"text_faithfulness": 9.0, "physical_quality": -2.0}, T2I_ASPECTS) == pytest.approx(0.5)
    assert rubric_reward({"text_faithfulness": 4.0}, T2I_ASPECTS) == 1.0 and rubric_reward(
        {"text_faithfulness": 1.0}, T2I_ASPECTS) == 0.0
    assert math.isnan(rubric_reward({"text_rendering": None}, T2I_ASPECTS))
    assert math.isnan(rubric_reward({}, T2I_ASPECTS))


# --- against the stand-in judge -------------------------------------------------------------------

def test_t2i_reward_is_the_mean_aspect_score_mapped_onto_0_1(judge):
    url, state = judge
    x = flat(0.1, 0.5, 0.9, 0.3)
    prompts = ["a red cube", "a sign that says \"open\"", "a cat", "a dog"]
    reward = build_reward("rational_rewards_t2i", url=url, token="sk-test", max_concurrent=2)
    got = score_all(reward, x, prompts, torch.arange(4), batch_size=4)
    want = [expected(rational_scores(q(v), None, '"' in p), T2I_ASPECTS) for v, p in zip([0.1, 0.5, 0.9, 0.3], prompts)]
    torch.testing.assert_close(got, torch.tensor(want), rtol=0, atol=1e-5)
    body = state["bodies"][-1]
    assert body["model"] == "RationalRewards-8B-T2I" and body["temperature"] == 0.1 and body["max_tokens"] == 2048
    system, user = body["messages"]
    assert system["role"] == "system" and "text-to-image" in system["content"]
    kinds = [p["type"] for p in user["content"]]
    assert kinds.count("image_url") == 1 and user["content"][0]["text"].startswith("Instruction: a ")
    assert state["auth"][-1] == "Bearer sk-test" and 1 < state["max_inflight"] <= 2


def test_aspects_choose_what_is_averaged(judge):
    url, _ = judge
    reward = build_reward("rational_rewards_t2i", url=url, aspects=["physical_quality"])
    got = reward.score(flat(0.6), ["a cat"])
    assert got.item() == pytest.approx((3 * q(0.6) ** 2) / 3, abs=1e-4)


def test_edit_shows_the_source_then_the_edited_image(judge):
    url, state = judge
    edited = flat(0.8, 0.2)
    sources = [[pil(0.4), pil(1.0)], [pil(0.2)]]
    reward = build_reward("rational_rewards_edit", url=url)
    assert isinstance(reward, RationalRewardsEdit) and reward.condition_images
    got = score_all(reward, edited, ["make it brighter", "keep it"], torch.arange(2), 2, sources)
    want = [expected(rational_scores(q(0.8), q(0.4), False), EDIT_ASPECTS),  # only the first source is shown
            expected(rational_scores(q(0.2), q(0.2), False), EDIT_ASPECTS)]
    torch.testing.assert_close(got, torch.tensor(want), rtol=0, atol=1e-5)
    body = state["bodies"][-1]
    assert body["model"] == "RationalRewards-8B-Edit" and "editing" in body["messages"][0]["content"]
    assert [p["type"] for p in body["messages"][1]["content"]].count("image_url") == 2
    # all sources: the built-in rubric lists each of them, and the judge compares with the first
    every = build_reward("rational_rewards_edit", url=url, sources="all")
    got = every.score(edited[:1], ["make it brighter"], condition_images=[[pil(0.6), pil(1.0)]])
    assert got.item() == pytest.approx(expected(rational_scores(q(0.8), q(0.6), False), EDIT_ASPECTS), abs=1e-5)
    content = state["bodies"][-1]["messages"][1]["content"]
    assert [p["type"] for p in content].count("image_url") == 3 and "Source image 2:" in content[2]["text"]
    with pytest.raises(ValueError, match="source image.*Fix: .*rational_rewards_t2i"):
        reward.score(edited, ["a", "b"], condition_images=[[pil(0.1)], []])


def test_a_judgement_without_scores_abstains_and_a_failing_judge_raises(judge, caplog):
    url, state = judge
    reward = build_reward("rational_rewards_t2i", url=url, retries=2, backoff=0.01)
    with caplog.at_level("WARNING"):
        got = reward.score(flat(0.5, 0.5), ["a riddle", "a cat"])
    assert math.isnan(got[0]) and not math.isnan(got[1])
    assert "'a riddle'" in caplog.text and "abstains" in caplog.text and "cannot tell" in caplog.text
    sent = reward.requests
    assert math.isnan(reward.score(flat(0.5), ["a riddle"])[0]) and reward.requests == sent + 1  # not cached
    with caplog.at_level("WARNING"):
        caplog.clear()
        got = reward.score(flat(0.5, 0.5), ["a truncated cat", "an empty reply"])
    assert not math.isnan(got[0]) and math.isnan(got[1])  # the aspects read before the cut still count
    assert "cut off at max_tokens (2048): raise max_tokens" in caplog.text and "The reply was empty" in caplog.text
    assert not math.isnan(reward.score(flat(0.5), ["flaky"])[0])  # two 503s, then a judgement
    assert state["flaky"] == 3
    with pytest.raises(RemoteRewardError, match=r"failed after 3 attempt\(s\).*judge crashed"):
        reward.score(flat(0.5), ["broken"])


def test_a_repeated_sample_is_answered_from_the_cache(judge):
    url, _ = judge
    reward = build_reward("rational_rewards_t2i", url=url)
    x = flat(0.3, 0.7)
    first = reward.score(x, ["a", "b"])
    assert torch.equal(reward.score(torch.cat([x, x]), ["a", "b", "a", "b"]), torch.cat([first, first]))
    assert reward.requests == 2
    # only text rendering, for prompts without text: N/A is an answer (cached, no warning), the sample abstains
    text_only = build_reward("rational_rewards_t2i", url=url, aspects=["text_rendering"])
    assert math.isnan(text_only.score(flat(0.3), ["a"])[0]) and math.isnan(text_only.score(flat(0.3), ["a"])[0])
    assert text_only.requests == 1


def test_videos_are_judged_on_their_first_frame(judge):
    url, _ = judge
    video = torch.stack([flat(0.2, 0.9, 0.9), flat(0.6, 0.1, 0.1)])  # [2, 3 frames, 3, 8, 8]
    got = score_all(build_reward("rational_rewards_t2i", url=url), video, ["a", "b"], torch.arange(2), 2)
    want = [expected(rational_scores(q(v), None, False), T2I_ASPECTS) for v in (0.2, 0.6)]
    torch.testing.assert_close(got, torch.tensor(want), rtol=0, atol=1e-5)


def test_a_rubric_file_replaces_the_built_in_one(judge, tmp_path):
    url, state = judge
    rubric = tmp_path / "rubric.txt"
    rubric.write_text("Instruction: {prompt}\nLook at <image> and score Text Faithfulness 1-4.")
    reward = build_reward("rational_rewards_t2i", url=url, rubric_file=str(rubric), system_prompt="Be strict.")
    assert reward.score(flat(0.5), ["a cat"]).item() == pytest.approx(
        expected(rational_scores(q(0.5), None, False), T2I_ASPECTS), abs=1e-5)
    system, user = state["bodies"][-1]["messages"]
    assert system["content"] == "Be strict." and user["content"][0]["text"] == "Instruction: a cat\nLook at "
    assert user["content"][2]["text"].startswith(" and score Text Faithfulness")
    # a prompt may itself say <image>: it is text, not a marker
    assert not math.isnan(reward.score(flat(0.5), ["a poster that says <image>"])[0])
    user = state["bodies"][-1]["messages"][1]
    assert [p["type"] for p in user["content"]] == ["text", "image_url", "text"]
    assert user["content"][0]["text"] == "Instruction: a poster that says <image>\nLook at "


def test_options_are_checked_with_a_fix(tmp_path):
    two = tmp_path / "two.txt"
    two.write_text("{prompt} <image> <image>")
    no_prompt = tmp_path / "no_prompt.txt"
    no_prompt.write_text("<image>")
    one = tmp_path / "one.txt"
    one.write_text("{prompt} <image>")
    for name, bad, message in [
            ("rational_rewards_t2i", {"url": "localhost:8000"}, "OpenAI API root"),
            ("rational_rewards_t2i", {"aspects": ["image_faithfulness"]}, "drawn from"),
            ("rational_rewards_t2i", {"aspects": "text_faithfulness"}, "non-empty list"),
            ("rational_rewards_t2i", {"rubric_file": str(tmp_path / "none.txt")}, "cannot read rubric_file"),
            ("rational_rewards_t2i", {"rubric_file": str(two)}, "2 <image> marker"),
            ("rational_rewards_t2i", {"rubric_file": str(no_prompt)}, "no {prompt} marker"),
            ("rational_rewards_t2i", {"temperature": -1}, "temperature"),
            ("rational_rewards_edit", {"sources": "last"}, "'first'"),
            ("rational_rewards_edit", {"sources": "all", "rubric_file": str(one)}, "each source image and then"),
            ("rational_rewards_edit", {"rubric_file": str(no_prompt)}, "no {prompt}")]:
        with pytest.raises(ValueError, match=message):
            build_reward(name, **{"url": "http://h/v1", **bad})
    assert isinstance(build_reward("rational_rewards_edit", url="http://h/v1", rubric_file=str(two)), RationalRewardsEdit)
    assert isinstance(build_reward("rational_rewards_t2i", url="http://h/v1"), RationalRewardsT2I)
    assert "sk-secret" not in repr(build_reward("rational_rewards_t2i", url="http://h/v1", token="sk-secret"))
