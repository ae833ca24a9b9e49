"""``flowrl convert``: a Flow-Factory config becomes a flowrl config that loads and means the same run."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from shared.config import ConfigError, load_config, parse_config
from shared.flow_factory import ConversionError, convert
from trainer.cli import main
from trainer.ema import ema_decay
from trainer.timesteps import sd3_time_shift

# Flow-Factory's GRPO LoRA recipe for FLUX.1 (reference/flow-factory.md 2.9), in its own layout and names
FF_GRPO = yaml.safe_load("""
launcher: accelerate
config_file: config/deepspeed/deepspeed_zero2.yaml
num_processes: 8
main_process_port: 29500
mixed_precision: bf16
data:
  dataset_dir: dataset/pickscore
  dataloader_num_workers: 16
  force_reprocess: false
model:
  finetune_type: lora
  lora_rank: 64
  lora_alpha: 128
  model_name_or_path: black-forest-labs/FLUX.1-dev
  model_type: flux1
scheduler:
  dynamics_type: Flow-SDE
  noise_level: 0.7
  num_sde_steps: 1
  sde_steps: [1, 2, 3]
train:
  trainer_type: grpo
  resolution: 512
  num_inference_steps: 10
  per_device_batch_size: 2
  group_size: 16
  unique_sample_num_per_epoch: 48
  gradient_step_per_epoch: 2
  max_epochs: null
  learning_rate: 3.0e-4
  clip_range: [-1.0e-4, 2.0e-4]
  adv_clip_range: [-5.0, 5.0]
  global_std: false
  ema_decay: 0.9
  ema_update_interval: 4
  enable_gradient_checkpointing: true
  latent_storage_dtype: bf16
eval:
  resolution: 1024
  num_inference_steps: 20
  seed: null
log:
  project: Flow-Factory
  logging_backend: wandb
  save_dir: save
  save_freq: 20
rewards:
  name: default
  reward_model: PickScore_Rank
  device: cuda
  async_reward: false
