"""Adapter contract suite: every model family in :data:`tests.helpers.tiny_pipelines.TINY_PIPELINES`
(one tiny random-weight diffusers pipeline per ``model_type``, saved with ``save_pretrained`` and
loaded back with the adapter's normal ``load``) must

* load from a local pipeline folder, freeze everything but the transformer, and name the fix
  for a bad folder, a missing path, an unknown option or a resolution that does not fit;
* give the rollout sigma grid (``adapter.sigmas``): ``[N + 1]`` float32 from 1 to 0 at any
  resolution, the one ``shared.sampling.rollout_batches`` rolls out on, and ``flow_sigmas(N, shift)``
  when ``model.scheduler_shift`` is set;
* roll out ``num_frames`` frames (video families, ``[B, F, 3, H, W]``; a count the VAE cannot make
  names the fix) or refuse frames (image families);
* roll out (``shared.sampling.rollout``, Flow-SDE) latents and images of the right shape, with
  log-probs that the trainer's replay (``adapter.velocity`` + ``shared.flow.sde_step`` with
  ``prev_sample``) reproduces within 1e-5 in float32 -- with and without guidance;
* condition on images (edit families: ``spec.condition_images`` per sample change the velocity; a
  wrong number names the fix) or refuse them (text-only families);
* guide: CFG families combine a negative branch (identical negatives = no guidance);
  guidance-distilled families feed the scale to the transformer in one forward;
* train LoRA on the adapter's default targets (``trainer.policy.attach_trainable``, one step of
  the trainer's optimizer): every default target gets LoRA weights, every LoRA weight with a
  gradient changes (at least one per target), the base weights stay frozen and bit-identical;
  the checkpoint written by ``trainer.checkpoint.save_checkpoint`` loads with the diffusers
  pipeline class's own ``load_lora_weights`` and reproduces the trained transformer's output;
* honour ``model.attn_backend: native`` (every attention processor dispatches, same velocities) and
  ``model.gradient_checkpointing`` (one LoRA step: the loss and gradients of the step without it);
* fine-tune fully: every transformer weight trainable, and every one that gets a gradient changes
  (weights outside the computation, like a last block's text-stream outputs, stay under 20%);
* write itself with ``save_pretrained`` and load back to identical predictions;
* encode images into latents (``encode_latents``, image families; the ``train.ptx_coef`` targets):
  the latent shape, and the exact inverse of :meth:`decode`'s normalization (what ``decode`` hands
  the VAE is the VAE's own posterior mean); video families refuse, naming the fix.

A newly registered adapter gets a builder in ``tests/helpers/tiny_pipelines.py`` and runs all of it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.config import ModelConfig
from shared.flow import flow_sigmas, sde_step
from shared.models import MODELS, Conditioning, load_adapter
from shared.models.experts import denoiser_parts, pipeline_denoiser
from shared.sampling import rollout, rollout_batches
from tests.helpers.pipeline_tests import CPU, load_tiny
from tests.helpers.tiny_pipelines import NEGATIVE, PROMPTS, TINY_PIPELINES, tiny_train_config

#: registered adapters without a diffusers pipeline (``tiny`` is built from options, no folder)
NO_PIPELINE = {"tiny"}


def test_every_registered_adapter_has_a_tiny_pipeline():
    missing = set(MODELS.names()) - NO_PIPELINE - {p.model_type for p in TINY_PIPELINES.values()}
    assert not missing, (f"model types {sorted(missing)} have no tiny pipeline builder; add one to "
                         f"tests/helpers/tiny_pipelines.py so they run the adapter contract suite")


@pytest.fixture(scope="module", params=sorted(TINY_PIPELINES))
def spec(request):
    return TINY_PIPELINES[request.param]


@pytest.fixture(scope="module")
def pipeline_dir(spec, tmp_path_factory) -> Path:
    return spec.save(tmp_path_factory.mktemp(spec.model_type.replace("-", "_")) / "pipe")


@pytest.fixture(scope="module")
def adapter(spec, pipeline_dir):
    """Shared, never trained or modified (training tests load their own copy)."""
    return load_tiny(spec, pipeline_dir)


def inputs(spec, adapter, batch: int = 2, seed: int = 0):
    shape = adapter.latent_shape(spec.resolution)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=g), torch.tensor([0.8, 0.35][:batch])


def conditioning(spec, adapter, batch: int = 2, seed: int = 0) -> Conditioning:
    """Prompts (and, for edit families, ``spec.condition_images`` test images per sample)."""
    return adapter.encode_prompts(PROMPTS[:batch], cfg=spec.uses_cfg, negative_prompts=[NEGATIVE] * batch,
                                  **spec.encode_kwargs(batch, seed))


# --------------------------------------------------------------------------- loading


def test_loads_from_a_local_pipeline_folder(spec, adapter):
    import diffusers

    assert type(adapter) is MODELS.get(spec.model_type)
    assert isinstance(adapter.pipeline, getattr(diffusers, spec.pipeline_class))
    parts = dict(denoiser_parts(adapter.transformer))  # the transformer (Wan2.2-A14B: both experts)
    assert all(module is getattr(adapter.pipeline, name) for name, module in parts.items())
    for name, component in adapter.pipeline.components.items():
        if isinstance(component, torch.nn.Module) and name not in parts:
            assert not any(p.requires_grad for p in component.parameters()), f"{name} is not frozen"
    assert adapter.scheduler_shift > 0


def test_load_errors_name_the_fix(spec, pipeline_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_tiny(spec, tmp_path)
    with pytest.raises(ValueError, match="model_name_or_path is required"):
        load_adapter(ModelConfig(model_type=spec.model_type), device=CPU, seed=0)
    cfg = ModelConfig(model_type=spec.model_type, model_name_or_path=str(pipeline_dir),
                      options={**spec.options, "no_such_option": 1})
    with pytest.raises(ValueError, match="unknown .*option.*no_such_option"):
        load_adapter(cfg, device=CPU, seed=0)


def test_latent_shape_and_a_resolution_that_does_not_fit(spec, adapter):
    h, w = spec.resolution
    shape = adapter.latent_shape((h, w))  # video families: [C, F', h, w]
    assert len(shape) == (4 if adapter.video else 3) and shape[-2] * adapter.vae_scale_factor == h
    with pytest.raises(ValueError, match="train.resolution"):
        adapter.latent_shape((h + 2, w))


def test_num_frames(spec, adapter):
    """Video families roll out ``num_frames`` frames (``[B, F, 3, H, W]``) and name the fix for a
    count their VAE cannot make; image families refuse frames with a fix."""
    if not adapter.video:
        assert adapter.sample_shape(spec.resolution, 1) == adapter.latent_shape(spec.resolution)
        with pytest.raises(ValueError, match="generates images.*num_frames"):
            adapter.sample_shape(spec.resolution, 5)
        return
    t = adapter.temporal_factor
    frames = 2 * t + 1
    shape = adapter.sample_shape(spec.resolution, frames)
    assert shape[1] == 3 and shape[2:] == adapter.latent_shape(spec.resolution)[2:]
    with pytest.raises(ValueError, match=r"train.num_frames / eval.num_frames=6 .*Fix: set .* to 5 or 9"):
        adapter.sample_shape(spec.resolution, 6)
    _, roll = rollout_batches(adapter, PROMPTS[:1], [None], [0], batch_size=1, resolution=spec.resolution,
                              num_steps=2, guidance_scale=1.0, dynamics="ODE", noise_level=0.0, sde_steps=[],
                              keep_means=False, log_prob_reduction="mean", transformer=None, num_frames=frames,
                              images=spec.encode_kwargs(1).get("images"))
    assert roll.final_latents.shape == (1, *shape)
    assert roll.images.shape == (1, frames, 3, *spec.resolution)


# --------------------------------------------------------------------------- rollouts


def test_sigma_grid_and_its_override(spec, adapter, pipeline_dir):
    """``adapter.sigmas`` at the spec's resolution and at twice it: ``[N + 1]`` float32 from exactly
    1 down to exactly 0; rollouts (``rollout_batches``, the path of training, evaluation and the
    sampler service) run on it; ``model.scheduler_shift`` replaces it by ``flow_sigmas(N, shift)``."""
    h, w = spec.resolution
    fixed = load_tiny(spec, pipeline_dir, scheduler_shift=2.0)
    assert fixed.scheduler_shift == 2.0
    for res in ((h, w), (2 * h, 2 * w)):
        sigmas = adapter.sigmas(5, res)
        assert sigmas.shape == (6,) and sigmas.dtype == torch.float32
        assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and bool((sigmas[1:] < sigmas[:-1]).all())
        _, roll = rollout_batches(adapter, PROMPTS[:1], [None], [0], batch_size=1, resolution=res,
                                  num_steps=2, guidance_scale=1.0, dynamics="ODE", noise_level=0.0,
                                  sde_steps=[], keep_means=False, log_prob_reduction="mean", transformer=None,
                                  images=spec.encode_kwargs(1).get("images"))
        assert torch.equal(roll.sigmas, adapter.sigmas(2, res))
        assert torch.equal(fixed.sigmas(5, res), flow_sigmas(5, 2.0))


@pytest.mark.parametrize("guided", [False, True], ids=["no-guidance", "guidance"])
def test_rollout_shapes_and_logprob_replay(spec, adapter, guided):
    """Rollout log-probs equal the trainer's recomputation from the stored steps (float32)."""
    w = spec.guidance_scale if guided else 1.0
    cond = conditioning(spec, adapter)
    sigmas = adapter.sigmas(4, spec.resolution)  # the grid rollouts use
    roll = rollout(adapter, cond, [0, 1], resolution=spec.resolution, sigmas=sigmas, guidance_scale=w,
                   dynamics="Flow-SDE", noise_level=0.7, sde_steps=[0, 2])
    h, w_px = spec.resolution
    assert roll.final_latents.shape == (2, *adapter.latent_shape(spec.resolution))
    frames = (spec.options["num_frames"],) if adapter.video else ()  # videos: [B, F, 3, H, W]
    assert roll.images.shape == (2, *frames, 3, h, w_px)
    assert torch.isfinite(roll.images).all() and 0.0 <= roll.images.min() and roll.images.max() <= 1.0
    assert roll.log_probs.shape == (2, 2) and torch.isfinite(roll.log_probs).all()
    for j, i in enumerate(roll.sde_steps):
        x = roll.latents[:, j]
        sigma, sigma_next = sigmas[i].expand(2), sigmas[i + 1].expand(2)
        with torch.no_grad():
            v = adapter.velocity(x, sigma, cond, w)
        out = sde_step(x, v, sigma, sigma_next, dynamics="Flow-SDE", noise_level=0.7,
                       prev_sample=roll.next_latents[:, j])
        torch.testing.assert_close(out.log_prob, roll.log_probs[:, j], rtol=0, atol=1e-5)


