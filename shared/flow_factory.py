"""Flow-Factory configs, read as flowrl configs (``flowrl convert FF.yaml``).

A Flow-Factory YAML (``../shared/reference/flow-factory.md`` section 2) differs from ours in its
layout (``scheduler:`` and ``log:`` sections, launcher keys at the top), in some names
(``sde_steps`` is our ``train_steps``, ``enable_gradient_checkpointing`` our
``model.gradient_checkpointing``), in units (its EMA counts outer epochs, ours optimizer steps),
in sign conventions (its clip ranges are signed offsets, its ``time_shift`` warps the denoising
fraction) and in defaults (it trains in bf16 with EMA on unless told otherwise). :func:`convert`
rewrites one into ours and says, per key, what it changed, dropped or could not carry over;
:func:`hint` tells the config loader what a Flow-Factory key left in a flowrl config is called
here. Pure dictionaries in, dictionaries out: no torch, nothing loaded.
"""

from __future__ import annotations

from typing import Any, Callable

SECTIONS = ("data", "model", "scheduler", "train", "eval", "log")

#: Flow-Factory key -> our key, same meaning and values
MOVED: dict[str, str] = {
    "mixed_precision": "train.mixed_precision",
    "data.dataset_dir": "data.dataset_dir",
    "data.image_dir": "data.image_dir",
    "data.video_dir": "data.video_dir",
    "data.max_dataset_size": "data.max_dataset_size",
    "data.cache_dir": "model.embedding_cache_dir",
    "model.model_name_or_path": "model.model_name_or_path",
    "model.model_type": "model.model_type",
    "model.finetune_type": "model.finetune_type",
    "model.master_weight_dtype": "model.master_weight_dtype",
    "model.target_modules": "model.target_modules",
    "model.lora_rank": "model.lora_rank",
    "model.lora_alpha": "model.lora_alpha",
    "model.attn_backend": "model.attn_backend",
    "model.resume_path": "model.init_from",
    "scheduler.dynamics_type": "train.dynamics_type",
    "scheduler.noise_level": "train.noise_level",
    "scheduler.sde_steps": "train.train_steps",
    "train.trainer_type": "train.trainer_type",
    "train.max_epochs": "train.max_epochs",
    "train.per_device_batch_size": "train.per_device_batch_size",
    "train.group_size": "train.group_size",
    "train.unique_sample_num_per_epoch": "train.unique_sample_num_per_epoch",
    "train.gradient_step_per_epoch": "train.gradient_step_per_epoch",
    "train.num_inner_epochs": "train.num_inner_epochs",
    "train.max_grad_norm": "train.max_grad_norm",
    "train.num_inference_steps": "train.num_inference_steps",
    "train.guidance_scale": "train.guidance_scale",
    "train.seed": "train.seed",
    "train.learning_rate": "train.learning_rate",
    "train.adam_weight_decay": "train.adam_weight_decay",
    "train.adam_betas": "train.adam_betas",
    "train.adam_epsilon": "train.adam_epsilon",
    "train.enable_gradient_checkpointing": "model.gradient_checkpointing",
    "train.offload_samples_to_cpu": "train.offload_samples_to_cpu",
    "train.ema_decay": "train.ema_decay",
    "train.ema_decay_schedule": "train.ema_decay_schedule",
    "train.initial_decay": "train.initial_decay",
    "train.num_frames": "train.num_frames",
    "train.global_std": "train.global_std",
    "train.advantage_aggregation": "train.advantage_aggregation",
    "train.kl_beta": "train.kl_beta",
    "train.kl_type": "train.kl_type",
    "train.nft_beta": "train.nft_beta",
    "train.off_policy": "train.off_policy",
    "train.time_sampling_strategy": "train.time_sampling_strategy",
    "train.awm_weighting": "train.awm_weighting",
    "train.ghuber_power": "train.ghuber_power",
    "train.ema_kl_beta": "train.ema_kl_beta",
    "eval.resolution": "eval.resolution",
    "eval.per_device_batch_size": "eval.per_device_batch_size",
    "eval.guidance_scale": "eval.guidance_scale",
    "eval.num_inference_steps": "eval.num_inference_steps",
    "eval.eval_freq": "eval.eval_freq",
    "eval.num_frames": "eval.num_frames",
    "log.run_name": "run_name",
    "log.project": "project",
    "log.logging_backend": "logging_backend",
    "log.save_dir": "output_dir",
    "log.save_freq": "train.save_freq",
}

