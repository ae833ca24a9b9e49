"""(a) Sampler throughput: images/s of flowrl's rollout (``shared.sampling.rollout``: the adapter's
velocity with CFG as one batched forward, Flow-SDE steps with log-probs, VAE decode) for the
SD3.5-Medium / FLUX.1-dev architectures, against the transformer-only limit measured in the same
run on the same forward batch.

    python bench/gpu/sampler.py --model sd3-5 --batch 8 16 32                  # eager
    python bench/gpu/sampler.py --model sd3-5 --batch 16 --compile default     # both compiled

Per batch size ``B`` (``2B`` rows per forward with CFG): ``limit_s`` = one bare transformer call
with the arguments the adapter passes (captured), ``limit_img_s = B / (steps x limit_s)``;
``rollout_s`` = one whole rollout of ``B`` images including decode, ``img_s = B / rollout_s``;
``sampler_vs_limit = img_s / limit_img_s`` (issue 8's key). ``decode_s`` is the VAE alone.
With ``--compile`` the eager rows are measured first, then the same for the compiled transformer
(``mode`` per row); ``compile_s`` is the first compiled call's time, reported separately.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from common import (base_parser, build_adapter, captured_call, conditioning, environment, peak_memory,  # noqa: I001
                    synchronize, timed, write_result)

from shared.models.attention import apply_attention_backend  # noqa: E402
from shared.sampling import rollout  # noqa: E402


def measure(adapter, module, b: int, args, *, device, dtype, cfg: bool, guidance: float, res, sigmas, sde,
            noise_device: str = "cpu", profile_to: str | None = None):
    """One row: the bare ``module`` call with the adapter's arguments (the limit) and whole rollouts of
    ``b`` images through ``module``; also the first velocity call's seconds (compile time when
    ``module`` is a fresh ``torch.compile``). ``profile_to``: also write a profile of one rollout there."""
    cond = conditioning(args.model, b, cfg=cfg, smoke=args.smoke, device=device, dtype=dtype)
    x = torch.randn(b, *adapter.latent_shape(res), device=device)
    sigma = sigmas[1].expand(b).to(device)

    def velocity():
        with torch.no_grad():
            return adapter.velocity(x, sigma, cond, guidance, transformer=module)

    synchronize(device)
    t0 = time.perf_counter()
    velocity()
    synchronize(device)
    first_s = time.perf_counter() - t0
    call_args, call_kwargs = captured_call(adapter.transformer, velocity)

    def bare():
        with torch.no_grad():
            return module(*call_args, **call_kwargs)

    limit_s = timed(bare, device, iters=args.iters, warmup=args.warmup)

    def sample():
        return rollout(adapter, cond, list(range(b)), resolution=res, sigmas=sigmas, guidance_scale=guidance,
                       dynamics="Flow-SDE", noise_level=0.7, sde_steps=sde, transformer=module,
                       noise_device=noise_device)

    if profile_to:
        profile(sample, device, profile_to)

    with peak_memory(device) as mem:
        rollout_s = timed(sample, device, iters=args.iters, warmup=args.warmup)
    final = torch.randn(b, *adapter.latent_shape(res), device=device)
    decode_s = timed(lambda: adapter.decode(final), device, iters=args.iters, warmup=1)
    limit_img_s = b / (args.steps * limit_s)
    img_s = b / rollout_s
    return {"batch": b, "forward_rows": 2 * b if cfg else b, "limit_s": limit_s, "limit_img_s": limit_img_s,
            "rollout_s": rollout_s, "img_s": img_s, "decode_s": decode_s, "sampler_vs_limit": img_s / limit_img_s,
            "peak_gib": mem["peak_gib"]}, first_s


#: the sampler options measured one after the other, each on top of the ones before it (``--variants``)
VARIANTS = {
    "noise_on_device": "train.rollout_noise_device: model (per-sample generators on the GPU)",
    "cudnn_benchmark": "torch.backends.cudnn.benchmark = True (cuDNN picks the VAE's conv algorithms by timing)",
    "channels_last_vae": "the VAE in channels-last memory format (NHWC convolutions)",
    "compiled_vae": "torch.compile of the VAE decoder (in place)",
}


def apply_variant(name: str, adapter) -> str | None:
    """Turn option ``name`` on; returns the rollout's ``noise_device`` when the option is that."""
    if name == "noise_on_device":
        return "model"
    if name == "cudnn_benchmark":
        torch.backends.cudnn.benchmark = True
    elif name == "channels_last_vae":
        adapter.pipeline.vae.to(memory_format=torch.channels_last)
    elif name == "compiled_vae":
        adapter.pipeline.vae.decoder.compile()
    else:
        raise SystemExit(f"--variants: unknown {name!r}; known: {', '.join(VARIANTS)}")
    return None


