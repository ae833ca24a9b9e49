"""Reward contract, built-in weight-free rewards and the score_all dispatcher."""

import ast
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import shared.rewards as rewards_pkg
from shared.registry import RegistryError
from shared.rewards import REWARDS, RewardModel, RewardOutputError, build_reward, score_all

BUILTINS = ("jpeg_incompressibility", "jpeg_compressibility", "brightness", "pairwise_brightness")


def constant_images(colors, size=8):
    """``[len(colors), 3, size, size]`` images, each filled with one RGB colour."""
    return torch.tensor(colors, dtype=torch.float32)[:, :, None, None].expand(-1, -1, size, size).contiguous()


def noise_images(n, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_importing_registers_builtins():
    for name in BUILTINS:
        assert name in REWARDS


def test_shared_rewards_imports_no_trainer_or_services():
    for path in Path(rewards_pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            for mod in mods:
                assert mod.split(".")[0] not in ("trainer", "services"), f"{path.name} imports {mod}"


# --- built-ins -------------------------------------------------------------------------------


def test_jpeg_incompressibility_prefers_noise():
    model = build_reward("jpeg_incompressibility")
    flat = model.score(constant_images([[0.5, 0.5, 0.5]], size=32), ["p"])
    noise = model.score(noise_images(1), ["p"])
    assert flat.shape == (1,) and flat.dtype == torch.float32
    assert float(flat[0]) < float(noise[0])


def test_jpeg_size_is_kilobytes_of_quality_95_jpeg():
    image = noise_images(1, size=16)
    array = (image[0] * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=95)
    assert float(build_reward("jpeg_incompressibility").score(image, ["p"])[0]) == pytest.approx(buffer.tell() / 1000)


def test_jpeg_compressibility_is_negative():
    images = torch.cat([constant_images([[0.2, 0.4, 0.6]], size=32), noise_images(2)])
    inc = build_reward("jpeg_incompressibility").score(images, ["p"] * 3)
    comp = build_reward("jpeg_compressibility").score(images, ["p"] * 3)
    assert torch.equal(comp, -inc)


def test_brightness_closed_form():
    colors = [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.2, 0.4, 0.6]]
    got = build_reward("brightness").score(constant_images(colors), ["p"] * 4)
    expected = torch.tensor([0.299 * r + 0.587 * g + 0.114 * b for r, g, b in colors])
    assert torch.allclose(got, expected, atol=1e-6)


def test_brightness_target_option():
    colors = [[0.2, 0.2, 0.2], [0.9, 0.9, 0.9]]
    got = build_reward("brightness", target=0.5).score(constant_images(colors), ["p"] * 2)
    assert torch.allclose(got, torch.tensor([-0.3, -0.4]), atol=1e-6)


def test_pairwise_brightness_probability():
    model = build_reward("pairwise_brightness", temperature=0.1)
    a = constant_images([[0.6] * 3, [0.5] * 3])
    b = constant_images([[0.5] * 3, [0.5] * 3])
    p = model.compare(a, b, ["p", "p"])
    assert torch.allclose(p, torch.tensor([1 / (1 + math.exp(-1.0)), 0.5]), atol=1e-6)


# --- options and registry ----------------------------------------------------------------------


def test_unknown_option_names_it_and_lists_accepted():
    with pytest.raises(TypeError) as e:
        build_reward("brightness", tagret=0.5)
    msg = str(e.value)
    assert "'tagret'" in msg and "target" in msg and "device" in msg and "dtype" in msg


def test_base_options():
    model = build_reward("brightness", device="cpu", dtype="bfloat16")
    assert model.device == torch.device("cpu") and model.dtype == torch.bfloat16
    assert RewardModel.accepted_options() == ["device", "dtype"]


def test_registry_unknown_name_lists_choices():
    with pytest.raises(RegistryError) as e:
        build_reward("jpeg_compresibility")
    msg = str(e.value)
    assert "jpeg_compressibility" in msg
    for name in BUILTINS:
        assert name in msg


def test_invalid_kind_rejected():
    with pytest.raises(TypeError, match="kind"):

        class Bad(RewardModel):
            kind = "listwise"


# --- score_all ------------------------------------------------------------------------------


def test_pointwise_chunking_equals_one_shot():
    images, prompts, ids = noise_images(7, size=16), [f"p{i}" for i in range(7)], torch.arange(7)
    for name in ("jpeg_incompressibility", "brightness"):
        model = build_reward(name)
        one_shot = score_all(model, images, prompts, ids, batch_size=7)
        assert one_shot.shape == (7,) and one_shot.dtype == torch.float32
        assert torch.equal(one_shot, model.score(images, prompts))
        for bs in (1, 3, 100):
            assert torch.equal(score_all(model, images, prompts, ids, batch_size=bs), one_shot)


class RankInGroup(RewardModel):
    """Groupwise test reward: rank of the brightness within the group / (K - 1); records calls."""

    kind = "groupwise"

    def __init__(self, **options):
        super().__init__(**options)
        self.calls = []

    def score_group(self, images, prompts):
        assert len(set(prompts)) == 1, "one prompt group per call"
        self.calls.append(images.shape[0])
        luma = images.mean(dim=(1, 2, 3))
        return luma.argsort().argsort().float() / max(images.shape[0] - 1, 1)


def test_groupwise_per_group_and_shuffled_ids():
    lumas = [0.1, 0.9, 0.5, 0.3, 0.2, 0.8]
    images = constant_images([[v] * 3 for v in lumas])
    ids = torch.tensor([5, 5, 5, 2, 2, 2])
    prompts = ["A" if i == 5 else "B" for i in ids.tolist()]
    model = RankInGroup()
    out = score_all(model, images, prompts, ids, batch_size=2)
    assert torch.allclose(out, torch.tensor([0.0, 1.0, 0.5, 0.5, 0.0, 1.0]))
    assert sorted(model.calls) == [3, 3]  # once per group, whole group at a time

    perm = torch.tensor([3, 0, 5, 1, 4, 2])  # interleave the groups
    shuffled = score_all(model, images[perm], [prompts[i] for i in perm], ids[perm], batch_size=2)
    assert torch.allclose(shuffled, out[perm])


def test_pairwise_mean_win_probability_per_group():
    temperature = 0.2
    lumas = [0.2, 0.5, 0.9, 0.4, 0.6]
    images = constant_images([[v] * 3 for v in lumas])
    ids = torch.tensor([0, 0, 0, 1, 1])
    model = build_reward("pairwise_brightness", temperature=temperature)

    def sig(x):
        return 1 / (1 + math.exp(-x / temperature))

    expected = []
    for i, (li, gi) in enumerate(zip(lumas, ids.tolist())):
        others = [lj for j, (lj, gj) in enumerate(zip(lumas, ids.tolist())) if gj == gi and j != i]
        expected.append(sum(sig(li - lj) for lj in others) / len(others))
    expected = torch.tensor(expected)

    out = score_all(model, images, ["p"] * 5, ids, batch_size=100)
    assert torch.allclose(out, expected, atol=1e-6)
    assert bool(((out >= 0) & (out <= 1)).all())
    assert torch.allclose(score_all(model, images, ["p"] * 5, ids, batch_size=1), out, atol=1e-6)

    perm = torch.tensor([4, 2, 0, 3, 1])
    shuffled = score_all(model, images[perm], ["p"] * 5, ids[perm], batch_size=2)
    assert torch.allclose(shuffled, out[perm], atol=1e-6)


def test_pairwise_singleton_group_abstains():
    images = constant_images([[0.1] * 3, [0.5] * 3, [0.9] * 3])
    out = score_all(build_reward("pairwise_brightness"), images, ["a", "a", "b"], torch.tensor([0, 0, 1]), 4)
    assert not math.isnan(float(out[0])) and math.isnan(float(out[2]))


class Broken(RewardModel):
    kind = "pointwise"

    def __init__(self, *, result="short", **options):
        super().__init__(**options)
        self.result = result

    def score(self, images, prompts):
        n = images.shape[0]
        return {
            "short": torch.zeros(n - 1),
            "2d": torch.zeros(n, 1),
            "list": [0.0] * n,
            "inf": torch.full((n,), float("inf")),
            "nan": torch.full((n,), float("nan")),
        }[self.result]


@pytest.mark.parametrize("result", ["short", "2d", "list", "inf"])
def test_wrong_output_names_the_reward(result):
    with pytest.raises(RewardOutputError, match="Broken"):
        score_all(Broken(result=result), noise_images(4, size=8), ["p"] * 4, torch.zeros(4, dtype=torch.long), 2)


def test_nan_output_means_abstain():
    out = score_all(Broken(result="nan"), noise_images(3, size=8), ["p"] * 3, torch.zeros(3, dtype=torch.long), 2)
    assert bool(torch.isnan(out).all())


def test_input_validation():
    model = build_reward("brightness")
    with pytest.raises(ValueError, match="prompts"):
        score_all(model, noise_images(3, size=8), ["p"] * 2, torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="group_ids"):
        score_all(model, noise_images(3, size=8), ["p"] * 3, torch.zeros(2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="batch_size"):
        score_all(model, noise_images(3, size=8), ["p"] * 3, torch.zeros(3, dtype=torch.long), 0)


def test_a_reward_configured_twice_alike_is_built_once():
    from shared.config import RewardSpec
    from shared.rewards.multi import build_rewards

    built: dict = {}
    train = build_rewards([RewardSpec(reward_model="brightness", weight=2.0),
                           RewardSpec(reward_model="toy_geneval", exact_objects=True)], "cpu", built)
    evals = build_rewards([RewardSpec(reward_model="Brightness", name="bright_eval", batch_size=4),
                           RewardSpec(reward_model="toy_geneval"),  # other options: another model
                           RewardSpec(reward_model="brightness", name="bright_target", target=0.5)], "cpu", built)
    assert evals["bright_eval"] is train["brightness"]
    assert evals["toy_geneval"] is not train["toy_geneval"]
    assert evals["bright_target"] is not train["brightness"]
    assert len(built) == 4