def test_condition_images(spec, adapter):
    """Edit families: the condition images condition the step (other images, another velocity) and
    a row with a wrong number of them names the fix; text-only families refuse condition images."""
    from shared.sampling import encode
    from tests.helpers.tiny_edit_pipelines import condition_rows

    if not spec.condition_images:
        assert adapter.condition_images == (0, 0)
        with pytest.raises(ValueError, match="takes no condition images.*Fix"):
            encode(adapter, PROMPTS[:1], [None], 1.0, images=condition_rows(1, 1), resolution=spec.resolution)
        return
    lo, hi = adapter.condition_images
    assert lo <= spec.condition_images and (hi is None or spec.condition_images <= hi)
    x, sigma = inputs(spec, adapter)
    with torch.no_grad():
        v = adapter.velocity(x, sigma, conditioning(spec, adapter), 1.0)
        other = adapter.velocity(x, sigma, conditioning(spec, adapter, seed=100), 1.0)
    assert (v - other).abs().max() > 1e-4, "the condition images do not change the velocity"
    with pytest.raises(ValueError, match="condition image.*Fix"):
        encode(adapter, PROMPTS[:1], [None], 1.0, images=[[]], resolution=spec.resolution)
    if hi is not None:
        with pytest.raises(ValueError, match="condition image.*Fix"):
            encode(adapter, PROMPTS[:1], [None], 1.0, images=condition_rows(1, hi + 1), resolution=spec.resolution)
    else:  # condition latents are batched: one count per batch
        with pytest.raises(ValueError, match="same number.*Fix"):
            encode(adapter, PROMPTS[:2], [None] * 2, 1.0, resolution=spec.resolution,
                   images=condition_rows(1, lo) + condition_rows(1, lo + 1))