def profile(sample, device, path: str) -> None:
    """One rollout under ``torch.profiler``: the ops that took the most device and host time, as a
    text table at ``path`` (what the rest of the rollout besides the transformer is made of)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    sample()  # warm
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        sample()
        synchronize(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=60)
    by_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
    Path(path).write_text(f"sorted by {sort}\n{table}\n\nsorted by self_cpu_time_total\n{by_cpu}\n")
    print(f"profile: {path}", flush=True)


def main(argv=None) -> dict:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--eager-batch", type=int, nargs="*", default=None,
                   help="with --compile: the eager rows' batch sizes (default: --batch; none given: no eager rows)")
    p.add_argument("--variants", nargs="*", default=[], choices=list(VARIANTS),
                   help="after the rows above, the last mode's last batch size again with each of these options "
                        "added on top of the ones before it (before/after of each, same run)")
    p.add_argument("--profile", default=None, help="write a torch.profiler table of one rollout (the last "
                                                   "mode's last batch size, all variants on) to this file")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--sde-steps", default="all", help="'all' (every step stochastic, log-probs on) or a count "
                                                      "of leading steps")
    p.add_argument("--guidance", type=float, default=None, help="default: 4.5 (sd3-5, CFG) / 3.5 (flux1, embedded)")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), torch.bfloat16
    if args.smoke:
        args.resolution, args.steps, args.iters, args.warmup = 64, 3, 1, 1
    adapter = build_adapter(args.model, smoke=args.smoke, device=device, dtype=dtype)
    apply_attention_backend(adapter.transformer, args.attn_backend,  # flowrl's default when None
                            masked=adapter.model_type if adapter.attention_mask else None)
    cfg = args.model == "sd3-5"
    guidance = args.guidance if args.guidance is not None else (4.5 if cfg else 3.5)
    res = (args.resolution, args.resolution)
    sigmas = adapter.sigmas(args.steps, res)
    sde = list(range(args.steps - 1)) if args.sde_steps == "all" else list(range(int(args.sde_steps)))
    eager = args.batch if args.eager_batch is None or not args.compile else args.eager_batch
    modes = [("eager", adapter.transformer)] if eager else []
    if args.compile:  # eager rows first, then the compiled module: both ratios from the same run
        modes.append(("compiled", torch.compile(adapter.transformer,
                                                mode=None if args.compile == "default" else args.compile)))
    rows, compile_s, applied = [], None, []

    def payload() -> dict:
        return {"bench": "gpu_sampler", "model": args.model, "smoke": args.smoke, "resolution": args.resolution,
                "steps": args.steps, "sde_steps": sde, "guidance": guidance, "cfg_batched": cfg,
                "compile": args.compile, "compile_s": compile_s, "dtype": "bfloat16", "rows": rows,
                "variants": {k: VARIANTS[k] for k in applied}, **environment(device)}

    def save_partial() -> None:  # after every row: a run cut by a time limit keeps what it measured
        write_result("sampler", args, payload(), quiet=True)

    for mode, module in modes:
        for b in eager if mode == "eager" else args.batch:
            row, first_s = measure(adapter, module, b, args, device=device, dtype=dtype, cfg=cfg,
                                   guidance=guidance, res=res, sigmas=sigmas, sde=sde)
            if mode == "compiled" and compile_s is None:
                compile_s = first_s
            rows.append({"mode": mode, **row})
            save_partial()
            print(f"{mode} B={b}: {row['img_s']:.2f} img/s vs limit {row['limit_img_s']:.2f} "
                  f"({row['sampler_vs_limit']:.1%}), decode {row['decode_s']:.3f} s, peak {row['peak_gib']:.1f} GiB",
                  flush=True)
    mode, module = modes[-1]
    b = eager[-1] if mode == "eager" else args.batch[-1]
    noise_device = "cpu"
    for name in args.variants:
        noise_device = apply_variant(name, adapter) or noise_device
        t0 = time.perf_counter()
        row, _ = measure(adapter, module, b, args, device=device, dtype=dtype, cfg=cfg, guidance=guidance, res=res,
                         sigmas=sigmas, sde=sde, noise_device=noise_device)
        rows.append({"mode": mode, "variant": name, "variant_s": time.perf_counter() - t0, **row})
        applied.append(name)
        save_partial()
        print(f"{mode} B={b} +{name}: {row['img_s']:.2f} img/s vs limit {row['limit_img_s']:.2f} "
              f"({row['sampler_vs_limit']:.1%}), decode {row['decode_s']:.3f} s", flush=True)
    if args.profile:
        measure(adapter, module, b, args, device=device, dtype=dtype, cfg=cfg, guidance=guidance, res=res,
                sigmas=sigmas, sde=sde, noise_device=noise_device, profile_to=args.profile)
    result = payload()
    write_result("sampler", args, result)
    return result


if __name__ == "__main__":
    main()
