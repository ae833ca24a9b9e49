"""The training loop, for both transports.

``transport: local`` (embedded): one process, or several under ``accelerate launch``;
``transport: celery`` (``flowrl trainer``): one controller process, samplers and reward
workers behind the queues (:mod:`trainer.transport`).

Per epoch: get the planned prompt groups sampled and scored -> advantages (global) ->
optimize (``num_inner_epochs`` passes of micro-batches x algorithm units, gradient
accumulation, AdamW, LR schedule) -> EMA -> publish the new policy version -> periodic ODE
eval -> checkpoint. With ``train.max_staleness: 1`` epoch k+1 is dispatched before epoch k
is trained, so sampling overlaps training and every sample lags the trained policy by one
version at most.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm

from shared.config import Config, ConfigError
from shared.models import load_adapter
from shared.models.experts import TwoExperts
from shared.models.warm_start import warm_start
from shared.rewards.multi import build_rewards
from shared.seeds import seeded
from trainer.algorithms import ALGORITHMS, Algorithm, TrainBatch
from trainer.checkpoint import load_checkpoint_ema, load_checkpoint_weights, save_checkpoint
from trainer.collect import SEED_STRIDE, EpochData, finish_epoch, plan_epoch
from trainer.data import check_condition_images, check_reward_rows, eval_subset, load_dataset
from trainer.embeddings import offload_mode, warm_embeddings
from trainer.evaluate import eval_settings, evaluate
from trainer.policy import DTYPES, Policy, attach_trainable, trainable_params
from trainer import context_parallel, cp_queue, optim
from trainer.offload import OffloadActivations
from trainer.ptx import PretrainMix
from trainer.kl_gate import KL_REFERENCE, KLGateState
from trainer.reporting import MetricLogger, detail_keys, progress_postfix, save_group_grid, write_report
from trainer.metrics import TrainerMetrics
from trainer.schedule import follow_budget, set_budget_fraction
from trainer.preempt import Stopped, StopRequest
from trainer.resume import (RESUME_DIR, Progress, ResumeError, check_same_experiment, find_checkpoint,
                            finished_summary, load_rank_state, load_resume, newest_checkpoint, supersede_later,
                            optimizer_tensors, run_dir_of, save_rank_state, save_resume, set_aside,
                            stale_checkpoints, truncate_jsonl)
from trainer.sharding import (agree_on_experts, check_fsdp, device_mesh, gather, local, param_bytes,
                              shard_transformer)
from trainer.transport import CeleryTransport, LocalTransport, fewest_over, patient_group


def run_name(cfg: Config, accelerator: Accelerator | None = None) -> str:
    """``run_name``, else ``<model_type>_<trainer_type>_<time>``: the main process's time, so that
    every process (on every machine) writes into the same folder and queue keys."""
    if cfg.run_name:
        return cfg.run_name
    stamp = torch.tensor([int(datetime.now().strftime("%Y%m%d%H%M%S"))], dtype=torch.long)  # as the main one writes it
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        stamp = broadcast(stamp.to(accelerator.device), from_process=0).cpu()
    digits = str(int(stamp))
    return f"{cfg.model.model_type}_{cfg.train.trainer_type}_{digits[:8]}_{digits[8:]}"


def _locate_run(cfg: Config, accelerator: Accelerator | None = None) -> tuple[str, Path, Path | None]:
    """(run name, run folder, checkpoint to resume from or None)."""
    spec = cfg.train.resume_from
    if spec is None:
        name = run_name(cfg, accelerator)
        return name, Path(cfg.output_dir) / name, None
    if spec in ("latest", "auto"):
        if not cfg.run_name:
            raise ResumeError(f"train.resume_from={spec} needs run_name (the run to continue). "
                              "Fix: --set run_name=<the run's folder name under output_dir>.")
        run_dir = Path(cfg.output_dir) / cfg.run_name
        if spec == "auto":  # a restarted process: continue if there is a checkpoint, else start
            return cfg.run_name, run_dir, newest_checkpoint(run_dir)
        return cfg.run_name, run_dir, find_checkpoint(spec, run_dir)
    ckpt = find_checkpoint(spec, Path(cfg.output_dir))
    run_dir = run_dir_of(ckpt)
    return run_dir.name, run_dir, ckpt


def fresh_folder(cfg: Config, accelerator: Accelerator, run_dir: Path, quiet: bool) -> None:
    """Before a fresh run writes into ``run_dir``: the main process moves an earlier run there aside
    (:func:`trainer.resume.set_aside`), and every process returns only once it has (or raises, on
    every process, when it could not). A ``model.init_from`` inside that folder is an error: the run
    would start from weights that are about to move (and a resume or a sampler would read the new
    run's files under that name)."""
    init = cfg.model.init_from
    if init is not None and Path(init).expanduser().resolve().is_relative_to(run_dir.resolve()):
        raise ConfigError(f"model.init_from: {init} lies in {run_dir}, an earlier run of run_name "
                          f"{run_dir.name!r}, which this fresh run would move aside before writing there. Fix: "
                          f"give this run its own name (--set run_name=...), or continue that run instead "
                          f"(--resume latest).")
    failed = ""
    if accelerator.is_main_process:
        try:
            aside = set_aside(run_dir)
        except OSError as e:  # e.g. the run folder is itself a mount point
            failed = (f"{run_dir} holds an earlier run, which could not be moved aside ({e}). Fix: give this run "
                      f"another run_name, or move the folder's contents away yourself.")
        else:
            if aside is not None and not quiet:
                print(f"flowrl: {run_dir} held an earlier run; it is now {aside} (to continue it instead: "
                      f"--set run_name={aside.name} --resume latest)")
    if accelerator.num_processes > 1:  # the others wait here until the folder is free
        from accelerate.utils import broadcast

        flag = broadcast(torch.tensor([1 if failed else 0], device=accelerator.device), from_process=0)
        failed = failed or ("the main process could not move an earlier run aside" if int(flag) else "")
    if failed:
        raise ConfigError(failed)


def check_media_geometry(cfg: Config, adapter) -> None:
    """Fail before any rollout when ``train`` / ``eval`` resolution or ``num_frames`` does not fit
    the model (the adapter's error names the key and the fix)."""
    from shared.sampling import as_hw

    adapter.sample_shape(as_hw(cfg.train.resolution), cfg.train.num_frames)
    adapter.sample_shape(as_hw(cfg.eval.resolution), cfg.eval.num_frames)
    for src in cfg.data.datasets or []:  # a source may be evaluated at its own resolution
        adapter.sample_shape(eval_settings(cfg, src.name).resolution, cfg.eval.num_frames)


def check_rows(adapter, *row_lists) -> None:
    """Fail before any rollout when dataset rows do not have the number of condition images the
    model takes (none for text-only models; the error names the row's file:line and the fix)."""
    for rows in row_lists:
        if rows:
            check_condition_images(rows, adapter.model_type, adapter.condition_images)


def make_accelerator(cfg: Config) -> Accelerator:
    """The run's Accelerator: ``train.mixed_precision``, the CPU where there is no GPU, and process
    groups that wait ``train.dist_timeout_s`` in a collective (several processes)."""
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    wait = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.dist_timeout_s))
    return Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available(),
                       kwargs_handlers=[wait])