#: Flow-Factory keys that are converted with a change of value, and where they go
CHANGED: dict[str, str] = {
    "scheduler.num_sde_steps": "train.num_train_steps",
    "train.resolution": "train.resolution",
    "train.height": "train.resolution",
    "train.width": "train.resolution",
    "eval.height": "eval.resolution",
    "eval.width": "eval.resolution",
    "eval.seed": "eval.seed",
    "train.gradient_accumulation_steps": "train.gradient_step_per_epoch",
    "train.ema_update_interval": "train.ema_update_interval",
    "train.warmup_steps": "train.ema_warmup_steps",
    "train.flat_steps": "train.flat_steps",
    "train.total_steps": "train.total_steps",
    "train.ramp_rate": "train.ramp_rate",
    "train.ema_device": "train.ema_device",
    "train.ref_param_device": "train.ref_param_device",
    "train.latent_storage_dtype": "train.rollout_state_dtype",
    "train.clip_range": "train.clip_range",
    "train.adv_clip_range": "train.adv_clip_range",
    "train.time_shift": "train.time_shift",
    "train.timestep_range": "train.timestep_fraction",
    "train.num_train_timesteps": "train.num_train_timesteps",
    "data.enable_preprocess": "model.offload_text_encoders",
}

#: Flow-Factory keys with no key here, and what does their job instead
DROPPED: dict[str, str] = {
    "launcher": "flowrl launches its own processes: `flowrl train CONFIG --processes N`",
    "config_file": "no accelerate / DeepSpeed file: sharding is `train.fsdp` (FSDP2), DeepSpeed is not used",
    "num_processes": "the process count is the launch's: `flowrl train CONFIG --processes N`",
    "main_process_port": "`--processes` picks a free port (or MASTER_PORT from the environment)",
    "num_machines": "several machines: one `accelerate launch` per machine, by hand (README)",
    "machine_rank": "several machines: one `accelerate launch` per machine, by hand (README)",
    "main_process_ip": "several machines: one `accelerate launch` per machine, by hand (README)",
    "data.audio_dir": "no audio models here",
    "data.preprocessing_batch_size": "prompts are encoded once and cached (model.embedding_cache_mb / _dir)",
    "data.dataloader_num_workers": "prompts are read once; there is no data loader to parallelize",
    "data.force_reprocess": "the embedding cache is fingerprinted by model and settings: it is never stale",
    "data.preprocess_parallelism": "each process encodes its own prompts into the shared cache",
    "data.sampler_type": "groups are placed by the batch geometry (`flowrl check` prints it)",
    "model.resume_type": "model.init_from tells a LoRA from full weights by its files",
    "model.target_components": "LoRA goes on every transformer of the model (both Wan2.2 experts)",
    "scheduler.seed": "Flow-Factory overwrites it every epoch; rollout seeds derive from train.seed",
    "log.save_model_only": "checkpoints hold everything needed to resume, the LoRA in diffusers' format",
    "log.verbose": "progress bars and logs are always on (rank 0)",
}

#: what Flow-Factory uses when a key is absent, where that is not our default
FF_DEFAULTS: dict[str, Any] = {
    "mixed_precision": "bf16",
    "model.model_name_or_path": "black-forest-labs/FLUX.1-dev",
    "model.model_type": "flux1",
    "model.finetune_type": "full",
    "model.master_weight_dtype": "bfloat16",
    "model.target_modules": "all",
    "scheduler.dynamics_type": "Flow-SDE",
    "scheduler.noise_level": 0.7,
    "scheduler.num_sde_steps": 1,
    "train.per_device_batch_size": 1,
    "train.gradient_step_per_epoch": 2,
    "train.learning_rate": 1e-5,
    "train.guidance_scale": 3.5,
    "train.ema_decay": 0.995,
    "train.ema_update_interval": 10,
    "train.ema_decay_schedule": "power",
    "train.warmup_steps": 10,  # its EMA schedules' knobs, in outer epochs
    "train.total_steps": 1000,
    "train.ramp_rate": 0.001,
    "eval.resolution": 1024,
    "eval.per_device_batch_size": 1,
    "eval.guidance_scale": 3.5,
    "eval.num_inference_steps": 30,
    "log.save_freq": 10,
}

