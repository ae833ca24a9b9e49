"""The tiny flow-matching setup every trainer test uses: a real diffusers SD3Transformer2DModel
with a tiny config (``model_type: tiny``), a small prompt folder and a weight-free reward."""

from __future__ import annotations

from pathlib import Path

from shared.config import Config, apply_overrides, parse_config

PROMPTS = [f"a {c} {s}" for c in ("red", "blue", "green", "yellow") for s in ("circle", "square")]


def tiny_raw(tmp_path: Path, trainer_type: str = "grpo") -> dict:
    data = tmp_path / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.txt").write_text("\n".join(PROMPTS) + "\n")
    (data / "test.txt").write_text("\n".join(PROMPTS[:6]) + "\n")
    return {
        "run_name": f"tiny_{trainer_type}", "output_dir": str(tmp_path / "runs"),
        "logging_backend": "none",
        "model": {"model_type": "tiny", "finetune_type": "lora", "lora_rank": 8},
        "data": {"dataset_dir": str(data)},
        "train": {"trainer_type": trainer_type, "resolution": 16, "num_inference_steps": 8,
                  "group_size": 8, "unique_sample_num_per_epoch": 4, "per_device_batch_size": 16,
                  "gradient_step_per_epoch": 2, "learning_rate": 3e-3, "max_epochs": 2,
                  "ema_update_interval": 1, "seed": 0},
        "eval": {"num_inference_steps": 16, "eval_freq": 0},
        "rewards": [{"reward_model": "brightness"}],
    }


def tiny_config(tmp_path: Path, trainer_type: str = "grpo", overrides: list[str] | None = None) -> Config:
    """A validated tiny config; ``overrides`` are ``key=value`` strings as on the CLI."""
    return parse_config(apply_overrides(tiny_raw(tmp_path, trainer_type), overrides or []))
