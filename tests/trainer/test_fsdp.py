"""``train.fsdp``: the transformer sharded over 2 CPU processes (gloo) with PyTorch FSDP2.

Checks: the sharding primitives against an unsharded copy (``tests/helpers/fsdp_probe.py``); a
full fine-tune (NFT with a KL reference, EMA evaluation, an uneven evaluation split, blocks kept
gathered between forward and backward) follows the DDP run to float rounding, with half the
weights and optimizer state on each process, writes a checkpoint diffusers loads, and resumes
from it exactly; a LoRA run
in bf16 resumes exactly under FSDP, and its checkpoint resumes under DDP;
Wan2.2-A14B's two experts train as under DDP; the combinations it refuses say why and what to do. The distributed mode (Celery) under FSDP is
in ``tests/integration/test_multi_trainer.py``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers.tiny import tiny_config, tiny_raw
from tests.trainer.test_multiprocess import free_port, metrics, run
from trainer.sharding import blocks_of, check_fsdp, equal_share

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def launch(cfg_path: Path, *overrides: str) -> None:
    sets = [a for o in overrides for a in ("--set", o)]
    run(LAUNCH + ["--main_process_port", str(free_port()), "-m", "trainer.cli", "train", str(cfg_path)] + sets)


def config_file(tmp_path: Path, trainer_type: str, **train) -> Path:
    raw = tiny_raw(tmp_path, trainer_type)
    raw["train"].update({"max_epochs": 2, "per_device_batch_size": 8, "gradient_step_per_epoch": 1, **train})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def rank_states(run_dir: Path) -> list[dict]:
    return [json.loads((run_dir / f"rank{r}_state.json").read_text()) for r in (0, 1)]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def adam_close(a: dict, b: dict, step: float, tol: float = 1e-5, share: float = 1e-3) -> str | None:
    """None when the weights ``a`` and ``b`` agree to ``tol`` but for a few elements (at most ``share`` of them)
    that differ by less than one AdamW step ``step`` (lr x steps), else what is wrong. Adam divides by
    the gradient's running RMS, so an element whose gradient is ~0 turns float rounding (which differs
    between one process and a sharded reduction, and from run to run of the gloo one) into a difference of
    up to a whole step (flux1 below, lr 1e-4 x 2 steps: from 1e-8 to 5e-5 between runs)."""
    assert a.keys() == b.keys()
    diffs = [(a[k].float() - b[k].float()).abs() for k in a]
    worst = max(float(d.max()) for d in diffs)
    off = sum(int((d > tol).sum()) for d in diffs)
    total = sum(d.numel() for d in diffs)
    if worst >= step or off > total * share:
        return f"{off} of {total} elements differ by more than {tol} (largest {worst:.3g}; one step {step:.3g})"
    return None


def run_probe(script: str, out: Path) -> None:
    """Run ``tests/helpers/{script}`` on 2 CPU processes (torch.distributed.run) writing to ``out``."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), f"tests/helpers/{script}", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_sharding_primitives_against_an_unsharded_copy(tmp_path):
    run_probe("fsdp_probe.py", tmp_path)
    for r in (0, 1):
        for res in json.loads((tmp_path / f"probe-rank{r}.json").read_text()):
            assert res["blocks"] == 2 and res["class"] == "SD3Transformer2DModel"
            assert res["sharded_vs_plain"] < 1e-6 and res["gathered_live_vs_plain"] == 0
            assert res["swap_vs_live"] > 0.1, "the perturbed weights changed nothing: the test would not see a swap"
            assert res["swap_vs_paramview"] < 1e-5, res  # the swapped weights were the ones used
            assert res["restored_vs_live"] < 1e-6, res  # and the live ones came back
            assert res["gather_like_round_trip"] == 0
            assert abs(res["bytes_here"] - res["bytes_whole"] / 2) <= 0.05 * res["bytes_whole"]
            assert "no_grad" in res["swap_with_grad"]


