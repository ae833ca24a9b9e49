"""Memory and speed options every adapter honours (README "Memory and speed options"), on the
tiny toy model and the tiny pipelines: ``model.attn_backend`` (errors name the backend, what is
missing and the fix; ``native`` works on the CPU), ``model.gradient_checkpointing`` (same
gradients), ``train.ref_param_device`` / ``train.ema_device: cpu``, ``train.mixed_precision: bf16``
on the CPU, and decoupled ``train`` / ``eval`` resolution and frames. Per-family checks of the
backend and of checkpointing are in the adapter contract suite."""

from __future__ import annotations

import pytest
import torch

from shared.models import load_adapter
from shared.models.attention import apply_attention_backend, attention_backend_of
from tests.helpers.tiny import tiny_config
from trainer.policy import Policy, attach_trainable


def tiny_adapter(tmp_path, overrides=()):
    cfg = tiny_config(tmp_path, "grpo", list(overrides))
    return cfg, load_adapter(cfg.model, device="cpu", seed=0)


def velocity(adapter, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *adapter.latent_shape((16, 16)), generator=g)
    cond = adapter.encode_prompts(["a red circle", "a blue square"], cfg=True, negative_prompts=["", ""])
    with torch.no_grad():
        return adapter.velocity(x, torch.tensor([0.9, 0.3]), cond, 3.0)


# --------------------------------------------------------------------------- attention backend


