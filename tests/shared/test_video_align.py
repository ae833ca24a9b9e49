"""``videoalign`` (shared/rewards/video_align.py): frame sampling and sizes in closed form, Qwen2-VL's
patch layout, the model inputs, and scores equal to an unmerged peft model built from the same
files (tests/helpers/tiny_video_align.py), plus loading errors that teach."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from shared.rewards import build_reward
from shared.rewards.video_align import (
    VIDEO_MIN_PIXELS,
    frame_count,
    frame_indices,
    patchify,
    sample_frames,
    smart_resize,
)
from shared.rewards.video_align_ckpt import current_name, read_template
from tests.helpers.tiny_video_align import (
    IMAGE_MEAN,
    IMAGE_STD,
    NORM,
    TEMPLATE,
    build_base,
    write_checkpoint,
    write_template_py,
)

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_base(tmp_path_factory.mktemp("va_base") / "qwen2vl")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return str(write_template_py(tmp_path_factory.mktemp("va_template") / "prompt_template.py"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, base):
    folder = tmp_path_factory.mktemp("va_ckpt") / "VideoReward"
    peft_model, head, token_ids = write_checkpoint(folder, base)
    return folder, peft_model, head, token_ids


def videos(n: int = 2, frames: int = 9, h: int = 64, w: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, frames, 3, h, w, generator=torch.Generator().manual_seed(seed))


# --- frames -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("total, video_fps, fps, num_frames, expected", [
    (81, 16, 2.0, None, 10),   # Wan2.1's 81 frames at 16 fps: 10.125 -> 10
    (121, 24, 2.0, None, 10),  # Wan2.2-TI2V-5B: 10.08 -> 10
    (17, 16, 2.0, None, 4),    # 2.1 -> at least 4
    (3, 16, 2.0, None, 2),     # at most the video's frames, rounded down to even
    (2000, 1, 2.0, None, 768),  # at most 768
    (81, 16, None, 9, 8),      # num_frames rounds to even (halves to even: 4.5 -> 4)
    (81, 16, None, 11, 12),
    (5, 16, None, 11, 5),      # never more than the video has
])
def test_frame_count(total, video_fps, fps, num_frames, expected):
    assert frame_count(total, video_fps=video_fps, fps=fps, num_frames=num_frames) == expected


def test_frame_count_refuses_single_frames():
    with pytest.raises(ValueError, match="at least 2.*Fix"):
        frame_count(1, video_fps=16, fps=2.0)


def test_frame_indices_span_the_video():
    assert frame_indices(81, 10) == [0, 9, 18, 27, 36, 44, 53, 62, 71, 80]
    assert frame_indices(9, 4) == [0, 3, 5, 8]  # 2.667 -> 3, 5.333 -> 5


@pytest.mark.parametrize("h, w, max_pixels, expected", [
    (480, 832, 200704, (336, 588)),  # shrunk by sqrt(399360 / 200704), sides rounded down to 28
    (64, 96, 336 * 336, (280, 392)),  # grown to VIDEO_MIN_PIXELS, sides rounded up
    (448, 448, 448 * 448, (448, 448)),  # already fits
    (10, 10, 448 * 448, (336, 336)),
])
def test_smart_resize(h, w, max_pixels, expected):
    out = smart_resize(h, w, max_pixels=max_pixels)
    assert out == expected and out[0] % 28 == 0 and out[1] % 28 == 0
    assert VIDEO_MIN_PIXELS <= out[0] * out[1] <= max(max_pixels, VIDEO_MIN_PIXELS)


def test_sample_frames_picks_and_resizes():
    video = videos(1, frames=9)[0]
    out = sample_frames(video, video_fps=16, fps=2.0, num_frames=None, max_pixels=336 * 336)
    assert out.shape == (4, 3, 280, 392) and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    same = sample_frames(video, video_fps=16, fps=2.0, num_frames=None, max_pixels=336 * 336)
    assert torch.equal(out, same)
    assert torch.equal((out * 255).round() / 255, out)  # 8-bit frames, as VideoAlign reads from video files
    still = torch.full((4, 3, 64, 96), 0.25)  # a flat video stays flat through the bicubic resize, in 8 bits
    assert torch.allclose(sample_frames(still, video_fps=16, fps=None, num_frames=4, max_pixels=336 * 336),
                          torch.full((4, 3, 280, 392), 64 / 255), atol=1e-6)


# --- patches ----------------------------------------------------------------------------------------


def test_patchify_layout_in_closed_form():
    """Row ``((t * bh_n + bh) * bw_n + bw) * m^2 + ih * m + iw`` holds frames ``2t, 2t+1`` of the
    patch at ``(bh * m + ih, bw * m + iw)``, column ``((c * 2 + k) * p + y) * p + x``."""
    p, m, temporal = 2, 2, 2
    frames = torch.randn(3, 3, 8, 12)  # 3 frames: the last is repeated to make 4
    flat, (t, gh, gw) = patchify(frames, patch=p, merge=m, temporal=temporal)
    assert (t, gh, gw) == (2, 4, 6) and flat.shape == (2 * 4 * 6, 3 * 2 * p * p)
    full = torch.cat([frames, frames[-1:]])
    bw_n = gw // m
    for ti in range(t):
        for gy in range(gh):
            for gx in range(gw):
                bh, ih, bw, iw = gy // m, gy % m, gx // m, gx % m
                row = ((ti * (gh // m) + bh) * bw_n + bw) * m * m + ih * m + iw
                for c in range(3):
                    for k in range(temporal):
                        expect = full[ti * temporal + k, c, gy * p:(gy + 1) * p, gx * p:(gx + 1) * p].reshape(-1)
                        start = (c * temporal + k) * p * p
                        assert torch.equal(flat[row, start:start + p * p], expect)


def test_patchify_matches_transformers_for_a_still_image():
    """A still (two equal frames) is laid out as transformers' Qwen2-VL image processor lays out
    an image (it repeats the image over the temporal patch)."""
    import numpy as np
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = torch.rand(3, 56, 84, generator=torch.Generator().manual_seed(3))
    proc = Qwen2VLImageProcessorPil()
    ref = proc(images=[image.permute(1, 2, 0).numpy().astype(np.float32)], do_resize=False, do_rescale=False,
               do_normalize=False, return_tensors="pt", input_data_format="channels_last")
    flat, grid = patchify(torch.stack([image, image]), patch=14, merge=2, temporal=2)
    assert tuple(ref["image_grid_thw"][0].tolist()) == grid
    assert torch.allclose(flat, ref["pixel_values"].float(), atol=1e-6)


# --- the model --------------------------------------------------------------------------------------


def reference(peft_model, head, token_ids, batch) -> torch.Tensor:
    """Raw ``[B, 3]`` scores from the unmerged peft model through transformers' own multimodal
    forward, with positions 0, 1, 2, ... on all three M-RoPE axes (as VideoAlign's forward gets)."""
    inner = peft_model.base_model.model.model
    ids = batch["input_ids"]
    positions = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, ids.shape[0], -1)
    with torch.no_grad():
        hidden = inner(input_ids=ids, attention_mask=batch["attention_mask"],
                       pixel_values_videos=batch["pixel_values_videos"], video_grid_thw=batch["video_grid_thw"],
                       position_ids=positions).last_hidden_state
    out = torch.empty(ids.shape[0], 3)
    for b in range(ids.shape[0]):
        for j, token in enumerate(token_ids):
            (at,) = (ids[b] == token).nonzero()[0].tolist()
            value = hidden[b, at] @ head.T
            out[b, j] = value[0] if head.shape[0] == 1 else value[j]
    return out


