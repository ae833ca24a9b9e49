"""Config validation: strict keys with suggestions, types, incompatible combinations, batch
geometry, algorithm defaults, ``--set`` overrides."""

from __future__ import annotations

import copy

import pytest

from shared.config import (
    ALGORITHM_DEFAULTS,
    BatchGeometry,
    ConfigError,
    apply_overrides,
    load_config,
    parse_config,
)

BASE = {
    "logging_backend": "none",
    "train": {"trainer_type": "grpo", "resolution": 16, "num_inference_steps": 8,
              "group_size": 8, "unique_sample_num_per_epoch": 4, "per_device_batch_size": 16,
              "gradient_step_per_epoch": 2},
    "rewards": [{"reward_model": "brightness"}],
}


def raw(**sections) -> dict:
    """BASE with sections deep-merged (one level) from ``sections``."""
    out = copy.deepcopy(BASE)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


def error(r: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(r)
    return str(info.value)


# --------------------------------------------------------------------------- strict keys


def test_base_config_is_valid():
    cfg = parse_config(raw())
    assert cfg.train.trainer_type == "grpo"
    assert cfg.rewards[0].label == "brightness"


def test_unknown_top_level_key_suggests_nearest():
    msg = error(raw(ouput_dir="runs"))
    assert "ouput_dir" in msg
    assert "Did you mean `output_dir`?" in msg


def test_unknown_nested_key_suggests_nearest():
    msg = error(raw(train={"clip_rnage": 1e-3}))
    assert "train.clip_rnage" in msg
    assert "Did you mean `train.clip_range`?" in msg


def test_model_type_is_a_family_or_a_dotted_adapter():
    msg = error(raw(model={"model_type": "Flux1-Dev"}))
    assert msg.startswith("model.model_type: unknown model_type 'Flux1-Dev'. Did you mean 'flux1'?") and "Fix:" in msg
    assert "not a subclass of shared.models.base.FlowModelAdapter" in error(raw(model={"model_type": "shared.config.Config"}))
    for ok in ("SD3-5", "wan2_i2v", "not_installed_here.Family"):  # registered (any case), or left to the loader
        assert parse_config(raw(model={"model_type": ok, "model_name_or_path": "org/model"})).model.model_type == ok


def test_what_loading_the_model_would_refuse_is_a_config_error():
    """flowrl check passed these and the run stopped after start-up with a traceback (exit 1: a k8s Job
    retried the typo three times, loading the model each time)."""
    assert "model.model_name_or_path is required for model_type 'sd3-5'" in error(raw(model={"model_type": "sd3-5"}))
    msg = error(raw(model={"model_type": "sd3-5", "model_name_or_path": "org/m", "options": {"foo": 1}}))
    assert "unknown sd3-5 option(s) ['foo']" in msg
    assert "unknown tiny-model option(s) ['foo']" in error(raw(model={"model_type": "tiny", "options": {"foo": 1}}))
    msg = error(raw(model={"model_type": "tiny", "attn_backend": "flashh"}))
    assert "'flashh' is not an attention backend" in msg and "Did you mean 'flash'?" in msg
    msg = error(raw(model={"model_type": "qwen-image", "model_name_or_path": "org/m", "attn_backend": "sage"}))
    assert "'sage' cannot take an attention mask, and qwen-image attends with one" in msg
    parse_config(raw(model={"model_type": "sd3-5", "model_name_or_path": "org/m", "attn_backend": "sage"}))


def test_unknown_key_in_list_item_section():
    # rewards items allow extra keys (reward options), but model/eval sections are strict
    msg = error(raw(eval={"num_inferance_steps": 4}))
    assert "eval.num_inferance_steps" in msg
    assert "eval.num_inference_steps" in msg


def test_wrong_type_names_key_and_value():
    msg = error(raw(train={"learning_rate": "abc"}))
    assert "train.learning_rate" in msg
    assert "'abc'" in msg


def test_mixed_precision_no_survives_yaml_reading_it_as_false():
    # `mixed_precision: no` in YAML and `--set train.mixed_precision=no` both arrive as False
    cfg = parse_config(apply_overrides(raw(), ["train.mixed_precision=no"]))
    assert cfg.train.mixed_precision == "no"
    assert parse_config(raw(train={"mixed_precision": "bf16"})).train.mixed_precision == "bf16"
    assert "train.mixed_precision" in error(raw(train={"mixed_precision": True}))


def test_missing_rewards():
    r = raw()
    del r["rewards"]
    msg = error(r)
    assert "rewards" in msg and "required" in msg


def test_non_mapping_config():
    with pytest.raises(ConfigError, match="mapping"):
        parse_config(["not", "a", "mapping"])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- combinations


def test_ode_with_grpo_names_both_keys_and_fix():
    msg = error(raw(train={"dynamics_type": "ODE"}))
    assert "train.dynamics_type" in msg and "'ODE'" in msg
    assert "train.trainer_type" in msg and "'grpo'" in msg
    assert "Fix:" in msg and "Flow-SDE" in msg and "nft" in msg


def test_grpo_with_zero_noise_level_is_rejected():
    msg = error(raw(train={"noise_level": 0.0}))
    assert "noise_level=0.0" in msg and "train.trainer_type" in msg


def test_grpo_guard_needs_flow_sde():
    msg = error(raw(train={"trainer_type": "grpo-guard", "dynamics_type": "Dance-SDE"}))
    assert "train.dynamics_type" in msg and "'Dance-SDE'" in msg and "grpo-guard" in msg
    assert "Fix: set train.dynamics_type: Flow-SDE" in msg


def test_grpo_with_dance_sde_is_fine():
    cfg = parse_config(raw(train={"dynamics_type": "Dance-SDE"}))
    assert cfg.train.noise_level == 0.3  # the Dance-SDE default


def test_cps_noise_level_above_one():
    msg = error(raw(train={"dynamics_type": "CPS", "noise_level": 1.5}))
    assert "train.noise_level" in msg and "1.5" in msg and "CPS" in msg and "[0, 1]" in msg
    assert parse_config(raw(train={"dynamics_type": "CPS", "noise_level": 1.0})).train.noise_level == 1.0


def test_unknown_trainer_type_suggests():
    msg = error(raw(train={"trainer_type": "gpro"}))
    assert "train.trainer_type" in msg and "Did you mean 'grpo'?" in msg


def test_duplicate_reward_names():
    msg = error(raw(rewards=[{"reward_model": "brightness"}, {"reward_model": "brightness"}]))
    assert "rewards" in msg and "unique" in msg and "name" in msg
    # distinct names make it valid
    cfg = parse_config(raw(rewards=[{"reward_model": "brightness"},
                                    {"reward_model": "brightness", "name": "bright2"}]))
    assert [r.label for r in cfg.rewards] == ["brightness", "bright2"]


def test_train_steps_out_of_range():
    msg = error(raw(train={"train_steps": [0, 7]}))  # 8 steps -> valid indices 0..6
    assert "train.train_steps" in msg and "7" in msg and "[0, 6]" in msg
    assert error(raw(train={"train_steps": [-1]})).startswith("train.train_steps")
    assert parse_config(raw(train={"train_steps": [0, 6]})).train.train_steps == [0, 6]


def test_off_policy_needs_ema():
    msg = error(raw(train={"trainer_type": "nft", "ema_decay": 0.0}))
    assert "train.off_policy" in msg and "ema_decay" in msg


# --------------------------------------------------------------------------- batch geometry


def test_geometry_values():
    geo = parse_config(raw()).geometry(1)
    assert isinstance(geo, BatchGeometry)
    assert (geo.samples_per_rank, geo.batches_per_rank, geo.batches_per_grad_step) == (32, 2, 1)
    geo2 = parse_config(raw(train={"per_device_batch_size": 8})).geometry(2)
    assert (geo2.groups_per_rank, geo2.samples_per_rank, geo2.batches_per_rank) == (2, 16, 2)


def test_geometry_groups_not_divisible_by_world_size():
    cfg = parse_config(raw(train={"unique_sample_num_per_epoch": 3, "per_device_batch_size": 4,
                                  "gradient_step_per_epoch": 1}))
    with pytest.raises(ConfigError) as info:
        cfg.geometry(2)
    msg = str(info.value)
    assert "train.unique_sample_num_per_epoch=3" in msg and "not divisible" in msg and "e.g. 4" in msg


def test_geometry_batch_size_does_not_divide_samples():
    cfg = parse_config(raw(train={"per_device_batch_size": 12}))
    with pytest.raises(ConfigError) as info:
        cfg.geometry(1)
    msg = str(info.value)
    assert "train.per_device_batch_size=12" in msg and "32 samples" in msg


def test_geometry_grad_steps_do_not_divide_batches():
    cfg = parse_config(raw(train={"per_device_batch_size": 8, "gradient_step_per_epoch": 3}))
    with pytest.raises(ConfigError) as info:
        cfg.geometry(1)
    msg = str(info.value)
    assert "train.gradient_step_per_epoch=3" in msg and "4 micro-batches" in msg


# --------------------------------------------------------------------------- algorithm defaults


@pytest.mark.parametrize("trainer_type", sorted(ALGORITHM_DEFAULTS))
def test_algorithm_defaults_filled(trainer_type):
    cfg = parse_config(raw(train={"trainer_type": trainer_type}))
    for key, value in ALGORITHM_DEFAULTS[trainer_type].items():
        assert getattr(cfg.train, key) == value, key
    # nothing algorithm-dependent is left undecided
    for key in ("clip_range", "kl_beta", "noise_level", "time_sampling_strategy",
                "timestep_fraction", "ema_decay_schedule", "ema_update_interval", "ema_kl_beta"):
        assert getattr(cfg.train, key) is not None, key


def test_nft_defaults():
    t = parse_config(raw(train={"trainer_type": "nft"})).train
    assert t.dynamics_type == "ODE" and t.off_policy is True and t.noise_level == 0.0


def test_grpo_guard_defaults():
    t = parse_config(raw(train={"trainer_type": "grpo-guard"})).train
    assert t.clip_range == 2e-6 and t.global_std is False and t.dynamics_type == "Flow-SDE"
    assert t.noise_level == 0.7


def test_explicit_value_wins_over_algorithm_default():
    t = parse_config(raw(train={"trainer_type": "grpo-guard", "clip_range": 1e-3,
                                "global_std": True})).train
    assert t.clip_range == 1e-3 and t.global_std is True
    t = parse_config(raw(train={"trainer_type": "nft", "off_policy": False})).train
    assert t.off_policy is False


def test_eval_resolution_and_guidance_default_to_train():
    cfg = parse_config(raw(train={"resolution": 24, "guidance_scale": 3.0}))
    assert cfg.eval.resolution == 24 and cfg.eval.guidance_scale == 3.0
    cfg = parse_config(raw(eval={"resolution": 32}))
    assert cfg.eval.resolution == 32 and cfg.train.resolution == 16


def test_reward_extra_options_land_in_options():
    cfg = parse_config(raw(rewards=[{"reward_model": "brightness", "target": 0.8, "weight": 2}]))
    spec = cfg.rewards[0]
    assert spec.options == {"target": 0.8}
    assert spec.weight == 2.0


def test_a_warm_start_path_that_does_not_exist_fails_at_load(tmp_path):
    msg = error(raw(model={"init_from": str(tmp_path / "nope")}))
    assert "model.init_from" in msg and "does not exist" in msg
    assert parse_config(raw(model={"init_from": str(tmp_path)})).model.init_from == str(tmp_path)


def test_a_signed_clip_range_as_flow_factory_writes_it_fails_at_load_with_the_fix():
    msg = error(raw(train={"clip_range": [-1e-4, 2e-4]}))
    assert "train.clip_range" in msg and "[0.0001, 0.0002]" in msg
    assert parse_config(raw(train={"clip_range": [1e-4, 2e-4]})).train.clip_range == (1e-4, 2e-4)


def test_a_misspelt_reward_key_fails_at_load_and_names_the_entry_key_it_meant():
    msg = error(raw(rewards=[{"reward_model": "brightness", "wieght": 2}]))
    assert "rewards[0]" in msg and "'wieght'" in msg and "did you mean 'weight'?" in msg
    assert "target" in msg  # the reward's own options are listed


def test_a_misspelt_reward_option_names_the_nearest_option_of_that_reward():
    msg = error(raw(eval_rewards=[{"reward_model": "toy_geneval", "exact_object": True}]))
    assert "eval_rewards[0]" in msg and "did you mean 'exact_objects'?" in msg


def test_a_reward_that_compares_a_prompts_images_needs_several_in_evaluation():
    msg = error(raw(eval_rewards=[{"reward_model": "diversity"}]))
    assert "eval_rewards[0] ('diversity') is groupwise" in msg and "eval.images_per_prompt" in msg
    msg = error(raw(eval_rewards=[{"reward_model": "pairwise_brightness"}]))
    assert "is pairwise" in msg
    served = {"reward_model": "remote", "url": "http://127.0.0.1:1"}
    assert "is groupwise" in error(raw(eval_rewards=[{**served, "kind": "groupwise"}]))
    parse_config(raw(eval_rewards=[served]))  # a pointwise remote reward
    cfg = parse_config(raw(eval={"images_per_prompt": 4}, eval_rewards=[{"reward_model": "diversity"}]))
    assert cfg.eval_rewards[0].reward_model == "diversity"
    parse_config(raw(rewards=[{"reward_model": "pairwise_brightness"}]))  # training: groups are whole


def test_an_unknown_reward_name_fails_at_load_with_the_nearest_name():
    msg = error(raw(rewards=[{"reward_model": "brightnes"}]))
    assert "rewards[0].reward_model" in msg and "Did you mean 'brightness'?" in msg


def test_a_required_reward_option_left_out_fails_at_load():
    msg = error(raw(rewards=[{"reward_model": "remote"}]))
    assert "missing required option 'url'" in msg and "add the missing option" in msg
    parse_config(raw(rewards=[{"reward_model": "remote", "url": "http://127.0.0.1:1"}]))


def test_a_dotted_reward_that_does_not_import_here_is_left_to_where_it_runs():
    # a reward worker may have packages the trainer's machine lacks
    cfg = parse_config(raw(rewards=[{"reward_model": "not_installed_pkg.rewards.Mine", "alpha": 1}]))
    assert cfg.rewards[0].options == {"alpha": 1}


# --------------------------------------------------------------------------- overrides


def test_apply_overrides_nested_and_yaml_typed():
    r = apply_overrides(raw(), ["train.learning_rate=1e-4", "train.global_std=false",
                                "train.resolution=[16, 24]", "model.options.num_layers=1",
                                "run_name=my run", "train.clip_range=null"])
    assert r["train"]["learning_rate"] == 1e-4 and isinstance(r["train"]["learning_rate"], float)
    assert r["train"]["global_std"] is False
    assert r["train"]["resolution"] == [16, 24]
    assert r["model"] == {"options": {"num_layers": 1}}
    assert r["run_name"] == "my run"
    assert r["train"]["clip_range"] is None
    cfg = parse_config(r)
    assert cfg.train.resolution == (16, 24) and cfg.model.options == {"num_layers": 1}


def test_apply_overrides_list_index():
    r = apply_overrides(raw(rewards=[{"reward_model": "brightness"},
                                     {"reward_model": "jpeg_compressibility"}]),
                        ["rewards.0.weight=2", "rewards.1.name=jpeg"])
    cfg = parse_config(r)
    assert cfg.rewards[0].weight == 2.0 and cfg.rewards[1].label == "jpeg"


def test_apply_overrides_value_may_contain_equals():
    r = apply_overrides(raw(), ["run_name=a=b"])
    assert r["run_name"] == "a=b"


def test_apply_overrides_without_equals_raises():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(raw(), ["train.learning_rate"])


def test_apply_overrides_into_a_value_raises():
    with pytest.raises(ConfigError, match="`logging_backend` is a value, not a section"):
        apply_overrides(raw(), ["logging_backend.name=x"])
    with pytest.raises(ConfigError, match="`train.learning_rate` is a value"):
        apply_overrides(raw(train={"learning_rate": 1e-3}), ["train.learning_rate.x=1"])


def test_apply_overrides_bad_list_index_raises():
    with pytest.raises(ConfigError, match="not an index of that 1-item list"):
        apply_overrides(raw(), ["rewards.3.weight=2"])
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides(raw(), ["rewards.weight=2"])


def test_apply_overrides_replaces_list_item():
    r = apply_overrides(raw(), ["rewards.0={reward_model: jpeg_compressibility, weight: 0.5}"])
    assert r["rewards"] == [{"reward_model": "jpeg_compressibility", "weight": 0.5}]


def test_apply_overrides_invalid_yaml_value_raises():
    with pytest.raises(ConfigError, match="not valid YAML"):
        apply_overrides(raw(), ["train.resolution=[16"])


def test_scientific_notation_without_dot_is_a_float(tmp_path):
    # plain PyYAML reads 1e-4 as a string; options dicts would then receive '1e-4'
    r = apply_overrides(raw(), ["rewards.0.target=5e-1", "train.learning_rate=-1E+2"])
    assert r["rewards"][0]["target"] == 0.5 and r["train"]["learning_rate"] == -100.0
    path = tmp_path / "c.yaml"
    path.write_text("rewards:\n  - reward_model: brightness\n    target: 1e-1\nrun_name: 1e3x\n")
    cfg = load_config(path)
    assert cfg.rewards[0].options == {"target": 0.1} and cfg.run_name == "1e3x"


def test_override_with_unknown_key_is_caught_by_validation():
    msg = error(apply_overrides(raw(), ["train.learnig_rate=1e-4"]))
    assert "train.learnig_rate" in msg and "train.learning_rate" in msg


# --------------------------------------------------------------------------- load_config


def test_load_config_from_file_with_overrides(tmp_path):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw()))
    cfg = load_config(path, ["train.max_epochs=3"])
    assert cfg.train.max_epochs == 3


