"""``diversity``: each image's cosine distance to the rest of its group in a frozen vision model's
features (a tiny random DINOv2 or CLIP saved locally): closed forms on hand-made features, the
reward equal to those forms on the model's own features, NaN for a group of one, and groups scored
apart through ``score_all``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from shared.rewards import build_reward, score_all
from shared.rewards.diversity import group_distances


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    from tests.helpers.tiny_clip import save_image_processor

    folder = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=28, patch_size=7)
    Dinov2Model(config).eval().save_pretrained(folder)
    save_image_processor(folder, size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28})
    return str(folder)


def test_group_distances_closed_forms():
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])  # cos: (0,1)=0, (0,2)=-1, (1,2)=0
    torch.testing.assert_close(group_distances(f), torch.tensor([1.5, 1.0, 1.5]))  # mean of (1, 2), (1, 1), (2, 1)
    torch.testing.assert_close(group_distances(f, "min"), torch.tensor([1.0, 1.0, 1.0]))
    torch.testing.assert_close(group_distances(torch.ones(4, 3) * torch.arange(1.0, 5.0)[:, None]), torch.zeros(4))
    assert math.isnan(group_distances(torch.ones(1, 3))[0])
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(group_distances(f[perm]), group_distances(f)[perm])
    with pytest.raises(ValueError, match="mean, min"):
        group_distances(f, "max")


def test_the_reward_is_the_distance_of_the_models_features(dino):
    reward = build_reward("diversity", model_name_or_path=dino, chunk_size=2)
    images = torch.rand(5, 3, 40, 36, generator=torch.Generator().manual_seed(1))
    got = reward.score_group(images, [""] * 5)
    with torch.no_grad():
        feats = reward.model(pixel_values=reward.transform(images)).pooler_output
    torch.testing.assert_close(got, group_distances(feats), rtol=0, atol=1e-5)
    assert got.min() > 0
    same = images[:1].expand(3, -1, -1, -1)
    assert reward.score_group(same, [""] * 3).abs().max() < 1e-5  # identical images: no diversity


def test_groups_are_scored_apart_and_singletons_abstain(dino):
    reward = build_reward("diversity", model_name_or_path=dino)
    images = torch.rand(7, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    images[3:6] = images[3]  # group 1: three copies of one image
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    got = score_all(reward, images, ["a"] * 3 + ["b"] * 3 + ["c"], groups, batch_size=4)
    torch.testing.assert_close(got[:3], reward.score_group(images[:3], ["a"] * 3))
    assert got[3:6].abs().max() < 1e-5 and math.isnan(got[6])


def test_clip_features_are_its_image_embeddings(tmp_path):
    from transformers import CLIPModel

    from tests.helpers.tiny_clip import save_tiny_clip

    folder = save_tiny_clip(tmp_path / "clip")
    reward = build_reward("diversity", model_name_or_path=str(folder), reduce="min")
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    clip = CLIPModel.from_pretrained(folder).eval()
    with torch.no_grad():
        out = clip.get_image_features(pixel_values=reward.transform(images))
    feats = out if isinstance(out, torch.Tensor) else out.pooler_output
    torch.testing.assert_close(reward.score_group(images, [""] * 3), group_distances(F.normalize(feats, dim=-1), "min"),
                               rtol=0, atol=1e-5)


def test_bad_options_say_what_to_do(dino, tmp_path):
    with pytest.raises(ValueError, match="reduce must be one of mean, min"):
        build_reward("diversity", model_name_or_path=dino, reduce="median")
    with pytest.raises(FileNotFoundError, match="model_name_or_path"):
        build_reward("diversity", model_name_or_path=str(tmp_path / "nowhere") + "/x/y")
