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

import torch

from common import (base_parser, build_adapter, captured_call, conditioning, environment, peak_memory,  # noqa: I001
                    synchronize, timed, write_result)

from shared.sampling import rollout  # noqa: E402


def measure(adapter, module, b: int, args, *, device, dtype, cfg: bool, guidance: float, res, sigmas, sde):
    """One row: the bare ``module`` call with the adapter's arguments (the limit) and whole rollouts of
    ``b`` images through ``module``; also the first velocity call's seconds (compile time when
    ``module`` is a fresh ``torch.compile``)."""
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
                       dynamics="Flow-SDE", noise_level=0.7, sde_steps=sde, transformer=module)

    with peak_memory(device) as mem:
        rollout_s = timed(sample, device, iters=args.iters, warmup=args.warmup)
    final = torch.randn(b, *adapter.latent_shape(res), device=device)
    decode_s = timed(lambda: adapter.decode(final), device, iters=args.iters, warmup=1)
    limit_img_s = b / (args.steps * limit_s)
    img_s = b / rollout_s
    return {"batch": b, "forward_rows": 2 * b if cfg else b, "limit_s": limit_s, "limit_img_s": limit_img_s,
            "rollout_s": rollout_s, "img_s": img_s, "decode_s": decode_s, "sampler_vs_limit": img_s / limit_img_s,
            "peak_gib": mem["peak_gib"]}, first_s


def main(argv=None) -> dict:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--eager-batch", type=int, nargs="+", default=None,
                   help="with --compile: the eager rows' batch sizes (default: --batch)")
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
    cfg = args.model == "sd3-5"
    guidance = args.guidance if args.guidance is not None else (4.5 if cfg else 3.5)
    res = (args.resolution, args.resolution)
    sigmas = adapter.sigmas(args.steps, res)
    sde = list(range(args.steps - 1)) if args.sde_steps == "all" else list(range(int(args.sde_steps)))
    modes = [("eager", adapter.transformer)]
    if args.compile:  # eager rows first, then the compiled module: both ratios from the same run
        modes.append(("compiled", torch.compile(adapter.transformer,
                                                mode=None if args.compile == "default" else args.compile)))
    rows, compile_s = [], None
    for mode, module in modes:
        for b in (args.eager_batch or args.batch) if mode == "eager" else args.batch:
            row, first_s = measure(adapter, module, b, args, device=device, dtype=dtype, cfg=cfg,
                                   guidance=guidance, res=res, sigmas=sigmas, sde=sde)
            if mode == "compiled" and compile_s is None:
                compile_s = first_s
            rows.append({"mode": mode, **row})
            print(f"{mode} B={b}: {row['img_s']:.2f} img/s vs limit {row['limit_img_s']:.2f} "
                  f"({row['sampler_vs_limit']:.1%}), decode {row['decode_s']:.3f} s, peak {row['peak_gib']:.1f} GiB",
                  flush=True)
    payload = {"bench": "gpu_sampler", "model": args.model, "smoke": args.smoke, "resolution": args.resolution,
               "steps": args.steps, "sde_steps": sde, "guidance": guidance, "cfg_batched": cfg,
               "compile": args.compile, "compile_s": compile_s, "dtype": "bfloat16", "rows": rows,
               **environment(device)}
    write_result("sampler", args, payload)
    return payload


if __name__ == "__main__":
    main()