""")


def test_a_flow_factory_grpo_recipe_becomes_a_flowrl_config_that_loads():
    raw, notes = convert(copy.deepcopy(FF_GRPO))
    cfg = parse_config(raw)
    t = cfg.train
    assert (t.dynamics_type, t.noise_level, t.train_steps, t.num_train_steps) == ("Flow-SDE", 0.7, [1, 2, 3], 1)
    assert t.clip_range == (1e-4, 2e-4) and t.adv_clip_range == 5.0  # signed offsets -> distances
    assert t.mixed_precision == "bf16" and t.rollout_state_dtype == "bfloat16"
    assert cfg.model.gradient_checkpointing and cfg.model.lora_alpha == 128
    assert t.save_freq == 20 and cfg.output_dir == "save" and cfg.logging_backend == "wandb"
    assert t.max_epochs == 1_000_000  # null: Flow-Factory runs until stopped
    # what Flow-Factory does when a key is absent is written out: gdpo, x-based KL off, eval CFG 3.5
    assert t.advantage_aggregation == "gdpo" and t.kl_beta == 0.0 and cfg.eval.guidance_scale == 3.5
    assert cfg.model.master_weight_dtype == "bfloat16"
    reward = cfg.rewards[0]
    assert reward.reward_model == "PickScore_Rank" and reward.label == "PickScore_Rank"  # 'default' dropped
    assert reward.device == "auto" and reward.dtype == "bfloat16" and reward.options == {}
    joined = "\n".join(notes)
    for dropped in ("launcher", "config_file", "num_processes", "data.dataloader_num_workers",
                    "rewards[0].async_reward"):
        assert f"{dropped}: dropped" in joined
    assert "train.max_epochs: null" in joined


def test_the_ema_updates_on_the_same_epochs_as_flow_factorys():
    """Flow-Factory updates its EMA after outer epoch k when (k + 1) % interval == 0; here after
    optimizer step s when s % interval == 0. With 2 optimizer steps an epoch the converted interval
    must pick the same epochs."""
    raw, _ = convert(copy.deepcopy(FF_GRPO))
    t = parse_config(raw).train
    steps_per_epoch = t.gradient_step_per_epoch * t.num_inner_epochs
    ours = {s // steps_per_epoch - 1 for s in range(1, 41 * steps_per_epoch) if s % t.ema_update_interval == 0}
    theirs = {k for k in range(40) if (k + 1) % FF_GRPO["train"]["ema_update_interval"] == 0}
    assert ours == theirs
    # the power schedule's warm-up (10 epochs there) is counted in steps here: the same decay at an epoch's end
    for k in (1, 5, 30):
        there = ema_decay(k, "power", 0.9, warmup_steps=10)
        here = ema_decay((k + 1) * steps_per_epoch - 1, "power", 0.9, warmup_steps=t.ema_warmup_steps)
        assert here == pytest.approx(there, abs=0.02)


def test_flow_factorys_time_shift_s_is_our_time_shift_one_over_s():
    """Flow-Factory warps the denoising fraction f = 1 - sigma by s f / (1 + (s - 1) f); we warp
    sigma. The converted shift must give the same sigmas (reference/flow-factory.md 3.9)."""
    raw, notes = convert({"train": {"trainer_type": "nft", "time_shift": 3.0, "timestep_range": 1.0},
                          "rewards": [{"reward_model": "brightness"}]})
    ours = parse_config(raw).train.time_shift
    assert ours == pytest.approx(1 / 3)
    sigma = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    f = 1 - sigma
    theirs = 1 - 3.0 * f / (1 + 2.0 * f)
    assert torch.allclose(sd3_time_shift(sigma, ours), theirs, atol=1e-12)
    assert any("train.time_shift: 3 -> 0.333333" in n for n in notes)


def test_nft_defaults_and_a_timestep_range_pair():
    raw, notes = convert({"train": {"trainer_type": "nft", "timestep_range": [0.1, 0.7], "num_train_timesteps": 0},
                          "rewards": [{"reward_model": "brightness"}]})
    t = parse_config(raw).train
    assert t.timestep_fraction == 0.7 and t.num_train_timesteps is None and t.nft_beta == 1.0
    assert t.time_sampling_strategy == "discrete" and t.time_shift == pytest.approx(1 / 3)  # Flow-Factory's 3.0
    assert any("starts above 0" in n for n in notes)


def test_height_width_gradient_accumulation_and_a_remote_reward():
    raw, notes = convert({
        "num_processes": 2,
        "train": {"height": 384, "width": 640, "unique_sample_num_per_epoch": 8, "group_size": 8,
                  "per_device_batch_size": 4, "gradient_accumulation_steps": 2},
        "eval": {"width": 768},
        "rewards": [{"reward_model": "remote", "server_url": "http://judge:8000", "retry_attempts": 5,
                     "timeout": 30, "num_workers": 4}],
    })
    cfg = parse_config(raw)
    assert cfg.train.resolution == (384, 640) and cfg.eval.resolution == (1024, 768)
    assert cfg.train.gradient_step_per_epoch == 4  # 64 samples / (4 per batch x 2 processes x 2 accumulated)
    assert cfg.rewards[0].options == {"url": "http://judge:8000", "retries": 4, "timeout": 30}  # 5 attempts
    assert any("num_workers: dropped" in n for n in notes)


@pytest.mark.parametrize("cls, kind", [("RemotePointwiseRewardModel", "pointwise"),
                                       ("RemoteGroupwiseRewardModel", "groupwise")])
def test_flow_factorys_remote_clients_become_our_remote_reward_with_metadata(cls, kind):
    raw, notes = convert({"rewards": [{"reward_model": f"flow_factory.rewards.my_reward_remote.{cls}",
                                       "server_url": "http://rm:8000", "retry_attempts": 3, "batch_size": 8}]})
    spec = parse_config(raw).rewards[0]
    assert spec.reward_model == "remote" and spec.batch_size == 8
    assert spec.options == {"url": "http://rm:8000", "retries": 2, "protocol": "flow-factory", "kind": kind,
                            "metadata": True}


def test_flow_factorys_geneval_converts_to_ours_and_drops_its_mmdetection_models():
    raw, notes = convert({"rewards": [{"reward_model": "geneval", "extra_kwargs": {
        "detection_threshold": 0.4, "counting_threshold": 0.85, "max_objects": 8, "clip_model": "ViT-L-14",
        "detector_config": "mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco", "object_names_path": "x.txt"}}]})
    spec = parse_config(raw).rewards[0]
    assert spec.reward_model == "geneval"
    assert spec.options == {"threshold": 0.4, "counting_threshold": 0.85, "max_objects": 8}
    assert any("detector_config, clip_model, object_names_path dropped" in n for n in notes)


def test_flow_factorys_vllm_evaluate_becomes_a_vlm_judge_with_its_options():
    raw, notes = convert({"rewards": [{"reward_model": "vllm_evaluate", "api_base_url": "http://vllm:8000/v1",
                                       "api_key": "sk", "vlm_model": "Qwen/Qwen2.5-VL-7B-Instruct",
                                       "max_concurrent": 50, "max_retries": 4, "top_logprobs": 20,
                                       "max_cache_size": 10, "async_reward": True}]})
    spec = parse_config(raw).rewards[0]
    assert spec.reward_model == "vlm_judge"
    assert spec.options == {"url": "http://vllm:8000/v1", "token": "sk", "model": "Qwen/Qwen2.5-VL-7B-Instruct",
                            "max_concurrent": 50, "retries": 4, "top_logprobs": 20, "cache_size": 10}
    assert any("set `question`" in n for n in notes)


def test_a_trainer_flowrl_does_not_have_is_refused_by_name(monkeypatch):
    import shared.flow_factory as ff

    monkeypatch.setattr(ff, "UNSUPPORTED_TRAINERS", ("tdm",))
    with pytest.raises(ConversionError, match="'tdm' has no flowrl implementation"):
        convert({"train": {"trainer_type": "tdm"}, "rewards": [{"reward_model": "pickscore"}]})


def test_flow_factorys_crd_converts_with_its_defaults_and_keys():
    raw, notes = convert({"train": {"trainer_type": "crd"}, "rewards": [{"reward_model": "pickscore"}]})
    t = parse_config(raw).train
    assert (t.trainer_type, t.crd_beta, t.crd_loss_type, t.crd_use_old, t.crd_adaptive_logp) == ("crd", 1.0, "mse",
                                                                                                 True, True)
    assert (t.crd_weight_temp, t.crd_old_decay, t.crd_sampling_decay) == (-1.0, "0-0.25-0.005-0.999",
                                                                         "75-0.0-0.0075-0.999")
    assert (t.kl_beta, t.ref_guidance_scale, t.crd_reward_adaptive_kl) == (0.1, 4.5, True)
    assert (t.time_sampling_strategy, t.timestep_fraction, t.time_shift) == ("discrete", 0.99, pytest.approx(1 / 3))
    raw, notes = convert({"train": {"trainer_type": "crd", "crd_loss_type": "bce", "use_old_for_loss": False,
                                    "weight_temp": 0.5, "old_model_decay": 3, "sampling_model_decay": "fast",
                                    "kl_beta": 0, "kl_cfg": 4.5, "reward_adaptive_kl": False},
                          "rewards": [{"reward_model": "pickscore"}]})
    t = parse_config(raw).train
    assert (t.crd_loss_type, t.crd_use_old, t.crd_weight_temp, t.crd_old_decay, t.crd_sampling_decay) == (
        "bce", False, 0.5, "3", "fast")  # 3: Flow-Factory's preset number for "offline", read as such
    assert (t.kl_beta, t.ref_guidance_scale, t.crd_reward_adaptive_kl) == (0, None, False)
    assert any("kl_cfg: 4.5 dropped" in n for n in notes)
    # kl_cfg 1 leaves the KL reference at the policy's own CFG, as Flow-Factory does at or below 1
    raw, _ = convert({"train": {"trainer_type": "crd", "kl_cfg": 1.0, "guidance_scale": 4.5},
                      "rewards": [{"reward_model": "pickscore"}]})
    t = parse_config(raw).train
    assert t.ref_guidance_scale is None and t.reference_guidance_scale == 4.5


def test_flow_factorys_dpo_converts_with_its_defaults_and_keys():
    raw, notes = convert({"train": {"trainer_type": "dpo"}, "rewards": [{"reward_model": "pickscore"}]})
    t = parse_config(raw).train
    assert (t.trainer_type, t.dpo_beta, t.time_sampling_strategy, t.num_train_timesteps) == ("dpo", 2000.0,
                                                                                            "logit_normal", 1)
    assert t.timestep_fraction == 0.99 and t.time_shift == 1.0 and t.uses_reference
    raw, notes = convert({"train": {"trainer_type": "dpo", "beta": 500, "weighting_scheme": "uniform",
                                    "logit_std": 1.5}, "rewards": [{"reward_model": "pickscore"}]})
    t = parse_config(raw).train
    assert (t.dpo_beta, t.time_sampling_strategy) == (500.0, "uniform")
    assert any("train.logit_std: 1.5 dropped" in n for n in notes)
    # gradient accumulation counts pair micro-batches: 48 pairs / (3 pairs x 8 processes x 1) = 2 steps
    raw, notes = convert({"num_processes": 8, "train": {"trainer_type": "dpo", "group_size": 16,
                                                         "unique_sample_num_per_epoch": 48, "per_device_batch_size": 3,
                                                         "gradient_accumulation_steps": 1},
                          "rewards": [{"reward_model": "pickscore"}]})
    cfg = parse_config(raw)
    assert cfg.train.gradient_step_per_epoch == 2 and cfg.geometry(8).train_batches_per_rank == 2


def test_a_flow_factory_warm_start_becomes_init_from(tmp_path):
    raw, notes = convert({"model": {"resume_path": str(tmp_path), "resume_type": "lora"},
                          "rewards": [{"reward_model": "brightness"}]})
    assert parse_config(raw).model.init_from == str(tmp_path)
    assert any("model.resume_type: dropped" in n for n in notes)


def test_an_unknown_key_is_left_out_and_said():
    raw, notes = convert({"train": {"my_knob": 3}, "rewards": [{"reward_model": "brightness"}]})
    assert "my_knob" not in raw["train"]
    assert any("train.my_knob: not a Flow-Factory key" in n for n in notes)


def test_flowrl_convert_writes_a_config_flowrl_train_loads(tmp_path, capsys):
    src, out = tmp_path / "ff.yaml", tmp_path / "flowrl.yaml"
    src.write_text(yaml.safe_dump(FF_GRPO))
    assert main(["convert", str(src), "-o", str(out)]) == 0
    text = out.read_text()
    assert f"# launch: flowrl train {out} --processes 8" in text and "# - launcher: dropped" in text
    cfg = load_config(out)
    assert cfg.train.train_steps == [1, 2, 3]
    assert "wrote" in capsys.readouterr().err


def test_flowrl_convert_says_what_still_does_not_load(tmp_path, capsys):
    ff = copy.deepcopy(FF_GRPO)
    ff["rewards"] = {"reward_model": "clap"}  # Flow-Factory's audio reward (LTX-2): none here
    src = tmp_path / "ff.yaml"
    src.write_text(yaml.safe_dump(ff))
    assert main(["convert", str(src), "-o", str(tmp_path / "out.yaml")]) == 2
    err = capsys.readouterr().err
    assert "does not load yet" in err and "rewards[0].reward_model" in err
    assert "unknown reward 'clap'" in err
    assert (tmp_path / "out.yaml").exists()  # written anyway, to be fixed by hand


def test_flow_factorys_rational_rewards_convert_and_build(tmp_path):
    ff = copy.deepcopy(FF_GRPO)
    ff["rewards"] = [{"name": "rr", "reward_model": "rational_rewards_t2i", "api_base_url": "http://judge:8000/v1",
                      "api_key": "EMPTY", "vlm_model": "RR-T2I", "max_retries": 5, "max_concurrent": 16,
                      "timeout": 120, "temperature": 0.0, "max_tokens": 1024, "aspects": ["text_faithfulness"]}]
    ff["eval_rewards"] = [{"reward_model": "rational_rewards_edit", "api_key": "sk-1"}]
    raw, notes = convert(ff)
    assert raw["rewards"] == [{"dtype": "bfloat16", "name": "rr", "reward_model": "rational_rewards_t2i",
                               "url": "http://judge:8000/v1", "model": "RR-T2I", "retries": 4, "max_concurrent": 16,
                               "timeout": 120, "temperature": 0.0, "max_tokens": 1024,
                               "aspects": ["text_faithfulness"]}]
    assert raw["eval_rewards"][0]["url"] == "http://localhost:8000/v1" and raw["eval_rewards"][0]["token"] == "sk-1"
    assert any("eval_rewards[0]: url: http://localhost:8000/v1" in n for n in notes)
    src, out = tmp_path / "ff.yaml", tmp_path / "out.yaml"
    src.write_text(yaml.safe_dump(ff))
    assert main(["convert", str(src), "-o", str(out)]) == 0
    cfg = load_config(out)
    from shared.rewards import build_reward
    built = build_reward(cfg.rewards[0].reward_model, **cfg.rewards[0].options)
    assert (built.url, built.model, built.retries, built.aspects) == ("http://judge:8000/v1", "RR-T2I", 4,
                                                                      ("text_faithfulness",))


def test_flow_factorys_ocr_reward_converts_to_ours(tmp_path):
    ff = copy.deepcopy(FF_GRPO)
    ff["rewards"] = {"name": "ocr", "reward_model": "ocr", "batch_size": 16, "device": "cuda"}
    src, out = tmp_path / "ff.yaml", tmp_path / "out.yaml"
    src.write_text(yaml.safe_dump(ff))
    assert main(["convert", str(src), "-o", str(out)]) == 0
    cfg = load_config(out)
    assert [(r.reward_model, r.label) for r in cfg.rewards] == [("ocr", "ocr")]


def test_a_flow_factory_key_left_in_a_flowrl_config_names_ours():
    base = {"logging_backend": "none", "rewards": [{"reward_model": "brightness"}]}
    with pytest.raises(ConfigError, match=r"here it is `model.gradient_checkpointing`"):
        parse_config({**base, "train": {"enable_gradient_checkpointing": True}})
    with pytest.raises(ConfigError, match=r"`scheduler.sde_steps` is Flow-Factory's key; here it is `train.train_steps`"):
        parse_config({**base, "train": {"sde_steps": [1]}})
    with pytest.raises(ConfigError, match=r"`scheduler:` is a Flow-Factory section"):
        parse_config({**base, "scheduler": {"noise_level": 0.7}})


def test_flow_factorys_dgpo_converts_with_its_defaults_and_keys():
    raw, notes = convert({"train": {"trainer_type": "dgpo"}, "rewards": [{"reward_model": "pickscore"}]})
    t = parse_config(raw).train
    assert (t.trainer_type, t.dgpo_beta, t.dgpo_clip, t.sample_from_ema_after) == ("dgpo", 100.0, True, 200)
    assert (t.time_sampling_strategy, t.timestep_fraction, t.clip_range) == ("discrete", 0.6, 1e-4)
    raw, notes = convert({"train": {"trainer_type": "dgpo", "dpo_beta": 50, "clip_dsm": False, "switch_ema_ref": 10,
                                    "use_shared_noise": False, "use_ema_ref": True, "ema_ref_max_decay": 0.3},
                          "rewards": [{"reward_model": "pickscore"}]})
    t = parse_config(raw).train
    assert (t.dgpo_beta, t.dgpo_clip, t.sample_from_ema_after) == (50, False, 10)
    assert any("use_shared_noise: false dropped" in n for n in notes)
    assert any("train.use_ema_ref: True dropped" in n for n in notes)
    assert any("train.ema_ref_max_decay: 0.3 dropped" in n for n in notes)


# Flow-Factory's newer layout: sources in data.datasets, the optimizer in optimizers:, the attention
# backend and compilation in acceleration:, trainable_parameters_dtype, rewards routed per source
FF_SOURCES = yaml.safe_load("""
mixed_precision: bf16
data:
  datasets:
    - name: pick
      dataset_dir: dataset/pickscore
      train: {weight: 3}
      eval: {}
    - name: ocr
      dataset_dir: dataset/ocr
      train: {weight: 1.0, split: train_v2, max_dataset_size: 500}
      eval: {enabled: false}
    - name: geneval
      dataset_dir: dataset/geneval
      eval: {split: validation, resolution: 1024, max_dataset_size: 64}
  max_dataset_size: 2000