#: per trainer type, Flow-Factory's algorithm defaults (its TrainingArguments subclasses)
FF_ALGORITHM_DEFAULTS: dict[str, dict[str, Any]] = {
    "grpo": {"global_std": True, "advantage_aggregation": "gdpo", "clip_range": 1e-4,
             "adv_clip_range": 5.0, "kl_type": "x-based", "kl_beta": 0.0},
    "nft": {"global_std": True, "advantage_aggregation": "gdpo", "nft_beta": 1.0, "off_policy": False,
            "adv_clip_range": 5.0, "kl_type": "v-based", "kl_beta": 0.0, "time_sampling_strategy": "discrete",
            "time_shift": 3.0, "timestep_range": 0.9},
    "awm": {"global_std": True, "advantage_aggregation": "gdpo", "off_policy": False, "adv_clip_range": 5.0,
            "kl_type": "v-based", "kl_beta": 0.0, "ema_kl_beta": 0.0, "awm_weighting": "Uniform",
            "ghuber_power": 0.25, "clip_range": 1e-4, "time_sampling_strategy": "discrete", "time_shift": 3.0,
            "timestep_range": 0.9},
}
FF_ALGORITHM_DEFAULTS["grpo-guard"] = FF_ALGORITHM_DEFAULTS["grpo"]
FF_ALGORITHM_DEFAULTS["dpo"] = {"global_std": True, "advantage_aggregation": "gdpo", "beta": 2000.0,
                                "weighting_scheme": "logit_normal", "num_train_timesteps": 1, "time_shift": 1.0,
                                "timestep_range": 0.99}
FF_ALGORITHM_DEFAULTS["dgpo"] = {**FF_ALGORITHM_DEFAULTS["grpo"], "kl_type": "v-based", "dpo_beta": 100.0,
                                 "clip_dsm": True, "switch_ema_ref": 200, "off_policy": False,
                                 "time_sampling_strategy": "discrete", "time_shift": 3.0, "timestep_range": 0.6}

FF_ALGORITHM_DEFAULTS["crd"] = {"global_std": True, "advantage_aggregation": "gdpo", "crd_beta": 1.0,
                                "crd_loss_type": "mse", "use_old_for_loss": True, "adaptive_logp": True,
                                "weight_temp": -1.0, "old_model_decay": "0-0.25-0.005-0.999",
                                "sampling_model_decay": "75-0.0-0.0075-0.999", "adv_clip_range": 5.0,
                                "kl_type": "v-based", "kl_beta": 0.1, "kl_cfg": 4.5, "reward_adaptive_kl": True,
                                "time_sampling_strategy": "discrete", "time_shift": 3.0, "timestep_range": 0.99}

#: Flow-Factory trainers that have no counterpart here
UNSUPPORTED_TRAINERS: tuple[str, ...] = ()

#: reward entry keys: Flow-Factory's -> ours (the remote reward's options included)
REWARD_KEYS = {"server_url": "url", "retry_attempts": "retries"}
#: vllm_evaluate's options -> vlm_judge's
JUDGE_KEYS = {"api_base_url": "url", "api_key": "token", "vlm_model": "model", "max_retries": "retries",
              "max_cache_size": "cache_size"}
#: the RationalRewards judges' options -> ours (``max_retries``, Flow-Factory's attempts, becomes
#: ``retries``, the attempts after the first)
RATIONAL_REWARDS = ("rational_rewards_t2i", "rational_rewards_edit")
RATIONAL_KEYS = {"api_base_url": "url", "api_key": "token", "vlm_model": "model"}
RATIONAL_DEFAULT_URL = "http://localhost:8000/v1"  # Flow-Factory's api_base_url default
REWARD_DROPPED = {
    "async_reward": "set train.overlap_scoring: true to score while the next micro-batch samples, or "
                    "run the reward as a service (`flowrl serve reward`, `reward_model: remote`)",
    "num_workers": "a reward service scales by workers (`flowrl worker reward`), not a key",
}


