"""Flow-Factory configs, read as flowrl configs (``flowrl convert FF.yaml``).

A Flow-Factory YAML (``../shared/reference/flow-factory.md`` section 2) differs from ours in its
layout (``scheduler:`` and ``log:`` sections, launcher keys at the top), in some names
(``sde_steps`` is our ``train_steps``, ``enable_gradient_checkpointing`` our
``model.gradient_checkpointing``), in units (its EMA counts outer epochs, ours optimizer steps),
in sign conventions (its clip ranges are signed offsets, its ``time_shift`` warps the denoising
fraction) and in defaults (it trains in bf16 with EMA on unless told otherwise). Both of its layouts convert: the
older one (one ``data.dataset_dir``, the optimizer's keys under ``train:``, ``model.attn_backend``)
and the newer one (``data.datasets`` sources, ``optimizers:``, ``acceleration:``,
``trainable_parameters_dtype``, rewards routed by ``applicable_datasets``). :func:`convert`
rewrites one into ours and says, per key, what it changed, dropped or could not carry over;
:func:`hint` tells the config loader what a Flow-Factory key left in a flowrl config is called
here. Pure dictionaries in, dictionaries out: no torch, nothing loaded.
"""

from __future__ import annotations

from typing import Any, Callable

SECTIONS = ("data", "model", "scheduler", "train", "eval", "log")
#: top-level sections read on their own (lists of entries, or nested by stage)
LIST_SECTIONS = ("rewards", "eval_rewards", "optimizers", "acceleration")

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
    "model.trainable_parameters_dtype": "model.master_weight_dtype",  # its newer name
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
    "train.kl_mask_type": "train.kl_mask_type",
    "train.kl_mask_threshold": "train.kl_mask_threshold",
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
    "train.kl_guidance_scale": "train.ref_guidance_scale",
    "model.frozen_parameters_dtype": "model.options.transformer_dtype",
    "log.checkpoint_retention": "train.keep_checkpoints",
}

#: Flow-Factory keys with no key here, and what does their job instead
DROPPED: dict[str, str] = {
    "launcher": "flowrl launches its own processes: `flowrl train CONFIG --processes N`",
    "config_file": "no accelerate / DeepSpeed file: sharding is `train.fsdp` (FSDP2), DeepSpeed is not used",
    "num_processes": "the process count is the launch's: `flowrl train CONFIG --processes N`",
    "main_process_port": "`--processes` picks a free port (or MASTER_PORT from the environment)",
    "num_machines": "several machines: `flowrl train CONFIG --nodes M --node-rank R --main-address HOST` on each",
    "machine_rank": "several machines: `flowrl train CONFIG --nodes M --node-rank R --main-address HOST` on each",
    "main_process_ip": "several machines: `flowrl train CONFIG --nodes M --node-rank R --main-address HOST` on each",
    "gpus_per_node": "`flowrl train CONFIG --processes auto` starts one process per visible GPU",
    "process_index": "set by the launcher",
    "local_process_index": "set by the launcher",
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
    "model.component_load_dtypes": "each component loads in the adapter's dtype; model.options text_dtype, "
                                   "vae_dtype and transformer_dtype set them",
    "train.shuffle_samples": "every epoch's samples are shuffled into micro-batches (Algorithm.train_order)",
    "train.frame_rate": "videos are written at the model's frame rate",
    "eval.frame_rate": "videos are written at the model's frame rate",
    "train.reward_optimization_overlap": "train.overlap_scoring scores each micro-batch while the next samples; "
                                         "the distributed mode scores in reward workers while the trainer trains",
    "train.reward_optimization_overlap_mode": "see train.reward_optimization_overlap",
    "train.reward_optimization_overlap_poll_interval": "see train.reward_optimization_overlap",
}