def test_full_finetune_under_fsdp_follows_ddp(tmp_path):
    cfg = config_file(tmp_path, "nft", learning_rate=1e-4, kl_beta=0.1, ema_decay=0.9)
    common = ["model.finetune_type=full", "eval.num_prompts=5", "eval.images_per_prompt=1"]  # 3 + 2 eval images
    sharded = ["train.fsdp=true", "train.fsdp_reshard_after_forward=false", "train.save_freq=1"]
    launch(cfg, "run_name=fsdp", *sharded, *common)
    launch(cfg, "run_name=ddp", *common)
    fsdp, ddp = tmp_path / "runs" / "fsdp", tmp_path / "runs" / "ddp"
    # resumed from its epoch-1 checkpoint (each process copies in its pieces of the whole weights)
    shutil.copytree(fsdp, tmp_path / "runs" / "resumed")
    shutil.rmtree(tmp_path / "runs" / "resumed" / "checkpoints" / "final")
    launch(cfg, "run_name=resumed", "train.resume_from=latest", *sharded, *common)

    keys = ("train/reward/brightness", "train/kl", "train/grad_norm", "eval/reward/brightness")
    mf, md = metrics(fsdp), metrics(ddp)
    assert len(mf) == len(md) == 4
    for a, b in zip(mf, md):
        for k in keys:
            assert (k in a) == (k in b)
            if k in a:
                assert abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(b[k])), (k, a[k], b[k])
    assert mf[2]["train/kl"] > 0  # the frozen reference (swapped-in pieces) differs from the policy

    sf, sd = rank_states(fsdp), rank_states(ddp)
    assert sf[0]["param_checksum"] == sf[1]["param_checksum"]
    assert abs(sf[0]["param_checksum"] - sd[0]["param_checksum"]) < 1e-5
    for r in (0, 1):  # each process holds half of the weights and of the AdamW moments
        assert abs(sf[r]["transformer_bytes"] - sd[r]["transformer_bytes"] / 2) <= 0.05 * sd[r]["transformer_bytes"]
        assert abs(sf[r]["optimizer_bytes"] - sd[r]["optimizer_bytes"] / 2) <= 0.05 * sd[r]["optimizer_bytes"]

    final = "checkpoints/final"
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert max_diff(load_file(fsdp / final / weights), load_file(ddp / final / weights)) < 1e-6
    assert max_diff(load_file(fsdp / final / "ema.safetensors"), load_file(ddp / final / "ema.safetensors")) < 1e-6
    config = json.loads((fsdp / final / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "SD3Transformer2DModel"
    from diffusers import SD3Transformer2DModel

    loaded = SD3Transformer2DModel.from_pretrained(fsdp / final / "transformer")
    saved = load_file(ddp / final / weights)
    assert max_diff({k: v for k, v in loaded.state_dict().items()}, saved) < 1e-6
    resumed = tmp_path / "runs" / "resumed"
    for name in (weights, "ema.safetensors"):
        a, b = load_file(fsdp / final / name), load_file(resumed / final / name)
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), name
    start = load_file(fsdp / "checkpoints" / "checkpoint-1" / weights)
    assert max_diff(start, load_file(fsdp / final / weights)) > 1e-5  # epoch 2 moved the weights


def test_lora_bf16_under_fsdp_resumes_exactly_and_under_ddp(tmp_path):
    cfg = config_file(tmp_path, "grpo", clip_range=1e-3, max_epochs=3, save_freq=1, ema_decay=0.9,
                      mixed_precision="bf16")
    launch(cfg, "run_name=full", "train.fsdp=true")
    runs = tmp_path / "runs"
    ckpt = runs / "full" / "checkpoints" / "checkpoint-1"
    assert (ckpt / "resume" / "optimizer.safetensors").is_file()
    for name in ("stopped", "other"):
        shutil.copytree(runs / "full", runs / name)
        for extra in ("checkpoint-2", "final"):
            shutil.rmtree(runs / name / "checkpoints" / extra)
    launch(cfg, "run_name=stopped", "train.fsdp=true", "train.resume_from=latest")
    # the same checkpoint under DDP: whole tensors in the files, the same math (bf16 rounding
    # depends on the batch layout, so the same 2 processes)
    launch(cfg, "run_name=other", "train.resume_from=latest")

    lora = "checkpoints/final/lora/pytorch_lora_weights.safetensors"
    full, stopped, other = (load_file(runs / n / lora) for n in ("full", "stopped", "other"))
    assert full.keys() == stopped.keys() and all(full[k].equal(stopped[k]) for k in full)
    start = load_file(ckpt / "lora" / "pytorch_lora_weights.safetensors")
    moved = max_diff(full, start)
    assert moved > 1e-4
    assert max_diff(full, other) < 1e-3 * moved
    ema = "checkpoints/final/ema.safetensors"
    assert max_diff(load_file(runs / "full" / ema), load_file(runs / "other" / ema)) < 1e-3 * moved


def test_hybrid_sharding_on_four_processes_follows_ddp(tmp_path):
    """``train.fsdp_shard_size: 2`` on 4 processes: 2 replicas of a model sharded over 2 processes
    each (HSDP, as over the GPUs of 2 nodes); every process holds half the weights, and the run
    ends where DDP's does."""
    cfg = config_file(tmp_path, "nft", learning_rate=1e-4, kl_beta=0.1, ema_decay=0.9)
    four = LAUNCH[:LAUNCH.index("--num_processes") + 1] + ["4"] + LAUNCH[LAUNCH.index("--num_processes") + 2:]
    for name, extra in (("hsdp", ["--set", "train.fsdp=true", "--set", "train.fsdp_shard_size=2"]), ("ddp", [])):
        run(four + ["--main_process_port", str(free_port()), "-m", "trainer.cli", "train", str(cfg),
                    "--set", f"run_name={name}", "--set", "model.finetune_type=full", *extra])
    runs = tmp_path / "runs"
    hsdp, ddp = ([json.loads((runs / n / f"rank{r}_state.json").read_text()) for r in range(4)] for n in ("hsdp", "ddp"))
    assert all(h["transformer_bytes"] * 2 == d["transformer_bytes"] for h, d in zip(hsdp, ddp))
    assert len({h["param_checksum"] for h in hsdp}) == 1
    weights = "checkpoints/final/transformer/diffusion_pytorch_model.safetensors"
    assert max_diff(load_file(runs / "hsdp" / weights), load_file(runs / "ddp" / weights)) < 1e-6


# ------------------------------------------------------------------ refusals and helpers (one process)

def test_fsdp_on_one_process_says_how_to_launch(tmp_path):
    from trainer.loop import train

    with pytest.raises(ValueError, match="accelerate launch --multi_gpu --num_processes N"):
        train(tiny_config(tmp_path, "grpo", ["train.fsdp=true"]), quiet=True)


@pytest.mark.parametrize("override, match", [
    ("train.mixed_precision=fp16", "train.mixed_precision: bf16"),
    ("model.compile=true", "model.compile: false"),
    ("train.fsdp_shard_size=3", "a divisor of 2"),
])
def test_fsdp_refuses_what_it_cannot_do(tmp_path, override, match):
    cfg = tiny_config(tmp_path, "grpo", ["train.fsdp=true", override])
    adapter = type("A", (), {"transformer": torch.nn.Linear(2, 2)})()
    with pytest.raises(ValueError, match=match):
        check_fsdp(cfg, adapter, world_size=2)


def test_two_experts_run_what_any_process_needs_and_add_nothing_for_it():
    """``TwoExperts.agree`` (set under FSDP): when another process needs the low-noise expert and
    this one has only high-noise samples, the low expert runs on a stand-in; the output is the same
    to the bit, and the low expert's gradient exists and is zero (what DDP's averaging gives it)."""
    from shared.models.experts import TwoExperts

    torch.manual_seed(0)

    class Expert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, hidden_states, timestep, return_dict=False, **kwargs):
            return (self.lin(hidden_states) * timestep[:, None],)

    two = TwoExperts(Expert(), Expert(), boundary=500.0)
    x, t = torch.randn(3, 4), torch.tensor([900.0, 700.0, 600.0])  # all high-noise
    plain = two(hidden_states=x, timestep=t)[0]
    asked = []
    two.agree = lambda need: asked.append(need.tolist()) or torch.tensor([1, 1])  # another process needs low
    agreed = two(hidden_states=x, timestep=t)[0]
    assert asked == [[1, 0]] and torch.equal(agreed, plain)
    agreed.sum().backward()
    low = two.transformer_2.lin.weight.grad
    assert low is not None and torch.count_nonzero(low) == 0
    assert torch.count_nonzero(two.transformer.lin.weight.grad) > 0
    two.zero_grad(set_to_none=True)
    two.agree = lambda need: need  # nobody else: the low expert does not run, no gradient
    two(hidden_states=x, timestep=t)[0].sum().backward()
    assert two.transformer_2.lin.weight.grad is None