def test_load_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_load_config_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_example_config_is_valid():
    from pathlib import Path

    root = Path(__file__).parents[2]
    cfg = load_config(root / "examples" / "toy" / "tiny_grpo.yaml")
    assert cfg.train.trainer_type == "grpo"
    cfg.geometry(1)


def test_diversity_shaping_names_one_of_several_rewards_and_std_free_needs_sum():
    two = [{"reward_model": "brightness"}, {"reward_model": "diversity", "reduce": "min"}]
    cfg = parse_config(raw(rewards=two, train={"diversity_shaping": "diversity", "advantage_std": False}))
    assert cfg.train.diversity_shaping == "diversity" and cfg.train.advantage_std is False
    assert "is not the name of a reward" in error(raw(rewards=two, train={"diversity_shaping": "diversty"}))
    assert "is the only reward" in error(raw(rewards=two[1:], train={"diversity_shaping": "diversity"}))
    assert "advantage_aggregation: sum" in error(raw(train={"advantage_std": False, "advantage_aggregation": "gdpo"}))


def test_numbers_read_as_yaml_1_2():
    """A leading zero is decimal (YAML 1.1 read --set train.seed=0123 as octal 83), 0o / 0x are octal /
    hex, 1:30 stays text, digit separators and 1e-4 still work."""
    from shared.config import _yaml_load

    assert [_yaml_load(t) for t in ("0123", "08", "0o17", "0x1f", "1_000", "1e-4", "1:30", "-7")] == \
        [123, 8, 15, 31, 1000, 1e-4, "1:30", -7]
    assert apply_overrides(raw(), ["train.seed=0123"])["train"]["seed"] == 123