#: what Flow-Factory uses when a key is absent, where that is not our default
FF_DEFAULTS: dict[str, Any] = {
    "mixed_precision": "bf16",
    "data.dataset_dir": "data",  # (left out beside data.datasets)
    "model.model_name_or_path": "black-forest-labs/FLUX.1-dev",
    "model.model_type": "flux1",
    "model.finetune_type": "full",
    "model.master_weight_dtype": "bfloat16",
    "model.target_modules": "all",
    "scheduler.dynamics_type": "Flow-SDE",
    "scheduler.noise_level": 0.7,
    "scheduler.num_sde_steps": 1,
    "train.per_device_batch_size": 1,
    "train.max_epochs": None,  # runs until stopped (the null handling below)
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
FF_ALGORITHM_DEFAULTS["dppo"] = {"global_std": True, "advantage_aggregation": "gdpo", "adv_clip_range": 5.0,
                                 "kl_type": "x-based", "kl_beta": 0.0, "kl_mask_type": "x-based",
                                 "kl_mask_threshold": 1e-6}
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
UNSUPPORTED_TRAINERS: tuple[str, ...] = ("sft", "offline-dpo", "dmd2", "tdm", "tdm-r1", "diffusion-opd")

#: an optimizer entry's keys (Flow-Factory's ``optimizers:``, AdamW) -> ours, and their defaults there
OPTIMIZER_KEYS = {"learning_rate": "train.learning_rate", "weight_decay": "train.adam_weight_decay",
                  "betas": "train.adam_betas", "eps": "train.adam_epsilon", "max_grad_norm": "train.max_grad_norm"}
OPTIMIZER_DEFAULTS = {"learning_rate": 1e-5, "weight_decay": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8,
                      "max_grad_norm": 1.0}
#: ``data.datasets[i]`` keys: a source's own, and those of its ``train:`` / ``eval:`` blocks
SOURCE_KEYS = ("name", "dataset_dir", "image_dir", "video_dir")
SIDE_KEYS = {"train": ("weight", "max_dataset_size", "split"), "eval": ("max_dataset_size", "split")}

#: reward entry keys: Flow-Factory's -> ours (the remote reward's options included; its
#: ``retry_attempts``, all attempts, becomes ``retries``, the attempts after the first)
REWARD_KEYS = {"server_url": "url"}
#: Flow-Factory's remote reward clients (by class name) -> our ``remote`` reward's ``kind``
REMOTE_CLIENTS = {"remotepointwiserewardmodel": "pointwise", "remotegroupwiserewardmodel": "groupwise"}
#: its GenEval reward's options -> ours; the mmdetection / open_clip model options are dropped
GENEVAL_KEYS = {"detection_threshold": "threshold"}
GENEVAL_DROPPED = ("detector_config", "detector_checkpoint", "clip_model", "object_names_path")
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
                f"save_dir is output_dir, save_freq is train.save_freq and checkpoint_retention train.keep_checkpoints. "
                f"{convert_it}")
    if key == "optimizers":
        return ("`optimizers:` is a Flow-Factory section; here the optimizer is AdamW with train.learning_rate, "
                f"adam_betas, adam_epsilon, adam_weight_decay and max_grad_norm. {convert_it}")
    if key == "acceleration":
        return ("`acceleration:` is a Flow-Factory section; here the attention backend is model.attn_backend and "
                f"compilation model.compile. {convert_it}")
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
    (one level of sections; :data:`LIST_SECTIONS` are read separately)."""
    flat: dict[str, Any] = {}
    for key, value in ff.items():
        if key in LIST_SECTIONS:
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
            f"train.trainer_type: '{trainer}' has no flowrl implementation (flowrl trains grpo, grpo-guard, dppo, "
            f"nft, awm, dpo, dgpo and crd online; not Flow-Factory's offline (sft, offline-dpo) or distillation "
            f"(dmd2, tdm, tdm-r1, diffusion-opd) trainers). Fix: pick one of those, or port the trainer as a "
            f"dotted-path plugin (docs/extending.md, section 2 'A training algorithm').")
    if "data.datasets" in flat and not flat["data.datasets"]:  # null or []: one folder, as there
        del flat["data.datasets"]
    if "model.trainable_parameters_dtype" in flat:  # the newer name wins over master_weight_dtype
        flat["model.master_weight_dtype"] = flat.pop("model.trainable_parameters_dtype")
    if flat.get("model.master_weight_dtype") is not None:
        flat["model.master_weight_dtype"] = _dtype_name("model.master_weight_dtype", flat["model.master_weight_dtype"])
    _optimizers(ff.get("optimizers"), flat, notes)
    _acceleration(ff.get("acceleration"), flat, notes)
    if "train.group_size" not in flat:  # Flow-Factory's default, 1, is a group that compares nothing
        from shared.config import TrainConfig

        flat["train.group_size"] = TrainConfig.model_fields["group_size"].default
        notes.append(f"train.group_size: absent; Flow-Factory's default is 1, a group of one sample, which no "
                     f"group-relative advantage can use: flowrl's default {flat['train.group_size']} is written "
                     f"instead. Set the group size you mean (Flow-GRPO: 24).")
    filled = [k for k in FF_DEFAULTS if k not in flat and not (k == "data.dataset_dir" and "data.datasets" in flat)]
    algo = {f"train.{k}": v for k, v in FF_ALGORITHM_DEFAULTS.get(trainer, {}).items()}
    filled += [k for k in algo if k not in flat]
    flat = {**FF_DEFAULTS, **algo, **flat}
    if filled:
        notes.append("Flow-Factory's defaults written out (they differ from flowrl's): " + ", ".join(filled))
    multi_source = "data.datasets" in flat

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

    def guided_reference(key: str, value: Any) -> None:  # crd's kl_cfg, dppo's kl_guidance_scale
        if float(flat.get("train.kl_beta") or 0) > 0:
            _put(out, "train.ref_guidance_scale", float(value))
        else:
            notes.append(f"{key}: {value} dropped; train.kl_beta is 0, so there is no KL reference to guide")

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
        elif name == "kl_cfg" and value is not None and float(value) > 1:  # guided only above 1 there
            guided_reference(key, value)

    handlers["train.kl_guidance_scale"] = lambda key, value: value is not None and guided_reference(key, value)

    if trainer == "crd":
        for name in ("crd_beta", "crd_loss_type", "use_old_for_loss", "adaptive_logp", "weight_temp",
                     "old_model_decay", "sampling_model_decay", "reward_adaptive_kl", "kl_cfg"):
            handlers[f"train.{name}"] = crd_key

    def datasets(key: str, value: Any) -> None:
        inherited = {k: flat.get(f"data.{k}") for k in ("image_dir", "video_dir", "max_dataset_size")}
        _put(out, "data.datasets", _sources(value, inherited, notes))

    def single_source(key: str, value: Any) -> None:  # data.dataset_dir & co. beside data.datasets
        if not multi_source:
            _put(out, MOVED[key], value)
        elif key == "data.dataset_dir" and value not in (None, "data"):
            notes.append(f"{key}: {value!r} beside data.datasets: left out; each source names its own folder")
        elif key != "data.dataset_dir" and value is not None:
            notes.append(f"{key}: {value!r} beside data.datasets: given to each source without its own, as there")

    for key in ("data.dataset_dir", "data.image_dir", "data.video_dir", "data.max_dataset_size"):
        handlers[key] = single_source
    handlers["data.datasets"] = datasets

    def checkpointing(key: str, value: Any) -> None:  # a bool, or Flow-Factory's {mode: ...} policy (the same here)
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"mode", "fraction", "every_n", "layers"})
            if unknown:
                raise ConversionError(f"{key}: {unknown} are not keys of a checkpointing policy (mode, fraction, "
                                      f"every_n, layers)")
            _put(out, "model.gradient_checkpointing", {k: v for k, v in value.items() if v is not None})
            notes.append(f"{key}: {value} -> model.gradient_checkpointing: the same policy, the blocks numbered "
                         f"over the transformer's block lists in forward order, per expert")
        else:  # a bool, as there (parse_config refuses anything else)
            _put(out, "model.gradient_checkpointing", value)

    handlers["train.enable_gradient_checkpointing"] = checkpointing

    def frozen_dtype(key: str, value: Any) -> None:
        if isinstance(value, dict):  # the transformer's own entry (an explicit null: not recast), else default
            value = next((value[k] for k in ("transformer", "transformers", "default") if k in value), None)
        if value is not None:
            _put(out, "model.options.transformer_dtype", _dtype_name(key, value))
            notes.append(f"{key} -> model.options.transformer_dtype: the frozen transformer weights; text encoders "
                         f"and VAE keep the adapter's dtypes (model.options text_dtype / vae_dtype)")

    handlers["model.frozen_parameters_dtype"] = frozen_dtype

    def retention(key: str, value: Any) -> None:
        if value:  # Flow-Factory's 0 keeps every checkpoint, as flowrl's default does
            _put(out, "train.keep_checkpoints", int(value))

    handlers["log.checkpoint_retention"] = retention
    handlers["model.compile"] = lambda key, value: _put(out, key, value)  # from acceleration: torch_compile
    for key in ("train.optimizer", "train.muon_momentum", "train.muon_nesterov", "train.muon_ns_steps",
                "train.muon_adjust_lr_fn"):  # from optimizers: muon
        handlers[key] = lambda key, value: _put(out, key, value)

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
            and trainer in ("grpo", "grpo-guard", "dppo"):
        notes.append("train.kl_beta: flowrl's x-based KL is flow_grpo's form, divided by 2 sigma_t^2; Flow-Factory's "
                     "is the unscaled squared mean difference, so the same kl_beta weighs the KL differently")
    if flat.get("eval.eval_freq") == 0:
        notes.append("eval.eval_freq: 0 turns evaluation off in Flow-Factory; here it evaluates before and after "
                     "training only (a test split must exist for either)")

    sources = out.get("data", {}).get("datasets") or []
    for section in ("rewards", "eval_rewards"):
        if ff.get(section) is not None:
            side = "train" if section == "rewards" else "eval"
            names = [src["name"] for src in sources if src.get(side) is not None]
            out[section] = _rewards(section, ff[section], notes, names)
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


DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32",
               "fp16": "float16", "float16": "float16"}


def _dtype_name(key: str, value: Any) -> str:
    """``bf16`` / ``torch.bfloat16`` / ``bfloat16`` -> ``bfloat16`` (and float32, float16)."""
    name = DTYPE_NAMES.get(str(value).lower().removeprefix("torch."))
    if name is None:
        raise ConversionError(f"{key}: {value!r} is not a dtype flowrl trains in (bfloat16, float32, float16)")
    return name


def _optimizers(entries: Any, flat: dict, notes: list[str]) -> None:
    """Flow-Factory's ``optimizers:`` list (one entry per trainable variant; a single-policy trainer
    uses its only entry, or the one named ``default``) -> ``train.learning_rate``, ``adam_*`` and
    ``max_grad_norm`` in ``flat``. As in Flow-Factory, the entry overrides those train keys, and a
    key it leaves out takes the optimizer's default (:data:`OPTIMIZER_DEFAULTS`)."""
    if entries is None:
        return
    if isinstance(entries, dict):
        entries = [entries]
    if entries == []:
        notes.append("optimizers: empty; the train: optimizer keys apply, as there")
        return
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConversionError(f"optimizers: expected a list of optimizer entries (name, learning_rate, ...), got "
                              f"{entries!r}")
    if len(entries) > 1:
        chosen = [e for e in entries if e.get("name", "default") == "default"]
        if len(chosen) != 1:
            raise ConversionError(
                f"optimizers: {len(entries)} entries and none (or several) named 'default'; flowrl trains one policy "
                f"with one optimizer. Fix: keep the policy's entry only, or name it 'default'")
        notes.append(f"optimizers: the entry named 'default' is the policy's; "
                     f"{[e.get('name') for e in entries if e is not chosen[0]]} left out")
        first_norm = entries[0].get("max_grad_norm", OPTIMIZER_DEFAULTS["max_grad_norm"])
        entries = [{**chosen[0], "max_grad_norm": first_norm}]  # Flow-Factory clips with the first entry's
    entry = dict(entries[0])
    kind = str(entry.pop("optimizer", "adamw")).lower()
    if kind == "muon":  # torch's Muon on the matrices, AdamW (the fallback_* values) on the rest, as there
        flat["train.optimizer"] = "muon"
        for muon_key, ours in (("fallback_betas", "betas"), ("fallback_eps", "eps")):
            entry[ours] = entry.pop(muon_key, OPTIMIZER_DEFAULTS[ours])
        for muon_key in ("momentum", "nesterov", "ns_steps", "adjust_lr_fn"):
            if muon_key in entry:
                value = entry.pop(muon_key)  # torch reads adjust_lr_fn None as Keller's original
                flat[f"train.muon_{muon_key}"] = "original" if muon_key == "adjust_lr_fn" and value is None else value
        coefficients = entry.pop("ns_coefficients", None)
        if coefficients is not None and [float(c) for c in coefficients] != [3.4445, -4.775, 2.0315]:
            notes.append(f"optimizers: muon ns_coefficients {coefficients} dropped; flowrl's Muon uses torch's "
                         f"(3.4445, -4.775, 2.0315)")
    elif kind != "adamw":
        raise ConversionError(f"optimizers: optimizer {kind!r} is not adamw or muon")
    entry.pop("name", None)
    if entry.get("update_frequency", 1) != 1:
        notes.append(f"optimizers: update_frequency {entry['update_frequency']} dropped; the policy steps every "
                     f"gradient_step_per_epoch micro-batch group")
    entry.pop("update_frequency", None)
    for key in sorted(set(entry) - set(OPTIMIZER_KEYS)):
        notes.append(f"optimizers: {key} is not a Flow-Factory optimizer key this converter knows; left out")
    overridden = sorted(dest for dest in OPTIMIZER_KEYS.values() if dest in flat)
    if overridden:
        notes.append(f"{', '.join(overridden)}: replaced by the optimizers: entry, as Flow-Factory replaces them")
    for key, dest in OPTIMIZER_KEYS.items():
        value = entry.get(key, OPTIMIZER_DEFAULTS[key])
        flat[dest] = list(value) if isinstance(value, tuple) else value