@pytest.mark.parametrize("output_dim", [1, 3])
def test_scores_match_the_unmerged_peft_model(tmp_path, base, template, output_dim):
    peft_model, head, token_ids = write_checkpoint(tmp_path / "ckpt", base, output_dim=output_dim)
    model = build_reward("videoalign", checkpoint=str(tmp_path / "ckpt"), template=template)
    clip = videos()
    batch = model.scorer.inputs(clip, PROMPTS, 16.0)
    raw = reference(peft_model, head, token_ids, batch)
    details = model.details(clip, PROMPTS)
    for j, d in enumerate(("VQ", "MQ", "TA")):
        mean, std = NORM[d]
        assert torch.allclose(details[d], (raw[:, j] - mean) / std, atol=1e-4), d
    assert torch.allclose(details["Overall"], details["VQ"] + details["MQ"] + details["TA"])
    assert torch.allclose(model.score(clip, PROMPTS), details["Overall"])
    assert raw[:, 0].std() > 0 and not torch.allclose(raw[:, 0], raw[:, 1])  # the scores say something
    # the same files without their LoRA give other scores: the merge matters
    peft_model.disable_adapter_layers()
    try:
        assert not torch.allclose(reference(peft_model, head, token_ids, batch), raw, atol=1e-3)
    finally:
        peft_model.enable_adapter_layers()