def test_native_backend_on_the_cpu_gives_the_same_velocities(tmp_path):
    """The toy model is an SD3 transformer, whose processors call SDPA directly: flowrl routes them
    through the dispatcher, bit-identically; the process-wide default backend is left alone."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    cfg, adapter = tiny_adapter(tmp_path)
    plain = velocity(adapter)
    assert attention_backend_of(adapter.transformer) == {None}
    for name in ("native", "_native_math"):
        _, other = tiny_adapter(tmp_path, [f"model.attn_backend={name}"])
        attach_trainable(other, tiny_config(tmp_path, "grpo", [f"model.attn_backend={name}"]))
        assert attention_backend_of(other.transformer) == {name}
        assert _AttentionBackendRegistry._active_backend == before
        if name == "native":
            assert torch.equal(velocity(other), plain)
        else:
            torch.testing.assert_close(velocity(other), plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, message", [
    ("flashh", r"'flashh' is not an attention backend of diffusers .* Did you mean 'flash'\? Fix: use 'native'"),
    ("xformers", r"'xformers' cannot be used in this environment: .*xformers.* Fix: pip install xformers; or use 'native'"),
    ("_native_cudnn", r"'_native_cudnn' needs a CUDA GPU, but the model is on cpu. Fix: use one of native"),
])
def test_backend_errors_name_the_backend_and_the_fix(tmp_path, name, message):
    _, adapter = tiny_adapter(tmp_path)
    with pytest.raises(ValueError, match=message):
        apply_attention_backend(adapter.transformer, name)


def test_flash_attn_not_installed_names_the_package(tmp_path):
    from diffusers.models import attention_dispatch

    if attention_dispatch._CAN_USE_FLASH_ATTN:
        pytest.skip("flash-attn is installed here")
    _, adapter = tiny_adapter(tmp_path)
    with pytest.raises(ValueError, match=r"model.attn_backend: 'flash' cannot be used in this environment: .*"
                                         r"flash-attn.*Fix: pip install flash-attn"):
        apply_attention_backend(adapter.transformer, "flash")
    if not attention_dispatch.is_kernels_available():
        with pytest.raises(ValueError, match=r"'flash_hub' cannot be used.*kernels.*Fix: pip install -U kernels"):
            apply_attention_backend(adapter.transformer, "flash_hub")


def test_the_trainer_fails_at_load_on_a_bad_backend(tmp_path):
    from trainer.loop import train

    cfg = tiny_config(tmp_path, "grpo", ["model.attn_backend=flash"])
    with pytest.raises(ValueError, match="model.attn_backend: 'flash'.*Fix"):
        train(cfg, quiet=True)


# --------------------------------------------------------------------------- gradient checkpointing


def loss_and_grads(tmp_path, checkpointing: bool, full: bool = False):
    over = [f"model.gradient_checkpointing={str(checkpointing).lower()}"]
    if full:
        over.append("model.finetune_type=full")
    cfg, adapter = tiny_adapter(tmp_path, over)
    torch.manual_seed(0)  # the same LoRA initialisation
    trainable = attach_trainable(adapter, cfg)
    adapter.transformer.train()
    calls = []
    if checkpointing:
        inner = adapter.transformer._gradient_checkpointing_func
        adapter.transformer._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or inner(*a, **k)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, *adapter.latent_shape((16, 16)), generator=g)
    cond = adapter.encode_prompts(["a red circle"] * 4, cfg=False)
    v = adapter.velocity(x, torch.tensor([0.9, 0.7, 0.5, 0.3]), cond, 1.0)
    loss = (v - x).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainable.items() if p.grad is not None}, len(calls)


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, full):
    loss, grads, _ = loss_and_grads(tmp_path, False, full)
    loss_ckpt, grads_ckpt, calls = loss_and_grads(tmp_path, True, full)
    assert calls > 0, "checkpointing was not used"
    assert grads and grads.keys() == grads_ckpt.keys()
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- where the extra copies live


def test_reference_and_ema_on_the_cpu(tmp_path):
    """Full fine-tune with a KL term: the frozen reference is a separate copy on the CPU, the EMA
    shadow lives on the CPU in float32, and both evaluate (inputs moved there and back)."""
    cfg, adapter = tiny_adapter(tmp_path, ["model.finetune_type=full", "train.kl_beta=0.01",
                                           "train.ref_param_device=cpu", "train.ema_device=cpu",
                                           "train.ema_decay=0.9"])
    trainable = attach_trainable(adapter, cfg)
    policy = Policy(adapter, adapter.transformer, cfg, trainable)
    ref = policy._ref
    assert ref is not None and ref is not adapter.transformer
    assert all(p.device.type == "cpu" and not p.requires_grad for p in ref.parameters())
    live = {p.data_ptr() for p in adapter.transformer.parameters()}
    assert not live & {p.data_ptr() for p in ref.parameters()}, "the reference shares the live weights"
    assert policy.ema.device == torch.device("cpu")
    assert all(s.device.type == "cpu" and s.dtype == torch.float32 for s in policy.ema.shadow.values())
    x = torch.randn(2, *adapter.latent_shape((16, 16)))
    cond = adapter.encode_prompts(["a", "b"], cfg=False)
    sigma = torch.tensor([0.5, 0.5])
    assert policy.ref_velocity(x, sigma, cond).shape == x.shape
    assert policy.ema_velocity(x, sigma, cond).shape == x.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reference_and_ema_on_the_cpu_with_the_model_on_cuda(tmp_path):
    cfg = tiny_config(tmp_path, "grpo", ["model.finetune_type=full", "train.kl_beta=0.01",
                                         "train.ref_param_device=cpu", "train.ema_device=cpu", "train.ema_decay=0.9"])
    adapter = load_adapter(cfg.model, device="cuda", seed=0)
    trainable = attach_trainable(adapter, cfg)
    policy = Policy(adapter, adapter.transformer, cfg, trainable)
    assert {p.device.type for p in policy._ref.parameters()} == {"cpu"}
    assert {s.device.type for s in policy.ema.shadow.values()} == {"cpu"}
    x = torch.randn(2, *adapter.latent_shape((16, 16)), device="cuda")
    cond = adapter.encode_prompts(["a", "b"], cfg=False)
    sigma = torch.tensor([0.5, 0.5], device="cuda")
    assert policy.ref_velocity(x, sigma, cond).device.type == "cuda"
    assert policy.ema_velocity(x, sigma, cond).device.type == "cuda"


# --------------------------------------------------------------------------- mixed precision, resolution, frames


def test_bf16_mixed_precision_on_the_cpu_trains_in_bf16(tmp_path, monkeypatch):
    import trainer.loop as loop

    dtypes = set()
    real = loop.attach_trainable

    def attach_and_watch(adapter, cfg, **kwargs):
        out = real(adapter, cfg, **kwargs)
        first = next(m for m in adapter.transformer.modules() if isinstance(m, torch.nn.Linear))
        first.register_forward_hook(lambda m, a, o: dtypes.add(o.dtype) if torch.is_grad_enabled() else None)
        return out

    monkeypatch.setattr(loop, "attach_trainable", attach_and_watch)
    cfg = tiny_config(tmp_path, "grpo", ["train.mixed_precision=bf16", "train.max_epochs=1",
                                         "train.unique_sample_num_per_epoch=2", "train.group_size=4",
                                         "train.per_device_batch_size=8", "train.gradient_step_per_epoch=1",
                                         "eval.num_inference_steps=2", "eval.num_prompts=2"])
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # the process-wide state other tests built with mixed_precision "no"
    try:
        summary = loop.train(cfg, quiet=True)
    finally:
        AcceleratorState._reset_state()
    assert summary["optimizer_steps"] == 1
    assert dtypes == {torch.bfloat16}, f"the training forward ran in {dtypes}"


def test_train_and_eval_resolution_and_frames_are_decoupled(tmp_path, monkeypatch):
    """wan2_t2v: rollouts at train.resolution / train.num_frames, evaluation at eval.*."""
    import shared.sampling as sampling
    from tests.helpers.tiny_pipelines import TINY_PIPELINES, tiny_train_config
    from trainer.loop import train

    spec = TINY_PIPELINES["wan2_t2v"]
    folder = spec.save(tmp_path / "pipe")
    seen = []
    real = sampling.rollout

    def recording(adapter, cond, seeds, **kw):
        out = real(adapter, cond, seeds, **kw)
        seen.append((kw["resolution"], kw["num_frames"], tuple(out.images.shape[1:])))
        return out

    monkeypatch.setattr(sampling, "rollout", recording)
    cfg = tiny_train_config(spec, folder, tmp_path, train={"num_frames": 5, "resolution": [32, 32]})
    cfg.eval.resolution, cfg.eval.num_frames = (48, 32), 9
    train(cfg, quiet=True)
    assert ((32, 32), 5, (5, 3, 32, 32)) in seen  # training rollouts
    assert ((48, 32), 9, (9, 3, 48, 32)) in seen  # evaluation
    assert {s[:2] for s in seen} == {((32, 32), 5), ((48, 32), 9)}


# --------------------------------------------------------------------------- torch.compile


def test_compile_trains_through_the_compiled_transformer_like_eager(tmp_path, monkeypatch):
    """``model.compile``: the transformer is compiled in place (parameter names, hence LoRA files,
    unchanged), the trainer's forwards go through dynamo, and one epoch lands on the weights of the
    uncompiled run. Dynamo's ``eager`` backend stands in for inductor here (no C++ toolchain on
    CI; inductor's speed is measured by bench/gpu/sampler.py --compile)."""
    from safetensors.torch import load_file
    from torch._dynamo.utils import counters

    import trainer.loop as loop

    real = torch.compile
    modes = []

    def eager_compile(model=None, **kwargs):
        modes.append(kwargs.pop("mode", None))
        return real(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager_compile)
    common = ["train.max_epochs=1", "train.unique_sample_num_per_epoch=2", "train.group_size=4",
              "train.per_device_batch_size=8", "train.gradient_step_per_epoch=1", "eval.eval_freq=0",
              "eval.num_prompts=2", "eval.num_inference_steps=2"]
    weights = {}
    for compiled in (False, True):
        cfg = tiny_config(tmp_path / str(compiled), "grpo", common + [f"model.compile={str(compiled).lower()}"])
        torch._dynamo.reset()
        before = counters["stats"]["calls_captured"]
        summary = loop.train(cfg, quiet=True)
        captured = counters["stats"]["calls_captured"] - before
        assert (captured > 0) == compiled, captured
        weights[compiled] = load_file(f"{summary['checkpoint']}/lora/pytorch_lora_weights.safetensors")
    torch._dynamo.reset()
    assert modes == [None]  # model.compile: true = torch.compile's default mode
    assert weights[True].keys() == weights[False].keys()
    for k in weights[True]:
        torch.testing.assert_close(weights[True][k], weights[False][k], rtol=1e-5, atol=1e-6)