class ConversionError(ValueError):
    """A Flow-Factory config that cannot be turned into a flowrl one (the message says why)."""


def hint(key: str) -> str | None:
    """What a Flow-Factory key found in a flowrl config is called here, as one sentence, or None
    when ``key`` (dotted, e.g. ``train.enable_gradient_checkpointing``) is not Flow-Factory's."""
    convert_it = "`flowrl convert FILE` rewrites a whole Flow-Factory config"
    if key == "scheduler":
        return ("`scheduler:` is a Flow-Factory section; its keys live under `train:` here (dynamics_type, "
                f"noise_level; sde_steps is train.train_steps, num_sde_steps train.num_train_steps). {convert_it}")
    if key == "log":
        return ("`log:` is a Flow-Factory section; here run_name, project and logging_backend are top-level keys, "
                f"save_dir is output_dir and save_freq is train.save_freq. {convert_it}")
    scheduler_key = "scheduler." + key.removeprefix("train.")  # a scheduler: key written under train:
    if key.startswith("train.") and key not in {*MOVED, *CHANGED, *DROPPED} and scheduler_key in {*MOVED, *CHANGED}:
        key = scheduler_key
    dest = MOVED.get(key) or CHANGED.get(key)
    if dest and dest != key:  # (a key that is ours too is no Flow-Factory leftover)
        changed = " (with its value converted)" if key in CHANGED else ""
        return f"`{key}` is Flow-Factory's key; here it is `{dest}`{changed}. {convert_it}"
    if key in DROPPED:
        return f"`{key}` is Flow-Factory's key and has no flowrl key: {DROPPED[key]}"
    return None


def _flatten(ff: dict) -> dict[str, Any]:
    """``{"train": {"seed": 1}, "mixed_precision": "bf16"}`` -> ``{"train.seed": 1, "mixed_precision": "bf16"}``
    (one level of sections; rewards are read separately)."""
    flat: dict[str, Any] = {}
    for key, value in ff.items():
        if key in ("rewards", "eval_rewards"):
            continue
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConversionError(f"`{key}:` must be a mapping of keys, got {type(value).__name__}")
            for sub, v in value.items():
                flat[f"{key}.{sub}"] = v
        else:
            flat[key] = value
    return flat


