"""Rewards that compare an output with its condition (source) images (``RewardModel.condition_images``):
the built-in ``source_similarity`` against closed forms, how ``score_all`` hands the images on
(sliced with the samples, shared by a video's frames, required), the embedded trainer giving an
edit model's dataset images to such a reward, and the reward server's two protocols carrying them
(v2 input ``condition_images`` BYTES ``[B, M]``, Flow-Factory's ``condition_images`` field)."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
import torch
from PIL import Image

from shared.rewards import RewardModel, build_reward, score_all


def pil(array: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in [0, 1] (exact in 8 bits) -> RGB PIL."""
    return Image.fromarray((array * 255).round().byte().permute(1, 2, 0).numpy())


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def levels(*values: float, size: int = 8) -> torch.Tensor:
    """``[N, 3, size, size]`` images, image ``i`` flat at ``values[i]`` (multiples of 1/255)."""
    return torch.stack([torch.full((3, size, size), v) for v in values])


def test_source_similarity_closed_forms():
    model = build_reward("source_similarity")
    out = levels(0.2, 1.0, 0.6)
    sources = [[pil(levels(0.2)[0])], [pil(levels(0.0)[0])], [pil(levels(0.4, size=16)[0])]]  # the last resized
    got = score_all(model, out, ["a", "b", "c"], torch.arange(3), 2, sources)
    torch.testing.assert_close(got, torch.tensor([1.0, 0.0, 0.8]), rtol=0, atol=1e-6)
    # half the image changed by 0.5: 1 - 0.25
    half = levels(0.2).clone()
    half[..., :4] = 0.7
    torch.testing.assert_close(score_all(model, half, ["a"], torch.arange(1), 1, sources[:1]),
                               torch.tensor([0.75]), rtol=0, atol=1e-6)


def test_condition_images_are_required_named_and_follow_their_samples():
    model = build_reward("source_similarity")
    with pytest.raises(ValueError, match="SourceSimilarity.*condition \\(source\\) images.*Fix"):
        score_all(model, levels(0.2, 0.4), ["a", "b"], torch.arange(2), 2)
    with pytest.raises(ValueError, match="Fix"):
        score_all(model, levels(0.2, 0.4), ["a", "b"], torch.arange(2), 2, [[], []])

    class SeesSources(RewardModel):  # groupwise: records the sources of each call
        kind = "groupwise"
        condition_images = True

        def __init__(self, **options):
            super().__init__(**options)
            self.calls = []

        def score_group(self, images, prompts, condition_images=None):
            self.calls.append([row[0].getpixel((0, 0))[0] for row in condition_images])
            return torch.zeros(images.shape[0])

    seen = SeesSources()
    sources = [[pil(levels(v / 255)[0])] for v in (10, 20, 30, 40)]
    score_all(seen, levels(0, 0, 0, 0), list("abcd"), torch.tensor([1, 0, 1, 0]), 4, sources)
    assert seen.calls == [[20, 40], [10, 30]]  # group 0 = samples 1, 3; group 1 = samples 0, 2
    seen.calls.clear()
    video = levels(0, 0).unsqueeze(1).expand(2, 3, 3, 8, 8)  # [B, F, 3, H, W]: every frame, the same sources
    score_all(seen, video, ["a", "b"], torch.tensor([0, 0]), 4, sources[:2])
    assert seen.calls == [[10, 20]] * 3
    # a reward that does not read them is not given any
    assert not build_reward("brightness").condition_images
    score_all(build_reward("brightness"), levels(0.2), ["a"], torch.arange(1), 1, sources[:1])


def test_embedded_trainer_gives_the_dataset_images_to_the_reward(tmp_path):
    """One epoch of an edit model trained on ``source_similarity``: the reward sees each row's own
    image, so its training reward is a real similarity, not the error a missing image raises."""
    import json as _json

    from tests.helpers.tiny_pipelines import TINY_PIPELINES, tiny_train_config
    from trainer.loop import train

    spec = TINY_PIPELINES["flux1-kontext"]
    folder = spec.save(tmp_path / "pipe")
    cfg = tiny_train_config(spec, folder, tmp_path)
    cfg = cfg.model_copy(update={"rewards": [cfg.rewards[0].model_copy(update={
        "reward_model": "source_similarity", "name": "keep"})]})
    summary = train(cfg, quiet=True)
    rows = [_json.loads(x) for x in (tmp_path / "runs" / spec.model_type / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["train/reward/keep"] for r in rows if "train/reward/keep" in r]
    assert summary["samples"] == 4 and rewards and all(0.0 < r < 1.0 for r in rewards)


@pytest.fixture(scope="module")
def server():
    from services.reward import RewardServerSettings
    from tests.services.live_server import running_server

    settings = RewardServerSettings(rewards=[{"reward_model": "source_similarity"}, {"reward_model": "brightness"}],
                                    max_queue_delay_ms=0, log_level="warning")
    with running_server(settings) as url:
        yield url


def test_server_takes_condition_images_in_both_protocols(server):
    from shared.rewards.remote import v2_request

    out, sources = levels(0.2, 0.6), [[pil(levels(0.2)[0])], [pil(levels(0.2, size=12)[0])]]
    meta = httpx.get(f"{server}/v2/models/source_similarity").json()
    assert [i["name"] for i in meta["inputs"]] == ["image", "prompt", "condition_images"]
    assert "condition_images" not in [i["name"] for i in httpx.get(f"{server}/v2/models/brightness").json()["inputs"]]

    remote = build_reward("remote", url=server, model="source_similarity", condition_images=True)
    got = score_all(remote, out, ["a", "b"], torch.arange(2), 2, sources)
    torch.testing.assert_close(got, torch.tensor([1.0, 0.6]), rtol=0, atol=1e-6)
    compute = build_reward("remote", url=server, protocol="flow-factory", condition_images=True)
    torch.testing.assert_close(score_all(compute, out, ["a", "b"], torch.arange(2), 2, sources), got)

    pngs = [base64.b64decode(png_b64(pil(x))) for x in out]
    body, headers = v2_request(pngs, ["a", "b"])  # no condition images for a reward that needs them
    r = httpx.post(f"{server}/v2/models/source_similarity/infer", content=body, headers=headers)
    assert r.status_code == 422 and "missing input 'condition_images'" in r.json()["error"]
    body, headers = v2_request(pngs, ["a", "b"], [[pngs[0]], [pngs[0]]])  # and some for one that does not
    r = httpx.post(f"{server}/v2/models/brightness/infer", content=body, headers=headers)
    assert r.status_code == 422 and "unknown input 'condition_images'" in r.json()["error"]
    r = httpx.post(f"{server}/compute", content=json.dumps(
        {"prompt": ["a", "b"], "image": [png_b64(pil(x)) for x in out], "condition_images": None}))
    assert r.status_code == 422 and "condition (source) images" in r.json()["error"]
    r = httpx.post(f"{server}/compute", content=json.dumps(
        {"prompt": ["a", "b"], "image": [png_b64(pil(x)) for x in out], "condition_images": [["x"]]}))
    assert r.status_code == 422 and "one list of base64 images per prompt" in r.json()["error"]
    with pytest.raises(ValueError, match="images each. Fix: give every row the same number"):
        v2_request(pngs, ["a", "b"], [[pngs[0]], [pngs[0], pngs[1]]])