def test_checkpointing_policies_choose_blocks_and_refuse_bad_ones(tmp_path):
    from shared.config import CheckpointPolicy, ConfigError
    from trainer.policy import chosen_blocks

    def pick(**policy):
        return chosen_blocks(10, CheckpointPolicy(**policy))

    # fraction: ceil(f n) blocks spread from the first to the last (Flow-Factory's choice); one: the middle
    assert pick(fraction=0.25) == [0, 4, 9] and pick(fraction=0.1) == [5] and pick(fraction=1.0) == list(range(10))
    assert chosen_blocks(25, CheckpointPolicy(fraction=0.28)) == [0, 4, 8, 12, 16, 20, 24]  # 7, not 8 (rounding)
    assert pick(every_n=3) == [0, 3, 6, 9]
    assert pick(layers=[7, 2, 2]) == [2, 7] and pick(mode="full") == list(range(10)) and pick(mode="none") == []
    assert chosen_blocks(4, True) == [0, 1, 2, 3] and not CheckpointPolicy(mode="none")
    with pytest.raises(ValueError, match=r"\[10\] are past the last block \(each denoiser.*has 10"):
        pick(layers=[3, 10])
    for bad, message in [("{mode: fraction}", "needs its fraction, e.g. {mode: fraction, fraction: 0.5}"), ("{fraction: 0.5, every_n: 2}", "exactly one"),
                         ("{mode: every_n, every_n: 2, layers: [1]}", "does not take"),
                         ("{layers: [-1]}", "from 0"), ("{fraction: 1.5}", "less than or equal to 1"),
                         ("{every_n: true}", "every_n.*valid integer"), ("{frac: 0.5}", "Did you mean .*fraction")]:
        with pytest.raises(ConfigError, match=message):
            tiny_adapter(tmp_path, [f"model.gradient_checkpointing={bad}"])