def test_guidance(spec, adapter):
    x, sigma = inputs(spec, adapter)
    cond = conditioning(spec, adapter)
    with torch.no_grad():
        v1 = adapter.velocity(x, sigma, cond, 1.0)
        vw = adapter.velocity(x, sigma, cond, spec.guidance_scale)
    assert v1.shape == x.shape and v1.dtype == torch.float32
    assert (vw - v1).abs().max() > 1e-4, "the guidance scale has no effect"
    if spec.uses_cfg:
        assert cond.negative is not None
        same = Conditioning(cond.tensors, cond.tensors)  # negatives = positives: nothing to guide by
        with torch.no_grad():
            torch.testing.assert_close(adapter.velocity(x, sigma, same, spec.guidance_scale), v1,
                                       rtol=1e-5, atol=1e-5)
    else:  # guidance-distilled: no negative branch, one forward per step
        assert cond.negative is None
        calls = []
        handle = adapter.transformer.register_forward_hook(lambda m, a, kw: calls.append(1))
        try:
            with torch.no_grad():
                adapter.velocity(x, sigma, cond, spec.guidance_scale)
        finally:
            handle.remove()
        assert len(calls) == 1


# --------------------------------------------------------------------------- training


def train_config(spec, pipeline_dir, tmp_path, **model):
    return tiny_train_config(spec, pipeline_dir, tmp_path, model=model)


