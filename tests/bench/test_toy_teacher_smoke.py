"""``bench/toy_teacher.py``: the contrastive negatives, the guidance-interval velocity against its
closed form, and a tiny end-to-end run that writes the JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import toy_teacher  # noqa: E402
from shared.models import load_adapter  # noqa: E402
from tests.helpers.tiny import tiny_config  # noqa: E402


def test_contrastive_negatives_reverse_the_binding():
    neg = toy_teacher.contrastive_negative
    assert neg("a photo of a circle left of a square", "position") == "a photo of a circle right of a square"
    assert neg("a photo of a triangle above a circle", "position") == "a photo of a triangle below a circle"
    assert neg("a photo of a square below a circle", "position") == "a photo of a square above a circle"
    assert (neg("a photo of a red circle and a green square", "color_attr")
            == "a photo of a green circle and a red square")
    assert neg("a photo of two circles", "counting") is None
    assert neg("a photo of a red circle", "colors") is None


def test_contrastive_dataset_only_adds_negatives(tmp_path):
    data = toy_teacher.write_contrastive(ROOT / "examples" / "data" / "toy-balanced", tmp_path / "d")
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    src = [json.loads(line) for line in (ROOT / "examples/data/toy-balanced/test.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in src]
    with_neg = {r["metadata"]["category"] for r in rows if "negative_prompt" in r}
    assert with_neg == {"position", "color_attr"}
    assert all(r["negative_prompt"] != r["prompt"] for r in rows if "negative_prompt" in r)


def test_guidance_interval_matches_its_closed_form(tmp_path):
    cfg = tiny_config(tmp_path)
    adapter = load_adapter(cfg.model, device=torch.device("cpu"), seed=0)
    shape = adapter.latent_shape((cfg.train.resolution, cfg.train.resolution))
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.8, 0.3])
    cond = adapter.encode_prompts(["a red circle", "a blue square"], cfg=True)
    with torch.no_grad():
        v_cond, v_uncond = adapter.cfg_velocities(adapter.transformer, x, sigma, cond)
        plain = adapter.velocity(x, sigma, cond, 4.0)
        with toy_teacher.guidance_interval(0.5):
            v = adapter.velocity(x, sigma, cond, 4.0)
        after = adapter.velocity(x, sigma, cond, 4.0)
    torch.testing.assert_close(v[0], (v_uncond + 4.0 * (v_cond - v_uncond))[0])  # sigma 0.8 > 0.5: guided
    torch.testing.assert_close(v[1], v_cond[1])  # sigma 0.3: unguided
    torch.testing.assert_close(after, plain)  # the patch is undone


def test_toy_teacher_writes_json(tmp_path):
    out = tmp_path / "teacher.json"
    toy_teacher.main(["--variants", "cfg 1", "contrastive 2", "--set", "eval.images_per_prompt=1",
                      "--set", "eval.num_inference_steps=2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["cfg 1", "contrastive 2"]
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and "accuracy/position" in r