def _put(out: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = out
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value


def _magnitudes(key: str, value: Any, notes: list[str]) -> Any:
    """Flow-Factory's signed ``(-a, b)`` clip interval (or ``c``) -> our distances ``[a, b]`` (or ``c``)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ConversionError(f"{key}: expected a number or a [low, high] pair, got {value!r}")
        lo, hi = (abs(float(v)) for v in value)
        if key == "train.adv_clip_range":  # ours is one magnitude (DiffusionNFT normalizes by it)
            if lo != hi:
                notes.append(f"{key}: {list(value)} is asymmetric; flowrl clips advantages to [-c, c], "
                             f"c = {max(lo, hi):g} written")
            return max(lo, hi)
        notes.append(f"{key}: {list(value)} -> [{lo:g}, {hi:g}] (distances from the centre here, not signed offsets)")
        return [lo, hi]
    return abs(float(value))


def convert(ff: dict) -> tuple[dict, list[str]]:
    """A Flow-Factory config (the parsed YAML) -> ``(flowrl config dict, notes)``.

    Keys absent from ``ff`` take Flow-Factory's defaults where they differ from ours (so the run
    is the one Flow-Factory would have made), written out explicitly. Each note is one sentence on
    a key that was changed, dropped or not recognized. The result is not validated here:
    :func:`shared.config.parse_config` does that (``flowrl convert`` runs it).

    Raises:
        ConversionError: not a mapping, a trainer Flow-Factory has and flowrl does not
            (:data:`UNSUPPORTED_TRAINERS`, none at present), or a malformed value.
    """
    if not isinstance(ff, dict):
        raise ConversionError(f"a Flow-Factory config is a YAML mapping of sections, got {type(ff).__name__}")
    flat = _flatten(ff)
    notes: list[str] = []
    trainer = str(flat.get("train.trainer_type", "grpo")).lower()
    if trainer in UNSUPPORTED_TRAINERS:
        raise ConversionError(
            f"train.trainer_type: '{trainer}' has no flowrl implementation (flowrl trains grpo, grpo-guard, nft, "
            f"awm, dpo, dgpo and crd; ../shared/reference/algorithms.md). Fix: pick one of those, or port the trainer as a "
            f"dotted-path plugin.")
    filled = [k for k in FF_DEFAULTS if k not in flat]
    algo = {f"train.{k}": v for k, v in FF_ALGORITHM_DEFAULTS.get(trainer, {}).items()}
    filled += [k for k in algo if k not in flat]
    flat = {**FF_DEFAULTS, **algo, **flat}
    if filled:
        notes.append("Flow-Factory's defaults written out (they differ from flowrl's): " + ", ".join(filled))

    for section, size in (("train", 512), ("eval", 1024)):  # height / width without a resolution
        if f"{section}.resolution" not in flat and ({f"{section}.height", f"{section}.width"} & set(flat)):
            flat[f"{section}.resolution"] = size
    out: dict[str, Any] = {}
    steps_per_epoch = _optimizer_steps_per_epoch(flat, notes)
    if str(flat.get("scheduler.dynamics_type")) == "ODE":
        for key in ("scheduler.sde_steps", "scheduler.num_sde_steps", "scheduler.noise_level"):
            flat.pop(key, None)  # Flow-Factory forces them off for ODE rollouts

    handlers: dict[str, Callable[[str, Any], None]] = {}

    def ema_steps(key: str, value: Any) -> None:
        if value is None:
            return
        dest = CHANGED[key]
        scaled = value / steps_per_epoch if key == "train.ramp_rate" else int(value) * steps_per_epoch
        if steps_per_epoch != 1:
            notes.append(f"{key}: {value} (Flow-Factory counts outer epochs) -> {dest}: {scaled:g} (flowrl counts "
                         f"optimizer steps, {steps_per_epoch} an epoch)")
        _put(out, dest, scaled)

    for key in ("train.ema_update_interval", "train.warmup_steps", "train.flat_steps", "train.total_steps",
                "train.ramp_rate"):
        handlers[key] = ema_steps

    def devices(key: str, value: Any) -> None:
        if value in ("cpu",):
            _put(out, CHANGED[key], "cpu")
        elif value is not None and not str(value).startswith("cuda"):
            notes.append(f"{key}: '{value}' is not cpu or cuda; left at flowrl's 'same' (the model's device)")

    handlers["train.ema_device"] = handlers["train.ref_param_device"] = devices

    def count(key: str, value: Any) -> None:  # Flow-Factory's 0 / null: derive it; ours: None
        if value not in (None, 0):
            _put(out, CHANGED[key], int(value))

    def resolution(key: str, value: Any) -> None:
        section = key.split(".")[0]
        if key.endswith((".height", ".width")):
            return  # read with the resolution below
        h, w = flat.get(f"{section}.height"), flat.get(f"{section}.width")
        if isinstance(value, (list, tuple)):
            value = list(value)
        if h is not None or w is not None:
            base = value if isinstance(value, list) else [value, value]
            value = [h if h is not None else base[0], w if w is not None else base[1]]
        if value is not None:
            _put(out, f"{section}.resolution", value)

    handlers["train.resolution"] = handlers["train.height"] = handlers["train.width"] = resolution
    handlers["eval.height"] = handlers["eval.width"] = resolution

    def eval_seed(key: str, value: Any) -> None:
        if value is not None:
            _put(out, "eval.seed", int(value))

    def accumulation(key: str, value: Any) -> None:
        pass  # read by _optimizer_steps_per_epoch

    def latent_dtype(key: str, value: Any) -> None:
        if str(value).lower() in ("bf16", "bfloat16"):
            _put(out, "train.rollout_state_dtype", "bfloat16")
        else:
            if value not in (None, "fp32", "float32"):
                notes.append(f"{key}: '{value}' -> train.rollout_state_dtype: float32 (flowrl stores states in "
                             f"float32 or bfloat16; float16 is not offered)")
            _put(out, "train.rollout_state_dtype", "float32")

    def clip(key: str, value: Any) -> None:
        if value is not None:
            _put(out, CHANGED[key], _magnitudes(key, value, notes))

    def shift(key: str, value: Any) -> None:
        s = float(value)
        if s <= 0:
            raise ConversionError(f"{key}: {value} must be > 0")
        _put(out, "train.time_shift", 1.0 / s)
        if s != 1:
            notes.append(f"{key}: {s:g} -> {1 / s:g}: Flow-Factory warps the denoising fraction 1 - sigma, flowrl "
                         f"warps sigma (the SD3 convention); the two warps are inverse-equal, so 1/s gives the same "
                         f"timesteps when timestep_range is 1 (approximately otherwise: the range is applied before "
                         f"the warp here, after it there)")

    def timestep_range(key: str, value: Any) -> None:
        if isinstance(value, (list, tuple)):
            lo, hi = (float(v) for v in value)
            if lo > 0:
                notes.append(f"{key}: {list(value)} starts above 0; flowrl trains from the noise end, "
                             f"timestep_fraction: {hi:g} written (the [0, {lo:g}) part is trained too)")
            value = hi
        if value is not None:
            _put(out, "train.timestep_fraction", float(value))

    def preprocess(key: str, value: Any) -> None:
        if value:
            _put(out, "model.offload_text_encoders", True)
            notes.append(f"{key}: true -> model.offload_text_encoders: true (every prompt is encoded up front, "
                         f"then the text encoders leave the GPU)")

    def dpo_key(key: str, value: Any) -> None:  # DPOTrainingArguments' own names
        name = key.split(".", 1)[1]
        if name == "beta":
            _put(out, "train.dpo_beta", float(value))
        elif name == "weighting_scheme":
            if value not in ("logit_normal", "uniform"):
                raise ConversionError(f"{key}: '{value}' is not logit_normal or uniform")
            _put(out, "train.time_sampling_strategy", value)
        elif float(value) != {"logit_mean": 0.0, "logit_std": 1.0}[name]:
            notes.append(f"{key}: {value} dropped; flowrl's logit_normal timesteps have mean 0 and std 1")

    if trainer == "dpo":
        for name in ("beta", "weighting_scheme", "logit_mean", "logit_std"):
            handlers[f"train.{name}"] = dpo_key

    def dgpo_key(key: str, value: Any) -> None:  # DGPOTrainingArguments' own names
        name = key.split(".", 1)[1]
        renamed = {"dpo_beta": "train.dgpo_beta", "beta_dpo": "train.dgpo_beta", "clip_dsm": "train.dgpo_clip",
                   "switch_ema_ref": "train.sample_from_ema_after"}
        if name in renamed:
            _put(out, renamed[name], value)
        elif name == "use_shared_noise":
            if not value:
                notes.append(f"{key}: false dropped; flowrl's dgpo always re-noises a group's samples alike")
        elif name == "kl_cfg":
            if float(value) != 1.0:
                notes.append(f"{key}: {value} dropped; the KL term's reference CFG here is train.ref_guidance_scale "
                             f"(default: the policy's; the group weights always compare with the base at the "
                             f"policy's CFG)")
        elif value not in (None, False) and not (name.startswith("ema_ref_") and not flat.get("train.use_ema_ref")):
            notes.append(f"{key}: {value!r} dropped; flowrl's dgpo has no separate fast-EMA reference: its old "
                         f"policy is the sampling policy (the EMA after sample_from_ema_after steps)")

    if trainer == "dgpo":
        for name in ("dpo_beta", "beta_dpo", "clip_dsm", "switch_ema_ref", "use_shared_noise", "kl_cfg",
                     "clip_kl", "use_ema_ref", "ema_ref_max_decay", "ema_ref_ramp_rate", "ema_ref_device"):
            handlers[f"train.{name}"] = dgpo_key

    def crd_key(key: str, value: Any) -> None:  # CRDTrainingArguments' own names
        name = key.split(".", 1)[1]
        renamed = {"crd_beta": "crd_beta", "crd_loss_type": "crd_loss_type", "use_old_for_loss": "crd_use_old",
                   "adaptive_logp": "crd_adaptive_logp", "weight_temp": "crd_weight_temp",
                   "reward_adaptive_kl": "crd_reward_adaptive_kl"}
        if name in renamed:
            _put(out, f"train.{renamed[name]}", value)
        elif name in ("old_model_decay", "sampling_model_decay"):
            # flowrl reads Flow-Factory's integer presets too (shared.config.SNAPSHOT_DECAY_NUMBERS)
            _put(out, "train.crd_old_decay" if name == "old_model_decay" else "train.crd_sampling_decay", str(value))
        elif name == "kl_cfg":  # Flow-Factory guides the KL reference only above 1
            if float(value) > 1 and float(flat.get("train.kl_beta") or 0) > 0:
                _put(out, "train.ref_guidance_scale", float(value))
            elif float(value) > 1:
                notes.append(f"{key}: {value} dropped; train.kl_beta is 0, so there is no KL term to guide")

    if trainer == "crd":
        for name in ("crd_beta", "crd_loss_type", "use_old_for_loss", "adaptive_logp", "weight_temp",
                     "old_model_decay", "sampling_model_decay", "reward_adaptive_kl", "kl_cfg"):
            handlers[f"train.{name}"] = crd_key

    handlers.update({
        "scheduler.num_sde_steps": count, "eval.resolution": resolution,
        "eval.seed": eval_seed, "train.gradient_accumulation_steps": accumulation,
        "train.latent_storage_dtype": latent_dtype, "train.clip_range": clip, "train.adv_clip_range": clip,
        "train.time_shift": shift, "train.timestep_range": timestep_range,
        "train.num_train_timesteps": count, "data.enable_preprocess": preprocess,
    })

    for key, value in flat.items():
        if key in handlers:
            handlers[key](key, value)
        elif key in MOVED:
            _put(out, MOVED[key], _moved_value(key, value, notes))
        elif key in DROPPED:
            notes.append(f"{key}: dropped; {DROPPED[key]}")
        else:
            notes.append(f"{key}: not a Flow-Factory key this converter knows; left out (value {value!r})")
    if out.get("train", {}).get("max_epochs", 0) is None:
        out["train"]["max_epochs"] = 1_000_000
        notes.append("train.max_epochs: null (Flow-Factory runs until stopped) -> 1000000; set a real count "
                     "for a learning-rate schedule other than constant")
    if out.get("logging_backend", "x") is None:
        out["logging_backend"] = "none"
    if out.get("run_name", "x") is None:
        del out["run_name"]
    if flat.get("train.kl_type") == "x-based" and float(flat.get("train.kl_beta") or 0) > 0 \
            and trainer in ("grpo", "grpo-guard"):
        notes.append("train.kl_beta: flowrl's x-based KL is flow_grpo's form, divided by 2 sigma_t^2; Flow-Factory's "
                     "is the unscaled squared mean difference, so the same kl_beta weighs the KL differently")
    if flat.get("eval.eval_freq") == 0:
        notes.append("eval.eval_freq: 0 turns evaluation off in Flow-Factory; here it evaluates before and after "
                     "training only (a test split must exist for either)")

    for section in ("rewards", "eval_rewards"):
        if ff.get(section) is not None:
            out[section] = _rewards(section, ff[section], notes)
    return out, notes


ORDER = ("run_name", "project", "output_dir", "logging_backend", "model", "data", "train", "eval", "rewards",
         "eval_rewards")


def dump(raw: dict) -> str:
    """``raw`` as YAML in the order our examples use (top-level keys, model, data, train, eval,
    rewards), block style, with lists of plain values on one line."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def represent_list(dumper, data):
        flow = all(not isinstance(v, (dict, list)) for v in data)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

    Dumper.add_representer(list, represent_list)
    ordered = {k: raw[k] for k in ORDER if k in raw} | {k: v for k, v in raw.items() if k not in ORDER}
    return yaml.dump(ordered, Dumper=Dumper, sort_keys=False, default_flow_style=False)


