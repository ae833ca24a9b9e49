"""Where training tensors and kernels live on a GPU: every tensor of a training micro-batch on the
latents' device (a sigma grid left on the CPU broke GRPO's replay on CUDA), PyTorch's cuDNN
attention kernel off by default on CUDA (its backward crashed FLUX.1 LoRA training on an H200;
``shared/models/attention.py``), and whole tiny epochs of every algorithm on CUDA (``gpu``: run on
the device machine, skipped elsewhere)."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from shared.models import Conditioning
from shared.models.attention import apply_attention_backend, avoid_cudnn_attention
from shared.sampling import Rollout
from tests.helpers.tiny import tiny_config
from trainer.collect import EpochData
from trainer.loop import micro_batches, train


def _epoch_on(device: str, n: int = 4, steps: int = 2) -> EpochData:
    dev = torch.device(device)
    roll = Rollout(final_latents=torch.zeros(n, 4, 8, 8, device=dev), images=None,
                   sigmas=torch.linspace(1, 0, 5),  # the grid stays where adapter.sigmas made it: the CPU
                   sde_steps=list(range(steps)), latents=torch.zeros(n, steps, 4, 8, 8, device=dev),
                   next_latents=torch.zeros(n, steps, 4, 8, 8, device=dev),
                   log_probs=torch.zeros(n, steps, device=dev), stds=torch.ones(n, steps, device=dev), means=None)
    cond = Conditioning({"prompt_embeds": torch.zeros(n, 3, 8, device=dev)})
    return EpochData(prompts=["p"] * n, group_ids=torch.zeros(n, dtype=torch.long), cond=cond, rollout=roll,
                     rewards={}, advantages=torch.zeros(n), metrics={})


def test_each_process_re_noises_its_micro_batches_with_its_own_seeds():
    """The decoupled trainers draw timesteps and noise from ``batch.seed``: one process keeps its
    seeds; on two, rank 0's and rank 1's micro-batches must not share them (they did, so N
    processes drew 1/N as many distinct noises and different images shared noise)."""
    from trainer.collect import SEED_STRIDE

    one = [b.seed for b in micro_batches(_epoch_on("cpu", n=6), batch_size=2, seed=7)]
    assert one == [7 * SEED_STRIDE + b for b in range(3)]
    ranks = [[b.seed for b in micro_batches(_epoch_on("cpu", n=6), batch_size=2, seed=7, rank=r, world=2)]
             for r in (0, 1)]
    assert len(set(ranks[0] + ranks[1])) == 6


def test_every_tensor_of_a_training_batch_is_on_the_latents_device():
    # the meta device stands in for a GPU: a tensor left behind on the CPU shows up as "cpu"
    for batch in micro_batches(_epoch_on("meta"), batch_size=2, seed=0):
        tensors = {"sigmas": batch.sigmas, "advantages": batch.advantages, "latents": batch.latents,
                   "next_latents": batch.next_latents, "log_probs": batch.log_probs, "stds": batch.stds,
                   **{f"cond.{k}": v for k, v in batch.cond.tensors.items()}}
        assert {k: v.device.type for k, v in tensors.items()} == {k: "meta" for k in tensors}


class _OnCuda(nn.Module):
    """A module that reports its parameters on CUDA without a GPU (only the device is looked at)."""

    def parameters(self, recurse: bool = True):
        yield types.SimpleNamespace(device=torch.device("cuda", 0))


def test_cudnn_attention_is_turned_off_only_for_cuda_models_with_no_backend_chosen(monkeypatch):
    state = {"enabled": True}
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: state["enabled"])
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", lambda on: state.update(enabled=on))

    assert avoid_cudnn_attention(nn.Linear(2, 2)) is False  # a CPU model changes nothing
    assert state["enabled"] is True
    apply_attention_backend(nn.Linear(2, 2), None)
    assert state["enabled"] is True

    apply_attention_backend(_OnCuda(), None)  # model.attn_backend unset, model on CUDA
    assert state["enabled"] is False


def test_a_chosen_backend_keeps_pytorchs_cudnn_setting(monkeypatch, tmp_path):
    from shared.models import load_adapter
    from trainer.policy import attach_trainable

    calls = []
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", lambda on: calls.append(on))
    cfg = tiny_config(tmp_path, "grpo", ["model.attn_backend=native"])
    attach_trainable(load_adapter(cfg.model, device="cpu", seed=0), cfg)
    assert calls == []


@pytest.mark.parametrize("algorithm", ["grpo", "grpo-guard", "nft", "awm"])
def test_training_losses_read_nothing_back_to_the_host(tmp_path, monkeypatch, algorithm):
    # the rollout's sigma grid is checked once per epoch (prepare), not by every replayed step
    from tests.helpers.host_reads import HostReads
    from trainer.algorithms import ALGORITHMS

    reads = HostReads(monkeypatch)
    cls = ALGORITHMS.get(algorithm)
    real = cls.loss

    def armed_loss(self, *args, **kwargs):
        reads.armed = True
        try:
            return real(self, *args, **kwargs)
        finally:
            reads.armed = False

    monkeypatch.setattr(cls, "loss", armed_loss)
    train(tiny_config(tmp_path, algorithm, ["train.max_epochs=1", "train.kl_beta=0.01"]), quiet=True)
    assert reads.where == []


def test_the_grid_is_read_back_once_per_epoch():
    from trainer.algorithms import ALGORITHMS

    algo = ALGORITHMS.get("nft").__new__(ALGORITHMS.get("nft"))
    first, second = micro_batches(_epoch_on("cpu"), batch_size=2, seed=0)
    assert first.sigmas is second.sigmas  # one grid tensor per epoch
    host = algo.host_sigmas(first)
    assert algo.host_sigmas(second) is host and host.device.type == "cpu"
    (next_epoch, _) = micro_batches(_epoch_on("cpu"), batch_size=2, seed=1)
    assert algo.host_sigmas(next_epoch) is not host


def test_a_bad_grid_still_fails_in_training():
    from trainer.algorithms import ALGORITHMS

    grpo = ALGORITHMS.get("grpo").__new__(ALGORITHMS.get("grpo"))
    grpo.t = types.SimpleNamespace(dynamics_type="Flow-SDE")
    epoch = _epoch_on("cpu")
    epoch.rollout.sigmas = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])  # sigma 0 at recorded SDE step 1
    (batch, *_) = micro_batches(epoch, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="sigma must be > 0 for Flow-SDE"):
        grpo.prepare(batch, policy=None)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("algorithm", ["grpo", "grpo-guard", "nft", "awm"])
def test_two_tiny_epochs_train_on_cuda(tmp_path, algorithm):
    cfg = tiny_config(tmp_path, algorithm, ["train.max_epochs=2", "train.mixed_precision=bf16"])
    summary = train(cfg, quiet=True)
    assert summary["samples"] > 0
    assert not torch.backends.cuda.cudnn_sdp_enabled()  # the default on CUDA (module docstring)


# --------------------------------------------------------------------------- train.offload_samples_to_cpu


def test_offloaded_samples_are_copied_to_the_training_device_one_micro_batch_at_a_time():
    import inspect

    # made on demand: a list would copy the whole epoch back to the device before training starts
    assert inspect.isgenerator(micro_batches(_epoch_on("cpu"), batch_size=2, seed=0, device="meta"))
    # the epoch in host memory, training on the "device" (meta stands in for a GPU)
    for batch in micro_batches(_epoch_on("cpu"), batch_size=2, seed=0, device="meta"):
        tensors = {"sigmas": batch.sigmas, "advantages": batch.advantages, "latents": batch.latents,
                   "final_latents": batch.final_latents, "next_latents": batch.next_latents,
                   "log_probs": batch.log_probs, "stds": batch.stds,
                   **{f"cond.{k}": v for k, v in batch.cond.tensors.items()}}
        assert {k: v.device.type for k, v in tensors.items()} == {k: "meta" for k in tensors}
        assert batch.final_latents.shape[0] == 2


def test_offloading_changes_no_number(tmp_path):
    """On the CPU the copies are no-ops, so the run must be bit-identical; on a GPU the same is
    checked with the tensors really moved (test_offloaded_samples_train_the_same_on_cuda)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    fast = ["train.max_epochs=2", "train.num_inference_steps=4", "eval.num_inference_steps=4"]
    runs = [train(tiny_config(tmp_path / str(flag), "grpo", fast + [f"train.offload_samples_to_cpu={flag}"]),
                  quiet=True) for flag in (False, True)]
    files = [load_file(Path(r["checkpoint"]) / "lora" / "pytorch_lora_weights.safetensors") for r in runs]
    assert all(torch.equal(files[0][k], files[1][k]) for k in files[0])
    states = [json.loads((Path(r["run_dir"]) / "rank0_state.json").read_text()) for r in runs]
    assert states[0]["param_checksum"] == states[1]["param_checksum"]