def build_optimizer(cfg: Config, trainable: dict):
    from diffusers.optimization import get_scheduler

    t = cfg.train
    optimizer = optim.build(cfg, list(trainable.items()))
    total = schedule_steps(cfg)
    schedule = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps,
                             num_training_steps=total)
    if t.lr_schedule_clock == "budget":
        follow_budget(schedule, total, t.lr_warmup_steps)
    return optimizer, schedule


def schedule_steps(cfg: Config) -> int:
    """Optimizer steps the LR schedule spans: every epoch's inner epochs' gradient steps (the same for any
    number of processes; no geometry is derived here, since dpo's and dgpo's depend on it)."""
    t = cfg.train
    return t.max_epochs * t.num_inner_epochs * t.gradient_step_per_epoch


def train_order(data: EpochData, seed: int,
                order: Callable[[EpochData, torch.Generator], torch.Tensor | None] | None = None) -> torch.Tensor:
    """The rows of this rank's epoch in training order: a seeded shuffle, or ``order``'s choice."""
    g = seeded(seed)
    perm = order(data, g) if order is not None else None
    return torch.randperm(data.advantages.shape[0], generator=g) if perm is None else perm


def informative_rows(perm: torch.Tensor, advantages: torch.Tensor, minimum: int) -> torch.Tensor:
    """``perm`` (row indices, training order) without the rows whose advantage is zero (``|A| <= 1e-6``:
    a group whose samples all scored the same; its policy-gradient term is 0), in the same order. When
    fewer than ``minimum`` remain, the first zero-advantage rows of ``perm`` stay too, up to ``minimum``
    rows (or all of them): each micro-batch keeps at least one row (``train.skip_zero_advantage``)."""
    keep = advantages[perm].abs() > 1e-6
    short = minimum - int(keep.sum())
    if short > 0:
        keep[(~keep).nonzero().flatten()[:short]] = True
    return perm[keep]