def _moved_value(key: str, value: Any, notes: list[str]) -> Any:
    if key == "log.save_freq" and value == 0:
        notes.append("log.save_freq: 0 (no checkpoints in Flow-Factory) -> train.save_freq: 0 (here: only the final one)")
    return list(value) if isinstance(value, tuple) else value


def _optimizer_steps_per_epoch(flat: dict, notes: list[str]) -> int:
    """Optimizer steps per outer epoch: ``gradient_step_per_epoch * num_inner_epochs``. An integer
    ``gradient_accumulation_steps`` A (Flow-Factory then ignores ``gradient_step_per_epoch``) is turned
    into the step count it implies, ``M * K / (B * processes * A)``, when that divides evenly (dpo:
    ``M / (B * processes * A)``, its micro-batches holding ``B`` of the epoch's ``M`` pairs)."""
    inner = int(flat.get("train.num_inner_epochs") or 1)
    accumulate = flat.get("train.gradient_accumulation_steps", "auto")
    if accumulate not in (None, "auto"):
        m = int(flat.get("train.unique_sample_num_per_epoch", 8))
        dpo = str(flat.get("train.trainer_type", "grpo")).lower() == "dpo"
        k = 1 if dpo else int(flat.get("train.group_size", 1))
        b = int(flat.get("train.per_device_batch_size", 1))
        p = int(flat.get("num_processes") or 1)
        per_step = b * p * int(accumulate)
        if (m * k) % per_step == 0 and m * k >= per_step:
            flat["train.gradient_step_per_epoch"] = m * k // per_step
            what = f"{m} pairs" if dpo else f"{m} x {k} samples"
            notes.append(f"train.gradient_accumulation_steps: {accumulate} -> train.gradient_step_per_epoch: "
                         f"{m * k // per_step} ({what} in micro-batches of {b} on {p} processes)")
        else:
            notes.append(f"train.gradient_accumulation_steps: {accumulate} does not divide the epoch's {m} x {k} "
                         f"samples in micro-batches of {b} on {p} processes; kept gradient_step_per_epoch")
    return int(flat.get("train.gradient_step_per_epoch") or 1) * inner