def one_step(spec, cfg, adapter, trainable) -> dict[str, bool]:
    """One step of the trainer's AdamW on a loss through the guided velocity; returns which
    trainable weights got a nonzero gradient."""
    from trainer.loop import build_optimizer

    optimizer, _ = build_optimizer(cfg, trainable)
    x, sigma = inputs(spec, adapter)
    cond = conditioning(spec, adapter)
    v = adapter.velocity(x, sigma, cond, cfg.train.guidance_scale)
    (v - x).square().mean().backward()
    grads = {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in trainable.items()}
    optimizer.step()
    optimizer.zero_grad()
    return grads


def test_lora_trains_saves_and_loads_with_the_pipelines_own_loader(spec, pipeline_dir, tmp_path):
    from accelerate import Accelerator

    from trainer.checkpoint import save_checkpoint
    from trainer.policy import Policy, attach_trainable

    cfg = train_config(spec, pipeline_dir, tmp_path)
    adapter = load_tiny(spec, pipeline_dir)
    base = {n: p.detach().clone() for n, p in adapter.transformer.named_parameters()}
    trainable = attach_trainable(adapter, cfg)
    assert trainable and all("lora_" in n for n in trainable)
    for target in adapter.default_lora_targets:
        assert any(f".{target}.lora_" in n for n in trainable), f"default target {target!r} got no LoRA"
    before = {n: p.detach().clone() for n, p in trainable.items()}
    got_grad = one_step(spec, cfg, adapter, trainable)
    changed = {n for n, p in trainable.items() if not torch.equal(p, before[n])}
    assert not [n for n in trainable if got_grad[n] and n not in changed], "LoRA weights with a gradient did not change"
    for target in adapter.default_lora_targets:  # (a last block's text-stream outputs feed nothing)
        assert any(f".{target}.lora_B" in n for n in changed), f"no LoRA weight of {target!r} changed"
    for name, p in adapter.transformer.named_parameters():
        if "lora_" not in name:
            assert not p.requires_grad, f"base weight {name} is trainable"
            key = name.replace(".base_layer", "")
            assert torch.equal(p, base[key]), f"base weight {name} changed"

    # the checkpoint a user gets loads with the diffusers pipeline's own load_lora_weights
    policy = Policy(adapter, adapter.transformer, cfg, trainable)
    assert policy.ema is not None  # so the EMA's LoRA files below are checked too
    ckpt = save_checkpoint(tmp_path / "ckpt", cfg, Accelerator(cpu=True), adapter, policy, epoch=1, step=1)
    pipe = spec.load_pipeline(pipeline_dir)
    x, sigma = inputs(spec, adapter)
    cond = conditioning(spec, adapter)
    w = spec.guidance_scale
    with torch.no_grad():
        plain = adapter.velocity(x, sigma, cond, w, transformer=pipeline_denoiser(pipe))
        pipe.load_lora_weights(str(ckpt / "lora"))
        assert pipe.transformer.peft_config, "no LoRA adapter was attached"
        if getattr(pipe, "transformer_2", None) is not None:  # Wan2.2-A14B: the low-noise expert's LoRA
            pipe.load_lora_weights(str(ckpt / "lora_2"), load_into_transformer_2=True)
            assert pipe.transformer_2.peft_config, "no LoRA adapter was attached to transformer_2"
        loaded = adapter.velocity(x, sigma, cond, w, transformer=pipeline_denoiser(pipe))
        trained = adapter.velocity(x, sigma, cond, w)
    assert (loaded - plain).abs().max() > 1e-4, "the loaded LoRA does not change the output"
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-5)
    # the EMA (what evaluation scores; here a copy of the trained weights) loads the same way
    pipe = spec.load_pipeline(pipeline_dir)
    pipe.load_lora_weights(str(ckpt / "lora_ema"))
    if getattr(pipe, "transformer_2", None) is not None:
        pipe.load_lora_weights(str(ckpt / "lora_2_ema"), load_into_transformer_2=True)
    with torch.no_grad():
        ema_loaded = adapter.velocity(x, sigma, cond, w, transformer=pipeline_denoiser(pipe))
        ema_live = adapter.velocity(x, sigma, cond, w, transformer=policy.eval_module())
    torch.testing.assert_close(ema_loaded, ema_live, rtol=1e-5, atol=1e-5)