def test_blocks_are_the_models_no_split_modules_else_its_module_lists():
    from shared.config import ModelConfig
    from shared.models import load_adapter

    transformer = load_adapter(ModelConfig(model_type="tiny"), device=torch.device("cpu"), seed=0).transformer
    assert [type(b).__name__ for b in blocks_of(transformer)] == ["JointTransformerBlock"] * 2

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))
            self.head = torch.nn.Linear(2, 2)

    plain = Plain()
    assert blocks_of(plain) == list(plain.layers)


def test_equal_share_pads_every_process_to_the_longest():
    assert equal_share([0, 2, 4], [3, 2]) == [0, 2, 4]
    assert equal_share([1, 3], [3, 2]) == [1, 3, 3]
    assert equal_share([], [1, 0]) == [0]


# ------------------------------------------------------------------ other model families

def family_config(tmp_path: Path, family: str, model: dict, **train) -> Path:
    from tests.helpers.tiny_pipelines import TINY_PIPELINES, tiny_train_config

    spec = TINY_PIPELINES[family]
    cfg = tiny_train_config(spec, spec.save(tmp_path / "pipe"), tmp_path, model=model,
                            train={"per_device_batch_size": 2, **train})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    return path


def test_two_expert_lora_under_fsdp_follows_ddp(tmp_path):
    """Wan2.2-A14B's two experts, each sharded: NFT at uniform random timesteps, so micro-batches mix
    the experts differently on each process; both experts train, and as under DDP."""
    path = family_config(tmp_path, "wan2_t2v-a14b", {}, trainer_type="nft", ema_decay=0.5, max_epochs=2,
                         time_sampling_strategy="uniform", num_train_timesteps=2, num_inference_steps=4)
    launch(path, "run_name=fsdp", "train.fsdp=true")
    launch(path, "run_name=ddp")
    runs = tmp_path / "runs"
    for part in ("lora", "lora_2"):
        name = f"checkpoints/final/{part}/pytorch_lora_weights.safetensors"
        a, b = load_file(runs / "fsdp" / name), load_file(runs / "ddp" / name)
        moved = max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k)  # B starts at zero
        assert moved > 1e-3, f"{part} did not train"
        assert max_diff(a, b) < 1e-3 * moved, part  # float rounding, through AdamW