def _acceleration(section: Any, flat: dict, notes: list[str]) -> None:
    """Flow-Factory's ``acceleration:`` (``shared`` / ``rollout`` lists of ``{name, params}``) ->
    ``model.attn_backend`` and ``model.compile`` in ``flat``; rollout feature caching has no
    counterpart (noted)."""
    if section is None:
        return
    if not isinstance(section, dict):
        raise ConversionError(f"acceleration: expected a mapping with shared: / rollout: lists, got {section!r}")
    for stage, entries in section.items():
        if stage not in ("shared", "rollout"):
            notes.append(f"acceleration.{stage}: not a stage this converter knows (shared, rollout); left out")
            continue
        for i, entry in enumerate([entries] if isinstance(entries, dict) else entries or []):
            where = f"acceleration.{stage}[{i}]"
            if not isinstance(entry, dict) or "name" not in entry:
                raise ConversionError(f"{where}: expected a mapping with a name (and params), got {entry!r}")
            name, params = str(entry["name"]), entry.get("params") or {}
            if not isinstance(params, dict):
                raise ConversionError(f"{where}.params: expected a mapping of the accelerator's options, got {params!r}")
            also = " (flowrl applies it to training as well as rollouts)" if stage == "rollout" else ""
            if name == "attention_backend":
                if "backend" not in params:
                    raise ConversionError(f"{where}: attention_backend needs params.backend (native, flash, ...)")
                flat["model.attn_backend"] = params["backend"]
                notes.append(f"{where}: attention_backend -> model.attn_backend: {params['backend']}{also}")
            elif name == "torch_compile":
                mode = params.get("mode", "auto")
                kwargs = dict(params.get("compile_kwargs") or {})
                flat["model.compile"] = kwargs.pop("mode", True)
                notes.append(f"{where}: torch_compile (mode {mode}) -> model.compile: {flat['model.compile']}; flowrl "
                             f"compiles the whole transformer, not block by block{also}"
                             + (f"; compile_kwargs {sorted(kwargs)} dropped" if kwargs else ""))
            elif name in ("diffusers_cache", "cache_dit"):
                notes.append(f"{where}: {name} dropped; flowrl has no rollout feature caching (a lossy speed-up "
                             f"of sampling)")
            else:
                notes.append(f"{where}: {name} dropped; not an accelerator this converter knows (attention_backend, "
                             f"torch_compile)")


