"""Every model-family recipe (``examples/{algorithm}/{lora|full}/{family}.yaml``) trains one epoch of
the embedded loop on that family's tiny random-weight pipeline (:mod:`tests.helpers.tiny_pipelines`).

The recipe's algorithm settings run as written (trainer type, dynamics, noise, SDE window, NFT / AWM
timesteps, KL, EMA schedule and device, LoRA or full fine-tuning, gradient checkpointing, text-encoder
offload, the model's own options such as Wan2.2's second guidance scale); only what a CPU test cannot
afford or load is replaced: the hub weights by the tiny pipeline, the geometry by one small epoch,
bf16 by float32, FSDP by one process (``tests/trainer/test_fsdp.py`` shards these families), and the
learned rewards (PickScore, CLIP) by ``brightness``. ``test_examples.py``
checks the recipes as they ship (keys, registered names, 8-GPU geometry)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shared.config import TRAINER_TYPES, parse_config
from tests.helpers.tiny_pipelines import TINY_PIPELINES, tiny_train_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "examples").glob("*/*/*.yaml")
                 if p.parts[-3] in TRAINER_TYPES and p.parts[-2] in ("lora", "full"))
IDS = [str(p.relative_to(ROOT / "examples")) for p in RECIPES]

# what replaces a recipe's geometry: one epoch of 2 prompts x 2 samples in one micro-batch of 4,
# 5 rollout steps (more when the recipe's SDE window reaches further)
TINY_TRAIN = {"num_inference_steps": 5, "group_size": 2, "unique_sample_num_per_epoch": 2,
              "per_device_batch_size": 4, "gradient_step_per_epoch": 1, "max_epochs": 1,
              "mixed_precision": "no", "save_freq": 0, "fsdp": False}


def test_every_family_has_a_recipe_of_every_algorithm_it_should():
    """GRPO-LoRA for every family (and layout), the peers' NFT / AWM / full recipes where they have one."""
    have = {(p.parts[-3], p.parts[-2], p.stem) for p in RECIPES}
    families = set(TINY_PIPELINES)  # every model type, and Wan2.2-A14B's two-expert layout
    assert {f for a, m, f in have if (a, m) == ("grpo", "lora")} == families
    assert {f for a, m, f in have if (a, m) == ("nft", "lora")} == families - {"flux2", "wan2_i2v-a14b"}
    assert {f for a, m, f in have if (a, m) == ("awm", "lora")} == {"sd3-5", "flux1", "flux2-klein"}
    assert ("grpo-guard", "lora", "sd3-5") in have
    assert {f for a, m, f in have if m == "full"} >= {"sd3-5", "flux2-klein", "wan2_t2v", "flux1", "qwen-image"}


@pytest.fixture(scope="module")
def saved_pipelines(tmp_path_factory):
    """Family name -> its tiny pipeline, saved once for the module."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            spec = TINY_PIPELINES[name]
            cache[name] = spec.save(tmp_path_factory.mktemp(name.replace("-", "_")) / "pipe")
        return cache[name]

    return get


def tiny_recipe(path: Path, pipeline_dir: Path, root: Path):
    """The recipe at ``path`` as a validated config on its family's tiny pipeline (see the module docstring)."""
    raw = yaml.safe_load(path.read_text())
    spec = TINY_PIPELINES[path.stem]
    assert raw["model"]["model_type"] == spec.model_type, f"{path.name} is not a {spec.model_type} recipe"
    base = tiny_train_config(spec, pipeline_dir, root)  # writes the tiny dataset (edit rows with images)
    model = {**raw["model"], "model_name_or_path": str(pipeline_dir),
             "options": {**raw["model"].get("options", {}), **spec.options}}
    if model.get("finetune_type", "lora") == "lora":
        model["lora_rank"], model["lora_alpha"] = 4, 8
    train = {**raw["train"], **TINY_TRAIN, "resolution": list(spec.resolution)}
    train["num_inference_steps"] = max(5, max(train.get("train_steps") or [0]) + 2)  # the SDE window fits
    if train.get("num_train_timesteps") is not None:
        train["num_train_timesteps"] = min(train["num_train_timesteps"], 2)
    if "num_frames" in train:
        train["num_frames"] = min(train["num_frames"], spec.options.get("num_frames", 5))
    return parse_config({
        **{k: v for k, v in raw.items() if k not in ("eval_rewards",)},
        "output_dir": str(base.output_dir), "logging_backend": "none",
        "model": model, "data": {"dataset_dir": base.data.dataset_dir}, "train": train,
        "eval": {"resolution": list(spec.resolution), "num_inference_steps": 2, "eval_freq": 0, "num_prompts": 2,
                 "per_device_batch_size": 2,
                 **({"num_frames": train["num_frames"]} if "num_frames" in train else {})},
        "rewards": [{"reward_model": "brightness"}],
    })


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_recipe_trains_one_epoch_on_its_tiny_family(path, saved_pipelines, tmp_path):
    from trainer.loop import train

    pipeline_dir = saved_pipelines(path.stem)
    cfg = tiny_recipe(path, pipeline_dir, tmp_path)
    raw = yaml.safe_load(path.read_text())["train"]
    assert cfg.train.trainer_type == raw["trainer_type"]
    summary = train(cfg, quiet=True)
    assert summary["optimizer_steps"] == 1 and summary["samples"] == 4
    ckpt = Path(summary["checkpoint"])
    if cfg.model.finetune_type == "lora":
        assert (ckpt / "lora" / "pytorch_lora_weights.safetensors").is_file()
    else:
        assert any(ckpt.rglob("*.safetensors")), f"{ckpt} holds no weights"