def _rewards(section: str, entries: Any, notes: list[str]) -> list[dict]:
    """Flow-Factory's reward list (or single entry) -> ours: ``server_url``/``retry_attempts`` renamed,
    the placeholder name ``default`` dropped, bf16 as its default dtype, ``cuda`` as ``auto``."""
    if isinstance(entries, dict):
        entries = [entries]
    if not isinstance(entries, list):
        raise ConversionError(f"{section}: expected a list of reward entries (or one entry), got {type(entries).__name__}")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "reward_model" not in entry:
            raise ConversionError(f"{section}[{i}]: each reward is a mapping with a reward_model, got {entry!r}")
        new: dict[str, Any] = {"dtype": "bfloat16"}
        judge = str(entry["reward_model"]).lower() == "vllm_evaluate"
        rational = str(entry["reward_model"]).lower() in RATIONAL_REWARDS
        if rational and "api_base_url" not in entry:
            new["url"] = RATIONAL_DEFAULT_URL
            notes.append(f"{section}[{i}]: url: {RATIONAL_DEFAULT_URL}, Flow-Factory's default api_base_url; "
                         f"point it at your judge server")
        for key, value in entry.items():
            if rational and key in RATIONAL_KEYS:
                if not (key == "api_key" and value == "EMPTY"):  # Flow-Factory's placeholder: no token
                    new[RATIONAL_KEYS[key]] = value
            elif rational and key == "max_retries":
                new["retries"] = max(0, int(value) - 1)
            elif key in REWARD_DROPPED:
                notes.append(f"{section}[{i}].{key}: dropped; {REWARD_DROPPED[key]}")
            elif key == "name" and value == "default":
                continue
            elif key == "device":
                if value is not None and not str(value).startswith("cuda"):
                    new["device"] = value
            elif key in REWARD_KEYS:
                new[REWARD_KEYS[key]] = value
            elif judge and key in JUDGE_KEYS:
                new[JUDGE_KEYS[key]] = value
            elif key == "reward_model" and judge:
                new[key] = "vlm_judge"
                notes.append(f"{section}[{i}]: vllm_evaluate -> vlm_judge; its default question asks whether the "
                             f"image shows the prompt: set `question` to the one your Flow-Factory version asks")
            else:
                new[key] = value
        out.append(new)
    return out