def micro_batches(data: EpochData, batch_size: int, seed: int,
                  device: torch.device | str | None = None,
                  order: Callable[[EpochData, torch.Generator], torch.Tensor | None] | None = None,
                  rank: int = 0, world: int = 1, perm: torch.Tensor | None = None,
                  splits: int | None = None) -> Iterator[TrainBatch]:
    """Shuffle this rank's samples (seeded) and cut them into training micro-batches on ``device``
    (None: where the rollout is; ``train.offload_samples_to_cpu`` keeps it in host memory). Each
    micro-batch is made (indexed out, copied over) only when the caller asks for it, so no more
    than the one in training is held beside the epoch. ``order`` (an algorithm's
    :meth:`~trainer.algorithms.base.Algorithm.train_order`) may choose the rows and their order
    instead of the shuffle (DPO: each group's best and worst sample, side by side). Each
    micro-batch's ``seed`` (its re-noising draws in the decoupled trainers) is distinct per
    ``rank`` of ``world`` processes, and the same as before for one process. ``perm``: the
    order already drawn (:func:`train_order` of the same ``seed`` and ``order``). ``splits``: cut the
    rows into that many micro-batches of near-equal sizes instead (``train.skip_zero_advantage``: the
    planned number, fewer rows)."""
    perm = train_order(data, seed, order) if perm is None else perm
    n = perm.shape[0]
    bounds = ([*range(0, n, batch_size), n] if n else [0]) if splits is None else [n * b // splits for b in range(splits + 1)]
    r = data.rollout
    src = r.final_latents.device
    dev = src if device is None else torch.device(device)
    grid = r.sigmas.to(dev)  # one copy for all micro-batches (the algorithms check it once)
    move = lambda x: None if x is None else x.to(dev, non_blocking=True)  # noqa: E731  (no-op where it is)
    for b, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        i = perm[s:e]
        j = i.to(src)
        yield TrainBatch(
            cond=data.cond.select(j).to(dev), advantages=data.advantages[i].to(dev),
            final_latents=move(r.final_latents[j]), sigmas=grid, sde_steps=r.sde_steps,
            latents=move(r.latents[j]), next_latents=move(r.next_latents[j]), log_probs=move(r.log_probs[j]),
            stds=move(r.stds[j]), means=None if r.means is None else move(r.means[j]),
            seed=(seed * SEED_STRIDE + b) * world + rank, group_ids=data.group_ids[i],
            epoch_seed=seed, kl_gate=None if data.kl_gate is None else data.kl_gate[i].to(dev))


def optimize(cfg: Config, accelerator: Accelerator, policy: Policy, algorithm: Algorithm,
             optimizer, lr_schedule, data: EpochData, epoch: int, step: int,
             ptx: PretrainMix | None = None) -> tuple[int, dict]:
    """All inner epochs of one epoch. Returns (optimizer steps so far, mean metrics). With
    ``ptx`` (``train.ptx_coef``) each micro-batch's first unit also carries its pretraining loss."""
    t = cfg.train
    geo = cfg.geometry(accelerator.num_processes)
    units = algorithm.num_units(len(data.rollout.sde_steps))
    per_step = geo.batches_per_grad_step * units  # backward passes per optimizer step
    sums: dict[str, torch.Tensor | float] = {}  # metric sums, kept on the device: no host sync per unit
    losses: list[tuple[int, torch.Tensor]] = []  # (unit, loss) since the last optimizer step
    step_kls: list[torch.Tensor] = []  # each optimizer step's mean KL over its units (train.kl_gate's reset rule)
    kl_sum, kl_units = 0.0, 0
    count = 0
    seeds = [(t.seed * SEED_STRIDE + epoch) * 131 + inner for inner in range(t.num_inner_epochs)]
    orders = [train_order(data, seed, algorithm.train_order) for seed in seeds]  # each inner epoch's rows
    planned = [-(-perm.shape[0] // geo.train_micro_batch) for perm in orders]  # micro-batches per inner epoch
    rows = sum(perm.shape[0] for perm in orders)
    if t.skip_zero_advantage:  # the same number of (smaller) micro-batches: the processes stay in step
        orders = [informative_rows(perm, data.advantages, k) for perm, k in zip(orders, planned)]
    kept = sum(perm.shape[0] for perm in orders) / max(rows, 1)
    # backward passes this epoch: fewer than planned when groups were dropped; the last one always
    # synchronizes gradients, or each process would apply only its own to the final step
    total = units * sum(planned)
    # the EMA drew this epoch's samples (off_policy, sample_from_ema_after): it is their "old" policy
    # (nft's v_old, awm's and dgpo's old terms) for the whole epoch and moves once, at its end; moved
    # after every step, a second optimizer step's v_old was already about the current weights
    hold_ema, first_step = policy.ema_is_sampling(), step
    policy.model.train()
    for seed, perm, splits in zip(seeds, orders, planned):
        for batch in micro_batches(data, geo.train_micro_batch, seed, device=accelerator.device,
                                   rank=context_parallel.data_rank(cfg, accelerator.process_index),
                                   world=geo.world_size, perm=perm, splits=splits if t.skip_zero_advantage else None):
            with torch.no_grad(), accelerator.autocast():
                state = algorithm.prepare(batch, policy)
            for unit in range(units):
                count += 1
                sync = count % per_step == 0 or count == total
                ctx = contextlib.nullcontext() if sync else accelerator.no_sync(policy.model)
                offload = OffloadActivations() if cfg.model.activation_offload else contextlib.nullcontext()
                with ctx, accelerator.autocast():
                    with offload:  # (model.activation_offload) what the forward saves waits in host memory
                        loss, metrics = algorithm.loss(batch, unit, state, policy)
                        if ptx is not None and unit == 0:
                            ptx_loss = ptx.loss(policy, batch.seed)  # each rank draws its own pairs
                            loss = loss + ptx.coef * ptx_loss
                            # the epoch mean divides by every unit
                            metrics = {**metrics, "ptx_loss": ptx_loss.detach() * units}
                    if cfg.model.activation_offload:
                        metrics = {**metrics, "offloaded_mib": offload.counts["bytes"] / 2**20}
                    accelerator.backward(loss * context_parallel.loss_scale(cfg) / per_step)
                losses.append((unit, loss.detach()))
                for k, v in {"loss": loss.detach(), **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + (v.detach() if isinstance(v, torch.Tensor) else v)
                if "kl" in metrics:
                    kl_sum, kl_units = kl_sum + metrics["kl"], kl_units + 1
                if sync:
                    if kl_units:
                        step_kls.append(torch.as_tensor(kl_sum / kl_units, dtype=torch.float64, device=accelerator.device))
                        kl_sum, kl_units = 0.0, 0
                    _check_finite(t, epoch, losses, accelerator)
                    step = _optimizer_step(t, accelerator, policy, optimizer, lr_schedule, step,
                                           sums, per_step, ema=not hold_ema)
    if hold_ema:
        policy.update_ema(step, since=first_step)
    policy.model.eval()  # (fewer micro-batches than planned: the last, synchronized one applied what was there)
    means = epoch_means(accelerator, sums, count)
    if step_kls:  # the largest of the steps' KL, each averaged over the processes (as flow_grpo's GARDO logs it)
        kls = torch.stack(step_kls)
        if accelerator.num_processes > 1:
            kls = accelerator.reduce(kls, reduction="mean")
        means["train/kl_step_max"] = float(kls.max())
    means["train/lr"] = lr_schedule.get_last_lr()[0]
    if t.skip_zero_advantage:  # the fraction of the epoch's samples trained, over every process
        share = torch.tensor([kept], dtype=torch.float64, device=accelerator.device)
        means["train/kept_fraction"] = float(accelerator.reduce(share, reduction="mean")
                                             if accelerator.num_processes > 1 else share)
    return step, means


def epoch_means(accelerator: Accelerator, sums: dict, count: int) -> dict[str, float]:
    """``train/{key}``: each metric's mean over the epoch's ``count`` backward passes on every
    process (a metric a process did not report counts nothing there); the epoch's one read-back."""
    keys = sorted(sums)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        keys = sorted({k for part in gather_object([keys]) for k in part})
    if not keys:
        return {}
    totals = torch.stack([torch.as_tensor(sums.get(k, 0.0), dtype=torch.float64, device=accelerator.device)
                          .reshape(()) for k in keys]
                         + [torch.tensor(float(count if k in sums else 0), dtype=torch.float64,
                                         device=accelerator.device) for k in keys])
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    totals = totals.cpu()
    n = len(keys)
    return {f"train/{k}": float(totals[i] / totals[n + i]) for i, k in enumerate(keys) if totals[n + i] > 0}


def _check_finite(t, epoch: int, losses: list[tuple[int, torch.Tensor]], accelerator=None) -> None:
    """Before an optimizer step: every loss accumulated into it, on every process, is finite (one
    host sync for all), else a FloatingPointError naming the first bad unit; the weights are not
    touched. The processes agree first: gradients are averaged over them, so one process's NaN
    is everyone's, and a process that stepped on while another stopped would wait for it forever."""
    finite = torch.isfinite(torch.stack([loss.float() for _, loss in losses]))
    mine = bool(finite.all())
    everyone = mine
    if accelerator is not None and accelerator.num_processes > 1:
        flags = accelerator.reduce(torch.tensor([0.0 if mine else 1.0], device=accelerator.device), reduction="sum")
        everyone = float(flags.item()) == 0.0
    if not mine:
        unit, loss = losses[int((~finite).nonzero()[0])]
        raise FloatingPointError(
            f"epoch {epoch}: {t.trainer_type} loss is {float(loss)} at unit {unit}; the optimizer step was not "
            f"applied. Lower train.learning_rate, check the rewards, or use mixed_precision: no.")
    if not everyone:
        raise FloatingPointError(
            f"epoch {epoch}: another process's {t.trainer_type} loss is not finite (its log names the unit); the "
            f"optimizer step was not applied here either. Lower train.learning_rate, check the rewards, or use "
            f"mixed_precision: no.")
    losses.clear()


def _optimizer_step(t, accelerator, policy, optimizer, lr_schedule, step: int, sums: dict,
                    per_step: int, ema: bool = True) -> int:
    """Clip, step, schedule, zero, EMA (unless ``ema`` is False: held to the epoch's end); returns the
    new optimizer step count."""
    if t.max_grad_norm:
        norm = gather(accelerator.clip_grad_norm_(list(policy.trainable.values()), t.max_grad_norm))
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + norm.detach() * per_step
    optimizer.step()
    lr_schedule.step()
    optimizer.zero_grad(set_to_none=True)
    step += 1
    if ema:
        policy.update_ema(step)
    else:
        policy.optimizer_step = step
    return step


def train(cfg: Config, *, quiet: bool = False, stop: StopRequest | None = None) -> dict:
    """Run the whole experiment; returns the summary written to ``summary.json``. When ``stop``
    is requested (SIGTERM, :mod:`trainer.preempt`), every process stops after the same epoch,
    writes a resumable checkpoint and raises :class:`~trainer.preempt.Stopped`."""
    t = cfg.train
    if t.resume_from == "auto" and cfg.run_name:
        done = finished_summary(Path(cfg.output_dir) / cfg.run_name, t.max_epochs, t.max_train_seconds)
        if done is not None:  # e.g. `docker compose up` again after the run ended
            if not quiet:
                why = (f"train.max_train_seconds={t.max_train_seconds:g}" if done.get("stopped_by") == "budget"
                       else f"train.max_epochs={t.max_epochs}")
                print(f"flowrl: run {cfg.run_name} already trained {done['epochs']} epochs "
                      f"({why}); nothing to do. Its report: {done.get('report')}")
            return done
    accelerator = make_accelerator(cfg)
    geo = cfg.geometry(accelerator.num_processes)
    main = accelerator.is_main_process
    set_seed(t.seed)  # identical initial weights (and LoRA init) on every rank
    train_rows, test_rows = load_dataset(cfg.data)
    eval_rows = eval_subset(test_rows or train_rows, cfg.eval.num_prompts)
    check_reward_rows(cfg.rewards, train_rows)
    eval_section, eval_specs = cfg.evaluation_rewards()
    # the reward the progress bar and sample grids show: the first one trained on (not diversity_shaping's)
    trained_label = next(s.label for s in cfg.rewards if s.label != t.diversity_shaping)
    check_reward_rows(eval_specs, eval_rows, eval_section)

    # FSDP: the transformer stays on the CPU until sharding moves each process's pieces to its device
    adapter = load_adapter(cfg.model, device=accelerator.device, seed=t.seed,
                           transformer_device="cpu" if t.fsdp else None)
    check_media_geometry(cfg, adapter)
    context_parallel.check(cfg, adapter, accelerator.num_processes)
    check_rows(adapter, train_rows, eval_rows)
    if t.fsdp:
        check_fsdp(cfg, adapter, accelerator.num_processes)
    # a full fine-tune under FSDP casts to the master dtype block by block as it shards
    per_block = t.fsdp and cfg.model.finetune_type == "full"
    # model.init_from: full weights (and a LoRA fused into a full run) before the trainable copy,
    # a LoRA into the run's own adapter after it; on resume too, so the KL reference is the same
    warmed_from = [warm_start(cfg.model, adapter, "before")]
    trainable = attach_trainable(adapter, cfg, master_cast=not per_block)
    warmed_from.append(warm_start(cfg.model, adapter, "after"))
    if main and not quiet and any(warmed_from):
        print(f"flowrl: {next(w for w in warmed_from if w)}")
    name, run_dir, ckpt = _locate_run(cfg, accelerator)
    if ckpt is not None:
        check_same_experiment(ckpt, cfg)
    # LoRA under FSDP: the checkpoint's LoRA before sharding (the KL reference is the model with
    # the adapters off, whatever their weights); otherwise after the Policy has copied the base
    # weights for a full fine-tune's KL reference
    early = ckpt is not None and t.fsdp and not per_block
    if early:
        load_checkpoint_weights(ckpt, cfg, adapter, None)
    if t.fsdp:  # shard the transformer over the processes (trainer/sharding.py)
        trainable = None  # let each block's whole tensors go once it is sharded
        mesh = device_mesh(accelerator.device.type, accelerator.num_processes, t.fsdp_shard_size)
        blocks = shard_transformer(adapter.transformer, reshard_after_forward=t.fsdp_reshard_after_forward,
                                   master_dtype=DTYPES[cfg.model.master_weight_dtype], mesh=mesh)
        trainable = trainable_params(adapter.transformer)  # the sharded parameters, same names
        if isinstance(adapter.transformer, TwoExperts):  # every process runs the experts any one needs
            adapter.transformer.agree = agree_on_experts
        if main and not quiet:
            groups = "" if mesh is None else f" (hybrid: {mesh.size(0)} replicas of {mesh.size(1)} shards)"
            print(f"flowrl: FSDP over {accelerator.num_processes} processes{groups}, {blocks} blocks; "
                  f"{param_bytes(adapter.transformer) / 2**30:.2f} GiB of transformer weights on this one")
    warmed = warm_embeddings(cfg, adapter, train_rows, eval_rows)  # offload_text_encoders only
    if warmed and main and not quiet:
        print(f"flowrl: {warmed['encoded']} prompt embeddings encoded in {warmed['seconds']:.1f} s "
              f"({warmed['disk_hits']} from {cfg.model.embedding_cache_dir}); text encoders offloaded "
              f"({offload_mode(cfg)})")
    optimizer, lr_schedule = build_optimizer(cfg, trainable)
    if t.fsdp:  # accelerate's mixed-precision forward as under DDP, without the DDP wrapper
        model = accelerator.prepare_model(adapter.transformer, device_placement=False, evaluation_mode=True)
        optimizer = accelerator.prepare(optimizer)
    else:
        # a micro-batch may use only one expert; some models leave trained weights unused
        if isinstance(adapter.transformer, TwoExperts) or adapter.unused_parameters:
            accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
        model, optimizer = accelerator.prepare(adapter.transformer, optimizer)
    model.eval()
    algorithm = ALGORITHMS.get(t.trainer_type)(cfg)
    policy = Policy(adapter, model, cfg, trainable, snapshots=algorithm.snapshots)
    # after the LoRA (peft may wrap proj_out, where diffusers gathers the tokens) and the reference copy
    groups = context_parallel.enable(cfg, [adapter.transformer, *policy.frozen_copies()], accelerator.device.type)
    ptx = PretrainMix(cfg, adapter) if t.ptx_coef else None
    built: dict = {}  # an eval reward configured like a training one is the same model, loaded once
    rewards = build_rewards(cfg.rewards, accelerator.device, built)
    eval_rewards = build_rewards(cfg.eval_rewards, accelerator.device, built) if cfg.eval_rewards else rewards

    progress = Progress()
    if ckpt is not None:  # exact resume: weights, EMA, optimizer, LR schedule, counters
        if not early:  # under FSDP each process copies in its pieces of the whole tensors
            load_checkpoint_weights(ckpt, cfg, adapter, None)
        load_checkpoint_ema(ckpt, policy)
        progress = load_resume(ckpt, optimizer, lr_schedule, accelerator.scaler)
        if progress.epoch >= t.max_epochs:
            raise ResumeError(f"{ckpt} is already at epoch {progress.epoch} >= train.max_epochs="
                              f"{t.max_epochs}. Fix: raise train.max_epochs to train further.")
    if t.resume_from is None:
        fresh_folder(cfg, accelerator, run_dir, quiet)
    logger = None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
        if ckpt is not None:  # going back to an earlier checkpoint: the later ones step aside, and what a
            supersede_later(run_dir, ckpt)  # crashed run logged after its checkpoint is forgotten
            truncate_jsonl(run_dir / "metrics.jsonl", lambda r: r.get("step", 0) <= progress.epoch)
        elif t.resume_from == "auto":  # restarted before its first checkpoint: it starts over
            truncate_jsonl(run_dir / "metrics.jsonl", lambda r: False)
        logger = MetricLogger(cfg.logging_backend, run_dir, cfg.project, name, cfg.model_dump(),
                              resume=ckpt is not None,  # (TensorBoard forgets what metrics.jsonl forgot)
                              purge_step=progress.epoch + 1 if ckpt is not None
                              else 0 if t.resume_from == "auto" else None)
        if not quiet:
            layout = (f"{accelerator.num_processes} processes ({geo.world_size} data ranks x context_parallel "
                      f"{t.context_parallel})" if t.context_parallel > 1 else f"{geo.world_size} process(es)")
            print(f"flowrl: {t.trainer_type} on {cfg.model.model_type}, {layout}, "
                  f"{geo.groups_per_epoch} groups x {geo.group_size} samples per epoch -> {run_dir}"
                  + (f" (resumed from {ckpt}, epoch {progress.epoch})" if ckpt is not None else ""))

    if cfg.transport == "celery" and groups is not None:  # context parallelism: a group's leader talks to the queue
        transport = cp_queue.group_transport(cfg, adapter, policy, algorithm, name, groups, accelerator, run_dir,
                                             resume_epoch=None if ckpt is None else progress.epoch)
    elif cfg.transport == "celery":
        patient = None if accelerator.num_processes == 1 else patient_group(cfg, list(range(accelerator.num_processes)))
        transport = CeleryTransport(cfg, adapter, policy, algorithm, name,
                                    world_size=accelerator.num_processes, rank=accelerator.process_index,
                                    barrier=accelerator.wait_for_everyone,
                                    agree=None if patient is None else partial(fewest_over, patient), run_dir=run_dir,
                                    resume_epoch=None if ckpt is None else progress.epoch)
    else:
        transport = LocalTransport(cfg, adapter, policy, algorithm, rewards)
    rank, world = accelerator.process_index, accelerator.num_processes
    start = time.time()
    step, version, samples_used = progress.step, progress.version, progress.samples_used
    policy.optimizer_step = step  # sample_from_ema_after counts from the run's start, not the resume
    train_seconds, history, evals = progress.train_seconds, progress.history, progress.evals
    gate = None
    if t.kl_gate is not None:  # GARDO's gated KL: its state, rebuilt from the epochs already trained
        gate = KLGateState(t.kl_gate)
        gate.restore(history)
    agreed_seconds = train_seconds  # the same on every rank: one saved Progress
    prom = None
    if main and cfg.metrics_port is not None:
        prom = TrainerMetrics()
        prom_server = prom.serve(cfg.metrics_host, cfg.metrics_port)

    def run_eval(epoch: int) -> dict:
        ev = evaluate(cfg, accelerator, adapter, policy, eval_rewards, eval_specs, eval_rows,
                      run_dir, epoch)
        ev["time/train_seconds"] = train_seconds
        if main:
            logger.log({k: v for k, v in ev.items() if k not in ("grid", "videos")}, step=epoch)
            if ev.get("grid"):
                logger.log_image("eval/images", run_dir / ev["grid"], epoch)
            if ev.get("videos"):
                logger.log_videos("eval/videos", [(run_dir / v["path"], v["prompt"]) for v in ev["videos"]], epoch)
        return ev

    dispatched_with = version  # the policy version the pending epoch was dispatched with

    def dispatch(epoch: int, with_version: int | None = None):
        """Plan ``epoch`` and start its sampling with the current (or the given) policy version."""
        nonlocal dispatched_with
        dispatched_with = version if with_version is None else with_version
        p = plan_epoch(cfg, train_rows, epoch, rank, world)
        with accelerator.autocast():
            return p, transport.dispatch(p, dispatched_with)

    def checkpoint(epoch: int, pending_samples) -> None:
        """A resumable checkpoint after ``epoch + 1`` trained epochs (atomic)."""
        staged = epoch + 1 if t.max_staleness >= 1 else None
        state = Progress(epoch + 1, step, version, samples_used, train_seconds, history, evals,
                         staged, dispatched_with if staged is not None else None)
        untrained = pending_samples if cfg.transport == "local" and staged is not None else None
        # sharded moments are gathered by every process; otherwise the main one reads them
        moments = optimizer_tensors(optimizer) if policy.sharded else None
        save_checkpoint(run_dir / "checkpoints" / f"checkpoint-{epoch + 1}", cfg, accelerator,
                        adapter, policy, epoch + 1, step,
                        main_extra=lambda d: save_resume(d / RESUME_DIR, state, optimizer,
                                                         lr_schedule, accelerator.scaler, moments),
                        rank_extra=lambda d: save_rank_state(d / RESUME_DIR, rank, untrained))
        if accelerator.is_main_process:  # the new one is complete (renamed into place): rotate
            for old in stale_checkpoints(run_dir, t.keep_checkpoints):
                shutil.rmtree(old, ignore_errors=True)

    transport.publish(version)
    # the local transport samples inside dispatch(): when that runs between epochs (max_staleness
    # 0, and the first epoch) its seconds are billed to the next epoch's time and budget
    unbilled = 0.0
    if ckpt is None:
        evals.append(run_eval(0))
        t_dispatch = time.time()
        plan, pending = dispatch(0)
        unbilled = time.time() - t_dispatch
    else:  # the checkpoint's pending epoch: its saved samples (local) or dispatched again
        plan = plan_epoch(cfg, train_rows, progress.epoch, rank, world)
        pending = load_rank_state(ckpt, rank, adapter, plan, cfg, world)  # also restores the RNG
        if pending is None:
            t_dispatch = time.time()
            # local: sampled now, with the current weights (its saved samples were cut for another
            # process count); a queue's samplers take the version the epoch was first dispatched with
            plan, pending = dispatch(progress.epoch, None if cfg.transport == "local" else progress.pending_version)
            unbilled = time.time() - t_dispatch
        else:
            dispatched_with = progress.pending_version
    stopped_at = None  # the epoch a stop request ended the run after
    over = False  # the training-time budget ran out
    bar = tqdm(range(progress.epoch, t.max_epochs), desc="epochs", initial=progress.epoch,
               total=t.max_epochs, disable=not main or quiet, dynamic_ncols=True)
    for epoch in bar:
        t0, unbilled = time.time() - unbilled, 0.0
        with accelerator.autocast():
            samples = transport.collect(pending)
        if samples.rows is not None:  # prompt groups dropped after dead-lettered tasks
            plan = plan.subset(samples.rows)
        data = finish_epoch(cfg, accelerator, plan, samples, version, gate)
        if gate is not None and gate.reset_due(epoch):  # the KL's anchor moves to the current weights
            policy.blend_snapshot(KL_REFERENCE, 0.0)
            data.metrics["train/kl_gate/reset"] = 1.0
        samples_used += data.advantages.shape[0] * geo.world_size  # data ranks (a context-parallel group's once)
        more = epoch + 1 < t.max_epochs
        if more and t.max_staleness >= 1:  # sample epoch k+1 while training on k
            plan, pending = dispatch(epoch + 1)
        if t.lr_schedule_clock == "budget":  # the clock every rank agreed on after the last epoch
            set_budget_fraction(lr_schedule, agreed_seconds / t.max_train_seconds)
        t_opt = time.time()
        step, opt_metrics = optimize(cfg, accelerator, policy, algorithm, optimizer, lr_schedule,
                                     data, epoch, step, ptx)
        opt_metrics.update(algorithm.after_epoch(policy, step))  # e.g. CRD's snapshots, before publishing
        if gate is not None:
            gate.after(opt_metrics.get("train/kl_step_max"))
        optimize_seconds = time.time() - t_opt
        version += 1
        transport.publish(version)
        transport.epoch_done(epoch)
        train_seconds += time.time() - t0
        metrics = {"epoch": epoch + 1, **data.metrics, **opt_metrics,
                   "train/optimizer_step": step, "train/policy_version": version,
                   "time/epoch_seconds": time.time() - t0, "time/optimize_seconds": optimize_seconds,
                   "time/train_seconds": train_seconds}
        history.append(metrics)
        if prom is not None:
            prom.observe_epoch(metrics, data.advantages.shape[0] * geo.world_size, transport)
        if main:
            logger.log(metrics, step=epoch + 1)
            bar.set_postfix(progress_postfix(metrics, evals[-1], trained_label, eval_specs[0].label))
            if t.log_samples_freq and (epoch + 1) % t.log_samples_freq == 0 and data.rollout.images is not None:
                grid = save_group_grid(data.rollout.images, data.group_ids, data.rewards[trained_label],
                                       data.advantages, run_dir / "images" / f"train_samples_epoch{epoch + 1:04d}.png",
                                       prompts=data.prompts)
                logger.log_image("train/samples", grid, epoch + 1)
        # the slowest rank's clock: over budget on any rank stops every rank after the same epoch,
        # and a budget-clocked LR schedule reads the same time on every rank; likewise a stop
        # request (SIGTERM) that reached any rank
        agreed = accelerator.reduce(torch.tensor([train_seconds, float(stop is not None and stop.requested)],
                                                 dtype=torch.float64, device=accelerator.device),
                                    reduction="max").tolist()
        agreed_seconds, stopping = agreed[0], agreed[1] > 0
        over = t.max_train_seconds is not None and agreed_seconds >= t.max_train_seconds
        last = not more or over
        if last or (cfg.eval.eval_freq and (epoch + 1) % cfg.eval.eval_freq == 0):
            evals.append(run_eval(epoch + 1))
        stop_now = stopping and not last  # SIGTERM: a checkpoint of this epoch, nothing more dispatched
        if not last and (stop_now or (t.save_freq and (epoch + 1) % t.save_freq == 0)):
            checkpoint(epoch, pending if t.max_staleness >= 1 else None)
        if stop_now:
            stopped_at = epoch + 1
            break
        if more and not last and t.max_staleness == 0:  # after the checkpoint: nothing in flight
            t_dispatch = time.time()
            plan, pending = dispatch(epoch + 1)
            unbilled = time.time() - t_dispatch
        if last:
            break
    bar.close()  # the loop may leave early (break): close the bar now, not when it is collected
    transport.close()
    if prom is not None:
        prom_server.shutdown()
    if stopped_at is not None:
        if main:
            logger.close()
        accelerator.wait_for_everyone()
        accelerator.end_training()
        raise Stopped(stopped_at, run_dir / "checkpoints" / f"checkpoint-{stopped_at}")
    epochs_done = len(history)  # the whole run's, a resumed one included
    duplicates = int(accelerator.reduce(torch.tensor([transport.duplicates], device=accelerator.device),
                                        reduction="sum").item())  # every trainer process's
    final_dir = save_checkpoint(run_dir / "checkpoints" / "final", cfg, accelerator, adapter, policy,
                                epochs_done, step)
    summary = {"run_name": name, "trainer_type": t.trainer_type, "model_type": cfg.model.model_type,
               "transport": cfg.transport, "epochs": epochs_done, "policy_version": version,
               "samples": samples_used, "duplicates_dropped": duplicates,
               "optimizer_steps": step, "seconds": time.time() - start,
               "train_seconds": train_seconds,
               # what ended it: resume_from auto leaves a run alone that a budget ended (unless raised)
               "stopped_by": "budget" if over and epochs_done < t.max_epochs else "max_epochs",
               "max_train_seconds": t.max_train_seconds,
               "world_size": accelerator.num_processes, "context_parallel": t.context_parallel,
               "run_dir": str(run_dir), "checkpoint": str(final_dir)}
    for spec in eval_specs:
        summary[f"base/{spec.label}"] = evals[0].get(f"eval/reward/{spec.label}")  # (None: not measured then)
        summary[f"final/{spec.label}"] = evals[-1][f"eval/reward/{spec.label}"]
    for key in detail_keys(evals[-1]):  # e.g. eval/toy_geneval/accuracy/position
        summary[f"base/{key}"], summary[f"final/{key}"] = evals[0].get(f"eval/{key}"), evals[-1][f"eval/{key}"]
    if main:
        report = write_report(run_dir, history, evals, [s.label for s in eval_specs], summary)
        summary["report"] = str(report)
        # strict JSON: no score (NaN, every sample abstained) is null
        (run_dir / "summary.json").write_text(json.dumps(
            {k: None if isinstance(v, float) and v != v else v for k, v in summary.items()}, indent=2))
        logger.close()
        if not quiet:
            for spec in eval_specs:
                print(f"eval reward '{spec.label}': base {_score(summary[f'base/{spec.label}'])} -> "
                      f"final {_score(summary[f'final/{spec.label}'])}")
            for key in detail_keys(evals[-1]):
                print(f"  {key}: base {_score(summary[f'base/{key}'])} -> final {_score(summary[f'final/{key}'])}")
            print(f"report: {report}  (reward curve: {run_dir / 'reward_curve.png'})")
    _write_rank_state(run_dir, accelerator, policy, data, optimizer)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _score(value: float | None) -> str:
    """A score for the closing lines: 4 decimals, or n/a where no sample had one (None, NaN)."""
    return "n/a" if value is None or value != value else f"{value:.4f}"


def _write_rank_state(run_dir: Path, accelerator: Accelerator, policy: Policy, data: EpochData,
                      optimizer) -> None:
    """Per-rank facts for multi-process checks: parameter checksum, the groups it owned, and the
    bytes of transformer weights and optimizer state this process holds (pieces under FSDP)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    whole = policy.full_weights().values()  # gathered under FSDP (every rank calls this)
    checksum = float(sum(p.double().sum() for p in whole))
    groups = data.group_ids.tolist()
    (run_dir / f"rank{accelerator.process_index}_state.json").write_text(json.dumps({
        "rank": accelerator.process_index, "param_checksum": checksum,
        "param_abs_sum": float(sum(p.double().abs().sum() for p in whole)),
        "transformer_bytes": param_bytes(policy.adapter.transformer),
        "optimizer_bytes": sum(local(v).numel() * v.element_size() for st in optimizer.state.values()
                               for v in st.values() if torch.is_tensor(v)),
        "last_epoch_group_ids": groups}))


__all__ = ["train", "optimize", "micro_batches", "dataclasses"]