def _sources(entries: Any, inherited: dict[str, Any], notes: list[str]) -> list[dict]:
    """Flow-Factory's ``data.datasets`` -> ours. There a source without a ``train:`` (or ``eval:``)
    block, or with ``enabled: false`` in it, is not trained on (evaluated); here that is an explicit
    null. ``inherited``: the ``data:`` keys a source without its own takes (``image_dir``,
    ``video_dir``, ``max_dataset_size``, the last for both sides), as there. Per-source eval
    settings (resolution, steps, guidance) have no counterpart (noted)."""
    if isinstance(entries, dict):
        entries = [entries]
    if not isinstance(entries, list):
        raise ConversionError(f"data.datasets: expected a list of sources (name, dataset_dir, train, eval), got "
                              f"{entries!r}. Fix: write each source as a mapping in a list")
    sources = []
    for i, entry in enumerate(entries):
        where = f"data.datasets[{i}]"
        if not isinstance(entry, dict):
            raise ConversionError(f"{where}: expected a mapping (name, dataset_dir, train, eval), got {entry!r}")
        src: dict[str, Any] = {"name": entry.get("name", "default"), "dataset_dir": entry.get("dataset_dir", "data")}
        for key in ("image_dir", "video_dir"):
            value = entry.get(key) if entry.get(key) is not None else inherited.get(key)
            if value is not None:
                src[key] = value
        for key in sorted(set(entry) - {*SOURCE_KEYS, "train", "eval"}):
            why = "no audio models here" if key == "audio_dir" else "not a source key this converter knows"
            notes.append(f"{where}.{key}: dropped; {why}")
        for side in ("train", "eval"):
            block = entry.get(side)
            if block is None or (isinstance(block, dict) and not block.get("enabled", True)):
                src[side] = None
                continue
            if not isinstance(block, dict):
                raise ConversionError(f"{where}.{side}: expected a mapping (or leave it out), got {block!r}")
            mine: dict[str, Any] = {}
            for key, value in block.items():
                if key in SIDE_KEYS[side] and value is not None:
                    mine[key] = _whole_weight(f"{where}.train.weight", value) if key == "weight" else value
                elif side == "eval" and key in ("resolution", "num_inference_steps", "guidance_scale"):
                    if value is not None:
                        mine[key] = value
                elif side == "eval" and key in ("height", "width"):
                    continue  # below, as a resolution
                elif key not in SIDE_KEYS[side] and key != "enabled":
                    notes.append(f"{where}.{side}.{key}: not a Flow-Factory key this converter knows; left out")
            if side == "eval" and "resolution" not in mine and (block.get("height") or block.get("width")):
                if block.get("height") and block.get("width"):
                    mine["resolution"] = [int(block["height"]), int(block["width"])]
                else:
                    notes.append(f"{where}.eval: height / width given alone dropped; give both (or resolution) for "
                                 f"this source's own size")
            if "max_dataset_size" not in mine and inherited.get("max_dataset_size") is not None:
                mine["max_dataset_size"] = inherited["max_dataset_size"]
            src[side] = mine
        if src["train"] is None and src["eval"] is None:
            raise ConversionError(f"{where} ({src['name']}): neither trained on nor evaluated (Flow-Factory refuses "
                                  f"it too). Fix: give it a train: or an eval: block")
        sources.append(src)
    return sources