def test_inputs_follow_the_chat_template(ckpt, template):
    folder, *_ = ckpt
    model = build_reward("videoalign", checkpoint=str(folder), template=template)
    prompts = ["a red circle", "two blue squares beside a red circle, a green triangle above them"]
    batch = model.scorer.inputs(videos(), prompts, 16.0)
    tok = model.scorer.tokenizer
    grid = batch["video_grid_thw"]
    assert grid.tolist() == [[2, 20, 28], [2, 20, 28]]  # 4 frames of 280 x 392 (test_sample_frames_picks...)
    assert batch["pixel_values_videos"].shape == (2 * 2 * 20 * 28, 3 * 2 * 14 * 14)
    for b, prompt in enumerate(prompts):
        text = tok.decode(batch["input_ids"][b][batch["attention_mask"][b].bool()])
        body = TEMPLATE.replace("{text_prompt}", prompt)
        assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                        "<|vision_start|>" + "<|video_pad|>" * (2 * 20 * 28 // 4) + "<|vision_end|>" + body
                        + "<|im_end|>\n<|im_start|>assistant\n")
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()  # the first row is padded...
    assert bool(batch["attention_mask"][:, 0].all()) and not bool(batch["attention_mask"][0, -1])  # ...on the right
    # the frames are normalized with the base model's own mean and std
    frames = sample_frames(videos()[0], video_fps=16, fps=2.0, num_frames=None, max_pixels=336 * 336)
    mean, std = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    flat, _ = patchify((frames - mean) / std, patch=14, merge=2, temporal=2)
    assert torch.allclose(batch["pixel_values_videos"][:flat.shape[0]], flat)


def test_batching_and_sharing(ckpt, template):
    """Entries for two dimensions share one model and one forward per video; a batch scores as its
    videos do one at a time (right padding); the frame rate changes what is seen."""
    folder, *_ = ckpt
    vq = build_reward("videoalign", checkpoint=str(folder), template=template, dimension="vq")
    mq = build_reward("videoalign", checkpoint=str(folder), template=template, dimension="MQ")
    assert vq.scorer is mq.scorer
    scorer = vq.scorer
    calls = []
    forward = scorer.net.forward
    scorer.net.forward = lambda *a, **k: calls.append(k["input_ids"].shape[0]) or forward(*a, **k)
    try:
        scorer._seen.clear()
        clip = videos(3, seed=5)
        prompts = PROMPTS + ["a green triangle"]
        together = vq.score(clip, prompts)
        assert calls == [3]
        mq.score(clip, prompts)
        assert calls == [3], "the second dimension ran the model again"
        scorer._seen.clear()
        alone = torch.cat([vq.score(clip[i:i + 1], prompts[i:i + 1]) for i in range(3)])
        assert calls == [3, 1, 1, 1]
        assert torch.allclose(together, alone, atol=1e-5)
        slow = build_reward("videoalign", checkpoint=str(folder), template=template, dimension="vq", video_fps=2)
        assert not torch.allclose(slow.score(clip, prompts), together)  # 9 frames at 2 fps: 8 seen, not 4
    finally:
        scorer.net.forward = forward


