"""Experiment config: YAML -> strict pydantic models, with errors that teach.

Keys follow Flow-Factory / flow_grpo names (design.md §3) so users can bring their YAML.
Everything is validated at start: unknown keys (with the nearest valid key), wrong types,
and incompatible combinations (``ODE`` with ``grpo``, ``grpo-guard`` without Flow-SDE,
batch sizes that do not tile into whole groups) raise :class:`ConfigError` with one
paragraph naming the key, the value and the fix.

Algorithm-dependent defaults (clip range, KL weight, rollout dynamics, timestep sampling,
EMA schedule...) are ``None`` in the schema and filled from :data:`ALGORITHM_DEFAULTS`
for the chosen ``train.trainer_type``; an explicit value always wins.

Derived batch geometry is computed in exactly one place, :meth:`Config.geometry`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator,
                      model_validator)

from shared.queue import QueueSettings, environment_problem
from shared.registry import import_dotted

DYNAMICS = ("Flow-SDE", "Dance-SDE", "CPS", "ODE")
TRAINER_TYPES = ("grpo", "grpo-guard", "dppo", "nft", "awm", "dpo", "dgpo", "crd")
#: each built-in trainer_type's class (trainer/algorithms registers them from here)
TRAINER_CLASSES = {"grpo": "trainer.algorithms.grpo.GRPO", "grpo-guard": "trainer.algorithms.grpo_guard.GRPOGuard",
                   "dppo": "trainer.algorithms.dppo.DPPO", "nft": "trainer.algorithms.nft.NFT",
                   "awm": "trainer.algorithms.awm.AWM", "dpo": "trainer.algorithms.dpo.DPO",
                   "dgpo": "trainer.algorithms.dgpo.DGPO", "crd": "trainer.algorithms.crd.CRD"}
# always evaluate the frozen reference model, whatever kl_beta says
REFERENCE_TRAINERS = ("dpo", "dgpo")  # (and crd without its old snapshot: TrainConfig.uses_reference)
# train on whole prompt groups a micro-batch (their losses compare a group's samples)
WHOLE_GROUP_TRAINERS = ("dgpo", "crd")

# Defaults per algorithm, from ../shared/reference/algorithms.md (official code values).
ALGORITHM_DEFAULTS: dict[str, dict[str, Any]] = {
    "grpo": dict(  # Flow-GRPO (flow_grpo config/grpo.py)
        dynamics_type="Flow-SDE", clip_range=1e-4, adv_clip_range=5.0, kl_beta=0.0,
        global_std=True, off_policy=False, ema_decay=0.9, ema_decay_schedule="power",
        ema_update_interval=8,
    ),
    "grpo-guard": dict(  # GRPO-Guard (flow_grpo config/grpo_guard.py)
        dynamics_type="Flow-SDE", clip_range=2e-6, adv_clip_range=5.0, kl_beta=0.0,
        global_std=False, off_policy=False, ema_decay=0.9, ema_decay_schedule="power",
        ema_update_interval=8,
    ),
    "dppo": dict(  # Flow-DPPO as Flow-Factory's trainers (DPPOTrainingArguments): GRPO with a KL trust region
        dynamics_type="Flow-SDE", adv_clip_range=5.0, kl_beta=0.0, global_std=True, off_policy=False,
        ema_decay=0.9, ema_decay_schedule="power", ema_update_interval=8,
    ),
    "nft": dict(  # DiffusionNFT (config/nft.py): ODE rollouts, off-policy EMA "old" model
        dynamics_type="ODE", adv_clip_range=5.0, kl_beta=1e-4, global_std=True,
        off_policy=True, ema_decay=0.5, ema_decay_schedule="piecewise_linear",
        ema_update_interval=1, ramp_rate=0.001, flat_steps=0,
        time_sampling_strategy="discrete", timestep_fraction=0.99,
    ),
    "awm": dict(  # Advantage Weighted Matching (config/dgx_awm.py)
        dynamics_type="ODE", clip_range=1.0, adv_clip_range=5.0, kl_beta=1e-3,
        ema_kl_beta=1.0, global_std=True, off_policy=False, ema_decay=0.3,
        ema_decay_schedule="linear", ema_warmup_steps=300, ema_update_interval=1,
        time_sampling_strategy="discrete_wo_init", timestep_fraction=0.9,
        num_train_timesteps=6,
    ),
    "dpo": dict(  # online Diffusion-DPO as Flow-Factory's trainers/dpo.py (DPOTrainingArguments)
        dynamics_type="ODE", kl_beta=0.0, adv_clip_range=5.0, global_std=True, off_policy=False,
        ema_decay=0.9, ema_decay_schedule="power", ema_update_interval=8,
        time_sampling_strategy="logit_normal", timestep_fraction=0.99, num_train_timesteps=1,
    ),
    "dgpo": dict(  # DGPO as Flow-Factory's trainers/dgpo.py (DGPOTrainingArguments, GRPO's clip ranges)
        dynamics_type="ODE", clip_range=1e-4, adv_clip_range=5.0, kl_beta=0.0, global_std=True,
        off_policy=False, ema_decay=0.9, ema_decay_schedule="power", ema_update_interval=8,
        sample_from_ema_after=200, time_sampling_strategy="discrete", timestep_fraction=0.6,
    ),
    "crd": dict(  # Centered Reward Distillation as Flow-Factory's trainers/crd.py (CRDTrainingArguments;
        # the EMA, only the eval weights here, is dgpo's: Flow-Factory's 0.995 every 10 epochs converts)
        dynamics_type="ODE", adv_clip_range=5.0, kl_beta=0.1, global_std=True,
        off_policy=False, ema_decay=0.9, ema_decay_schedule="power", ema_update_interval=8,
        time_sampling_strategy="discrete", timestep_fraction=0.99,
    ),
}
NOISE_LEVEL_DEFAULTS = {"Flow-SDE": 0.7, "Dance-SDE": 0.3, "CPS": 0.8, "ODE": 0.0}
SDE_TRAINERS = ("grpo", "grpo-guard", "dppo")  # need per-step log-probs from a stochastic rollout


def trainer_kind(trainer_type: str) -> str:
    """The built-in algorithm ``train.trainer_type`` is or derives from: a built-in's name (lower case);
    for a dotted path to a user's class, the nearest built-in among its bases, whose defaults and config
    checks then apply (a GRPO subclass needs stochastic rollouts too); else the path itself (an algorithm
    of its own: grpo's defaults, no algorithm-specific checks). A class that does not import here (a
    service without the user's module) counts as its own; the trainer imports it and says why."""
    if "." not in trainer_type:
        return trainer_type.lower()
    try:
        cls = import_dotted(trainer_type)
    except Exception:  # noqa: BLE001  (reported where the trainer loads it)
        return trainer_type
    builtin = {path: kind for kind, path in TRAINER_CLASSES.items()}
    for base in getattr(cls, "__mro__", ()):
        kind = builtin.get(f"{base.__module__}.{base.__qualname__}")
        if kind is not None:
            return kind
    return trainer_type


#: named snapshot decay schedules (Flow-Factory's CRD presets): (start_step, start_value, slope, end_value)
SNAPSHOT_DECAY_PRESETS = {
    "none": (0, 0.0, 0.0, 0.0), "slow": (0, 0.0, 0.001, 0.5), "medium": (75, 0.0, 0.0075, 0.999),
    "offline": (0, 1.0, 0.0, 1.0), "fast": (0, 0.0, 0.02, 0.99), "moderate": (0, 0.0, 0.01, 0.5),
}
#: Flow-Factory's integer presets -> the names above (6: the medium ramp from step 0)
SNAPSHOT_DECAY_NUMBERS = {0: "none", 1: "slow", 2: "medium", 3: "offline", 4: "fast", 5: "moderate",
                          6: "0-0.0-0.0075-0.999"}


def parse_snapshot_decay(spec: str) -> tuple[int, float, float, float]:
    """``"start_step-start_value-slope-end_value"`` (e.g. ``"75-0.0-0.0075-0.999"``), a preset name of
    :data:`SNAPSHOT_DECAY_PRESETS` or a preset number of :data:`SNAPSHOT_DECAY_NUMBERS` ->
    ``(start_step, start_value, slope, end_value)``; ValueError naming the format otherwise (finite
    values, the two decays in [0, 1])."""
    spec = str(spec).strip()
    if spec.isdigit() and int(spec) in SNAPSHOT_DECAY_NUMBERS:
        spec = SNAPSHOT_DECAY_NUMBERS[int(spec)]
    if spec in SNAPSHOT_DECAY_PRESETS:
        return SNAPSHOT_DECAY_PRESETS[spec]
    parts = spec.split("-")
    try:
        if len(parts) != 4:
            raise ValueError
        start, v0, slope, end = float(parts[0]), float(parts[1]), float(parts[2]), float(parts[3])
    except ValueError:
        raise ValueError(f"snapshot decay {spec!r} is not 'start_step-start_value-slope-end_value' "
                         f"(e.g. '75-0.0-0.0075-0.999') or one of {', '.join(SNAPSHOT_DECAY_PRESETS)}") from None
    if not all(math.isfinite(x) for x in (start, v0, slope, end)) or start != int(start) \
            or not (0 <= v0 <= 1 and 0 <= end <= 1):
        raise ValueError(f"snapshot decay {spec!r}: start_step must be a whole number >= 0 and start_value, "
                         f"end_value in [0, 1]; the slope, non-negative, is written without a minus sign")
    return int(start), v0, slope, end


class ConfigError(ValueError):
    """A config problem, phrased as: which key, what value, how to fix it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Resolution = int | tuple[int, int]


class CheckpointPolicy(_Strict):
    """``model.gradient_checkpointing`` as a mapping (Flow-Factory's selective form): which of the
    transformer's blocks recompute their activations in backward. The blocks are numbered from 0
    in forward order over the transformer's block lists (FLUX.1: its 19 double-stream blocks, then
    its 38 single-stream ones; Z-Image: its two noise and two context refiner blocks, then its
    layers), and a two-expert model (Wan2.2-A14B) applies the policy to each expert's own blocks.
    ``fraction`` f: ``max(1, ceil(f N))`` blocks spread evenly from the first to the last;
    ``every_n``: every n-th (0, n, 2n, ...); ``layers``: those indices; ``full`` / ``none``: all /
    no block (trainer.policy.chosen_blocks). ``mode`` may be left out when exactly one of
    fraction, every_n, layers is given."""

    mode: Literal["full", "none", "fraction", "every_n", "layers"] | None = None
    fraction: float | None = Field(None, gt=0, le=1)
    every_n: StrictInt | None = Field(None, ge=1)
    layers: list[StrictInt] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_selector(self) -> "CheckpointPolicy":
        given = [k for k in ("fraction", "every_n", "layers") if getattr(self, k) is not None]
        if self.mode is None:
            if len(given) != 1:
                raise ValueError(f"give a mode, or exactly one of fraction, every_n, layers (got {given or 'none'})")
            object.__setattr__(self, "mode", given[0])
        extra = [k for k in given if k != self.mode]
        if extra:
            raise ValueError(f"mode {self.mode} does not take {extra}")
        if self.mode in ("fraction", "every_n", "layers") and getattr(self, self.mode) is None:
            example = {"fraction": "0.5", "every_n": "2", "layers": "[0, 1]"}[self.mode]
            raise ValueError(f"mode {self.mode} needs its {self.mode}, e.g. {{mode: {self.mode}, {self.mode}: {example}}}")
        if self.layers is not None and min(self.layers) < 0:
            raise ValueError(f"layers are block indices from 0, got {self.layers}")
        return self

    def __bool__(self) -> bool:
        return self.mode != "none"


class ModelConfig(_Strict):
    """``model:`` — which generator, how it is fine-tuned."""

    model_type: str = "tiny"  # registry key in shared.models (or a dotted plugin path)
    model_name_or_path: str | None = None  # hub id or local dir; None builds the tiny model
    finetune_type: Literal["lora", "full"] = "lora"
    lora_rank: int = Field(8, gt=0)
    lora_alpha: float | None = None  # None -> 2 * lora_rank
    target_modules: str | list[str] = "default"  # "default" = the adapter's attention projections
    # -- memory and speed (README "Memory and speed options")
    # diffusers attention backend: native, flash, flash_hub, _flash_3_hub, xformers, sage, ...
    # (shared.models.attention); None = the model as diffusers builds it
    attn_backend: str | None = None
    # recompute the transformer blocks' activations in backward: true (every block), or which
    # blocks ({fraction: 0.5} | {every_n: 2} | {layers: [0, 1]}; CheckpointPolicy)
    gradient_checkpointing: bool | CheckpointPolicy = False
    # the training forward's saved activations wait in page-locked host memory until backward
    # (trainer/offload.py); with gradient_checkpointing only the blocks' inputs, so the GPU holds ~one block's
    activation_offload: bool = False
    # torch.compile the transformer (trainer and samplers; in place, so parameter names, LoRA files
    # and published weights are unchanged): true = the default mode, or a torch.compile mode name
    compile: bool | Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = False
    # prompt / condition embeddings are computed once per distinct (prompt, negative prompt,
    # condition images, settings) and reused (shared.embedding_cache): an in-memory LRU of this
    # many MiB (CPU memory; 0 = none), and on disk under embedding_cache_dir (safetensors files
    # named by a fingerprint of the model and the encode settings; shared by trainer and samplers)
    embedding_cache_mb: float = Field(1024, ge=0)
    embedding_cache_dir: str | None = None
    # true / "cpu": the trainer encodes every train and eval prompt up front, then the text
    # encoders live on the CPU (brought back only for a prompt not seen before); "drop": freed
    offload_text_encoders: bool | Literal["cpu", "drop"] = False
    master_weight_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    scheduler_shift: float | None = Field(None, gt=0)  # None = the model's own shift
    # start from weights trained elsewhere (trainer/warm_start.py): a flowrl checkpoint folder, a
    # diffusers LoRA file (or its folder), or a transformer folder; not a resume (that is --resume)
    init_from: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)  # adapter-specific settings


class SourceTrain(_Strict):
    """``train:`` of one ``data.datasets`` entry: how much of every epoch it supplies."""

    weight: int = Field(1, gt=0)  # an epoch's prompt groups are split between sources by weight
    max_dataset_size: int | None = Field(None, gt=0)  # the first N train rows
    split: str = Field("train", pattern=r"^[A-Za-z0-9_.-]+$")  # the rows of {dataset_dir}/{split}.jsonl|txt


class SourceEval(_Strict):
    """``eval:`` of one ``data.datasets`` entry (present: its held-out prompts are evaluated)."""

    max_dataset_size: int | None = Field(None, gt=0)  # the first N test rows
    # the held-out rows: {dataset_dir}/{split}.jsonl|txt; when absent, the source's train rows
    split: str = Field("test", pattern=r"^[A-Za-z0-9_.-]+$")
    # this source's prompts evaluated with their own settings (Flow-Factory's per-source eval);
    # None = the eval: section's
    resolution: Resolution | None = None
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = None


class DataSource(_Strict):
    """One entry of ``data.datasets`` (Flow-Factory's multi-source layout): a dataset folder as
    ``data.dataset_dir`` takes, with a ``name`` that metrics and ``rewards[].datasets`` use.
    ``train: null`` = evaluated only; ``eval: null`` = trained on only."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    dataset_dir: str
    image_dir: str | None = None  # default {dataset_dir}/images
    video_dir: str | None = None  # default {dataset_dir}/videos
    train: SourceTrain | None = Field(default_factory=SourceTrain)
    eval: SourceEval | None = Field(default_factory=SourceEval)


class DataConfig(_Strict):
    """``data:`` — a folder with train.txt|train.jsonl and optional test.txt|test.jsonl, or
    several (``datasets``) mixed by weight."""

    dataset_dir: str = "examples/data/tiny"
    image_dir: str | None = None  # default {dataset_dir}/images
    video_dir: str | None = None  # default {dataset_dir}/videos
    max_dataset_size: int | None = Field(None, gt=0)
    datasets: list[DataSource] | None = Field(None, min_length=1)  # instead of the four keys above


class SdeWindow(_Strict):
    """``train.sde_window``: MixGRPO's progressive window of SDE steps
    (:func:`shared.flow.progressive_window`), instead of ``train_steps`` / ``num_train_steps``."""

    size: int = Field(4, gt=0)  # w: SDE steps per epoch (MixGRPO: 4)
    shift_every: int = Field(25, gt=0)  # tau: epochs between shifts (MixGRPO: 25; Flash: 20)
    stride: int = Field(1, gt=0)  # s: steps the window moves per shift
    roll_back: bool = False  # at the end, go back to the noisiest steps instead of staying


class OdeTail(_Strict):
    """``train.ode_tail``: MixGRPO-Flash's faster sampling of the steps after a rollout's last SDE step
    (nothing there is trained): ``solver`` on a grid cut by ``compress_ratio`` as MixGRPO cuts it
    (:func:`shared.flow.solvers.tail_grid`; MixGRPO-Flash: DPM-Solver++ order 2 at 0.4, Flash*: 0.2)."""

    solver: Literal["dpm_solver++", "euler"] = "dpm_solver++"
    compress_ratio: float = Field(0.4, gt=0, le=1)


class KLGate(_Strict):
    """``train.kl_gate``: GARDO's gated and adaptive KL (He et al. 2025), as flow_grpo's
    ``scripts/train_sd3_gardo.py`` runs it (:mod:`trainer.kl_gate`). The KL term (``kl_beta``) applies only
    to the samples whose ``reward`` disagrees most with the ``auxiliary`` rewards (the top ``fraction``
    of rank gaps, adapted epoch by epoch when ``adaptive``), and it anchors to a copy of the policy that
    is reset to the current weights after an epoch with an optimizer step whose KL exceeds ``reset_kl``,
    and once more than ``reset_every`` epochs passed since the last reset."""

    reward: str | None = None  # the proxy reward's name (None: the first reward with a nonzero weight)
    auxiliary: list[str] = Field(min_length=1)  # rewards' names judging the same images (weight 0: not trained on)
    fraction: float = Field(0.1, gt=0, le=1)  # share of the rank gaps >= 0 gated (GARDO: 0.1)
    adaptive: bool = True  # GARDO's RiskCompensator: x1.1 / x0.9 as the gap grows / shrinks, within [0.02, 0.2]
    reset_kl: float | None = Field(3e-4, gt=0)  # GARDO's kl_thres (config/grpo_gardo.py); None: no KL-triggered reset
    reset_every: int | None = Field(15, gt=0)  # GARDO's reset_freq: a reset once more than this many epochs passed


class TrainConfig(_Strict):
    """``train:`` — rollout, algorithm and optimizer settings. ``None`` = algorithm default."""

    trainer_type: str = "grpo"
    seed: int = 42
    max_epochs: int = Field(100, gt=0)  # one epoch = one rollout + update round
    max_train_seconds: float | None = Field(None, gt=0)  # wall-clock budget: stop after the epoch that exceeds it
    resolution: Resolution = 512
    # video models: frames per rollout (Wan: 4k + 1, e.g. 5, 17, 81); None = the model's default
    # (model.options.num_frames); image models take None or 1
    num_frames: int | None = Field(None, ge=1)
    # precision of the rollout's latent chain and stored states: bfloat16 (with a bf16 model,
    # e.g. mixed_precision: bf16) halves what samplers write; the chain continues from the
    # rounded state, so the recorded log-probs are exactly what training replays
    rollout_state_dtype: Literal["float32", "bfloat16"] = "float32"
    # where each sample's noise generator draws (shared/sampling.py): "cpu" = the same images for a
    # seed on every machine; "model" = on the model's device (a GPU draws it itself: no CPU work and
    # no host-to-device copy before the first step; other numbers than the CPU's for the same seed)
    rollout_noise_device: Literal["cpu", "model"] = "cpu"
    # keep the epoch's rollouts (trajectories, conditioning, images) in host memory, each
    # micro-batch moved there as soon as it is sampled and back to the device when it trains
    # (Flow-Factory's name): the device holds one micro-batch's instead of the epoch's, for the
    # price of the copies; for video models and large groups
    offload_samples_to_cpu: bool = False
    # embedded mode: score each rolled-out micro-batch in a background thread while the next one
    # samples (pointwise rewards only; groupwise/pairwise ones are scored after the rollout).
    # None = when sampling on a GPU; on a CPU the two threads contend (bench/overlap_scoring.py)
    overlap_scoring: bool | None = None
    num_inference_steps: int = Field(10, ge=1)
    guidance_scale: float = Field(1.0, ge=0)  # > 1 enables CFG (the policy is the guided step)
    # nft / awm: the CFG scale the rollouts are sampled with when it should differ from the policy's
    # (None = guidance_scale). These trainers learn from any sampler's clean images, so a CFG-free
    # policy can be trained on guided rollouts (behaviour policy = the guided model)
    rollout_guidance_scale: float | None = Field(None, ge=0)
    # -- rollout dynamics and the SDE window (MixGRPO / Flow-GRPO-Fast style)
    dynamics_type: Literal["Flow-SDE", "Dance-SDE", "CPS", "ODE"] | None = None
    noise_level: float | None = Field(None, ge=0)
    train_steps: list[int] | None = None  # candidate SDE step indices; None = all but the last
    num_train_steps: int | None = Field(None, gt=0)  # how many of them per epoch; None = all
    sde_window: SdeWindow | None = None  # MixGRPO's progressive window instead of the two keys above
    ode_tail: OdeTail | None = None  # MixGRPO-Flash: the deterministic steps after the last SDE step, fewer and 2nd order
    # every member of a prompt group starts from the same initial noise and differs only by the
    # SDE steps' noise (MixGRPO's and TempFlow-GRPO's seed groups): reward differences within a
    # group then come from the trained steps alone
    shared_initial_noise: bool = False
    # TempFlow-GRPO's noise-aware policy weighting (grpo): each trained step's policy
    # term times its transition std over the grid's mean one (shared.flow.sde.noise_aware_weights)
    noise_aware_weighting: bool = False
    log_prob_reduction: Literal["mean", "sum"] = "mean"
    # -- batch geometry
    group_size: int = Field(8, ge=2)  # images per prompt (K)
    unique_sample_num_per_epoch: int = Field(8, gt=0)  # prompts (groups) per epoch (M)
    per_device_batch_size: int = Field(8, gt=0)  # rollout and train micro-batch (B)
    # rollout micro-batch when it should differ from B (None = B): sampling keeps no activations
    # for a backward pass, so it can run bigger forwards than training (SD3.5-M on an H200: 4.64
    # images/s at 8 per batch, 4.98 at 16; bench/results/gpu_sampler_sd3-5.json)
    rollout_batch_size: int | None = Field(None, gt=0)
    gradient_step_per_epoch: int = Field(1, gt=0)  # optimizer steps per inner epoch (G)
    num_inner_epochs: int = Field(1, gt=0)
    # -- optimizer
    learning_rate: float = Field(3e-4, gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    # what the schedule's length is measured in: "steps" = max_epochs' optimizer steps; "budget" =
    # whichever runs out first of those and max_train_seconds (trainer/schedule.py): a cosine over
    # a 10-minute budget still ends at 0 on a machine too slow for max_epochs in that time
    lr_schedule_clock: Literal["steps", "budget"] = "steps"
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_weight_decay: float = Field(1e-4, ge=0)
    adam_epsilon: float = Field(1e-8, gt=0)
    # muon: torch.optim.Muon on the 2-D matrices (LoRA factors, linear weights), AdamW (adam_*) on the
    # rest (trainer/optim.py); match_rms_adamw keeps AdamW's learning-rate scale, original is Muon's own
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_momentum: float = Field(0.95, ge=0, lt=1)
    muon_nesterov: bool = True
    muon_ns_steps: int = Field(5, gt=0)
    muon_adjust_lr_fn: Literal["match_rms_adamw", "original"] = "match_rms_adamw"
    muon_adamw_learning_rate: float | None = Field(None, gt=0)  # the AdamW part's; None = learning_rate
    # matrices whose name contains one of these stay on AdamW: input / output layers, modulation tables
    muon_exclude: list[str] = Field(default_factory=lambda: ["embed", "proj_out", "norm_out", "scale_shift_table",
                                                             "time_text", "proj_in"])
    max_grad_norm: float | None = Field(1.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    # shard the transformer, its gradients and optimizer state over the processes (PyTorch FSDP2,
    # trainer/sharding.py) instead of a whole copy on each (DDP): for full fine-tuning of models
    # whose copy does not fit one GPU. reshard_after_forward: false keeps each block gathered from
    # its forward to its backward (less communication, more memory; ZeRO-2-like)
    fsdp: bool = False
    fsdp_reshard_after_forward: bool = True
    # shard within groups of this many processes (e.g. one node's GPUs) and replicate across the
    # groups (hybrid sharding, HSDP: gradients cross nodes once, reduced, not per block); None = all
    fsdp_shard_size: int | None = Field(None, gt=0)
    # Ulysses context (sequence) parallelism for video models (trainer/context_parallel.py): each sample's
    # tokens are split over this many processes, which run it together (rollout, training, evaluation);
    # the processes form world / context_parallel data-parallel ranks (with fsdp too). 1 = off
    context_parallel: int = Field(1, ge=1)
    # how long a process waits in a collective (all-reduce, barrier) for the others before the run
    # stops with an error: long enough for the main process to write a full fine-tune's checkpoint while
    # the others wait; short enough that a hung process ends the run. PyTorch's default for NCCL is 600
    # s. (What the trainer processes of a queue run agree on waits as long as queue.collect_timeout_s.)
    dist_timeout_s: float = Field(1800.0, gt=0)
    # -- advantages
    advantage_aggregation: Literal["sum", "gdpo"] = "sum"
    global_std: bool | None = None
    # false: A = R - mean_group(R), not divided by a std (GARDO's / Dr. GRPO's std-free advantages; sum only)
    advantage_std: bool = True
    # grpo / grpo-guard / dppo: train only the samples with a nonzero advantage (|A| > 1e-6), as flow_grpo's
    # scripts do; a group whose samples all scored the same adds no policy gradient, only compute (and its KL
    # term, which goes with it). Each process keeps its number of micro-batches, now smaller; logged as
    # train/kept_fraction
    skip_zero_advantage: bool = False
    # a rewards label whose scores scale each positive advantage by the sample's score over its group's
    # mean instead of adding to the reward (GARDO's diversity-aware optimization: reward_model diversity,
    # reduce: min); trainer/advantages.py diversity_scale
    diversity_shaping: str | None = None
    # GARDO's gated KL against a resettable copy of the policy (grpo with kl_beta > 0): KLGate above
    kl_gate: KLGate | None = None
    adv_clip_range: float | None = Field(None, gt=0)
    # -- GRPO / GRPO-Guard / AWM surrogate
    clip_range: float | tuple[float, float] | None = None
    kl_type: Literal["x-based", "v-based"] = "x-based"
    kl_beta: float | None = Field(None, ge=0)  # 0: no KL term, and no reference model but for dpo, dgpo, crd
    # where a full fine-tune's frozen copy lives, and an algorithm's snapshots (crd's old and sampling models)
    ref_param_device: Literal["same", "cpu"] = "same"
    # the CFG scale of the KL reference (None = guidance_scale). A CFG-free policy (guidance_scale 1)
    # anchored to the base's guided velocity (e.g. 4.5) is pulled towards the guided model while the
    # reward tilts it: guidance distillation as the KL anchor, so it needs no CFG at inference
    ref_guidance_scale: float | None = Field(None, ge=0)
    # -- DiffusionNFT
    nft_beta: float = Field(1.0, gt=0)
    off_policy: bool | None = None  # sample (and take v_old) from the EMA model
    # -- online Diffusion-DPO: the beta of -log sigmoid(-beta/2 [(err_w - ref_w) - (err_l - ref_l)]),
    # errors being per-sample mean squared velocity errors (Diffusion-DPO's scale; Flow-Factory's 2000)
    dpo_beta: float = Field(2000.0, gt=0)
    # -- Flow-DPPO (trainer_type dppo): a sample whose step diverges from the rollout's by at least
    # kl_mask_threshold, measured between the step Gaussians (x-based) or the velocities (v-based),
    # and whose ratio moved the way its advantage pushes, gets no gradient (no PPO clip)
    kl_mask_type: Literal["x-based", "v-based"] = "x-based"
    kl_mask_threshold: float = Field(1e-6, gt=0)
    # -- DGPO (Direct Group Preference Optimization): group weight sigmoid(sum_i A_i dgpo_beta
    # (l_i - l_ref_i) / K) on the advantage-weighted flow-matching loss; dgpo_clip: PPO-style, the
    # loss of a sample whose ratio exp(l_old - l) left clip_range on its advantage's side is detached
    dgpo_beta: float = Field(100.0, gt=0)
    dgpo_clip: bool = True
    # sample rollouts (and take the "old" policy) from the EMA once this many optimizer steps are done
    # (DGPO's switch_ema_ref); None: only with off_policy
    sample_from_ema_after: int | None = Field(None, ge=0)
    # -- CRD (Centered Reward Distillation): the implicit reward r = -(||v - v_t||^2 - ||v_old - v_t||^2)
    # (crd_adaptive_logp: each error over its own mean |error|), centred within its group, regresses onto
    # the centred advantage (mse: (crd_beta r_c - A_c)^2; bce: logits crd_beta r_c, targets sigmoid(A_c));
    # crd_weight_temp < 0: plain group means; 0: separate means over the positive and the negative
    # samples; > 0: softmax(+-A / T)-weighted means (the two directions averaged)
    crd_beta: float = Field(1.0, gt=0)
    crd_loss_type: Literal["mse", "bce"] = "mse"
    crd_weight_temp: float = -1.0
    crd_adaptive_logp: bool = True
    # v_old: a snapshot of the policy blended towards it after every epoch (true), or the frozen base
    crd_use_old: bool = True
    # the snapshots' blend decays d(step) ("start_step-start_value-slope-end_value": start_value before
    # start_step, then start_value + slope * (step - start_step), capped at end_value; or a preset name),
    # snapshot <- d snapshot + (1 - d) policy after every epoch, step = optimizer steps done. Rollouts
    # come from the sampling snapshot (on-policy while its decay is 0)
    crd_old_decay: str = "0-0.25-0.005-0.999"
    crd_sampling_decay: str = "75-0.0-0.0075-0.999"
    # the KL term per sample weighted by 1e-4 / kl_beta + (1 - 1e-4 / kl_beta) * a, a in [0, 1] the
    # normalized advantage: high-reward samples stay near the reference, low-reward ones may leave it
    crd_reward_adaptive_kl: bool = True
    # -- AWM
    awm_weighting: Literal["Uniform", "t", "t**2", "huber", "ghuber"] = "ghuber"
    ghuber_power: float = Field(0.25, gt=0)
    ema_kl_beta: float | None = Field(None, ge=0)
    # -- training timesteps of the trainers that re-noise clean images (nft, awm, dpo, dgpo, crd)
    time_sampling_strategy: Literal[
        "uniform", "logit_normal", "discrete", "discrete_with_init", "discrete_wo_init"
    ] | None = None
    time_shift: float = Field(1.0, gt=0)
    timestep_fraction: float | None = Field(None, gt=0, le=1)
    num_train_timesteps: int | None = Field(None, gt=0)  # None = int(steps * fraction)
    # every sample of a group re-noised with the group's timesteps and noise (common random
    # numbers: the same loss in expectation, the group's samples compared at equal (t, eps))
    group_shared_noise: bool = False
    # -- pretraining-data mix (PPO-ptx / ReFL's pretraining loss; trainer/ptx.py): every
    # micro-batch also regresses the velocity on ptx_batch_size (caption, image) pairs of
    # ptx_dataset (a folder with train.jsonl rows {"prompt", "image"}), weighted by ptx_coef
    ptx_coef: float = Field(0.0, ge=0)
    ptx_dataset: str | None = None
    ptx_batch_size: int = Field(16, gt=0)
    # -- EMA (eval weights; the "old"/sampling model for off-policy nft; the AWM anchor)
    ema_decay: float | None = Field(None, ge=0, le=1)  # 0 disables EMA
    ema_decay_schedule: Literal[
        "constant", "power", "linear", "piecewise_linear", "cosine", "warmup_cosine"
    ] | None = None
    ema_update_interval: int | None = Field(None, gt=0)  # in optimizer steps
    ema_device: Literal["same", "cpu"] = "same"
    flat_steps: int = Field(0, ge=0)
    ramp_rate: float = Field(0.001, ge=0)
    ema_warmup_steps: int | None = Field(None, gt=0)  # None = algorithm default (10; awm 300)
    initial_decay: float = Field(0.0, ge=0, le=1)
    total_steps: int = Field(1000, gt=0)
    # -- asynchrony: how many policy versions a trained-on sample may lag (0 = on-policy,
    # sample epoch k+1 only after training on k; 1 = sample k+1 while training on k)
    max_staleness: int = Field(0, ge=0, le=1)
    # -- checkpoints
    # every this many epochs, a grid of the epoch's first prompt groups (rank 0's rollouts, each
    # with its reward and advantage) to runs/<run>/images and the logger; 0 = none
    log_samples_freq: int = Field(0, ge=0)
    save_freq: int = Field(0, ge=0)  # epochs between checkpoints; 0 = only the final one
    # how many of the newest checkpoint-N folders to keep (older ones are deleted after each new
    # one is complete; the final checkpoint is never deleted); None = keep all
    keep_checkpoints: int | None = Field(None, ge=1)
    # continue a run exactly: a checkpoint folder, or "latest" (the newest checkpoint of the
    # run named run_name), or "auto" (as latest when the run has a checkpoint, else a fresh start,
    # and nothing to do when it already finished: for restart policies); see trainer/resume.py
    resume_from: str | None = None

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v):
        # YAML 1.1 (and so `--set train.mixed_precision=no`) reads a bare `no` as false
        return "no" if v is False else v

    @field_validator("crd_old_decay", "crd_sampling_decay", mode="before")
    @classmethod
    def _decay_spec(cls, v):
        if isinstance(v, int) and not isinstance(v, bool):  # Flow-Factory's preset numbers
            v = str(v)
        parse_snapshot_decay(v)  # raises ValueError naming the format
        return v

    @field_validator("resolution")
    @classmethod
    def _positive_resolution(cls, v):
        sizes = (v, v) if isinstance(v, int) else v
        if min(sizes) <= 0:
            raise ValueError("resolution must be positive")
        return v

    @property
    def sampling_guidance_scale(self) -> float:
        """The CFG scale rollouts are sampled with: ``rollout_guidance_scale``, else the policy's."""
        return self.guidance_scale if self.rollout_guidance_scale is None else self.rollout_guidance_scale

    @property
    def uses_reference(self) -> bool:
        """Whether the frozen reference model is evaluated: a KL term (``kl_beta > 0``) or an
        algorithm whose loss is defined against it (``dpo``, ``dgpo``; ``crd`` without its ``old``
        snapshot, ``crd_use_old: false``). A full fine-tune keeps a copy of the base only then."""
        trainer = trainer_kind(self.trainer_type)
        # (train.kl_gate anchors the KL to a copy of the policy, not to the base)
        return ((bool(self.kl_beta) and self.kl_gate is None) or trainer in REFERENCE_TRAINERS
                or (trainer == "crd" and not self.crd_use_old))

    @property
    def reference_guidance_scale(self) -> float:
        """The CFG scale of the KL reference's velocity: ``ref_guidance_scale``, else the policy's."""
        return self.guidance_scale if self.ref_guidance_scale is None else self.ref_guidance_scale

    @property
    def encode_guidance_scale(self) -> float:
        """The largest CFG scale any forward on the training conditioning uses (policy, rollouts,
        KL reference): the trainer encodes negative prompts when it is above 1."""
        return max(self.guidance_scale, self.sampling_guidance_scale, self.reference_guidance_scale)


class EvalConfig(_Strict):
    """``eval:`` — periodic held-out evaluation with the deterministic ODE sampler."""

    resolution: Resolution | None = None  # None = train.resolution
    num_frames: int | None = Field(None, ge=1)  # video models; None = train.num_frames
    num_inference_steps: int = Field(20, ge=1)
    guidance_scale: float | None = None  # None = train.guidance_scale
    eval_freq: int = Field(10, ge=0)  # epochs; 0 = only before and after training
    per_device_batch_size: int = Field(16, gt=0)
    # None = the whole test split; with data.datasets, shared among the evaluated sources (trainer.data.eval_subset)
    num_prompts: int | None = Field(None, gt=0)
    images_per_prompt: int = Field(1, gt=0)  # seeds per prompt (GenEval uses 4)
    seed: int = 0
    # video models: how many of the grid's eval videos are also written as looping GIFs (and logged)
    # at video_fps frames a second (Wan2.1: 16, Wan2.2-TI2V-5B: 24); 0 = none
    num_videos: int = Field(4, ge=0)
    video_fps: float = Field(16.0, gt=0)


class RewardEntry(BaseModel):
    """What names a reward anywhere (experiment ``rewards:``, the reward server's list): the
    reward, its label and, as extra keys, the reward's own options."""

    model_config = ConfigDict(extra="allow")
    name: str | None = None  # label in logs / v2 model name; defaults to reward_model
    reward_model: str  # registry name or dotted path 'package.module.Class'
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @property
    def label(self) -> str:
        return self.name or self.reward_model

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RewardSpec(RewardEntry):
    """One entry of ``rewards:``. Extra keys are that reward's own options."""

    weight: float = 1.0
    batch_size: int = Field(16, gt=0)
    device: str = "auto"
    # the ``data.datasets`` names whose samples this reward scores (None = every sample); the
    # others get no score from it (NaN: it abstains), e.g. a verifier that reads only its own prompts
    datasets: list[str] | None = Field(None, min_length=1)


class Config(_Strict):
    """The whole experiment."""

    project: str = "flowrl"
    run_name: str | None = None  # None -> {model_type}_{trainer_type}_{timestamp}
    output_dir: str = "runs"
    logging_backend: Literal["tensorboard", "wandb", "swanlab", "none"] = "tensorboard"
    transport: Literal["local", "celery"] = "local"
    metrics_port: int | None = Field(None, ge=0, le=65535)  # serve the trainer's Prometheus /metrics
    metrics_host: str = "127.0.0.1"  # interface for metrics_port (loopback unless opened on purpose)
    queue: QueueSettings = Field(default_factory=lambda: _queue_from_environment())  # transport: celery only
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    rewards: list[RewardSpec] = Field(..., min_length=1)
    eval_rewards: list[RewardSpec] | None = None  # None = same as rewards

    def evaluation_rewards(self) -> tuple[str, list[RewardSpec]]:
        """The section evaluation scores with and its rewards: ``eval_rewards``, or ``rewards`` when
        that is not set (or empty)."""
        return ("eval_rewards", self.eval_rewards) if self.eval_rewards else ("rewards", self.rewards)

    def geometry(self, world_size: int) -> "BatchGeometry":
        """The batch geometry on ``world_size`` processes: over ``world_size / train.context_parallel``
        data-parallel ranks (each group of ``context_parallel`` processes runs the same samples)."""
        cp = self.train.context_parallel
        if world_size % cp:
            raise ConfigError(
                f"train.context_parallel={cp} does not divide the {world_size} processes: each sample runs on "
                f"{cp} of them together. Fix: launch a multiple of {cp} processes (--processes; flowrl check: "
                f"--world-size), or lower train.context_parallel.")
        return BatchGeometry.derive(self.train, world_size // cp)


@dataclasses.dataclass(frozen=True)
class BatchGeometry:
    """Batch sizes derived from the config and the world size (W processes).

    Groups never straddle processes: each process owns ``groups_per_rank`` whole groups.
    """

    world_size: int
    group_size: int  # K
    groups_per_epoch: int  # M
    groups_per_rank: int  # M / W
    samples_per_rank: int  # M K / W
    micro_batch: int  # B
    batches_per_rank: int  # M K / (W B) rollout micro-batches per process
    grad_steps_per_inner_epoch: int  # G
    batches_per_grad_step: int  # train_batches_per_rank / G: training micro-batches per optimizer step
    # what is trained: every sample in micro-batches of B, except for dpo: each group's best and
    # worst sample, M / W pairs, B pairs (2 B samples) a micro-batch as Flow-Factory's: min(2 B, 2 M / W);
    # and dgpo and crd: every sample, whole groups a micro-batch, max(1, B // K) of them
    train_samples_per_rank: int = 0
    train_micro_batch: int = 0
    train_batches_per_rank: int = 0

    @classmethod
    def derive(cls, t: TrainConfig, world_size: int) -> "BatchGeometry":
        K, M, B, G, W = (t.group_size, t.unique_sample_num_per_epoch, t.per_device_batch_size,
                         t.gradient_step_per_epoch, world_size)
        if M % W:
            raise ConfigError(
                f"train.unique_sample_num_per_epoch={M} is not divisible by the {W} processes, so "
                f"prompt groups cannot stay whole on one process. Fix: use a multiple of {W}, "
                f"e.g. {((M + W - 1) // W) * W}."
            )
        per_rank = M * K // W
        if per_rank % B:
            raise ConfigError(
                f"train.per_device_batch_size={B} does not divide the {per_rank} samples each of "
                f"the {W} processes rolls out per epoch (unique_sample_num_per_epoch={M} x "
                f"group_size={K} / {W}). Fix: pick a per_device_batch_size that divides {per_rank}."
            )
        batches = per_rank // B
        if trainer_kind(t.trainer_type) == "dpo":
            return cls._dpo(t, W, per_rank, batches)
        if trainer_kind(t.trainer_type) in WHOLE_GROUP_TRAINERS:
            return cls._whole_groups(t, W, per_rank, batches)
        if batches % G:
            raise ConfigError(
                f"train.gradient_step_per_epoch={G} does not divide the {batches} micro-batches per "
                f"process per epoch, so optimizer steps would see unequal data. Fix: choose a "
                f"divisor of {batches}, or change unique_sample_num_per_epoch / per_device_batch_size."
            )
        return cls(W, K, M, M // W, per_rank, B, batches, G, batches // G, per_rank, B, batches)

    @classmethod
    def _dpo(cls, t: TrainConfig, W: int, per_rank: int, batches: int) -> "BatchGeometry":
        """DPO trains one (best, worst) pair per group: ``2 M / W`` samples per process."""
        K, M, B, G = t.group_size, t.unique_sample_num_per_epoch, t.per_device_batch_size, t.gradient_step_per_epoch
        rows = 2 * (M // W)
        b = min(2 * B, rows)
        if rows % b or (rows // b) % G:
            raise ConfigError(
                f"train.trainer_type: dpo trains each group's (best, worst) pair, {M // W} pairs per process per "
                f"epoch (unique_sample_num_per_epoch={M} / {W}), per_device_batch_size={B} pairs a micro-batch: "
                f"{-(-(M // W) // B)} micro-batch(es), which must be whole and a multiple of "
                f"gradient_step_per_epoch={G}. Fix: a per_device_batch_size that divides {M // W} pairs into a "
                f"multiple of {G} parts, or change unique_sample_num_per_epoch / gradient_step_per_epoch.")
        return cls(W, K, M, M // W, per_rank, B, batches, G, rows // b // G, rows, b, rows // b)

    @classmethod
    def _whole_groups(cls, t: TrainConfig, W: int, per_rank: int, batches: int) -> "BatchGeometry":
        """DGPO weighs each group by a sum over its members, CRD centres within each group: a training
        micro-batch holds whole groups, ``max(1, B // K)`` of them."""
        K, M, B, G = t.group_size, t.unique_sample_num_per_epoch, t.per_device_batch_size, t.gradient_step_per_epoch
        groups = max(1, B // K)
        if (M // W) % groups or (M // W // groups) % G:
            raise ConfigError(
                f"train.trainer_type: {t.trainer_type} trains whole groups, max(1, per_device_batch_size={B} // group_size={K}) = "
                f"{groups} a micro-batch, so the {M // W} groups per process must split into a multiple of "
                f"gradient_step_per_epoch={G} micro-batches. Fix: a per_device_batch_size that is a multiple of "
                f"{K} dividing the groups evenly, or change unique_sample_num_per_epoch / gradient_step_per_epoch.")
        n = M // W // groups
        return cls(W, K, M, M // W, per_rank, B, batches, G, n // G, per_rank, groups * K, n)


# --------------------------------------------------------------------------- loading


def _fill_algorithm_defaults(cfg: Config) -> Config:
    t = cfg.train
    defaults = ALGORITHM_DEFAULTS.get(trainer_kind(t.trainer_type), ALGORITHM_DEFAULTS["grpo"])
    for key, value in defaults.items():
        if getattr(t, key) is None:
            setattr(t, key, value)
    if t.noise_level is None:
        t.noise_level = NOISE_LEVEL_DEFAULTS[t.dynamics_type]
    # keys that only some algorithms use still need a concrete value
    for key, value in dict(clip_range=1e-4, ema_kl_beta=0.0, time_sampling_strategy="discrete",
                           timestep_fraction=0.99, ema_decay_schedule="power",
                           ema_update_interval=1, ema_warmup_steps=10).items():
        if getattr(t, key) is None:
            setattr(t, key, value)
    if cfg.eval.resolution is None:
        cfg.eval.resolution = t.resolution
    if cfg.eval.num_frames is None:
        cfg.eval.num_frames = t.num_frames
    if cfg.eval.guidance_scale is None:
        cfg.eval.guidance_scale = t.guidance_scale
    return cfg


def check_combinations(cfg: Config) -> None:
    """Reject settings that cannot work together, before any model is loaded."""
    t = cfg.train
    kind = trainer_kind(t.trainer_type)  # a user's subclass of a built-in: that built-in's checks
    if kind not in TRAINER_TYPES and "." not in kind:
        hint = difflib.get_close_matches(kind, TRAINER_TYPES, n=1)
        raise ConfigError(
            f"train.trainer_type: '{t.trainer_type}' is not a known algorithm."
            + (f" Did you mean '{hint[0]}'?" if hint else "")
            + f" Fix: use one of {', '.join(TRAINER_TYPES)}, or a dotted path to your own class."
        )
    if kind in SDE_TRAINERS and (t.dynamics_type == "ODE" or t.noise_level == 0):
        raise ConfigError(
            f"train.dynamics_type: '{t.dynamics_type}' (noise_level={t.noise_level}) has no "
            f"per-step log-probabilities, but train.trainer_type: '{t.trainer_type}' optimizes "
            f"exactly those. Fix: set train.dynamics_type to Flow-SDE (Flow-GRPO), Dance-SDE or "
            f"CPS with noise_level > 0, or use trainer_type nft or awm, which learn from ODE rollouts."
        )
    if (kind in SDE_TRAINERS and t.rollout_guidance_scale is not None
            and t.rollout_guidance_scale != t.guidance_scale):
        raise ConfigError(
            f"train.rollout_guidance_scale: {t.rollout_guidance_scale} differs from "
            f"train.guidance_scale: {t.guidance_scale}, but train.trainer_type: '{t.trainer_type}' "
            f"replays the rollout's own log-probabilities, which exist only for the policy that "
            f"sampled them. Fix: leave rollout_guidance_scale unset, or use trainer_type nft or awm, "
            f"which learn from any sampler's images."
        )
    if t.ref_guidance_scale is not None and t.ref_guidance_scale != t.guidance_scale and not t.kl_beta:
        raise ConfigError(
            f"train.ref_guidance_scale: {t.ref_guidance_scale} sets the CFG scale of the KL reference, "
            f"but train.kl_beta is {t.kl_beta!r}, so no reference is evaluated and it would do nothing. "
            f"Fix: set train.kl_beta > 0 (e.g. 0.1), or leave ref_guidance_scale unset.")
    own = [s.name for s in cfg.data.datasets or [] if s.eval is not None
           and any(getattr(s.eval, k) is not None for k in ("resolution", "num_inference_steps", "guidance_scale"))]
    if own and t.fsdp:
        raise ConfigError(
            f"data.datasets {own}: eval settings of their own (resolution / num_inference_steps / guidance_scale), "
            f"but train.fsdp runs every process's evaluation forwards in lockstep, one setting for all. Fix: move "
            f"them to the eval: section, or train without fsdp.")
    if t.optimizer == "muon" and t.fsdp:
        raise ConfigError(
            "train.optimizer: muon orthogonalizes each whole weight matrix, but train.fsdp shards them over the "
            "processes. Fix: use optimizer: adamw with fsdp, or train without fsdp (LoRA fits one GPU).")
    if kind == "grpo-guard" and t.dynamics_type != "Flow-SDE":
        raise ConfigError(
            f"train.dynamics_type: '{t.dynamics_type}' cannot be used with train.trainer_type: "
            f"'grpo-guard': its ratio normalization and 1/dt reweighting are derived for Flow-SDE's "
            f"noise schedule sigma_t = a*sqrt(t/(1-t)). Fix: set train.dynamics_type: Flow-SDE, or "
            f"use trainer_type: grpo for {t.dynamics_type}."
        )
    if t.dynamics_type == "CPS" and t.noise_level > 1:
        raise ConfigError(
            f"train.noise_level: {t.noise_level} is out of range for CPS, whose injected std is "
            f"sigma_next*sin(noise_level*pi/2). Fix: use a value in [0, 1]; 0.8 is the recommended one."
        )
    if kind in SDE_TRAINERS and t.num_inference_steps < 2:
        raise ConfigError(
            f"train.num_inference_steps: {t.num_inference_steps} leaves no trainable step (the last "
            f"denoising step is never trained). Fix: use at least 2; Flow-GRPO uses 10."
        )
    n = t.num_inference_steps
    for i in t.train_steps or []:
        if not 0 <= i < n - 1:
            raise ConfigError(
                f"train.train_steps: step index {i} is outside [0, {n - 2}] for "
                f"num_inference_steps={n} (the last step is never trained). Fix: list indices "
                f"from 0 (noisiest) to {n - 2}."
            )
    if t.noise_aware_weighting and (kind != "grpo" or t.dynamics_type == "ODE" or t.noise_level == 0):
        guard = (" GRPO-Guard already reweights each step (its loss over |dt|)." if kind == "grpo-guard"
                 else "")
        raise ConfigError(
            f"train.noise_aware_weighting weighs GRPO's per-step policy terms by each SDE step's noise, but "
            f"this run is trainer_type={t.trainer_type!r} with dynamics {t.dynamics_type!r}, noise_level "
            f"{t.noise_level}.{guard} Fix: use it with grpo and a stochastic dynamics (Flow-SDE, Dance-SDE, "
            f"CPS) with noise_level > 0, or drop it.")
    if t.ode_tail is not None and (kind not in SDE_TRAINERS or t.noise_aware_weighting):
        why = ("train.noise_aware_weighting normalizes each step's weight over the whole grid, which the cut "
               "tail would change" if t.noise_aware_weighting else
               f"train.trainer_type: '{t.trainer_type}' does not train on SDE steps, so there is no last one "
               f"to end at")
        raise ConfigError(
            f"train.ode_tail runs the steps after a rollout's last SDE step on a coarser grid, but {why}. Fix: "
            f"drop ode_tail, or use it with grpo / grpo-guard / dppo"
            + (" without noise_aware_weighting." if t.noise_aware_weighting else "."))
    if t.shared_initial_noise and t.dynamics_type == "ODE":
        raise ConfigError(
            "train.shared_initial_noise starts every member of a group from the same noise, but "
            "train.dynamics_type is ODE: the members would be identical images, with no reward "
            "difference to learn from. Fix: drop shared_initial_noise, or use an SDE dynamics with grpo.")
    if t.sde_window is not None:
        w = t.sde_window
        if t.train_steps is not None or t.num_train_steps is not None:
            raise ConfigError(
                "train.sde_window moves MixGRPO's window of SDE steps over the run, but train.train_steps / "
                "train.num_train_steps also choose them. Fix: drop train_steps and num_train_steps, or "
                "sde_window.")
        if t.dynamics_type == "ODE":
            raise ConfigError(
                "train.sde_window chooses which steps are stochastic, but train.dynamics_type is ODE (no "
                "stochastic step). Fix: drop sde_window, or use Flow-SDE / Dance-SDE / CPS with grpo.")
        if w.size > n - 2:
            raise ConfigError(
                f"train.sde_window.size: {w.size} does not fit num_inference_steps={n}: MixGRPO's window "
                f"stays within the first {n - 2} steps. Fix: a size of at most {n - 2}, or more steps.")
    if t.ema_kl_beta and not t.ema_decay:
        raise ConfigError(
            f"train.ema_kl_beta: {t.ema_kl_beta} pulls the policy toward its EMA, but "
            f"train.ema_decay is 0 (EMA disabled). Fix: set ema_decay > 0 or ema_kl_beta: 0."
        )
    if kind == "crd" and t.crd_reward_adaptive_kl and 0 < t.kl_beta < 1e-4:
        raise ConfigError(
            f"train.kl_beta: {t.kl_beta} is below 1e-4, where crd_reward_adaptive_kl's per-sample weights "
            f"1e-4 / kl_beta + (1 - 1e-4 / kl_beta) a invert (the lowest-reward samples weigh the most). Fix: "
            f"kl_beta >= 1e-4 (Flow-Factory's crd uses 0.1), or crd_reward_adaptive_kl: false.")
    if kind == "crd" and (t.off_policy or t.sample_from_ema_after is not None):
        raise ConfigError(
            f"train.trainer_type: crd samples from its own sampling snapshot (train.crd_sampling_decay), so "
            f"train.off_policy: {t.off_policy} / sample_from_ema_after: {t.sample_from_ema_after} would be ignored. "
            f"Fix: leave both unset and shape the sampling model with crd_sampling_decay (e.g. 'none' samples "
            f"on-policy, '75-0.0-0.0075-0.999' moves to a slow average after 75 steps).")
    if t.sample_from_ema_after is not None and not t.ema_decay:
        raise ConfigError(
            f"train.sample_from_ema_after: {t.sample_from_ema_after} samples from the EMA model after that many "
            f"optimizer steps, but train.ema_decay is 0 (EMA disabled). Fix: set ema_decay > 0, or "
            f"sample_from_ema_after: null.")
    if t.off_policy and not t.ema_decay:
        raise ConfigError(
            "train.off_policy: true samples from the EMA model, but train.ema_decay is 0 (EMA "
            "disabled). Fix: set ema_decay > 0, or off_policy: false."
        )
    if t.ptx_coef and not t.ptx_dataset:
        raise ConfigError(
            f"train.ptx_coef: {t.ptx_coef} mixes a pretraining-data loss into training, but "
            f"train.ptx_dataset is not set. Fix: point train.ptx_dataset at a folder whose train.jsonl "
            f'has {{"prompt": ..., "image": ...}} rows (images under its images/), or set ptx_coef: 0.'
        )
    if t.lr_schedule_clock == "budget" and t.max_train_seconds is None:
        raise ConfigError(
            "train.lr_schedule_clock: budget runs the learning-rate schedule over the wall-clock "
            "budget, but train.max_train_seconds is not set. Fix: set train.max_train_seconds, or "
            "lr_schedule_clock: steps."
        )
    if cfg.model.init_from is not None and not Path(cfg.model.init_from).expanduser().exists():
        raise ConfigError(
            f"model.init_from: {cfg.model.init_from!r} does not exist (it is read before training starts, "
            f"by the trainer and, for a LoRA run, by every sampler). Fix: point it at a flowrl checkpoint "
            f"folder, a pytorch_lora_weights.safetensors (or its folder), or a transformer folder.")
    if isinstance(t.clip_range, tuple) and min(t.clip_range) < 0:
        lo, hi = t.clip_range
        raise ConfigError(
            f"train.clip_range: {list(t.clip_range)} has a negative entry; here both entries are distances "
            f"from the centre (ratio kept in [1 - lo, 1 + hi]), where Flow-Factory writes signed offsets. "
            f"Fix: write [{abs(lo):g}, {abs(hi):g}] (or `flowrl convert` the Flow-Factory config).")
    check_datasets(cfg)
    check_model_type(cfg)
    check_reward_options(cfg)
    labels = [r.label for r in cfg.rewards]
    if len(set(labels)) != len(labels):
        raise ConfigError(
            f"rewards: names {labels} repeat; each reward needs a unique name for logging and "
            f"weighting. Fix: give duplicates a distinct `name:`."
        )
    if t.diversity_shaping is not None:
        if t.diversity_shaping not in labels:
            raise ConfigError(
                f"train.diversity_shaping: {t.diversity_shaping!r} is not the name of a reward in rewards "
                f"({labels}). Fix: add one, e.g. {{name: diversity, reward_model: diversity, reduce: min}}, "
                f"and give its name.")
        if len(labels) < 2:
            raise ConfigError(
                f"train.diversity_shaping: {t.diversity_shaping!r} is the only reward; it scales the advantages "
                f"the other rewards give and adds nothing itself. Fix: add the reward to train on.")
    if t.kl_gate is not None:
        check_kl_gate(t, labels, {r.label: r.weight for r in cfg.rewards})
    if t.skip_zero_advantage and kind not in SDE_TRAINERS:
        raise ConfigError(
            f"train.skip_zero_advantage: {t.trainer_type} learns from every sample (a zero advantage still sets "
            f"its target), so none can be skipped; only the policy-gradient trainers ({', '.join(SDE_TRAINERS)}) "
            f"get nothing from them. Fix: remove train.skip_zero_advantage.")
    if not t.advantage_std and t.advantage_aggregation != "sum":
        raise ConfigError(
            "train.advantage_std: false leaves group-centred rewards undivided, which needs "
            "train.advantage_aggregation: sum (gdpo's per-reward z-scores are its definition). Fix: set "
            "advantage_aggregation: sum, or keep advantage_std: true.")


def kl_gate_proxy(t: TrainConfig, labels: list[str], weights: dict[str, float]) -> str | None:
    """The reward ``train.kl_gate`` gates by: its ``reward``, else the first reward with a nonzero
    weight that is not ``diversity_shaping``'s (None: there is none)."""
    return t.kl_gate.reward or next((k for k in labels if weights[k] and k != t.diversity_shaping), None)


def check_kl_gate(t: TrainConfig, labels: list[str], weights: dict[str, float]) -> None:
    """``train.kl_gate`` names rewards of this run, and there is a KL term to gate (grpo, kl_beta > 0)."""
    g = t.kl_gate
    if trainer_kind(t.trainer_type) != "grpo" or not t.kl_beta:
        raise ConfigError(
            f"train.kl_gate gates GRPO's KL term, but this run is trainer_type={t.trainer_type!r} with kl_beta "
            f"{t.kl_beta!r}. Fix: use trainer_type: grpo with kl_beta > 0 (GARDO: 0.04), or drop kl_gate.")
    proxy = kl_gate_proxy(t, labels, weights)
    if proxy is None:
        raise ConfigError("train.kl_gate: no reward has a nonzero weight to be the proxy reward. Fix: give the "
                          "reward you train on a weight, or name it in kl_gate.reward.")
    if g.adaptive and not 0.02 <= g.fraction <= 0.2:
        raise ConfigError(
            f"train.kl_gate.fraction: {g.fraction} is outside [0.02, 0.2], where the adaptive fraction stays "
            f"(GARDO's RiskCompensator). Fix: a fraction in that range (GARDO: 0.1), or adaptive: false.")
    unknown = [n for n in [proxy, *g.auxiliary] if n not in labels]
    if unknown:
        raise ConfigError(
            f"train.kl_gate names {unknown}, which are not rewards of this run ({labels}). Fix: add them to "
            f"rewards (auxiliary ones with weight: 0, scored but not trained on; GARDO uses aesthetic and "
            f"imagereward), or name existing ones.")
    if proxy in g.auxiliary or len(set(g.auxiliary)) != len(g.auxiliary):
        raise ConfigError(
            f"train.kl_gate: the proxy reward {proxy!r} and the auxiliary ones {g.auxiliary} must be distinct "
            f"rewards: the gate is how far the proxy's ranking of a sample strays from theirs. Fix: name others.")


def check_model_type(cfg: Config) -> None:
    """``model.model_type`` is a registered family or a dotted path to a ``FlowModelAdapter`` subclass
    (a dotted path that does not import here is left to the process that loads the model, as for
    rewards), and what its class can check of ``model:`` without loading (``check_config``: the path
    given, the option names) and ``model.attn_backend``'s name hold."""
    from shared.models import MODELS  # lazy: imports torch
    from shared.registry import RegistryError

    name = cfg.model.model_type
    try:
        cls = MODELS.get(name)
    except RegistryError as e:
        if "." in name and isinstance(e.__cause__, ImportError):
            return
        fix = "" if "Fix:" in str(e) else " Fix: correct the name (`flowrl list models`)."
        raise ConfigError(f"model.model_type: {e}{fix}") from None
    # what the model's loading would refuse, said now (flowrl check passed a missing model_name_or_path, an
    # unknown model.options key or attn_backend name, and the run stopped with a traceback after start-up)
    try:
        cls.check_config(cfg.model)
        if cfg.model.attn_backend is not None:
            from shared.models.attention import check_backend_name

            check_backend_name(cfg.model.attn_backend, masked=name if cls.attention_mask else None)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None


def check_reward_options(cfg: Config) -> None:
    """Every ``rewards`` / ``eval_rewards`` entry names a known reward and gives it options its
    class takes, checked at load instead of after the model has loaded. A dotted path that does
    not import here is left to where it runs (a reward worker may have packages the trainer's
    machine lacks); a registered name always resolves."""
    from shared.registry import RegistryError  # lazy: reward classes import torch
    from shared.rewards import REWARDS, RewardModel
    from shared.rewards.base import option_problems

    entry_keys = sorted(RewardSpec.model_fields)
    for where, specs in (("rewards", cfg.rewards), ("eval_rewards", cfg.eval_rewards or [])):
        for i, spec in enumerate(specs):
            name = spec.reward_model
            try:
                cls = REWARDS.get(name)
            except RegistryError as e:
                if name not in REWARDS and "." in name:
                    continue
                raise ConfigError(f"{where}[{i}].reward_model: {e} Fix: correct the name.") from None
            if not (isinstance(cls, type) and issubclass(cls, RewardModel)):
                continue  # build_reward says what a reward class must be
            kind = cls.declared("kind", spec.options)  # a `remote` reward's kind option included
            if where == "eval_rewards" and kind != "pointwise" and cfg.eval.images_per_prompt < 2:
                raise ConfigError(
                    f"eval_rewards[{i}] ('{spec.label}') is {kind}: it compares the images of one prompt, "
                    f"and eval.images_per_prompt is {cfg.eval.images_per_prompt}, so it has nothing to compare. "
                    f"Fix: set eval.images_per_prompt to 2 or more (GenEval uses 4), or evaluate with a "
                    f"pointwise reward.")
            problems = option_problems(cls, spec.options, entry_keys)
            if problems:
                raise ConfigError(
                    f"{where}[{i}] ('{spec.label}', {cls.__name__}): {'; '.join(problems)}. An entry takes "
                    f"{', '.join(entry_keys)} and the reward's own options: "
                    f"{', '.join(o for o in cls.accepted_options() if o not in ('device', 'dtype')) or 'none'}. "
                    f"Fix: " + ("add the missing option; " if any(p.startswith("missing") for p in problems) else "")
                    + "correct or remove an unknown key.")


def check_datasets(cfg: Config) -> None:
    """``data.datasets`` replaces the single-folder keys, names its sources uniquely, trains on at
    least one, and every ``rewards[].datasets`` name is one of them."""
    d = cfg.data
    names = [s.name for s in d.datasets or []]
    if d.datasets is not None:
        single = sorted(d.model_fields_set & {"dataset_dir", "image_dir", "video_dir", "max_dataset_size"})
        if single:
            raise ConfigError(
                f"data: {', '.join('data.' + k for k in single)} and data.datasets are both set; a config "
                f"takes one folder or a list of sources. Fix: move the folder into data.datasets as "
                f"{{name: ..., dataset_dir: ...}}, or drop data.datasets.")
        if len(set(names)) != len(names):
            raise ConfigError(f"data.datasets: names {names} repeat; metrics and rewards[].datasets tell the "
                              f"sources apart by name. Fix: give each source a distinct name.")
        if not any(s.train is not None for s in d.datasets):
            raise ConfigError("data.datasets: every source has train: null, so there is nothing to train on. "
                              "Fix: give at least one source a train: {weight: 1} (or leave train out).")
    for where, specs in (("rewards", cfg.rewards), ("eval_rewards", cfg.eval_rewards or [])):
        for spec in specs:
            unknown = [n for n in spec.datasets or [] if n not in names]
            if unknown:
                raise ConfigError(
                    f"{where}['{spec.label}'].datasets: {unknown} "
                    + (f"are not among data.datasets' names {names}" if names else
                       "name sources, but data has no datasets list")
                    + ". Fix: list names of data.datasets entries, or drop the reward's datasets key.")
    if d.datasets is None:
        return
    # a source trained on needs a reward that scores it (else its advantages are all 0), and a reward
    # routed to a source must be able to score it: rewards on a trained source (or an evaluated one
    # when they also evaluate, eval_rewards unset), eval_rewards on an evaluated one (as Flow-Factory)
    def on(*sides: str) -> list[str]:
        return [s.name for s in d.datasets if any(getattr(s, side) is not None for side in sides)]

    for where, specs, sides in (("rewards", cfg.rewards, ("train",) if cfg.eval_rewards is not None else
                                 ("train", "eval")), ("eval_rewards", cfg.eval_rewards or [], ("eval",))):
        usable = on(*sides)
        for spec in specs:
            off = [n for n in spec.datasets or [] if n not in usable]
            if off:
                raise ConfigError(
                    f"{where}['{spec.label}'].datasets: {off} have {' and '.join(f'{x}: null' for x in sides)} in "
                    f"data.datasets, so this reward never scores them. Fix: route it to sources it scores "
                    f"({usable}), or give those sources a {sides[0]}: block.")
    trained = on("train")
    bare = [n for n in trained if not any(spec.datasets is None or n in spec.datasets for spec in cfg.rewards)]
    if bare:  # (an evaluated source without a reward is only reported without scores)
        raise ConfigError(
            f"data.datasets: {bare} are trained on, but no reward in rewards scores them (each lists other "
            f"sources in its datasets), so their samples would train on an advantage of 0. Fix: add them to a "
            f"reward's datasets, or add a reward without datasets.")


#: pydantic's names of the branches of a union in an error's location (``bool``, ``literal[...]``,
#: ``function-after[...]``, a model class name): not config keys
_BRANCH_TAG = re.compile(r"^(bool|int|float|str|none|list\[.*|dict\[.*|tuple\[.*|literal\[.*|function-\w+\[.*|[A-Z]\w*)$")
#: errors of a union's scalar branches, beside the real one when the input is a mapping
_SCALAR_BRANCH_ERRORS = ("bool_type", "bool_parsing", "literal_error", "int_type", "int_parsing", "float_type",
                         "float_parsing", "string_type")


def _queue_from_environment() -> QueueSettings:
    """``queue:`` when the YAML has none: the environment's FLOWRL_QUEUE_* over the defaults; a bad
    variable is a config error naming it (it was reported as the YAML's key ``broker_url``)."""
    from shared.queue import QueueEnvironmentError, from_environment

    try:
        return from_environment()
    except QueueEnvironmentError as e:
        raise ConfigError(str(e)) from None


def _format_validation_error(err: ValidationError, raw: dict) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        if any(_BRANCH_TAG.match(p) for p in loc):
            if e["type"] in _SCALAR_BRANCH_ERRORS and isinstance(e.get("input"), dict):
                continue  # the mapping was meant for the union's model branch, whose errors follow
            loc = [p for p in loc if not _BRANCH_TAG.match(p)]
        key = ".".join(loc)
        if e["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            valid = sorted(parent.model_fields) if parent else []
            hint = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
            where = ".".join(loc[:-1]) or "top level"
            from shared.flow_factory import hint as flow_factory_hint

            ff = flow_factory_hint(".".join(p for p in loc if not p.isdigit()))
            if ff:
                lines.append(f"unknown config key `{key}`: {ff}.")
                continue
            lines.append(
                f"unknown config key `{key}`."
                + (f" Did you mean `{'.'.join(loc[:-1] + [hint[0]])}`?" if hint else "")
                + f" Fix: rename or remove it (valid keys in {where}: {', '.join(valid)})."
            )
        elif e["type"] == "missing":
            lines.append(f"config key `{key}` is required but missing. Fix: add it.")
        else:
            got, msg = e.get("input"), e["msg"]
            msg = msg[:1].lower() + msg[1:]  # (only the first letter: the allowed values keep their case)
            from_env = environment_problem(loc[1], e["msg"], raw.get("queue") or {}) \
                if len(loc) == 2 and loc[0] == "queue" else None
            if from_env:  # the environment filled it in, not the YAML
                lines.append(from_env)
                continue
            lines.append(
                f"config key `{key}`: got {got!r} ({type(got).__name__}); {msg}. "
                f"Fix: set `{key}` to a valid value."
            )
    return "\n".join(lines)


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        for c in candidates:
            for sub in [c, *getattr(c, "__args__", ())]:
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    model = sub
                    break
            else:
                continue
            break
        else:
            return None
    return model


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads numbers as YAML 1.2 does: ``1e-4`` (no dot) is a float (plain PyYAML returns
    the string '1e-4', which would reach ``dict[str, Any]`` options untyped), and an integer is decimal
    unless written ``0o...`` / ``0x...`` (YAML 1.1 read ``0123`` as octal 83 and ``1:30`` as 90)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))
_INT_12 = re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7][0-7_]*|0x[0-9a-fA-F][0-9a-fA-F_]*)$")  # (digit separators as YAML 1.1 had them)
for _first, _resolvers in list(_YamlLoader.yaml_implicit_resolvers.items()):  # (the class's own copy)
    _YamlLoader.yaml_implicit_resolvers[_first] = [(t, r) for t, r in _resolvers if t != "tag:yaml.org,2002:int"]
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:int", _INT_12, list("-+0123456789"))


def _yaml_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    return int(text, 0) if text[:2] in ("0o", "0x") else int(text, 10)


_YamlLoader.add_constructor("tag:yaml.org,2002:int", _yaml_int)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 (a SafeLoader subclass)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"--set {item!r}: expected key=value, e.g. --set train.learning_rate=1e-4."
            )
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for depth, p in enumerate(parts):
            if isinstance(node, list):
                if not (p.isdigit() and int(p) < len(node)):
                    raise ConfigError(f"--set {key}: `{p}` is not an index of that {len(node)}-item "
                                      f"list. Fix: use 0 to {len(node) - 1}.")
            elif not isinstance(node, dict):
                raise ConfigError(f"--set {key}: `{'.'.join(parts[:depth])}` is a value, not a section.")
            if depth == len(parts) - 1:
                break
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        try:
            parsed = _yaml_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e}).") from None
        node[int(parts[-1]) if isinstance(node, list) else parts[-1]] = parsed
    return raw


def parse_config(raw: dict) -> Config:
    """Validate a raw dict into a :class:`Config` with defaults filled and combinations checked."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"the config must be a YAML mapping of sections (model, data, train, eval, rewards), "
            f"got {type(raw).__name__}."
        )
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, raw)) from None
    _check_unread(cfg)  # before the defaults: only what the user wrote
    cfg = _fill_algorithm_defaults(cfg)
    check_combinations(cfg)
    return cfg


def unread_train_keys(trainer_type: str) -> set[str]:
    """The ``train:`` keys ``trainer_type`` never reads (a resume ignores a difference in them: a run
    written before :func:`_check_unread` may hold any value there)."""
    kind = trainer_kind(trainer_type)
    out = {"timestep_fraction", "time_sampling_strategy", "time_shift", "num_train_timesteps"} \
        if kind in SDE_TRAINERS else set()
    return out | ({"ema_kl_beta"} if kind != "awm" and "." not in kind else set())


def _check_unread(cfg: Config) -> None:
    """Keys the user set that the chosen algorithm never reads: an error naming the key that does
    the job, instead of a run that silently trains otherwise."""
    t = cfg.train
    unread, given = unread_train_keys(t.trainer_type), t.model_fields_set
    # (num_train_timesteps is let pass: no peer's GRPO has it, and a protocol shared by every algorithm,
    # bench/toy_cfgfree.set, sets it for the ones that read it; the values a loaded config is filled with
    # pass: a config written back out, as checkpoints and tools do, must load again)
    filled = {"timestep_fraction": 0.99, "time_sampling_strategy": "discrete", "time_shift": 1.0}
    keys = [k for k, v in filled.items() if k in unread and k in given and getattr(t, k) not in (None, v)]
    if keys:
        n = t.num_inference_steps
        hint = (f" (flow_grpo's timestep_fraction {t.timestep_fraction} of {n} steps is "
                f"train.num_train_steps: {max(1, int(n * t.timestep_fraction))})"
                if t.timestep_fraction is not None else "")
        raise ConfigError(
            f"train.{', train.'.join(keys)}: these choose the training timesteps of the trainers that "
            f"re-noise clean images (nft, awm, dpo, dgpo, crd); trainer_type '{t.trainer_type}' trains the "
            f"rollout's own SDE steps and would ignore them. Fix: choose those steps with "
            f"train.num_train_steps or train.train_steps{hint}, and drop {', '.join(keys)}.")
    if t.ema_kl_beta and "ema_kl_beta" in unread:
        raise ConfigError(
            f"train.ema_kl_beta: {t.ema_kl_beta} pulls the policy toward its EMA in AWM's loss only; "
            f"trainer_type '{t.trainer_type}' would ignore it. Fix: drop ema_kl_beta, or use trainer_type awm "
            f"(kl_beta anchors every trainer to the frozen reference).")


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML file, apply ``--set`` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist. Fix: check the path.")
    try:
        raw = _yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    return parse_config(apply_overrides(raw, overrides or []))
