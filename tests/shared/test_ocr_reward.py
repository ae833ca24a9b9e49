"""The ``ocr`` reward: the scoring rule against closed forms, and the real recognizer (RapidOCR's
PP-OCR models) reading rendered text."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from shared.rewards import build_reward, score_all
from shared.rewards.ocr import edit_distance, normalize, ocr_score, quoted_text
from tests.helpers.text_images import render_text


@pytest.mark.parametrize("a,b,d", [
    ("", "", 0), ("abc", "", 3), ("", "abc", 3), ("kitten", "sitting", 3), ("flaw", "lawn", 2),
    ("intention", "execution", 5), ("abc", "abc", 0), ("abc", "acb", 2), ("a", "b", 1),
])
def test_edit_distance_closed_forms(a, b, d):
    assert edit_distance(a, b) == d
    assert edit_distance(b, a) == d


def test_edit_distance_is_a_metric_on_random_strings():
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abc") for _ in range(rng.randint(0, 7))) for _ in range(40)]
    for x, y, z in zip(words, words[1:], words[2:]):
        assert edit_distance(x, z) <= edit_distance(x, y) + edit_distance(y, z)
        assert abs(len(x) - len(y)) <= edit_distance(x, y) <= max(len(x), len(y))


def test_quoted_text_and_normalize():
    assert quoted_text('A sign that says "Open 24 Hours" on a wall') == "Open 24 Hours"
    assert quoted_text('a mug reading "Hi" and "Bye"') == "Hi"
    assert quoted_text("a poster saying \u201cflow matching\u201d") == "flow matching"
    assert quoted_text("a cat on a mat") is None
    assert quoted_text('a sign that says ""') == ""
    assert normalize(" Open\t24\nHours ") == "open24hours"


def test_ocr_score_rule():
    assert ocr_score("OPEN 24 HOURS", "Open 24 Hours") == 1.0
    assert ocr_score("Sale! Open 24 hours today", "open 24 hours") == 1.0  # the target inside more text
    assert ocr_score("Opan 24 Hours", "Open 24 Hours") == pytest.approx(1 - 1 / 11)  # one substitution of 11
    assert ocr_score("", "hello") == 0.0
    assert ocr_score("a completely different and much longer text", "hello") == 0.0  # distance capped at n
    assert math.isnan(ocr_score("anything", "  "))


@pytest.fixture(scope="module")
def ocr():
    return build_reward("ocr", device="cpu", dtype="float32")


def test_reads_rendered_text(ocr):
    words = ["flow matching", "GRPO", "Open 24 Hours", "reward"]
    images = torch.stack([render_text(w, seed=i) for i, w in enumerate(words)])
    prompts = [f'A sign that says "{w}"' for w in words]
    assert ocr.score(images, prompts).tolist() == [1.0, 1.0, 1.0, 1.0]
    # the same images under other prompts: partial or no credit, by the rule
    wrong = ['A sign that says "flow marching"', 'A sign that says "GRPQ"', 'A sign that says "Closed"',
             'A sign that says "rewards"']
    got = ocr.score(images, wrong)
    want = torch.tensor([ocr_score(ocr.read(a), quoted_text(p)) for a, p in
                         zip((images * 255).round().byte().permute(0, 2, 3, 1).numpy(), wrong)])
    assert torch.equal(got, want)
    assert got[0] == pytest.approx(1 - 1 / 12)  # 'flowmatching' -> 'flowmarching': one insertion of 12 and got[1] == pytest.approx(0.75)
    assert bool((got < 1).all())


def test_blank_image_scores_zero_and_unquoted_prompt_abstains(ocr, caplog):
    blank = render_text("")[None]
    assert ocr.score(blank, ['A sign that says "hello"']).tolist() == [0.0]
    with caplog.at_level(logging.WARNING, logger="flowrl.reward.ocr"):
        out = ocr.score(torch.cat([blank, blank]), ["a cat on a mat", "a cat on a mat"])
    assert bool(torch.isnan(out).all())
    warnings = [r for r in caplog.records if "quotes no text" in r.getMessage()]
    assert len(warnings) == 1 and "A sign that says" in warnings[0].getMessage()


def test_details_exact_and_video_frames(ocr):
    images = torch.stack([render_text("hello"), render_text("help")])
    prompts = ['A sign that says "hello"', 'A sign that says "hello"']
    exact = ocr.details(images, prompts)["exact"]
    assert exact.tolist() == [1.0, 0.0]
    # a video is scored frame by frame and averaged: one readable frame of two -> (1 + 0) / 2
    video = torch.stack([render_text("hello"), render_text("")])[None]
    got = score_all(ocr, video, ['A sign that says "hello"'], torch.tensor([0]), batch_size=4)
    assert got.tolist() == [0.5]


def test_min_confidence_drops_every_line_at_one():
    strict = build_reward("ocr", device="cpu", dtype="float32", min_confidence=1.0)
    # no recognizer is certain to the last digit, so everything is dropped and nothing matches
    assert strict.score(render_text("hello")[None], ['A sign that says "hello"']).tolist() == [0.0]


def test_bad_options_fail_at_load():
    with pytest.raises(ValueError, match="min_confidence"):
        build_reward("ocr", min_confidence=2)
    from shared.rewards import REWARDS
    from shared.rewards.base import option_problems

    assert option_problems(REWARDS.get("ocr"), {"min_confidense": 0.5}) == [
        "unknown option 'min_confidense' (did you mean 'min_confidence'?)"]