def test_attention_backend_native(spec, adapter, pipeline_dir):
    """``model.attn_backend: native`` reaches every attention processor (through diffusers'
    dispatcher) and changes nothing on the CPU."""
    from shared.models.attention import attention_backend_of
    from shared.models.lora import prepare_transformer

    cfg = ModelConfig(model_type=spec.model_type, model_name_or_path=str(pipeline_dir), options=spec.options,
                      finetune_type="full", attn_backend="native")
    native = load_tiny(spec, pipeline_dir)
    prepare_transformer(native, cfg)
    assert attention_backend_of(native.transformer) == {"native"}
    x, sigma = inputs(spec, adapter)
    cond = conditioning(spec, adapter)
    with torch.no_grad():
        torch.testing.assert_close(native.velocity(x, sigma, cond, spec.guidance_scale),
                                   adapter.velocity(x, sigma, cond, spec.guidance_scale), rtol=0, atol=1e-6)


def test_a_masked_family_refuses_a_backend_without_masks_at_load(spec, adapter, pipeline_dir):
    """Qwen-Image (and its edit model) and Z-Image attend with a padding mask: ``_native_flash`` (the
    FLUX.1 cuDNN workaround) passed the load and failed on the first batch of prompts of different
    lengths. Now the load says so; a family without masks takes it, and ``native`` works for all."""
    from shared.models.attention import backends_without_mask
    from shared.models.lora import prepare_transformer

    assert "_native_flash" in backends_without_mask() and "native" not in backends_without_mask()
    cfg = ModelConfig(model_type=spec.model_type, model_name_or_path=str(pipeline_dir), options=spec.options,
                      finetune_type="full", attn_backend="_native_flash")
    fresh = load_tiny(spec, pipeline_dir)
    if type(adapter).attention_mask:
        with pytest.raises(ValueError, match=rf"'_native_flash' cannot take an attention mask, and {spec.model_type} "
                                             r"attends with one.*Fix: use one of native"):
            prepare_transformer(fresh, cfg)
        return
    prepare_transformer(fresh, cfg)  # (runs on the CPU: no mask, so flash-style kernels are fine)
    x, sigma = inputs(spec, adapter)
    cond = conditioning(spec, adapter)
    with torch.no_grad():
        torch.testing.assert_close(fresh.velocity(x, sigma, cond, spec.guidance_scale),
                                   adapter.velocity(x, sigma, cond, spec.guidance_scale), rtol=1e-4, atol=1e-5)