model:
  finetune_type: lora
  lora_rank: 32
  model_name_or_path: stabilityai/stable-diffusion-3.5-medium
  model_type: sd3-5
  trainable_parameters_dtype: fp32
  frozen_parameters_dtype: {default: bf16, text_encoders: null}
  component_load_dtypes: {default: bf16}
train:
  trainer_type: grpo
  learning_rate: 1.0e-4
  enable_gradient_checkpointing: {mode: every_n, every_n: 2}
  shuffle_samples: true
  reward_optimization_overlap: false
log:
  checkpoint_retention: 3
acceleration:
  shared:
    - name: attention_backend
      params: {backend: flash}
    - name: torch_compile
      params: {mode: regional, compile_kwargs: {mode: max-autotune, fullgraph: true}}
  rollout:
    - name: diffusers_cache
      params: {policy: first_block, threshold: 0.08}
optimizers:
  - name: default
    learning_rate: 3.0e-4
    betas: [0.9, 0.99]
    max_grad_norm: 0.5
rewards:
  - name: pick_score
    reward_model: PickScore
    applicable_datasets: [pick]
  - name: ocr
    reward_model: ocr
    weight: {ocr: 2.0}
  - name: never
    reward_model: brightness
    applicable_datasets: []
eval_rewards:
  - reward_model: rational_rewards_t2i
    extra_kwargs: {api_base_url: "http://judge:8000/v1", vlm_model: RR}
    applicable_datasets: [geneval]