def _whole_weight(key: str, value: Any) -> int:
    try:
        weight = float(value)
    except (TypeError, ValueError):
        weight = float("nan")
    if not weight.is_integer() or weight < 1:
        raise ConversionError(f"{key}: {value!r} must be a whole number >= 1 (the source's share of each epoch)")
    return int(weight)


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


def _rewards(section: str, entries: Any, notes: list[str], sources: list[str] | None = None) -> list[dict]:
    """Flow-Factory's reward list (or single entry) -> ours: ``server_url``/``retry_attempts`` renamed,
    the placeholder name ``default`` dropped, bf16 as its default dtype, ``cuda`` as ``auto``,
    ``extra_kwargs`` merged into the entry, ``applicable_datasets`` as ``datasets``. A per-source
    ``weight`` mapping becomes one entry per distinct weight over its sources (``sources``: the
    names of the ``data.datasets`` sources on this side, which a reward without
    ``applicable_datasets`` covers); an entry with ``applicable_datasets: []`` never scores there
    and is left out."""
    if isinstance(entries, dict):
        entries = [entries]
    if not isinstance(entries, list):
        raise ConversionError(f"{section}: expected a list of reward entries (or one entry), got {type(entries).__name__}")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "reward_model" not in entry:
            raise ConversionError(f"{section}[{i}]: each reward is a mapping with a reward_model, got {entry!r}")
        extra = entry.get("extra_kwargs") or {}
        if not isinstance(extra, dict):
            raise ConversionError(f"{section}[{i}].extra_kwargs: expected a mapping of the reward's options, got {extra!r}")
        entry = {**{k: v for k, v in entry.items() if k != "extra_kwargs"}, **extra}
        if entry.get("applicable_datasets") == []:
            notes.append(f"{section}[{i}] ({entry.get('name', entry['reward_model'])}): applicable_datasets is empty, "
                         f"so it never scores; left out")
            continue
        new: dict[str, Any] = {"dtype": "bfloat16"}
        judge = str(entry["reward_model"]).lower() == "vllm_evaluate"
        rational = str(entry["reward_model"]).lower() in RATIONAL_REWARDS
        cls = str(entry["reward_model"]).rpartition(".")[2].lower()
        geneval = cls in ("geneval", "genevalrewardmodel")
        if cls in REMOTE_CLIENTS:  # its client sends the row metadata along, as ours does with metadata: true
            entry = {**entry, "reward_model": "remote", "protocol": "flow-factory", "kind": REMOTE_CLIENTS[cls],
                     "metadata": True}
            notes.append(f"{section}[{i}]: {cls} -> remote (protocol: flow-factory, kind: {REMOTE_CLIENTS[cls]}, "
                         f"metadata: true)")
        elif geneval:
            entry = {**entry, "reward_model": "geneval"}
            dropped = [k for k in GENEVAL_DROPPED if k in entry]
            if dropped:
                notes.append(f"{section}[{i}] (geneval): {', '.join(dropped)} dropped; flowrl's geneval runs a "
                              f"transformers Mask2Former (option detector, default COCO Swin-S) and CLIP (clip_model, "
                              f"default openai/clip-vit-large-patch14); map class names with class_aliases")
                entry = {k: v for k, v in entry.items() if k not in GENEVAL_DROPPED}
        if rational and entry.get("api_base_url") is None:
            new["url"] = RATIONAL_DEFAULT_URL
            notes.append(f"{section}[{i}]: url: {RATIONAL_DEFAULT_URL}, Flow-Factory's default api_base_url; "
                         f"point it at your judge server")
        for key, value in entry.items():
            if rational and key in RATIONAL_KEYS:
                if value is not None and not (key == "api_key" and value == "EMPTY"):  # EMPTY: no token
                    new[RATIONAL_KEYS[key]] = value
            elif rational and key == "max_retries":
                try:
                    attempts = int(value)
                except (TypeError, ValueError):
                    raise ConversionError(f"{section}[{i}].max_retries: {value!r} is not a whole number of "
                                          f"attempts") from None
                new["retries"] = max(0, attempts - 1)
                if attempts < 1:
                    notes.append(f"{section}[{i}].max_retries: {value} (no attempt at all in Flow-Factory) -> "
                                 f"retries: 0, one attempt")
            elif key in REWARD_DROPPED:
                notes.append(f"{section}[{i}].{key}: dropped; {REWARD_DROPPED[key]}")
            elif key == "name" and value == "default":
                continue
            elif key == "device":
                if value is not None and not str(value).startswith("cuda"):
                    new["device"] = value
            elif key == "applicable_datasets":
                if value is not None:
                    new["datasets"] = [value] if isinstance(value, str) else list(value)
            elif key in REWARD_KEYS:
                new[REWARD_KEYS[key]] = value
            elif key == "retry_attempts":
                try:
                    new["retries"] = max(0, int(value) - 1)
                except (TypeError, ValueError):
                    raise ConversionError(f"{section}[{i}].retry_attempts: {value!r} is not a whole number of "
                                          f"attempts") from None
            elif geneval and key in GENEVAL_KEYS:
                new[GENEVAL_KEYS[key]] = value
            elif judge and key in JUDGE_KEYS:
                new[JUDGE_KEYS[key]] = value
            elif key == "reward_model" and judge:
                new[key] = "vlm_judge"
                notes.append(f"{section}[{i}]: vllm_evaluate -> vlm_judge; its default question asks whether the "
                             f"image shows the prompt: set `question` to the one your Flow-Factory version asks")
            else:
                new[key] = value
        if section == "eval_rewards" and isinstance(new.get("weight"), dict):
            notes.append(f"{section}[{i}].weight: per-source weights dropped; evaluation reports each reward "
                         f"unweighted")
            new.pop("weight")
        out += _split_by_weight(f"{section}[{i}]", new, sources or [], notes)
    return out


