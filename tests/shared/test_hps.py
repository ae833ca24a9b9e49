"""``hpsv2``: the OpenCLIP -> transformers renaming on a tiny CLIP (a state dict written in
OpenCLIP's layout scores exactly as the model it came from), the checkpoint's formats
(``state_dict`` / ``module.`` prefixes), and errors that name the fix."""

from __future__ import annotations

import pytest
import torch

from shared.rewards import build_reward
from shared.rewards.hps import open_clip_to_hf


def to_open_clip(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPModel state dict in OpenCLIP's layout (the inverse, written out by hand
    from OpenCLIP's module names: fused in_proj rows q, k, v; x @ proj projections)."""
    out = {}
    block = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    top = {"vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
           "vision_model.embeddings.class_embedding": "visual.class_embedding",
           "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
           "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight", "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
           "vision_model.post_layernorm.weight": "visual.ln_post.weight",
           "vision_model.post_layernorm.bias": "visual.ln_post.bias",
           "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
           "text_model.embeddings.position_embedding.weight": "positional_embedding",
           "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias",
           "logit_scale": "logit_scale"}
    for key, value in hf.items():
        if key.endswith("position_ids"):
            continue
        if key in top:
            out[top[key]] = value
        elif key == "visual_projection.weight":
            out["visual.proj"] = value.t()
        elif key == "text_projection.weight":
            out["text_projection"] = value.t()
        else:
            tower, rest = key.split(".encoder.layers.")
            index, name = rest.split(".", 1)
            prefix = ("visual." if tower == "vision_model" else "") + f"transformer.resblocks.{index}"
            module, param = name.rsplit(".", 1)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                if module == "self_attn.q_proj":  # OpenCLIP fuses the three, rows q, k, v
                    base = f"{tower}.encoder.layers.{index}.self_attn"
                    out[f"{prefix}.attn.in_proj_{param}"] = torch.cat([hf[f"{base}.{q}_proj.{param}"] for q in "qkv"])
                continue
            out[f"{prefix}.{block[module]}.{param}"] = value
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import CLIPModel

    from tests.helpers.tiny_clip import save_tiny_clip

    root = tmp_path_factory.mktemp("hps")
    folder = save_tiny_clip(root / "clip", seed=3)
    hf = CLIPModel.from_pretrained(folder).state_dict()
    ckpt = root / "HPS_tiny.pt"  # as released: {"state_dict": ...} with DDP's module. prefixes
    torch.save({"state_dict": {f"module.{k}": v for k, v in to_open_clip(hf).items()}}, ckpt)
    return folder, ckpt


def test_the_renaming_covers_every_weight_and_inverts_the_open_clip_layout(tiny):
    from transformers import CLIPModel

    folder, _ = tiny
    hf = {k: v for k, v in CLIPModel.from_pretrained(folder).state_dict().items() if not k.endswith("position_ids")}
    back = open_clip_to_hf(to_open_clip(hf))
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)
    with pytest.raises(KeyError, match="'visual.attn_pool.query'"):
        open_clip_to_hf({"visual.attn_pool.query": torch.zeros(1)})


def test_the_converted_checkpoint_scores_as_the_model_it_came_from(tiny):
    folder, ckpt = tiny
    hps = build_reward("hpsv2", checkpoint=str(ckpt), processor_name_or_path=str(folder))
    clip = build_reward("clip", model_name_or_path=str(folder))  # the plain cosine of the same weights
    images = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "two blue squares", "a cat"]
    torch.testing.assert_close(hps.score(images, prompts), clip.score(images, prompts), rtol=0, atol=1e-6)
    # a converted folder loads directly
    hps.model.save_pretrained(folder.parent / "converted")
    again = build_reward("hpsv2", model_name_or_path=str(folder.parent / "converted"),
                         processor_name_or_path=str(folder))
    torch.testing.assert_close(again.score(images, prompts), hps.score(images, prompts), rtol=0, atol=1e-6)


def test_a_checkpoint_that_does_not_fit_or_is_missing_says_what_to_do(tiny, tmp_path):
    folder, ckpt = tiny
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    del state["module.visual.proj"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="does not fit the CLIP architecture.*missing \\['visual_projection.weight'\\]"):
        build_reward("hpsv2", checkpoint=str(tmp_path / "broken.pt"), processor_name_or_path=str(folder))
    with pytest.raises(FileNotFoundError, match="checkpoint 'nowhere.pt' is not a file"):
        build_reward("hpsv2", checkpoint="nowhere.pt", processor_name_or_path=str(folder))


def test_hps_letterboxes_wide_images_like_its_open_clip_fork(tiny):
    """HPS's scorer resizes the longest edge to 224 and pads with black (OpenCLIP ResizeMaxSize);
    here, at the tiny processor's 32: a 64 x 32 image becomes 32 x 16, centred, 8 black rows above
    and below. Compared with PIL doing the same (bicubic resize, paste on black)."""
    import numpy as np
    from PIL import Image

    folder, ckpt = tiny
    hps = build_reward("hpsv2", checkpoint=str(ckpt), processor_name_or_path=str(folder))
    u8 = torch.randint(0, 256, (1, 3, 32, 64), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    got = hps.transform(u8.float() / 255)
    assert got.shape == (1, 3, 32, 32)
    pil = Image.fromarray(u8[0].permute(1, 2, 0).numpy()).resize((32, 16), Image.BICUBIC)
    canvas = Image.new("RGB", (32, 32))
    canvas.paste(pil, (0, 8))
    want = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    mean = torch.tensor(hps.transform.mean).view(1, 3, 1, 1)
    std = torch.tensor(hps.transform.std).view(1, 3, 1, 1)
    want = (want - mean) / std
    torch.testing.assert_close(got[..., :8, :], want[..., :8, :], rtol=0, atol=1e-6)  # the black band, exactly
    assert (got - want).abs().mean() < 0.03  # PIL's and torch's bicubic differ by rounding
    # a square image is resized as by the plain CLIP transform
    square = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(6))
    clip = build_reward("clip", model_name_or_path=str(folder))
    torch.testing.assert_close(hps.transform(square), clip.transform(square))
