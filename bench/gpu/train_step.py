"""(b) One optimization step over a group, flowrl's trainer code path against the raw LoRA
forward + backward of the same batch, measured in the same run.

    python bench/gpu/train_step.py --model sd3-5 --algorithm grpo                    # eager
    python bench/gpu/train_step.py --model sd3-5 --algorithm grpo --gradient-checkpointing
    python bench/gpu/train_step.py --model sd3-5 --algorithm grpo --compile default  # model.compile

The group: ``--batch`` samples of one prompt group rolled out by flowrl (Flow-SDE, the recipe's
trained SDE steps recorded, CFG), random advantages. flowrl's step = ``trainer.loop.optimize``
(the algorithm's prepare, one loss + backward per trained unit, clipping, AdamW, EMA) on that
epoch data, LoRA r=32 / alpha 64 on the attention projections of both streams (the peer
recipe's targets), bf16 autocast. Raw = per unit one bare transformer forward on the same
(CFG-batched) inputs + backward of a mean square, then AdamW: ``train_step_vs_raw`` = flowrl's
seconds / raw seconds (issue 8's key). Peak memory of each.
"""

from __future__ import annotations

import torch

from common import (base_parser, build_adapter, captured_call, conditioning, environment, peak_memory,  # noqa: I001
                    timed, write_result)

from shared.config import parse_config  # noqa: E402
from shared.sampling import rollout  # noqa: E402

SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
FLUX_TARGETS = SD3_TARGETS


def main(argv=None) -> dict:
    from accelerate import Accelerator

    from trainer.algorithms import ALGORITHMS
    from trainer.collect import EpochData
    from trainer.loop import build_optimizer, optimize
    from trainer.policy import Policy, attach_trainable

    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--algorithm", default="grpo", choices=["grpo", "nft", "awm"])
    p.add_argument("--batch", type=int, default=8, help="samples per micro-batch (one group)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--train-steps", type=int, default=2, help="trained SDE steps / timesteps per sample")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--lora-rank", type=int, default=32)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.smoke:
        args.resolution, args.steps, args.iters, args.warmup = 64, 3, 1, 1
    cuda = device.type == "cuda"
    adapter = build_adapter(args.model, smoke=args.smoke, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    cfg_guidance = args.model == "sd3-5"
    guidance = 4.5 if cfg_guidance else 3.5
    b, res = args.batch, (args.resolution, args.resolution)
    train = {"trainer_type": args.algorithm, "resolution": args.resolution, "num_inference_steps": args.steps,
             "guidance_scale": guidance, "group_size": b, "unique_sample_num_per_epoch": 1,
             "per_device_batch_size": b, "gradient_step_per_epoch": 1, "learning_rate": 1e-4,
             "mixed_precision": "bf16" if cuda else "no", "max_epochs": 1}
    if args.algorithm == "grpo":
        train.update(dynamics_type="Flow-SDE", noise_level=0.7, num_train_steps=args.train_steps,
                     train_steps=list(range(args.train_steps)))
    else:
        train.update(num_train_timesteps=args.train_steps)
    cfg = parse_config({"model": {"model_type": args.model, "model_name_or_path": "random-weights", "lora_rank": args.lora_rank,
                                  "lora_alpha": 2 * args.lora_rank, "target_modules": SD3_TARGETS,
                                  "gradient_checkpointing": args.gradient_checkpointing,
                                  "compile": args.compile or False,  # in place: raw uses it too
                                  "attn_backend": args.attn_backend},
                        "train": train, "logging_backend": "none", "rewards": [{"reward_model": "brightness"}]})
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not cuda)
    trainable = attach_trainable(adapter, cfg)
    optimizer, schedule = build_optimizer(cfg, trainable)
    model, optimizer = accelerator.prepare(adapter.transformer, optimizer)
    policy = Policy(adapter, model, cfg, trainable)
    algorithm = ALGORITHMS.get(args.algorithm)(cfg)

    cond = conditioning(args.model, b, cfg=cfg_guidance, smoke=args.smoke, device=device,
                        dtype=adapter.transformer.dtype)
    sigmas = adapter.sigmas(args.steps, res)
    sde = list(range(args.train_steps)) if algorithm.needs_log_probs else []
    roll = rollout(adapter, cond, list(range(b)), resolution=res, sigmas=sigmas, guidance_scale=guidance,
                   dynamics="Flow-SDE" if sde else "ODE", noise_level=0.7, sde_steps=sde,
                   keep_means=algorithm.keep_means, decode=False)
    advantages = torch.randn(b, generator=torch.Generator().manual_seed(1)).to(device)
    data = EpochData(prompts=["p"] * b, group_ids=torch.zeros(b, dtype=torch.long), cond=cond, rollout=roll,
                     rewards={}, advantages=advantages, metrics={})
    state = {"step": 0}

    def ours():
        state["step"], _ = optimize(cfg, accelerator, policy, algorithm, optimizer, schedule, data, 0, state["step"])

    with peak_memory(device) as ours_mem:
        ours_s = timed(ours, device, iters=args.iters, warmup=args.warmup)

    x = torch.randn(b, *adapter.latent_shape(res), device=device)
    sigma = sigmas[1].expand(b).to(device)
    call_args, call_kwargs = captured_call(adapter.transformer, lambda: adapter.velocity(
        x, sigma, cond, guidance, transformer=model))
    units = algorithm.num_units(len(sde))

    def raw():
        model.train()
        for _ in range(units):
            with accelerator.autocast():
                out = model(*call_args, **call_kwargs)[0]
                loss = out.float().square().mean()
            accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()

    with peak_memory(device) as raw_mem:
        raw_s = timed(raw, device, iters=args.iters, warmup=args.warmup)
    row = {"algorithm": args.algorithm, "batch": b, "forward_rows": 2 * b if cfg_guidance else b, "units": units,
           "compile": args.compile,
           "gradient_checkpointing": args.gradient_checkpointing, "ours_s": ours_s, "raw_s": raw_s,
           "train_step_vs_raw": ours_s / raw_s, "ours_peak_gib": ours_mem["peak_gib"],
           "raw_peak_gib": raw_mem["peak_gib"], "trainable_params_M": sum(t.numel() for t in trainable.values()) / 1e6}
    print(f"{args.algorithm} B={b} units={units}: ours {ours_s:.3f} s vs raw {raw_s:.3f} s "
          f"({ours_s / raw_s:.2f}x), peak {ours_mem['peak_gib']:.1f} / {raw_mem['peak_gib']:.1f} GiB", flush=True)
    payload = {"bench": "gpu_train_step", "model": args.model, "smoke": args.smoke, "resolution": args.resolution,
               "steps": args.steps, "guidance": guidance, "lora_rank": args.lora_rank, "targets": SD3_TARGETS,
               "mixed_precision": cfg.train.mixed_precision, "rows": [row], **environment(device)}
    suffix = f"{args.algorithm}{'_ckpt' if args.gradient_checkpointing else ''}{'_compiled' if args.compile else ''}"
    write_result(f"train_step_{suffix}", args, payload)
    return payload


if __name__ == "__main__":
    main()