@pytest.mark.gpu
@cuda
def test_offloaded_samples_train_the_same_on_cuda(tmp_path):
    from shared.sampling import rollout_batches
    from shared.models import load_adapter

    cfg = tiny_config(tmp_path, "grpo", ["train.max_epochs=2"])
    adapter = load_adapter(cfg.model, device=torch.device("cuda"), seed=0)
    kw = dict(batch_size=4, resolution=16, num_steps=4, guidance_scale=1.0, dynamics="Flow-SDE", noise_level=0.7,
              sde_steps=[0, 1], keep_means=False, log_prob_reduction="mean", transformer=adapter.transformer)
    prompts = ["a red circle"] * 8
    cond, roll = rollout_batches(adapter, prompts, [None] * 8, list(range(8)), offload=True, **kw)
    assert roll.latents.device.type == "cpu" and roll.latents.is_pinned()
    assert all(v.device.type == "cpu" for v in cond.tensors.values())
    _, on_gpu = rollout_batches(adapter, prompts, [None] * 8, list(range(8)), **kw)
    torch.testing.assert_close(roll.latents, on_gpu.latents.cpu(), rtol=0, atol=0)
    summaries = [train(tiny_config(tmp_path / str(f), "grpo", ["train.max_epochs=2",
                                                               f"train.offload_samples_to_cpu={f}"]), quiet=True)
                 for f in (False, True)]
    assert summaries[0]["final/brightness"] == pytest.approx(summaries[1]["final/brightness"], abs=1e-4)
