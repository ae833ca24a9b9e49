"""``imagereward``: a checkpoint in BLIP's original layout, renamed into transformers' BLIP towers,
scores as ImageReward's own forward pass computes from that checkpoint (a reference written from
BLIP's and ImageReward's source in plain torch, ``tests/helpers/tiny_image_reward.py``); padding in a
batch changes nothing; the towers honour ``dtype``; bad checkpoints and paths say what to do."""

from __future__ import annotations

import datetime

import pytest
import torch

from shared.rewards import build_reward
from shared.rewards.image_reward import ImageRewardNet, blip_to_hf, configs_from_state
from tests.helpers.tiny_image_reward import IMAGE, original_state, reference_score, save_tiny_image_reward

PROMPTS = ["a red circle", "two blue squares on the left and a very detailed green dog", "a cat", "photo"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_image_reward(tmp_path_factory.mktemp("imagereward"), seed=3)


def test_the_renaming_fills_every_weight_and_reads_the_sizes_from_the_tensors():
    state = blip_to_hf(original_state(1))
    assert not any(k.startswith("blip.") or "position_ids" in k or "_proj." in k.split("encoder")[0] for k in state)
    vision, text = configs_from_state(state)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.image_size,
            vision.patch_size) == (128, 2, 2, IMAGE, 8)
    assert (text.hidden_size, text.num_hidden_layers, text.encoder_hidden_size, text.max_position_embeddings) == \
        (128, 2, 128, 40)
    model = ImageRewardNet(vision, text)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert [k for k in missing if not k.endswith("position_ids")] == [] and unexpected == []
    with pytest.raises(KeyError, match="'blip.visual_encoder.blocks.0.ls1.gamma'"):
        blip_to_hf({"blip.visual_encoder.blocks.0.ls1.gamma": torch.zeros(1)})
    with pytest.raises(KeyError, match="'blip.text_decoder.cls.bias'"):
        blip_to_hf({"blip.text_decoder.cls.bias": torch.zeros(1)})


def test_it_scores_as_imagereward_computes_from_the_original_checkpoint(tiny):
    ckpt, tokenizer = tiny
    reward = build_reward("imagereward", checkpoint=str(ckpt), tokenizer_name_or_path=str(tokenizer))
    images = torch.rand(4, 3, 48, 40, generator=torch.Generator().manual_seed(0))  # portrait: resize + crop
    got = reward.score(images, PROMPTS)
    pixels = reward.transform(images)
    assert pixels.shape == (4, 3, IMAGE, IMAGE)
    tokens = reward.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    assert tokens["input_ids"][:, 0].eq(reward.tokenizer.cls_token_id).all()  # ImageReward keeps [CLS] first
    want = reference_score(torch.load(ckpt, weights_only=True), pixels, tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert got.dtype == torch.float32 and got.std() > 0.05  # scores differ across (image, prompt) pairs
    # the prompt matters, and each pair scores the same alone as in a padded batch
    assert not torch.allclose(reward.score(images, PROMPTS[::-1]), got)
    alone = torch.cat([reward.score(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(alone, got, rtol=0, atol=1e-5)


def test_prompts_are_cut_at_35_tokens_like_imagereward(tiny):
    ckpt, tokenizer = tiny
    reward = build_reward("imagereward", checkpoint=str(ckpt), tokenizer_name_or_path=str(tokenizer))
    image = torch.rand(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    long = " ".join(["red"] * 33)  # [CLS] + 33 words + [SEP] = 35 tokens
    torch.testing.assert_close(reward.score(image, [long + " blue cat"]), reward.score(image, [long + " dog"]))
    assert not torch.allclose(reward.score(image, [" ".join(["red"] * 30) + " blue"]),
                              reward.score(image, [" ".join(["red"] * 30) + " dog"]))


def test_the_towers_run_in_dtype_and_the_head_in_float32(tiny):
    ckpt, tokenizer = tiny
    full = build_reward("imagereward", checkpoint=str(ckpt), tokenizer_name_or_path=str(tokenizer))
    half = build_reward("imagereward", checkpoint=str(ckpt), tokenizer_name_or_path=str(tokenizer), dtype="bfloat16")
    assert half.model.vision.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert half.model.text.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    assert half.model.mlp[0].weight.dtype == torch.float32
    images = torch.rand(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
    got, want = half.score(images, PROMPTS), full.score(images, PROMPTS)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got - want).abs().max() < 0.25 * want.std()  # bf16 rounding, not a different model


def test_bad_checkpoints_and_paths_say_what_to_do(tiny, tmp_path):
    ckpt, tokenizer = tiny
    state = torch.load(ckpt, weights_only=True)
    del state["mlp.layers.7.bias"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"does not fit ImageReward's architecture: missing \['mlp.7.bias'\]"):
        build_reward("imagereward", checkpoint=str(tmp_path / "broken.pt"), tokenizer_name_or_path=str(tokenizer))
    torch.save({"model": state}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="'model.*no counterpart.*Fix: download ImageReward.pt"):
        build_reward("imagereward", checkpoint=str(tmp_path / "other.pt"), tokenizer_name_or_path=str(tokenizer))
    torch.save({"state_dict": state, "saved": datetime.date(2023, 1, 1)}, tmp_path / "objects.pt")
    with pytest.raises(ValueError, match="does not unpickle"):
        build_reward("imagereward", checkpoint=str(tmp_path / "objects.pt"), tokenizer_name_or_path=str(tokenizer))
    with pytest.raises(FileNotFoundError, match="checkpoint 'nowhere.pt' is not a file.*Fix: download ImageReward.pt"):
        build_reward("imagereward", checkpoint="nowhere.pt", tokenizer_name_or_path=str(tokenizer))
    with pytest.raises(OSError, match="tokenizer_name_or_path"):
        build_reward("imagereward", checkpoint=str(ckpt), tokenizer_name_or_path=str(tmp_path / "no-tokenizer"))


def test_the_crop_is_centred_as_torchvisions_center_crop(tiny):
    """ImageReward preprocesses with torchvision's CenterCrop, whose offset is int(round(extra / 2)):
    a 54 x 40 image resizes to 43 x 32 (short edge 32), and 11 extra rows put the crop at row 6
    (CLIP processors take int(extra / 2) = 5)."""
    import torch.nn.functional as F

    from shared.rewards.image_reward import CLIP_MEAN, CLIP_STD

    ckpt, tokenizer = tiny
    reward = build_reward("imagereward", checkpoint=str(ckpt), tokenizer_name_or_path=str(tokenizer))
    x = torch.rand(1, 3, 54, 40, generator=torch.Generator().manual_seed(4))
    resized = F.interpolate(x, size=(43, 32), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(reward.transform(x), (resized[..., 6:38, :] - mean) / std)