def test_lora_step_with_gradient_checkpointing(spec, pipeline_dir, tmp_path):
    """``model.gradient_checkpointing``: the blocks are recomputed in backward (the checkpoint
    function runs) and the loss and LoRA gradients equal those without it."""
    from trainer.policy import attach_trainable

    def step(checkpointing: bool):
        cfg = train_config(spec, pipeline_dir, tmp_path, gradient_checkpointing=checkpointing)
        adapter = load_tiny(spec, pipeline_dir)
        torch.manual_seed(0)  # the same LoRA initialisation
        trainable = attach_trainable(adapter, cfg)
        with torch.no_grad():  # LoRA B starts at zero: make the LoRA path matter
            for name, p in trainable.items():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        calls = []
        if checkpointing:
            for _, part in denoiser_parts(adapter.transformer):  # (both experts of Wan2.2-A14B)
                inner = part._gradient_checkpointing_func
                part._gradient_checkpointing_func = (lambda f: lambda *a, **k: calls.append(1) or f(*a, **k))(inner)
        adapter.transformer.train()
        x, sigma = inputs(spec, adapter)
        v = adapter.velocity(x, sigma, conditioning(spec, adapter), cfg.train.guidance_scale)
        loss = (v - x).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in trainable.items() if p.grad is not None}, len(calls)

    loss, grads, _ = step(False)
    loss_ckpt, grads_ckpt, calls = step(True)
    assert calls > 0, "gradient checkpointing was not used"
    assert grads and grads.keys() == grads_ckpt.keys()
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=0)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("policy", [{"every_n": 2}, {"fraction": 0.5}], ids=["every_n", "fraction"])
def test_selective_gradient_checkpointing_recomputes_only_the_chosen_blocks(spec, pipeline_dir, tmp_path,
                                                                            monkeypatch, policy):
    """A selective ``model.gradient_checkpointing``: exactly the chosen blocks that run are
    checkpointed (each expert of a two-expert model choosing among its own), the others run as
    usual, and the gradients equal those without checkpointing."""
    from shared.models.experts import denoiser_parts
    from trainer.policy import attach_trainable, checkpoint_blocks, chosen_blocks

    def step(policy):
        cfg = train_config(spec, pipeline_dir, tmp_path, gradient_checkpointing=policy)
        adapter = load_tiny(spec, pipeline_dir)
        torch.manual_seed(0)
        trainable = attach_trainable(adapter, cfg)
        with torch.no_grad():
            for name, p in trainable.items():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        ran, recomputed, chosen = set(), set(), set()
        for _, part in denoiser_parts(adapter.transformer):
            blocks = checkpoint_blocks(part)
            for block in blocks:
                block.register_forward_pre_hook(lambda m, a: ran.add(id(m)))
            if policy:
                chosen |= {id(blocks[i]) for i in chosen_blocks(len(blocks), cfg.model.gradient_checkpointing)}
        real = torch.utils.checkpoint.checkpoint

        def counting(fn, *args, **kwargs):
            recomputed.add(id(getattr(fn, "__self__", None)))
            return real(fn, *args, **kwargs)

        monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
        adapter.transformer.train()
        x, sigma = inputs(spec, adapter)
        v = adapter.velocity(x, sigma, conditioning(spec, adapter), cfg.train.guidance_scale)
        (v - x).square().mean().backward()
        monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", real)
        grads = {n: p.grad for n, p in trainable.items() if p.grad is not None}
        return grads, ran, recomputed, chosen

    grads, _, none, _ = step(False)
    grads_sel, ran, recomputed, chosen = step(policy)
    assert not none
    assert len(ran) > 1 and recomputed == ran & chosen and ran & chosen and ran - chosen, (ran, recomputed, chosen)
    assert grads.keys() == grads_sel.keys()
    for name in grads:
        torch.testing.assert_close(grads_sel[name], grads[name], rtol=1e-4, atol=1e-7)