@pytest.mark.parametrize("trainer", ["grpo", "grpo-guard", "dppo"])
def test_timestep_keys_an_sde_trainer_ignores_are_errors(trainer):
    """A flow_grpo user's timestep_fraction on grpo trained every SDE step without a word: the SDE
    trainers choose steps with num_train_steps / train_steps."""
    msg = error(raw(train={"trainer_type": trainer, "timestep_fraction": 0.6}))
    assert "train.timestep_fraction" in msg and "train.num_train_steps: 4" in msg  # int(8 * 0.6)
    msg = error(raw(train={"trainer_type": trainer, "time_sampling_strategy": "uniform", "time_shift": 3.0}))
    assert "train.time_sampling_strategy, train.time_shift" in msg and "train_steps" in msg
    for fine in ("nft", "awm", "dgpo"):  # the trainers that read them
        parse_config(raw(train={"trainer_type": fine, "timestep_fraction": 0.6, "num_train_timesteps": 2}))
    # a loaded config written back out (checkpoints, tools) loads again: it holds the filled values
    cfg = parse_config(raw(train={"trainer_type": trainer}))
    again = parse_config(cfg.model_dump(mode="json"))
    assert again.train.timestep_fraction == cfg.train.timestep_fraction


def test_ema_kl_beta_outside_awm_is_an_error():
    assert "AWM's loss only" in error(raw(train={"trainer_type": "nft", "ema_kl_beta": 1.0}))
    assert "AWM's loss only" in error(raw(train={"trainer_type": "grpo", "ema_kl_beta": 0.5}))
    parse_config(raw(train={"trainer_type": "grpo", "ema_kl_beta": 0.0}))  # zero asks for nothing
    assert parse_config(raw(train={"trainer_type": "awm", "ema_kl_beta": 0.5})).train.ema_kl_beta == 0.5


def test_an_invalid_choice_lists_the_choices_as_spelt():
    """The whole message was lower-cased: 'flow-sde' was refused, then offered as a valid value."""
    msg = error(raw(train={"dynamics_type": "flow-sde"}))
    assert "'Flow-SDE', 'Dance-SDE', 'CPS' or 'ODE'" in msg
    assert "'Uniform'" in error(raw(train={"trainer_type": "awm", "awm_weighting": "uniform"}))
