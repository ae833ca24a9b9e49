"""GARDO's gated, adaptive KL (trainer/kl_gate.py, ``train.kl_gate``): ranks, gaps and the gate in
closed form, the fraction's adaptation and the reset rule, the state rebuilt from metrics on resume,
and a tiny run where resets keep the KL's anchor near the policy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shared.config import ConfigError
from tests.helpers.tiny import tiny_config
from trainer.kl_gate import KLGateState, RiskCompensator, batch_ranks, gate_mask, uncertainty

# the proxy (brightness) and two auxiliary rewards scored but not trained on (weight 0)
GATE_REWARDS = ("rewards=[{reward_model: brightness}, {reward_model: jpeg_incompressibility, weight: 0}, "
                "{name: dim, reward_model: brightness, target: 0.2, weight: 0}]")
GATE = ["train.kl_beta=0.04", GATE_REWARDS, "train.kl_gate={auxiliary: [jpeg_incompressibility, dim], fraction: 0.2}"]


def test_ranks_gaps_and_gate():
    assert batch_ranks(torch.tensor([0.2, 0.9, 0.1, 0.5, 0.9])).tolist() == [4, 1, 5, 3, 2]
    # ties in a seeded random order (flow_grpo's unstable sort): both orders occur, each reproducible
    orders = {tuple(batch_ranks(torch.tensor([0.9, 0.9]), torch.Generator().manual_seed(s)).tolist()) for s in range(20)}
    assert orders == {(1.0, 2.0), (2.0, 1.0)}
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    assert torch.equal(batch_ranks(torch.tensor([3.0, 3.0, 1.0]), g()), batch_ranks(torch.tensor([3.0, 3.0, 1.0]), g()))
    proxy = torch.tensor([4.0, 3.0, 2.0, 1.0])  # ranks 1 2 3 4
    aux = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 3.0, 2.0, 4.0])]  # ranks 4 3 2 1 / 4 2 3 1
    u = uncertainty(proxy, aux)
    assert u.tolist() == [1 - 4, 2 - 2.5, 3 - 2.5, 4 - 1] and float(u.sum()) == 0
    # a sample any of the rewards abstained on (NaN) is left out of the ranks and never gated
    nan = float("nan")
    u = uncertainty(torch.tensor([4.0, nan, 3.0, 2.0, 1.0]), [torch.tensor([1.0, 2.0, 2.0, 3.0, 4.0]),
                                                              torch.tensor([1.0, 5.0, 3.0, 2.0, nan])])
    assert torch.isnan(u[[1, 4]]).all() and u[[0, 2, 3]].tolist() == [1 - 3, 2 - 1.5, 3 - 1.5]
    assert gate_mask(u, 0.5).tolist() == [False, False, False, True, False]
    gaps = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0])
    threshold = np.percentile(gaps[gaps >= 0].numpy(), 100 - 40)  # flow_grpo's numpy call
    assert gate_mask(gaps, 0.4).tolist() == (gaps.numpy() > threshold).tolist()
    assert gate_mask(gaps, 0.4).sum() == 2  # the two largest of the 6 non-negative gaps


def test_risk_compensator_follows_gardo():
    rc = RiskCompensator(0.1)
    fractions = [rc.update(g) for g in (5.0, 6.0, 7.0, 3.0, 4.0, 2.0)]
    # first: the base; a new maximum: x1.1; a new minimum: x0.9; in between: unchanged
    assert fractions == pytest.approx([0.1, 0.11, 0.121, 0.1089, 0.1089, 0.09801])
    rc = RiskCompensator(0.1)
    for g in range(40):  # keeps growing, capped at 0.2; only the last 20 epochs count
        rc.update(float(g))
    assert rc.fraction == 0.2 and rc.recent == [float(g) for g in range(20, 40)]
    fixed = RiskCompensator(0.3, adaptive=False)
    assert [fixed.update(g) for g in (1.0, 9.0, 0.0)] == [0.3, 0.3, 0.3]


def test_reset_rule_and_restore_from_metrics():
    cfg = tiny_config(pytest.importorskip("pathlib").Path("/tmp/unused-kl-gate"), overrides=GATE + [
        "train.kl_gate={auxiliary: [jpeg_incompressibility, dim], reset_kl: 0.01, reset_every: 3}"])
    live = KLGateState(cfg.train.kl_gate)
    g = torch.Generator().manual_seed(0)
    rows, kls = [], [0.0, 0.02, 0.0, 0.0, 0.0, 0.0, 0.05, 0.0]
    resets = []
    for epoch, kl in enumerate(kls):
        row = {"epoch": epoch + 1}
        if live.reset_due(epoch):
            row["train/kl_gate/reset"] = 1.0
            resets.append(epoch)
        _, metrics = live.mask(torch.rand(16, generator=g), [torch.rand(16, generator=g) for _ in range(2)])
        row.update(metrics, **{"train/kl_step_max": kl})
        live.after(kl)
        rows.append(row)
    # after epoch 1's KL > 0.01: reset at 2; then more than 3 epochs after 2: at 6; epoch 6's KL: at 7
    assert resets == [2, 6, 7]
    restored = KLGateState(cfg.train.kl_gate)
    restored.restore(rows)
    assert (restored.last_reset, restored.pending) == (live.last_reset, live.pending)
    assert restored.compensator.fraction == live.compensator.fraction
    assert restored.compensator.recent == live.compensator.recent


@pytest.mark.parametrize("extra, message", [
    (["train.kl_beta=0"], "kl_beta > 0"),
    (["train.kl_gate={auxiliary: [aesthetic]}"], r"\['aesthetic'\].*not rewards of this run"),
    (["train.kl_gate={reward: dim, auxiliary: [dim]}"], "must be distinct"),
    (["train.trainer_type=nft"], "trainer_type='nft'"),
    (["train.kl_gate={auxiliary: [dim], fraction: 0.5}"], r"fraction: 0.5 is outside \[0.02, 0.2\]"),
    (["rewards=[{reward_model: brightness, weight: 0}, {name: dim, reward_model: brightness, target: 0.2, weight: 0}]",
      "train.kl_gate={auxiliary: [dim]}"], "no reward has a nonzero weight"),
])
def test_config_errors(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, overrides=GATE + extra)


def run_metrics(tmp_path, extra) -> list[dict]:
    from trainer.loop import train

    cfg = tiny_config(tmp_path, overrides=GATE + extra + [
        "train.max_epochs=4", "train.num_inference_steps=4", "train.group_size=4", "train.unique_sample_num_per_epoch=4",
        "train.per_device_batch_size=4", "train.gradient_step_per_epoch=2", "train.learning_rate=3e-2"])
    train(cfg, quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "runs" / "tiny_grpo" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/kl" in r]


def test_resets_move_the_anchor_to_the_policy(tmp_path):
    """The same run twice (two optimizer steps an epoch, a checkpoint after each): with a reset after every
    epoch whose KL is above a tiny reset_kl, the KL's anchor at the end is the policy of the last epoch's
    start (checkpoint-3's weights); without resets it is still the starting policy (LoRA B zero). Epoch 0
    is the same in both (the anchor is the starting policy) and the gate covers part of the batch."""
    from safetensors.torch import load_file

    gate = "train.kl_gate={auxiliary: [jpeg_incompressibility, dim], fraction: 1.0, adaptive: false, "
    kept = run_metrics(tmp_path / "kept", [gate + "reset_kl: null}", "train.save_freq=1"])
    reset = run_metrics(tmp_path / "reset", [gate + "reset_kl: 1.0e-12}", "train.save_freq=1"])
    assert kept[0]["train/kl"] == reset[0]["train/kl"] > 0
    assert [r.get("train/kl_gate/reset", 0) for r in reset] == [0, 1, 1, 1]
    assert not any("train/kl_gate/reset" in r for r in kept)
    assert all(0 < r["train/kl_gate/gated"] < 1 and r["train/kl_gate/fraction"] == 1.0 for r in kept)

    def anchor(run: str, ckpt: str) -> dict:
        snap = load_file(tmp_path / run / "runs" / "tiny_grpo" / "checkpoints" / ckpt / "snapshot-kl_reference.safetensors")
        return {"transformer." + k.replace(".default", ""): v for k, v in snap.items()}

    def lora(run: str, ckpt: str) -> dict:
        return load_file(tmp_path / run / "runs" / "tiny_grpo" / "checkpoints" / ckpt / "lora" / "pytorch_lora_weights.safetensors")

    moved, start_of_last, before = anchor("reset", "final"), lora("reset", "checkpoint-3"), lora("reset", "checkpoint-2")
    assert moved.keys() == start_of_last.keys()
    assert all(torch.equal(moved[k], start_of_last[k]) for k in moved)
    assert not all(torch.equal(moved[k], before[k]) for k in moved)
    fixed = anchor("kept", "final")
    assert all(torch.equal(fixed[k], v) for k, v in anchor("kept", "checkpoint-1").items())
    assert all(not v.any() for k, v in fixed.items() if "lora_B" in k)  # the starting LoRA


def test_grpo_anchors_the_gated_kl_to_the_snapshot_and_averages_the_gated_samples(tmp_path):
    """Wiring, with a stand-in policy: the reference velocity comes from the ``kl_reference`` snapshot
    (at the reference CFG scale), not the base, and the KL term is the mean over the gated samples."""
    from types import SimpleNamespace

    from trainer.algorithms.grpo import GRPO

    cfg = tiny_config(tmp_path, overrides=GATE + ["train.kl_type=v-based"])
    algo = GRPO(cfg)
    assert algo.snapshots == ("kl_reference",) and not cfg.train.uses_reference  # no frozen base copy needed
    calls = []

    def velocity(x, sigma, cond, scale, transformer=None):
        calls.append((transformer, scale))
        return torch.zeros_like(x)

    policy = SimpleNamespace(adapter=SimpleNamespace(velocity=velocity), ref_guidance_scale=3.0,
                             snapshot_view=lambda name: f"view:{name}",
                             ref_velocity=lambda *a: pytest.fail("the base was used as the anchor"))
    v = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    kl = algo.kl(SimpleNamespace(cond=None), 0, policy, None, v, torch.zeros(3, 2), torch.ones(3), torch.zeros(3))
    assert calls == [("view:kl_reference", 3.0)] and kl.tolist() == [1.0, 4.0, 9.0]  # mean_d (v - v_ref)^2