def test_full_finetune_trains_every_transformer_weight(spec, pipeline_dir, tmp_path):
    from trainer.policy import attach_trainable

    cfg = train_config(spec, pipeline_dir, tmp_path, finetune_type="full")
    adapter = load_tiny(spec, pipeline_dir)
    trainable = attach_trainable(adapter, cfg)
    assert set(trainable) == {n for n, _ in adapter.transformer.named_parameters()}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    got_grad = one_step(spec, cfg, adapter, trainable)
    unchanged = [n for n, p in trainable.items() if torch.equal(p, before[n])]
    assert not [n for n in unchanged if got_grad[n]], "weights with a gradient did not change"
    # only weights outside the computation may stay put: in 2-block MMDiTs the last block's
    # text-stream output layers (Qwen-Image: 9 of 77 tensors), or a padding token no input needs
    assert len(unchanged) < 0.2 * len(trainable), f"unchanged weights: {unchanged}"


def test_save_pretrained_round_trip(spec, adapter, tmp_path):
    adapter.save_pretrained(str(tmp_path / "copy"))
    again = load_tiny(spec, tmp_path / "copy")
    x, sigma = inputs(spec, adapter)
    cond = conditioning(spec, adapter)
    with torch.no_grad():
        torch.testing.assert_close(again.velocity(x, sigma, cond, spec.guidance_scale),
                                   adapter.velocity(x, sigma, cond, spec.guidance_scale), rtol=0, atol=0)


def test_encode_latents_inverts_decode_normalization(spec, adapter):
    vae = adapter.pipeline.vae
    if adapter.video:
        with pytest.raises(NotImplementedError, match="ptx_coef"):
            adapter.encode_latents(torch.rand(1, 3, *spec.resolution))
        return
    seen: dict[str, torch.Tensor] = {}
    encode, decode = vae.encode, vae.decode

    def recording_encode(x, *a, **k):
        out = encode(x, *a, **k)
        seen["posterior_mean"] = out.latent_dist.mean.detach().clone()
        return out

    def recording_decode(z, *a, **k):
        seen["decoded"] = z.detach().clone()
        return decode(z, *a, **k)

    images = torch.rand(2, 3, *spec.resolution, generator=torch.Generator().manual_seed(0))
    vae.encode, vae.decode = recording_encode, recording_decode
    try:
        z = adapter.encode_latents(images)
        out = adapter.decode(z)
    finally:
        del vae.encode, vae.decode  # back to the class's methods
    assert z.shape == (2, *adapter.latent_shape(spec.resolution)) and z.dtype == torch.float32
    assert out.shape == images.shape
    torch.testing.assert_close(seen["decoded"].float(), seen["posterior_mean"].float(), rtol=1e-5, atol=1e-5)