def test_raw_scores_without_normalization(ckpt, template):
    folder, peft_model, head, token_ids = ckpt
    model = build_reward("videoalign", checkpoint=str(folder), template=template, normalize=False,
                         dimension="TA")
    clip = videos(seed=2)
    raw = reference(peft_model, head, token_ids, model.scorer.inputs(clip, PROMPTS, 16.0))
    assert torch.allclose(model.score(clip, PROMPTS), raw[:, 2], atol=1e-4)


@pytest.mark.filterwarnings("ignore:Model with `tie_word_embeddings=True`")  # peft merging the tied embedding
def test_a_full_model_file_loads(tmp_path, ckpt, base, template):
    """``model.pth`` (the whole model, transformers 4.45 names) instead of adapter + non-LoRA files."""
    folder, peft_model, head, token_ids = ckpt
    merged = tmp_path / "full"
    merged.mkdir()
    shutil.copy(folder / "model_config.json", merged / "model_config.json")
    (merged / "checkpoint-7").mkdir()
    import copy

    plain = copy.deepcopy(peft_model).merge_and_unload()
    state = {("visual." + k.removeprefix("model.visual.")) if k.startswith("model.visual.")
             else ("model." + k.removeprefix("model.language_model.")) if k.startswith("model.language_model.")
             else k: v for k, v in plain.state_dict().items()}
    state["rm_head.weight"] = head
    torch.save(state, merged / "checkpoint-7" / "model.pth")
    config = json.loads((merged / "model_config.json").read_text())
    config["peft_lora_config"]["lora_enable"] = False
    (merged / "model_config.json").write_text(json.dumps(config))
    model = build_reward("videoalign", checkpoint=str(merged), template=template, normalize=False, dimension="VQ")
    clip = videos(seed=4)
    raw = reference(peft_model, head, token_ids, model.scorer.inputs(clip, PROMPTS, 16.0))
    assert torch.allclose(model.score(clip, PROMPTS), raw[:, 0], atol=1e-4)


def test_a_peft_wrapped_model_file_loads(tmp_path, ckpt, template):
    """``model.pth`` as VideoAlign's trainer saves a LoRA run whole: the peft-wrapped, unmerged state
    dict (``base_model.model.`` names, ``lora_A.default.weight``, ``base_layer``, the tied output
    head), in transformers 4.45's layout."""
    from tests.helpers.tiny_video_align import old_name

    folder, peft_model, head, token_ids = ckpt
    whole = tmp_path / "whole"
    (whole / "checkpoint-3").mkdir(parents=True)
    shutil.copy(folder / "model_config.json", whole / "model_config.json")
    state = {old_name("base_model.model." + k.removeprefix("base_model.model.")): v
             for k, v in peft_model.state_dict().items()}
    assert any(k.endswith("lora_A.default.weight") for k in state) and "base_model.model.lm_head.weight" in state
    state["base_model.model.rm_head.weight"] = head
    torch.save(state, whole / "checkpoint-3" / "model.pth")
    model = build_reward("videoalign", checkpoint=str(whole), template=template, normalize=False, dimension="MQ")
    clip = videos(seed=6)
    raw = reference(peft_model, head, token_ids, model.scorer.inputs(clip, PROMPTS, 16.0))
    assert torch.allclose(model.score(clip, PROMPTS), raw[:, 1], atol=1e-4)