def _split_by_weight(where: str, entry: dict, sources: list[str], notes: list[str]) -> list[dict]:
    """A reward whose ``weight`` is Flow-Factory's per-source mapping (sources left out weigh 1) ->
    one entry per distinct weight, each scoring only its sources (``datasets``); one entry with a
    number when every covered source weighs the same."""
    weight = entry.get("weight", 1.0)
    if not isinstance(weight, dict):
        return [entry]
    covered = entry.get("datasets") or sources
    unknown = sorted(set(weight) - set(covered))
    if unknown or not covered:
        raise ConversionError(f"{where}.weight: per-source weights for {unknown or sorted(weight)}, which this reward "
                              f"does not score (its sources: {covered}). Fix: name only data.datasets sources it "
                              f"scores (applicable_datasets)")
    by_weight: dict[float, list[str]] = {}
    for name in covered:
        try:
            w = float(weight.get(name, 1.0))
        except (TypeError, ValueError):
            raise ConversionError(f"{where}.weight.{name}: {weight[name]!r} is not a number") from None
        by_weight.setdefault(w, []).append(name)
    if len(by_weight) == 1:
        return [{**entry, "weight": next(iter(by_weight))}]
    label = entry.get("name", entry["reward_model"])
    split = [{**entry, "name": f"{label}_{'_'.join(names)}", "weight": w, "datasets": names}
             for w, names in by_weight.items()]
    notes.append(f"{where}: per-source weights -> {len(split)} entries ({', '.join(e['name'] for e in split)}), each "
                 f"scoring its sources with one weight (each loads its own copy of the model)")
    return split
