"""Contract suite: every registered algorithm, with every rollout dynamics it accepts, and its
optional terms (KL, EMA anchor, full fine-tuning), runs one epoch on the tiny model with a
finite loss and changes the trainable parameters; rejected combinations fail at config time. A
plugin's algorithm runs it through a pytest plugin that adds its cases to ``ALGORITHM_CASES``
(tests/helpers/contract_cases.py, docs/extending.md)."""

from __future__ import annotations

import pytest
import torch

from shared.config import ConfigError, DYNAMICS, SDE_TRAINERS
from tests.helpers.contract_cases import ALGORITHM_CASES
from tests.helpers.tiny import tiny_config
from trainer.algorithms import ALGORITHMS
from trainer import loop

SMALL = ["train.max_epochs=1", "train.num_inference_steps=4", "train.resolution=8",
         "train.group_size=2", "train.unique_sample_num_per_epoch=2",
         "train.per_device_batch_size=2", "train.gradient_step_per_epoch=1",
         "eval.num_inference_steps=2", "eval.num_prompts=2", "train.num_train_timesteps=2"]


def accepted(algorithm: str) -> list[str]:
    if algorithm == "grpo-guard":
        return ["Flow-SDE"]
    return [d for d in DYNAMICS if not (algorithm in SDE_TRAINERS and d == "ODE")]


CASES = [(a, d, []) for a in ALGORITHMS.names() for d in accepted(a)]
CASES += [("grpo", "Flow-SDE", ["train.kl_beta=0.04", "train.kl_type=x-based"]),
          ("grpo", "CPS", ["train.kl_beta=0.04", "train.kl_type=x-based"]),
          ("grpo", "Dance-SDE", ["train.kl_beta=0.04", "train.kl_type=v-based"]),
          ("grpo-guard", "Flow-SDE", ["train.kl_beta=0.01"]),
          ("nft", "ODE", ["train.off_policy=false", "train.kl_beta=0"]),
          ("awm", "ODE", ["train.ema_kl_beta=0", "train.kl_beta=0", "train.ema_decay=0"]),
          ("grpo", "Flow-SDE", ["model.finetune_type=full", "train.kl_beta=0.04"]),
          ("nft", "ODE", ["model.finetune_type=full"]),
          ("grpo", "Flow-SDE", ["train.train_steps=[0,1,2]", "train.num_train_steps=1"])]
CASES += ALGORITHM_CASES  # a plugin's (tests/helpers/contract_cases.py)


@pytest.mark.parametrize("algorithm,dynamics,extra", CASES,
                         ids=[f"{a}-{d}-{'-'.join(e) or 'default'}" for a, d, e in CASES])
def test_one_epoch_trains(tmp_path, monkeypatch, algorithm, dynamics, extra):
    cfg = tiny_config(tmp_path, algorithm, SMALL + [f"train.dynamics_type={dynamics}"] + extra)
    seen = {}
    real_optimize = loop.optimize

    def spy(cfg_, accelerator, policy, *args, **kwargs):
        before = {n: p.detach().clone() for n, p in policy.trainable.items()}
        step, metrics = real_optimize(cfg_, accelerator, policy, *args, **kwargs)
        seen["changed"] = any(not torch.equal(before[n], p) for n, p in policy.trainable.items())
        seen["metrics"] = metrics
        return step, metrics

    monkeypatch.setattr(loop, "optimize", spy)
    summary = loop.train(cfg, quiet=True)
    assert summary["optimizer_steps"] == 1
    assert seen["changed"], "optimizer step left every trainable parameter unchanged"
    assert torch.isfinite(torch.tensor(seen["metrics"]["train/loss"]))
    if "train.kl_beta=0.04" in extra or "train.kl_beta=0.01" in extra:
        assert "train/kl" in seen["metrics"]


@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS.names() if a in SDE_TRAINERS])
def test_sde_trainers_reject_ode(tmp_path, algorithm):
    with pytest.raises(ConfigError, match="train.dynamics_type"):
        tiny_config(tmp_path, algorithm, ["train.dynamics_type=ODE"])


def test_every_registered_algorithm_is_covered():
    assert set(ALGORITHMS.names()) <= {a for a, _, _ in CASES}