""")


def test_flow_factorys_newer_layout_converts_to_the_same_run():
    raw, notes = convert(copy.deepcopy(FF_SOURCES))
    cfg = parse_config(raw)
    pick, ocr, geneval = cfg.data.datasets
    assert (pick.name, pick.train.weight, pick.train.max_dataset_size, pick.eval.split) == ("pick", 3, 2000, "test")
    assert (ocr.train.weight, ocr.train.split, ocr.train.max_dataset_size, ocr.eval) == (1, "train_v2", 500, None)
    assert geneval.train is None and (geneval.eval.split, geneval.eval.max_dataset_size) == ("validation", 64)
    assert geneval.eval.resolution == 1024  # its own eval size, as there
    ff = copy.deepcopy(FF_SOURCES)
    ff["data"]["datasets"][2]["eval"] = {"height": 768, "width": 1024, "num_inference_steps": 30, "guidance_scale": 5}
    own = parse_config(convert(ff)[0]).data.datasets[2].eval
    assert (own.resolution, own.num_inference_steps, own.guidance_scale) == ((768, 1024), 30, 5.0)
    # optimizers: replaces train.learning_rate, its left-out keys take the optimizer's defaults
    t = cfg.train
    assert (t.learning_rate, t.adam_betas, t.max_grad_norm, t.adam_epsilon, t.adam_weight_decay) == (
        3e-4, (0.9, 0.99), 0.5, 1e-8, 1e-4)
    assert any("train.learning_rate: replaced by the optimizers: entry" in n for n in notes)
    m = cfg.model
    assert (m.attn_backend, m.compile, m.master_weight_dtype) == ("flash", "max-autotune", "float32")
    assert (m.gradient_checkpointing.mode, m.gradient_checkpointing.every_n) == ("every_n", 2)
    assert m.options["transformer_dtype"] == "bfloat16" and t.keep_checkpoints == 3
    assert any("diffusers_cache dropped" in n for n in notes) and any("fullgraph" in n for n in notes)
    # rewards: routed by source; a per-source weight map becomes one entry per weight; [] never scores
    assert [(r.label, r.weight, r.datasets) for r in cfg.rewards] == [
        ("pick_score", 1.0, ["pick"]), ("ocr_pick", 1.0, ["pick"]), ("ocr_ocr", 2.0, ["ocr"])]
    assert any("never" in n and "left out" in n for n in notes)
    (judge,) = cfg.eval_rewards
    assert (judge.options["url"], judge.options["model"], judge.datasets) == ("http://judge:8000/v1", "RR", ["geneval"])


def test_the_newer_layouts_refusals_say_what_to_fix():
    for change, message in [
            (lambda ff: ff["data"]["datasets"][2].pop("eval"), r"datasets\[2\] \(geneval\): neither trained on nor"),
            (lambda ff: ff["data"]["datasets"][0]["train"].update(weight=1.5), "whole number"),
            (lambda ff: ff["optimizers"].append({"name": "fake"}) or ff["optimizers"][0].update(name="gen"),
             "none \\(or several\\) named 'default'"),
            (lambda ff: ff["optimizers"][0].update(optimizer="sgd"), "not adamw or muon"),
            (lambda ff: ff["rewards"][1].update(weight={"geneval": 2.0}), r"rewards\[1\].weight: .*'geneval'"),
            (lambda ff: ff["train"].update(trainer_type="dmd2"), "'dmd2' has no flowrl implementation"),
            (lambda ff: ff["eval_rewards"][0].update(max_retries="five"), "max_retries: 'five'"),
            (lambda ff: ff["model"].update(trainable_parameters_dtype="int8"), "not a dtype")]:
        ff = copy.deepcopy(FF_SOURCES)
        change(ff)
        with pytest.raises(ConversionError, match=message):
            convert(ff)


def test_muon_and_several_optimizers_convert_with_notes():
    ff = copy.deepcopy(FF_SOURCES)
    ff["optimizers"] = [{"name": "default", "optimizer": "muon", "learning_rate": 2e-4, "fallback_betas": [0.8, 0.9],
                         "momentum": 0.9}, {"name": "fake", "learning_rate": 1.0, "update_frequency": 5}]
    raw, notes = convert(ff)
    t = parse_config(raw).train
    assert (t.learning_rate, t.adam_betas, t.adam_epsilon) == (2e-4, (0.8, 0.9), 1e-8)
    assert (t.optimizer, t.muon_momentum, t.muon_adjust_lr_fn) == ("muon", 0.9, "match_rms_adamw")
    assert any("['fake'] left out" in n for n in notes)
    ff["optimizers"] = [{"optimizer": "muon", "adjust_lr_fn": "original", "ns_steps": 3, "nesterov": False,
                         "ns_coefficients": [3.0, -4.0, 2.0]}]
    raw, notes = convert(ff)
    t = parse_config(raw).train
    assert (t.muon_adjust_lr_fn, t.muon_ns_steps, t.muon_nesterov) == ("original", 3, False)
    assert any("ns_coefficients [3.0, -4.0, 2.0] dropped" in n for n in notes)
    ff["optimizers"] = {"learning_rate": 5e-5, "update_frequency": 2}  # one entry, as a mapping
    raw, notes = convert(ff)
    assert raw["train"]["learning_rate"] == 5e-5 and any("update_frequency 2 dropped" in n for n in notes)


def test_a_source_list_leaves_the_single_folder_keys_out():
    ff = copy.deepcopy(FF_SOURCES)
    ff["data"]["dataset_dir"] = "dataset/other"
    raw, notes = convert(ff)
    assert "dataset_dir" not in raw["data"] and any("data.dataset_dir: 'dataset/other' beside" in n for n in notes)
    assert not any("data.dataset_dir" in n for n in notes if n.startswith("Flow-Factory's defaults"))
    bare, _ = convert({"train": {"trainer_type": "grpo"}, "rewards": [{"reward_model": "brightness"}]})
    assert bare["data"]["dataset_dir"] == "data"  # Flow-Factory's default folder, not flowrl's tiny one


def test_flow_factorys_dppo_converts():
    ff = copy.deepcopy(FF_GRPO)
    ff["train"].update(trainer_type="dppo", kl_mask_type="v-based", kl_beta=1e-3, kl_guidance_scale=4.5)
    ff["train"].pop("clip_range")
    raw, notes = convert(ff)
    t = parse_config(raw).train
    assert (t.trainer_type, t.kl_mask_type, t.kl_mask_threshold, t.kl_beta, t.ref_guidance_scale) == (
        "dppo", "v-based", 1e-6, 1e-3, 4.5)
    assert (t.kl_type, t.advantage_aggregation, t.adv_clip_range) == ("x-based", "gdpo", 5.0)
    ff["train"]["kl_beta"] = 0
    raw, notes = convert(ff)
    assert parse_config(raw).train.ref_guidance_scale is None and any("kl_guidance_scale: 4.5 dropped" in n for n in notes)


def test_the_newer_layouts_edge_cases():
    ff = copy.deepcopy(FF_SOURCES)
    ff["data"].update(image_dir="imgs", datasets=ff["data"]["datasets"][:2])
    ff["data"]["datasets"][0]["image_dir"] = "own"
    ff["rewards"] = [{"reward_model": "brightness", "applicable_datasets": "pick"}, {"reward_model": "ocr"}]
    ff["eval_rewards"] = [{"reward_model": "brightness", "weight": {"pick": 2.0}}]
    ff["optimizers"] = []
    ff["model"]["frozen_parameters_dtype"] = {"default": "bf16", "transformer": None}
    ff["acceleration"] = {"shared": [{"name": "my_pkg.Fast"}]}
    raw, notes = convert(ff)
    cfg = parse_config(raw)
    pick, ocr = cfg.data.datasets
    assert (pick.image_dir, ocr.image_dir) == ("own", "imgs")  # the data: folder for sources without their own
    assert pick.eval.max_dataset_size == 2000  # data.max_dataset_size caps the eval side too
    assert cfg.train.learning_rate == 1e-4 and any("optimizers: empty" in n for n in notes)
    assert cfg.rewards[0].datasets == ["pick"] and "transformer_dtype" not in cfg.model.options
    assert cfg.eval_rewards[0].weight == 1.0 and any("per-source weights dropped" in n for n in notes)
    assert any("my_pkg.Fast dropped; not an accelerator this converter knows" in n for n in notes)
    ff["data"]["datasets"] = None  # null: one folder, as there
    raw, _ = convert(ff)
    assert "datasets" not in raw["data"] and raw["data"]["dataset_dir"] == "data"
    for change, message in [
            (lambda f: f["data"].update(datasets=[{"name": "a", "train": {"weight": "x"}}]), "whole number"),
            (lambda f: f["acceleration"]["shared"][0].update(name="torch_compile", params=[1]), "params: expected")]:
        bad = copy.deepcopy(FF_SOURCES)
        change(bad)
        with pytest.raises(ConversionError, match=message):
            convert(bad)


def test_flow_factory_sections_left_in_a_flowrl_config_are_named():
    from shared.flow_factory import hint

    assert "ref_guidance_scale" in hint("train.kl_guidance_scale")
    assert "train.keep_checkpoints" in hint("log.checkpoint_retention")
    assert "train.learning_rate" in hint("optimizers") and "model.attn_backend" in hint("acceleration")


def test_absent_group_size_and_max_epochs_keep_flow_factorys_meaning():
    """Left out, Flow-Factory's group_size is 1 (no group to compare: flowrl's 8, with a note) and its
    max_epochs None (until stopped); both were changed without a note (K=8 for 100 epochs)."""
    from shared.flow_factory import convert

    ff = {"model": {"model_type": "sd3-5", "model_name_or_path": "x"},
          "train": {"trainer_type": "grpo", "unique_sample_num_per_epoch": 4, "per_device_batch_size": 4},
          "rewards": [{"reward_model": "PickScore"}]}
    out, notes = convert(ff)
    assert out["train"]["group_size"] == 8 and out["train"]["max_epochs"] == 1_000_000
    assert any("train.group_size" in n for n in notes) and any("runs until stopped" in n for n in notes)
