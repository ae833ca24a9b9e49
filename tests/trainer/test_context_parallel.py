"""``train.context_parallel``: a video's tokens split over 2 CPU processes (gloo) with diffusers' Ulysses
attention (trainer/context_parallel.py).

Checks: the split itself against one process (``tests/helpers/context_parallel_probe.py``: each process
holds half the tokens inside the blocks, the gathered output is the same, and the processes' gradients
sum to one process's); whole runs on 2 processes as one context-parallel group train the same weights
as one process (LoRA GRPO with a KL reference and an EMA evaluation, text- and image-to-video, with and
without gradient checkpointing; a full fine-tune of Wan2.2-A14B's
two experts with NFT, whose KL reference is a frozen copy that is split too; LoRA on both experts
sharded with FSDP as well); on 4 processes, 2 data ranks of 2 follow 2 plain data-parallel processes;
the layout's arithmetic; what it refuses, with the fix; and with the queue transport, the samples a
group's leader sends the others, and its failure reaching them (the whole run through the queue:
``tests/integration/test_multi_trainer.py``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared.config import ConfigError
from tests.trainer.test_fsdp import adam_close, family_config, run_probe
from tests.trainer.test_multiprocess import free_port, metrics, run
from trainer import context_parallel, cp_queue



def launch(cfg_path: Path, processes: int, *overrides: str) -> None:
    if processes == 1:
        from shared.config import load_config
        from trainer.loop import train

        train(load_config(cfg_path, list(overrides)), quiet=True)
        return
    sets = [a for o in overrides for a in ("--set", o)]
    run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()), "-m", "trainer.cli", "train", str(cfg_path)] + sets)


def adam_rounding(a: dict, b: dict, lr: float) -> str | None:
    """:func:`adam_close` for a split attention's rounding: at most 1% of the elements off by more than
    1e-5, none by 5% of one AdamW step (``lr``): its different summation order, amplified by Adam on
    elements whose gradient is ~0."""
    return adam_close(a, b, step=0.05 * lr, share=0.01)


def test_the_split_against_one_process(tmp_path):
    run_probe("context_parallel_probe.py", tmp_path)
    for r in (0, 1):
        res = json.loads((tmp_path / f"probe-rank{r}.json").read_text())
        assert res["block_tokens"] * 2 == res["tokens"], res  # each process's blocks see half the tokens
        assert res["output_vs_one"] < 1e-5, res
        assert res["grad_sum_vs_one"] < 1e-5 * res["grad_scale"], res
        assert res["grad_local_vs_one"] > 1e-3 * res["grad_scale"], res  # one process alone has only its share


@pytest.mark.parametrize("family, checkpointing", [("wan2_t2v", False), ("wan2_i2v", True)])
def test_lora_grpo_as_one_group_trains_what_one_process_does(tmp_path, family, checkpointing):
    """Text-to-video; image-to-video (the first frame's image tokens in cross-attention, not split) with
    gradient checkpointing (each block split again when it is recomputed)."""
    path = family_config(tmp_path, family, {"gradient_checkpointing": checkpointing}, trainer_type="grpo",
                         max_epochs=2, kl_beta=0.1, ema_decay=0.5, learning_rate=1e-2)
    evals = ["eval.eval_freq=1", "eval.num_prompts=2", "eval.images_per_prompt=1"]
    launch(path, 2, "run_name=cp", "train.context_parallel=2", *evals)
    launch(path, 1, "run_name=one", *evals)
    runs = tmp_path / "runs"
    name = "checkpoints/final/lora/pytorch_lora_weights.safetensors"
    a, b = load_file(runs / "cp" / name), load_file(runs / "one" / name)
    moved = max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k)  # B starts at zero
    assert moved > 1e-3, "it did not train"
    assert adam_rounding(a, b, lr=1e-2) is None
    # AdamW does not see a gradient's scale; the gradient norm does (a missing loss_scale halves it)
    mc, mo = metrics(runs / "cp"), metrics(runs / "one")
    assert len(mc) == len(mo)
    for x, y in zip(mc, mo):
        for k in ("train/reward/brightness", "train/kl", "train/grad_norm", "eval/reward/brightness"):
            assert (k in x) == (k in y), k
            if k in x:
                assert abs(x[k] - y[k]) <= 1e-4 * max(1.0, abs(y[k])), (k, x[k], y[k])
    assert any(m.get("train/kl", 0) > 0 for m in mc)  # the reference was evaluated
    sc, so = (json.loads((runs / r / "summary.json").read_text()) for r in ("cp", "one"))
    assert sc["samples"] == so["samples"] and (sc["world_size"], sc["context_parallel"]) == (2, 2)
    # `flowrl eval` of the run on one process (its config says context_parallel: 2): each video whole
    from shared.config import load_config
    from trainer.eval_cli import eval_checkpoint

    again = eval_checkpoint(load_config(path, ["run_name=cp", "train.context_parallel=2", *evals]),
                            runs / "cp" / "checkpoints" / "final")
    assert again["eval/reward/brightness"] == pytest.approx(mc[-1]["eval/reward/brightness"], rel=1e-5)


def test_two_experts_full_finetune_with_a_frozen_copy(tmp_path):
    path = family_config(tmp_path, "wan2_t2v-a14b", {"finetune_type": "full"}, trainer_type="nft", max_epochs=2,
                         time_sampling_strategy="uniform", num_train_timesteps=2, num_inference_steps=4,
                         kl_beta=0.1, learning_rate=1e-4)
    launch(path, 2, "run_name=cp", "train.context_parallel=2")
    launch(path, 1, "run_name=one")
    runs = tmp_path / "runs"
    for part in ("transformer", "transformer_2"):
        name = f"checkpoints/final/{part}/diffusion_pytorch_model.safetensors"
        a, b = load_file(runs / "cp" / name), load_file(runs / "one" / name)
        problem = adam_close(a, b, step=1e-4 * 2)
        assert problem is None, f"{part}: {problem}"
    assert any(m.get("train/kl", 0) > 0 for m in metrics(runs / "cp"))


def test_under_fsdp_two_experts_train_as_on_one_process(tmp_path):
    """Sharded (FSDP2 over both processes) and split: each block is gathered, then runs half the tokens."""
    path = family_config(tmp_path, "wan2_t2v-a14b", {}, trainer_type="nft", ema_decay=0.5, max_epochs=2,
                         time_sampling_strategy="uniform", num_train_timesteps=2, num_inference_steps=4, kl_beta=0.1)
    launch(path, 2, "run_name=cp", "train.fsdp=true", "train.context_parallel=2")
    launch(path, 1, "run_name=one")
    runs = tmp_path / "runs"
    for part in ("lora", "lora_2"):
        name = f"checkpoints/final/{part}/pytorch_lora_weights.safetensors"
        a, b = load_file(runs / "cp" / name), load_file(runs / "one" / name)
        assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 1e-3, f"{part} did not train"
        assert adam_rounding(a, b, lr=1e-2) is None, part
    mc, mo = metrics(runs / "cp"), metrics(runs / "one")
    for x, y in zip(mc, mo):
        for k in ("train/loss", "train/grad_norm", "train/kl"):
            if k in y:
                assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-7), k


def test_two_data_ranks_of_two_follow_two_data_parallel_processes(tmp_path):
    path = family_config(tmp_path, "wan2_t2v", {}, trainer_type="grpo", max_epochs=1,
                         unique_sample_num_per_epoch=2, per_device_batch_size=2)
    launch(path, 4, "run_name=cp", "train.context_parallel=2")
    launch(path, 2, "run_name=dp")
    runs = tmp_path / "runs"
    name = "checkpoints/final/lora/pytorch_lora_weights.safetensors"
    a, b = load_file(runs / "cp" / name), load_file(runs / "dp" / name)
    moved = max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k)
    assert moved > 1e-3
    assert adam_rounding(a, b, lr=1e-2) is None
    mc, md = (next(m for m in metrics(runs / r) if "train/loss" in m) for r in ("cp", "dp"))
    for k in ("train/reward/brightness", "train/grad_norm", "train/loss"):
        assert mc[k] == pytest.approx(md[k], rel=1e-4, abs=1e-7), k


def test_layout_arithmetic(tmp_path):
    from tests.helpers.tiny import tiny_config

    cfg = tiny_config(tmp_path, overrides=["train.context_parallel=2"])
    assert [context_parallel.data_rank(cfg, p) for p in range(4)] == [0, 0, 1, 1]
    assert context_parallel.data_world(cfg, 4) == 2 and context_parallel.loss_scale(cfg) == 2
    assert cfg.geometry(2) == tiny_config(tmp_path).geometry(1)  # 2 processes, one data rank
    with pytest.raises(ConfigError, match="does not divide the 3 processes"):
        cfg.geometry(3)
    gathered = torch.tensor([[0.], [1.], [0.], [1.], [2.], [3.], [2.], [3.]])  # 4 processes, 2 rows each
    assert context_parallel.one_per_group(gathered, 4, 2).flatten().tolist() == [0., 1., 2., 3.]
    assert context_parallel.one_per_group(gathered, 4, 1) is gathered


def test_check_names_what_cannot_be_split(tmp_path):
    from shared.config import load_config
    from shared.models import load_adapter
    from tests.helpers.tiny import tiny_config

    image = tiny_config(tmp_path, overrides=["train.context_parallel=2"])
    with pytest.raises(ValueError, match="generates images"):
        context_parallel.check(image, load_adapter(image.model, device="cpu", seed=0), 2)

    path = family_config(tmp_path / "wan", "wan2_t2v", {})
    cfg = load_config(path, ["train.context_parallel=2"])
    adapter = load_adapter(cfg.model, device="cpu", seed=0)
    context_parallel.check(cfg, adapter, 2)  # 2 heads, even token counts: fine
    with pytest.raises(ValueError, match="attention backend diffusers can split.*'_native_math'.*Fix: one of .*native"):
        context_parallel.check(load_config(path, ["train.context_parallel=2", "model.attn_backend=_native_math"]),
                               adapter, 2)
    with pytest.raises(ValueError, match="does not divide the 2 attention heads"):
        context_parallel.check(load_config(path, ["train.context_parallel=4"]), adapter, 4)
    # 24 px: 6 x 6 latent pixels, 3 x 3 patches of 2 x 2; one frame: 9 tokens, which 2 does not divide
    odd = load_config(path, ["train.context_parallel=2", "train.resolution=[24,24]", "train.num_frames=1"])
    with pytest.raises(ValueError, match="tokens of a train rollout"):
        context_parallel.check(odd, adapter, 2)


def test_the_queue_leaders_failure_reaches_the_group():
    """With ``transport: celery`` a group's leader collects while the others wait (longer than the
    process groups' timeout); when that fails, the others raise too, naming the leader and its error,
    instead of waiting for samples that will not come."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        run_probe("cp_transport_probe.py", Path(tmp))
        leader, member = (json.loads((Path(tmp) / f"probe-rank{r}.json").read_text()) for r in (0, 1))
    assert leader["raised"].startswith("epoch 0: 3 of 4 samples not scored")
    assert member["raised"] == f"the group's first process (rank 0) stopped collecting: CollectError: {leader['raised']}"
    assert member["duplicates"] == 0 and leader["duplicates"] == 0


def test_samples_travel_to_the_group_whole():
    """What a leader sends (:func:`pack_samples`) is what a member rebuilds (but the conditioning,
    re-encoded there): the trajectory bit for bit, the rewards, versions, metrics and kept rows."""
    from shared.sampling import Rollout, unpack_trajectory
    from trainer.collect import Samples

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 4, 2, 2, generator=g)  # [B, states, C, h, w]: steps 1-3 and the state after
    roll = Rollout(final_latents=torch.randn(4, 4, 2, 2, generator=g), images=None, sigmas=torch.linspace(1, 0, 5),
                   sde_steps=[1, 2, 3], latents=latents[:, :3], next_latents=latents[:, 1:],
                   log_probs=torch.randn(4, 3, generator=g), stds=torch.rand(4, 3, generator=g), means=None)
    sent = Samples(None, roll, {"brightness": torch.tensor([0.1, float("nan"), 0.3, 0.4])}, [3, 3, 2, 3],
                   {"queue/policy_lag": 0.25, "queue/samplers": 1.0}, rows=[0, 1, 2, 3])
    data = cp_queue.pack_samples(sent)
    trajectory, rewards, meta = cp_queue.unpack_samples(data)
    got = unpack_trajectory(trajectory)
    for name in ("final_latents", "latents", "next_latents", "log_probs", "stds", "sigmas"):
        assert torch.equal(getattr(got, name), getattr(roll, name)), name
    assert got.sde_steps == roll.sde_steps and got.means is None
    # a bfloat16 rollout's states (exact in bf16) travel in half the bytes, and arrive the same
    roll.latents, roll.next_latents = latents.bfloat16().float()[:, :3], latents.bfloat16().float()[:, 1:]
    half = cp_queue.pack_samples(sent, "bfloat16")
    assert abs((len(data) - len(half)) - latents.numel() * 2) < 16  # 2 bytes a state element fewer (header aside)
    back = unpack_trajectory(cp_queue.unpack_samples(half)[0])
    assert torch.equal(back.latents, roll.latents) and torch.equal(back.next_latents, roll.next_latents)
    with pytest.raises(ValueError, match="not exact in bfloat16"):  # a float32 rollout's are refused
        roll.latents = latents[:, :3]
        cp_queue.pack_samples(sent, "bfloat16")
    assert torch.allclose(rewards["brightness"], sent.rewards["brightness"], equal_nan=True)
    assert meta == {"policy_versions": [3, 3, 2, 3], "metrics": sent.metrics, "rows": [0, 1, 2, 3]}