def test_current_names():
    assert current_name("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight") == \
        "model.language_model.layers.3.self_attn.q_proj.lora_A"
    assert current_name("base_model.model.model.embed_tokens.lora_embedding_B.default") == \
        "model.language_model.embed_tokens.lora_embedding_B"
    assert current_name("base_model.model.model.embed_tokens.base_layer.weight") == \
        "model.language_model.embed_tokens.weight"
    assert current_name("base_model.model.visual.merger.mlp.0.weight") == "model.visual.merger.mlp.0.weight"
    assert current_name("base_model.model.rm_head.modules_to_save.default.weight") == "rm_head.weight"
    assert current_name("base_model.model.rm_head.modules_to_save.weight") == "rm_head.weight"  # peft's saved name
    assert current_name("base_model.model.rm_head.original_module.weight") is None
    assert current_name("model.norm.weight") == "model.language_model.norm.weight"


# --- errors that teach ------------------------------------------------------------------------------


def test_errors(tmp_path, ckpt, template, base):
    folder, *_ = ckpt
    model = build_reward("videoalign", checkpoint=str(folder), template=template)
    with pytest.raises(ValueError, match=r"scores videos \[B, F, 3, H, W\].*Fix"):
        model.score(torch.rand(2, 3, 32, 32), PROMPTS)
    with pytest.raises(ValueError, match="prompt_template.py.*Fix|Fix.*prompt_template.py"):
        build_reward("videoalign", checkpoint=str(folder))
    with pytest.raises(ValueError, match="dimension 'XQ'"):
        build_reward("videoalign", checkpoint=str(folder), template=template, dimension="XQ")
    with pytest.raises(FileNotFoundError, match="no model_config.json.*Fix"):
        build_reward("videoalign", checkpoint=str(tmp_path), template=template)
    with pytest.raises(FileNotFoundError, match="no checkpoint-5.*checkpoint-100"):
        build_reward("videoalign", checkpoint=str(folder), template=template, step=5)
    text = tmp_path / "template.txt"
    text.write_text(TEMPLATE.replace("<|MQ_reward|>", ""))
    with pytest.raises(ValueError, match=r"'<\|MQ_reward\|>' 0 times.*Fix"):
        build_reward("videoalign", checkpoint=str(folder), template=str(text))
    text.write_text(TEMPLATE.replace("<|VQ_reward|>", "@").replace("<|MQ_reward|>", "<|VQ_reward|>")
                    .replace("@", "<|MQ_reward|>"))
    with pytest.raises(ValueError, match="another order"):
        build_reward("videoalign", checkpoint=str(folder), template=str(text))
    with pytest.raises(ValueError, match="prompt .* reward tokens.*Fix"):
        model.score(videos(1), ["a video <|TA_reward|>"])
    with pytest.raises(ValueError, match="no string constant NOPE"):
        build_reward("videoalign", checkpoint=str(folder), template=template, template_name="NOPE")
    for key, value, message in (("model_config", {"use_special_tokens": False}, "use_special_tokens is False"),
                                ("data_config", {"sample_type": "multi_pts"}, "sample_type is 'multi_pts'")):
        other = tmp_path / key
        shutil.copytree(folder, other)
        config = json.loads((other / "model_config.json").read_text())
        config[key].update(value)
        (other / "model_config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=message):
            build_reward("videoalign", checkpoint=str(other), template=template)
    # a checkpoint without the reward tokens' embeddings
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    state = torch.load(broken / "checkpoint-100" / "non_lora_state_dict.pth", weights_only=True)
    torch.save({k: v for k, v in state.items() if "embed_tokens" not in k},
               broken / "checkpoint-100" / "non_lora_state_dict.pth")
    with pytest.raises(ValueError, match="embeddings of the reward tokens"):
        build_reward("videoalign", checkpoint=str(broken), template=template)


def test_template_file_is_read_not_run(tmp_path, template):
    assert read_template(template, "DETAILED_PROMPT_WITH_SPECIAL_TOKEN", "videoalign") == TEMPLATE
    text = tmp_path / "t.txt"
    text.write_text(TEMPLATE)
    assert read_template(str(text), "unused", "videoalign") == TEMPLATE