@pytest.mark.parametrize("family", ["flux1", "wan2_t2v", "qwen-image"])
def test_full_finetune_of_other_families_under_fsdp_matches_one_process(tmp_path, family):
    """Two block types (FLUX.1's double and single blocks), a video model whose root holds a lone
    modulation table (Wan), a model whose last block leaves weights without gradient (Qwen-Image,
    with its recipe's gradient checkpointing: each block is gathered again for its recomputation)."""
    from shared.config import load_config
    from trainer.loop import train

    model = {"finetune_type": "full", "gradient_checkpointing": family == "qwen-image"}
    path = family_config(tmp_path, family, model, learning_rate=1e-4, max_epochs=2, ema_decay=0.5, kl_beta=0.1)
    launch(path, "run_name=fsdp", "train.fsdp=true")
    train(load_config(path, ["run_name=one"]), quiet=True)
    runs = tmp_path / "runs"
    for name in ("transformer/diffusion_pytorch_model.safetensors", "ema.safetensors"):
        a, b = (load_file(runs / r / "checkpoints" / "final" / name) for r in ("fsdp", "one"))
        problem = adam_close(a, b, step=1e-4 * 2)  # lr x the 2 optimizer steps (max_epochs 2, one each)
        assert problem is None, f"{name}: {problem}"
    start = load_file(tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors")
    final = load_file(runs / "fsdp" / "checkpoints" / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert max(float((final[k] - start[k]).abs().max()) for k in start) > 1e-5  # it trained


def test_the_transformer_can_stay_off_the_device_the_rest_goes_to(tmp_path):
    """``transformer_device`` (what ``train.fsdp`` loads with: the CPU, so the whole transformer never
    sits on one GPU): here ``meta`` stands in for the other device, the only other one a CPU has."""
    from shared.config import ModelConfig
    from shared.models import load_adapter
    from tests.helpers.tiny_pipelines import TINY_PIPELINES

    spec = TINY_PIPELINES["flux1"]
    cfg = ModelConfig(model_type="flux1", model_name_or_path=str(spec.save(tmp_path / "pipe")),
                      options=dict(spec.options))
    adapter = load_adapter(cfg, device=torch.device("cpu"), seed=0, transformer_device="meta")
    assert {p.device.type for p in adapter.transformer.parameters()} == {"meta"}
    assert {p.device.type for p in adapter.pipeline.text_encoder.parameters()} == {"cpu"}
    assert {p.device.type for p in adapter.pipeline.vae.parameters()} == {"cpu"}
    tiny = load_adapter(ModelConfig(model_type="tiny"), device=torch.device("cpu"), seed=0, transformer_device="meta")
    assert next(tiny.transformer.parameters()).device.type == "meta"


def test_crd_snapshots_under_fsdp_follow_ddp(tmp_path):
    """CRD's old and sampling snapshots are kept as each process's pieces under FSDP, evaluated through
    them, and gathered into whole tensors in the checkpoint: training and files follow DDP's."""
    cfg = config_file(tmp_path, "crd", crd_sampling_decay="0-0.5-0.0-0.5")
    launch(cfg, "run_name=fsdp", "train.fsdp=true")
    launch(cfg, "run_name=ddp")
    final = {n: tmp_path / "runs" / n / "checkpoints" / "final" for n in ("fsdp", "ddp")}
    lr = yaml.safe_load(cfg.read_text())["train"]["learning_rate"]
    for name in ("lora/pytorch_lora_weights.safetensors", "snapshot-old.safetensors", "snapshot-sampling.safetensors"):
        sharded, whole = load_file(final["fsdp"] / name), load_file(final["ddp"] / name)
        assert adam_close(sharded, whole, step=2 * lr) is None, name
    old, sampling = (load_file(final["fsdp"] / f"snapshot-{n}.safetensors") for n in ("old", "sampling"))
    assert max_diff(old, sampling) > 0  # two different blends of the policy
