"""Learned rewards (PickScore, PickScore_Rank, CLIP, aesthetic) on tiny random CLIPs saved
locally, and custom rewards given by dotted path."""

from __future__ import annotations

import math
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from shared.config import parse_config
from shared.registry import RegistryError
from shared.rewards import REWARDS, RewardModel, build_reward, score_all
from shared.rewards.aesthetic import HEAD_URL, Aesthetic, AestheticMLP
from shared.rewards.clip_rewards import (ClipImageTransform, CLIPScore, PickScore, PickScoreRank,
                                         rank_in_group)
from tests.helpers.tiny_clip import IMAGE_SIZE, save_image_processor, save_tiny_clip
from tests.helpers.tiny import tiny_raw

PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow square", "a cat"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def clip768_dir(tmp_path_factory):
    """A tiny CLIP whose projection is 768-d, the width the real aesthetic head expects."""
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip768"), projection_dim=768, seed=1)


@pytest.fixture(scope="module")
def reference(clip_dir):
    """An independently loaded CLIPModel for the hand computations."""
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(str(clip_dir)).eval()


def images(n, h=40, w=48, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def smooth_uint8_images(n, h, w, seed=0):
    """``[n, 3, h, w]`` in [0, 1] on the uint8 grid, smooth (upsampled noise)."""
    coarse = torch.rand(n, 3, h // 4 + 1, w // 4 + 1, generator=torch.Generator().manual_seed(seed))
    fine = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return (fine * 255).round() / 255


def features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def hand_cosine(reference, model, x, prompts):
    """cos(image, text) from transformers' get_image_features / get_text_features on the
    reward's own preprocessed input."""
    with torch.no_grad():
        img = features(reference.get_image_features(pixel_values=model.preprocess(x).float()))
        txt = features(reference.get_text_features(**model.tokenize(prompts)))
    return torch.nn.functional.cosine_similarity(img.double(), txt.double(), dim=-1)


# --- registration and loading ----------------------------------------------------------------


def test_registered_lazily_under_peer_names():
    for name, cls in [("PickScore", PickScore), ("PickScore_Rank", PickScoreRank), ("CLIP", CLIPScore),
                      ("aesthetic", Aesthetic)]:
        assert name in REWARDS and REWARDS.get(name) is cls
    assert (PickScore.kind, PickScoreRank.kind, CLIPScore.kind, Aesthetic.kind) == (
        "pointwise", "groupwise", "pointwise", "pointwise")


def test_loads_from_local_path(clip_dir):
    from transformers import CLIPModel

    model = build_reward("PickScore", model_name_or_path=str(clip_dir), processor_name_or_path=str(clip_dir))
    assert isinstance(model.model, CLIPModel)
    assert model.model_name_or_path == str(clip_dir) and model.processor_name_or_path == str(clip_dir)
    assert not model.model.training and not any(p.requires_grad for p in model.model.parameters())
    assert model.transform.crop == (IMAGE_SIZE, IMAGE_SIZE) and model.max_length == 16
    assert model.logit_scale() == pytest.approx(math.exp(3.0))


def test_hub_defaults_follow_the_peers():
    assert PickScore.default_model == PickScoreRank.default_model == "yuvalkirstain/PickScore_v1"
    assert PickScore.default_processor == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    assert CLIPScore.default_model == Aesthetic.default_model == "openai/clip-vit-large-patch14"
    assert CLIPScore.default_processor is None  # the model's own folder


@pytest.mark.parametrize("option", ["model_name_or_path", "processor_name_or_path"])
def test_missing_local_path_names_the_option_and_fix(clip_dir, tmp_path, option):
    paths = {"model_name_or_path": str(clip_dir), "processor_name_or_path": str(clip_dir)}
    paths[option] = str(tmp_path / "no_such_folder")
    with pytest.raises(FileNotFoundError) as e:
        build_reward("CLIP", **paths)
    msg = str(e.value)
    assert option in msg and "no_such_folder" in msg and "Fix" in msg and "save_pretrained" in msg


def test_unreachable_hub_id_is_wrapped(monkeypatch):
    from transformers import CLIPModel

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(CLIPModel, "from_pretrained", offline)
    with pytest.raises(OSError) as e:
        build_reward("CLIP", model_name_or_path="someone/some-clip")
    msg = str(e.value)
    assert "someone/some-clip" in msg and "model_name_or_path" in msg and "couldn't connect" in msg
    assert "Fix" in msg and "HF_HOME" in msg


def test_unknown_option_lists_accepted(clip_dir):
    with pytest.raises(TypeError) as e:
        build_reward("PickScore", model_name_or_path=str(clip_dir), divsor=1.0)
    msg = str(e.value)
    assert "'divsor'" in msg and "divisor" in msg and "processor_name_or_path" in msg


# --- preprocessing ------------------------------------------------------------------------------


def processed(directory, pil_images):
    """Pixel values from transformers' own image processor saved in ``directory``."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(str(directory))
    return torch.as_tensor(np.asarray(processor(images=pil_images, return_tensors="np")["pixel_values"]))


@pytest.mark.parametrize("hw", [(32, 32), (40, 48), (48, 40), (33, 47), (96, 80), (24, 20)])
def test_transform_matches_clip_image_processor(clip_dir, hw):
    """Same output size as transformers' processor on the PIL image; exact at the model's
    resolution (only normalization), within about one uint8 level after a resize (PIL's bicubic
    kernel uses a = -0.5, torch's a = -0.75, as transformers' torchvision backend)."""
    x = smooth_uint8_images(2, *hw)
    ours = ClipImageTransform.from_pretrained(str(clip_dir))(x)
    pil = [Image.fromarray((im * 255).round().byte().permute(1, 2, 0).numpy()) for im in x]
    ref = processed(clip_dir, pil)
    assert ours.shape == ref.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and ours.dtype == torch.float32
    one_level = 1 / 255 / min(ClipImageTransform.from_pretrained(str(clip_dir)).std)
    if hw == (IMAGE_SIZE, IMAGE_SIZE):
        assert torch.allclose(ours, ref, atol=1e-5)
    else:
        assert (ours - ref).abs().max() < 1.5 * one_level
        assert (ours - ref).abs().mean() < 0.5 * one_level


def test_transform_resize_rule_and_old_int_config():
    t = ClipImageTransform.from_config({"size": 224, "crop_size": 224, "image_mean": [0.5] * 3,
                                        "image_std": [0.5] * 3, "resample": 3})
    assert t.resize == 224 and t.crop == (224, 224) and t.mode == "bicubic"
    # transformers' get_resize_output_image_size: short -> size, long -> int(size * long / short)
    assert t.output_size(512, 768) == (224, 336) and t.output_size(768, 512) == (336, 224)
    assert t.output_size(300, 301) == (224, int(224 * 301 / 300))
    fixed = ClipImageTransform.from_config({"size": {"height": 20, "width": 30}, "do_center_crop": False,
                                            "image_mean": [0.0] * 3, "image_std": [1.0] * 3})
    out = fixed(torch.full((1, 3, 7, 9), 0.25))
    assert out.shape == (1, 3, 20, 30) and torch.allclose(out, torch.full_like(out, 0.25), atol=1e-6)


def test_transform_pads_small_images_with_black(tmp_path):
    save_image_processor(tmp_path, size={"height": 8, "width": 8}, crop_size={"height": 12, "width": 12})
    t = ClipImageTransform.from_pretrained(str(tmp_path))
    out = t(torch.ones(1, 3, 8, 8))
    mean, std = torch.tensor(t.mean).view(3, 1, 1), torch.tensor(t.std).view(3, 1, 1)
    assert out.shape == (1, 3, 12, 12)
    assert torch.allclose(out[0, :, 2:10, 2:10], ((1 - mean) / std).expand(3, 8, 8), atol=1e-6)
    assert torch.allclose(out[0, :, :2], ((0 - mean) / std).expand(3, 2, 12), atol=1e-6)


# --- PickScore and CLIP: closed forms -------------------------------------------------------------


def test_pickscore_equals_hand_computation(clip_dir, reference):
    model = build_reward("PickScore", model_name_or_path=str(clip_dir), processor_name_or_path=str(clip_dir))
    x = images(4)
    got = model.score(x, PROMPTS)
    expected = reference.logit_scale.exp().double() * hand_cosine(reference, model, x, PROMPTS) / 26
    assert got.shape == (4,) and got.dtype == torch.float32 and got.device.type == "cpu"
    assert torch.allclose(got.double(), expected, atol=1e-5)
    raw = build_reward("PickScore", model_name_or_path=str(clip_dir), processor_name_or_path=str(clip_dir),
                       divisor=1.0)
    assert torch.allclose(raw.score(x, PROMPTS), got * 26, atol=1e-4)


def test_pickscore_matches_processor_pipeline_of_the_peers(clip_dir, reference):
    """Flow-Factory's path (processor on PIL images + get_*_features) gives the same reward up to
    the resize-kernel difference."""
    model = build_reward("PickScore", model_name_or_path=str(clip_dir), processor_name_or_path=str(clip_dir))
    x = smooth_uint8_images(4, 48, 40, seed=3)
    pil = [Image.fromarray((im * 255).round().byte().permute(1, 2, 0).numpy()) for im in x]
    pixel_values = processed(clip_dir, pil)
    with torch.no_grad():
        img = features(reference.get_image_features(pixel_values=pixel_values))
        txt = features(reference.get_text_features(**model.tokenize(PROMPTS)))
    peer = reference.logit_scale.exp() * torch.nn.functional.cosine_similarity(img, txt, dim=-1) / 26
    assert torch.allclose(model.score(x, PROMPTS), peer, atol=2e-3)


def test_clip_is_cosine(clip_dir, reference):
    model = build_reward("CLIP", model_name_or_path=str(clip_dir))
    x = images(3, 64, 64, seed=1)
    got = model.score(x, PROMPTS[:3])
    assert got.shape == (3,) and got.dtype == torch.float32
    assert torch.allclose(got.double(), hand_cosine(reference, model, x, PROMPTS[:3]), atol=1e-5)
    assert bool((got.abs() <= 1).all())


def test_batching_does_not_change_scores(clip_dir):
    model = build_reward("CLIP", model_name_or_path=str(clip_dir))
    x = images(4, seed=2)
    whole = model.score(x, PROMPTS)
    singles = torch.cat([model.score(x[i:i + 1], PROMPTS[i:i + 1]) for i in range(4)])
    assert torch.allclose(whole, singles, atol=1e-5)
    assert torch.allclose(score_all(model, x, PROMPTS, torch.arange(4), batch_size=3), whole, atol=1e-5)


def test_bfloat16_runs_in_bfloat16_and_returns_float32(clip_dir):
    full = build_reward("PickScore", model_name_or_path=str(clip_dir), processor_name_or_path=str(clip_dir))
    half = build_reward("PickScore", model_name_or_path=str(clip_dir), processor_name_or_path=str(clip_dir),
                        dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert half.preprocess(images(1)).dtype == torch.bfloat16
    x = images(3, seed=4)
    out = half.score(x, PROMPTS[:3])
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    assert torch.allclose(out, full.score(x, PROMPTS[:3]), atol=0.02)  # bf16 has ~3 digits


def test_prompt_count_must_match(clip_dir):
    model = build_reward("CLIP", model_name_or_path=str(clip_dir))
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        model.score(images(3), PROMPTS[:2])


# --- PickScore_Rank --------------------------------------------------------------------------------


def test_rank_in_group_closed_form():
    assert torch.equal(rank_in_group(torch.tensor([3.0, 1.0, 2.0])), torch.tensor([1.0, 0.0, 0.5]))
    assert torch.equal(rank_in_group(torch.tensor([1.0, 5.0, 5.0, 9.0])), torch.tensor([0.0, 0.5, 0.5, 1.0]))
    assert torch.equal(rank_in_group(torch.tensor([2.0, 2.0, 2.0])), torch.tensor([0.5, 0.5, 0.5]))
    assert torch.equal(rank_in_group(torch.tensor([7.0])), torch.tensor([0.5]))
    nan = float("nan")
    out = rank_in_group(torch.tensor([4.0, nan, 1.0]))
    assert out[0] == 1.0 and math.isnan(float(out[1])) and out[2] == 0.0
    assert bool(torch.isnan(rank_in_group(torch.tensor([nan, nan]))).all())


def test_rank_in_group_is_permutation_equivariant():
    g = torch.Generator().manual_seed(0)
    for k in (2, 5, 16):
        scores = torch.randint(0, 4, (k,), generator=g).float()  # plenty of ties
        ranks = rank_in_group(scores)
        assert bool(((ranks >= 0) & (ranks <= 1)).all())
        assert ranks.sum().item() == pytest.approx(k / 2)  # average ranks sum to K(K-1)/2
        for _ in range(5):
            perm = torch.randperm(k, generator=g)
            assert torch.equal(rank_in_group(scores[perm]), ranks[perm])


def test_pickscore_rank_ranks_pickscore_within_the_group(clip_dir):
    paths = dict(model_name_or_path=str(clip_dir), processor_name_or_path=str(clip_dir))
    rank = build_reward("PickScore_Rank", chunk_size=2, **paths)
    x, prompts = images(5, seed=5), ["a red circle"] * 5
    out = rank.score_group(x, prompts)
    pick = build_reward("PickScore", **paths).score(x, prompts)
    assert out.shape == (5,) and out.dtype == torch.float32
    assert torch.equal(out.argsort(), pick.argsort())
    assert torch.allclose(out.sort().values, torch.linspace(0, 1, 5))  # distinct scores: 0, 1/4, ..., 1
    perm = torch.tensor([3, 1, 4, 0, 2])
    assert torch.equal(rank.score_group(x[perm], prompts), out[perm])
    assert torch.equal(build_reward("PickScore_Rank", chunk_size=32, **paths).score_group(x, prompts), out)


def test_pickscore_rank_through_score_all_with_groups(clip_dir):
    rank = build_reward("PickScore_Rank", model_name_or_path=str(clip_dir), processor_name_or_path=str(clip_dir))
    x = images(7, seed=6)
    ids = torch.tensor([4, 1, 4, 1, 4, 1, 1])
    prompts = ["a cat" if i == 4 else "a dog" for i in ids.tolist()]
    out = score_all(rank, x, prompts, ids, batch_size=2)
    for gid, k in ((4, 3), (1, 4)):
        members = ids == gid
        assert torch.allclose(out[members].sort().values, torch.linspace(0, 1, k))
        assert torch.equal(out[members], rank.score_group(x[members], [p for p, m in zip(prompts, members) if m]))


# --- aesthetic ----------------------------------------------------------------------------------------


def test_aesthetic_mlp_is_the_original_architecture():
    mlp = AestheticMLP()
    layers = list(mlp.layers)
    kinds = [type(m).__name__ for m in layers]
    assert kinds == ["Linear", "Dropout", "Linear", "Dropout", "Linear", "Dropout", "Linear", "Linear"]
    assert [(m.in_features, m.out_features) for m in layers if isinstance(m, torch.nn.Linear)] == [
        (768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    assert [m.p for m in layers if isinstance(m, torch.nn.Dropout)] == [0.2, 0.2, 0.1]
    original_keys = [f"layers.{i}.{w}" for i in (0, 2, 4, 6, 7) for w in ("weight", "bias")]
    assert sorted(mlp.state_dict()) == sorted(original_keys)
    assert mlp(torch.randn(3, 768)).shape == (3,)


@pytest.fixture(scope="module")
def head_files(tmp_path_factory):
    """The same random head saved as a torch state dict and as safetensors."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("aesthetic_head")
    torch.manual_seed(7)
    state = AestheticMLP(768).state_dict()
    torch.save(state, folder / "head.pth")
    save_file(state, str(folder / "head.safetensors"))
    return folder / "head.pth", folder / "head.safetensors"


def test_aesthetic_shapes_determinism_and_closed_form(clip768_dir, head_files):
    from transformers import CLIPModel

    pth, st = head_files
    model = build_reward("aesthetic", model_name_or_path=str(clip768_dir), head_path=str(pth))
    assert model.model.text_model is None and not model.head.training
    x = images(4, seed=8)
    out = model.score(x, [""] * 4)
    assert out.shape == (4,) and out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    assert torch.equal(model.score(x, [""] * 4), out)  # dropout is off
    assert torch.allclose(torch.cat([model.score(x[:1], [""]), model.score(x[1:], [""] * 3)]), out, atol=1e-5)

    reference = CLIPModel.from_pretrained(str(clip768_dir)).eval()
    head = AestheticMLP(768)
    head.load_state_dict(torch.load(pth, weights_only=True))
    with torch.no_grad():
        emb = features(reference.get_image_features(pixel_values=model.preprocess(x)))
        expected = head.eval()(emb / emb.norm(dim=-1, keepdim=True))
    assert torch.allclose(out, expected, atol=1e-5)

    from_safetensors = build_reward("aesthetic", model_name_or_path=str(clip768_dir), head_path=str(st))
    assert torch.equal(from_safetensors.score(x, [""] * 4), out)


def test_aesthetic_errors(clip_dir, clip768_dir, head_files, tmp_path):
    pth, _ = head_files
    with pytest.raises(ValueError) as e:
        build_reward("aesthetic", model_name_or_path=str(clip768_dir))
    assert "head_path" in str(e.value) and HEAD_URL in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        build_reward("aesthetic", model_name_or_path=str(clip768_dir), head_path=str(tmp_path / "missing.pth"))
    assert "missing.pth" in str(e.value) and HEAD_URL in str(e.value)
    with pytest.raises(ValueError) as e:  # a 16-d CLIP cannot feed the 768-d head
        build_reward("aesthetic", model_name_or_path=str(clip_dir), head_path=str(pth))
    assert "768" in str(e.value) and "16" in str(e.value) and "ViT-L/14" in str(e.value)
    torch.save({"fc.weight": torch.zeros(1, 768)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="layers.0.weight"):
        build_reward("aesthetic", model_name_or_path=str(clip768_dir), head_path=str(tmp_path / "other.pth"))


# --- custom rewards by dotted path --------------------------------------------------------------------


@pytest.fixture
def my_pkg(tmp_path, monkeypatch):
    """A user's package ``my_pkg.rewards`` on sys.path, as a custom reward would live."""
    pkg = tmp_path / "my_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "rewards.py").write_text(textwrap.dedent("""
        import torch
        from shared.rewards import RewardModel

        class MyReward(RewardModel):
            kind = "pointwise"

            def __init__(self, *, scale: float = 1.0, **options):
                super().__init__(**options)
                self.scale = scale

            def score(self, images, prompts):
                return self.scale * images.mean(dim=(1, 2, 3))

        class NotAReward:
            pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_pkg.rewards"
    for name in ("my_pkg", "my_pkg.rewards"):
        sys.modules.pop(name, None)


def test_dotted_path_builds_a_custom_reward(my_pkg):
    model = build_reward(f"{my_pkg}.MyReward", scale=2.0, dtype="float32")
    assert isinstance(model, RewardModel) and type(model).__name__ == "MyReward"
    x = images(3, 8, 8)
    assert torch.allclose(score_all(model, x, ["p"] * 3, torch.arange(3), 2), 2 * x.mean(dim=(1, 2, 3)))


def test_config_accepts_a_dotted_reward_model(my_pkg, tmp_path):
    from trainer.loop import build_rewards

    raw = tiny_raw(tmp_path)
    raw["rewards"] = [{"reward_model": f"{my_pkg}.MyReward", "scale": 3.0, "name": "mine"}]
    cfg = parse_config(raw)
    spec = cfg.rewards[0]
    assert spec.reward_model == "my_pkg.rewards.MyReward" and spec.options == {"scale": 3.0}
    built = build_rewards(cfg.rewards, "cpu")
    assert type(built["mine"]).__name__ == "MyReward" and built["mine"].scale == 3.0


def test_dotted_path_errors_name_the_path_and_fix(my_pkg):
    with pytest.raises(RegistryError) as e:
        build_reward("my_pkg.missing_module.MyReward")
    msg = str(e.value)
    assert "my_pkg.missing_module.MyReward" in msg and "No module named" in msg
    assert "Fix" in msg and "PYTHONPATH" in msg
    with pytest.raises(RegistryError) as e:
        build_reward(f"{my_pkg}.MyRewrad")
    msg = str(e.value)
    assert "my_pkg.rewards.MyRewrad" in msg and "has no attribute 'MyRewrad'" in msg and "Fix" in msg
    with pytest.raises(TypeError) as e:
        build_reward(f"{my_pkg}.NotAReward")
    msg = str(e.value)
    assert "my_pkg.rewards.NotAReward" in msg and "not a RewardModel subclass" in msg
    assert "class NotAReward(shared.rewards.RewardModel)" in msg
    with pytest.raises(TypeError, match="'scael'.*did you mean 'scale'"):
        build_reward(f"{my_pkg}.MyReward", scael=2.0)


def test_unknown_plain_name_still_suggests_registered_ones():
    with pytest.raises(RegistryError) as e:
        build_reward("pickscor")
    assert "pickscore" in str(e.value) and "Fix" not in str(e.value)


# --- GPU ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,atol", [("float32", 1e-4), ("bfloat16", 0.02)])
def test_cuda_scores_match_cpu(clip_dir, clip768_dir, head_files, dtype, atol):
    """On the GPU (inputs given on the CPU or on the GPU) in the configured dtype: the CPU float32
    scores, up to bf16 rounding; outputs float32."""
    paths = dict(model_name_or_path=str(clip_dir), processor_name_or_path=str(clip_dir))
    builds = {"PickScore": paths, "CLIP": paths, "PickScore_Rank": paths,
              "aesthetic": dict(model_name_or_path=str(clip768_dir), head_path=str(head_files[0]))}
    x, prompts, ids = images(6, seed=9), ["a red circle", "a cat"] * 3, torch.tensor([0, 1] * 3)
    for name, options in builds.items():
        cpu = score_all(build_reward(name, **options), x, prompts, ids, batch_size=4)
        gpu_model = build_reward(name, device="cuda", dtype=dtype, **options)
        assert next(gpu_model.model.parameters()).device.type == "cuda"
        for inputs in (x, x.cuda()):
            got = score_all(gpu_model, inputs, prompts, ids, batch_size=4)
            assert got.dtype == torch.float32 and got.device.type == "cpu"
            if name == "PickScore_Rank" and dtype == "bfloat16":  # bf16 may swap near-equal scores
                assert bool(((got >= 0) & (got <= 1)).all())
                continue
            assert torch.allclose(got, cpu, atol=atol), (name, got, cpu)
