"""Every shipped example config parses with the config loader, names a registered model type and
registered rewards, and tiles its batches on one process (the multi-GPU recipes also on 8); the
image-conditioned (edit) examples' shipped datasets load with images the model takes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.config import load_config
from shared.models import MODELS
from shared.rewards import REWARDS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 5
    assert {"flux1.yaml", "z-image.yaml", "qwen-image.yaml", "sd3-5.yaml", "wan2_t2v.yaml",
            "flux1-kontext.yaml", "qwen-image-edit-plus.yaml", "wan2_i2v.yaml"} <= {
        p.name for p in (ROOT / "examples" / "grpo" / "lora").glob("*.yaml")}


@pytest.mark.parametrize("path", EXAMPLES, ids=[str(p.relative_to(ROOT / "examples")) for p in EXAMPLES])
def test_example_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.model.model_type in MODELS, f"{path.name}: unknown model_type {cfg.model.model_type!r}"
    for spec in cfg.rewards + (cfg.eval_rewards or []):
        assert spec.reward_model in REWARDS, f"{path.name}: unknown reward_model {spec.reward_model!r}"
    cfg.geometry(1)
    if "grpo" in path.parts or "nft" in path.parts or "awm" in path.parts:
        cfg.geometry(8)  # written for 8 GPUs like the peers' recipes
    if MODELS.get(cfg.model.model_type).video:  # Wan: 4k + 1 frames, (height, width) multiples of 16
        for frames, resolution in ((cfg.train.num_frames, cfg.train.resolution),
                                   (cfg.eval.num_frames, cfg.eval.resolution)):
            assert frames is not None and (frames - 1) % 4 == 0, f"{path.name}: num_frames {frames} is not 4k + 1"
            hw = (resolution, resolution) if isinstance(resolution, int) else resolution
            assert all(x % 16 == 0 for x in hw), f"{path.name}: resolution {resolution} not a multiple of 16"
    readers = [s for s in cfg.rewards + (cfg.eval_rewards or []) if REWARDS.get(s.reward_model).metadata]
    if readers:  # rewards that read row metadata (geneval): the shipped dataset's rows all have what they need
        from trainer.data import check_reward_rows, load_dataset

        train, test = load_dataset(cfg.data.model_copy(update={"dataset_dir": str(ROOT / cfg.data.dataset_dir)}))
        check_reward_rows(readers, train + (test or []))
    adapter = MODELS.get(cfg.model.model_type)
    if adapter.condition_images != (0, 0):  # edit models: the shipped dataset loads, its images fit
        assert (ROOT / cfg.data.dataset_dir).is_dir(), f"{path.name}: ship {cfg.data.dataset_dir}"
        check_example_dataset(cfg, adapter)


@pytest.mark.parametrize("path", EXAMPLES, ids=[str(p.relative_to(ROOT / "examples")) for p in EXAMPLES])
def test_the_launch_line_in_a_header_runs_this_recipe(path):
    """A header's `flowrl train ... --processes N` line parses with the CLI, names its own file,
    and asks for as many processes as the recipe's geometry was written for (FSDP: 2 or more)."""
    from trainer.cli import _parser

    lines = [m.group(1).rstrip(").") for ln in path.read_text().splitlines() if ln.startswith("#")
             for m in [re.search(r"flowrl (train [^`]*)", ln)] if m]
    for line in lines:
        args = _parser().parse_args(line.split())
        assert (ROOT / args.config).resolve() == path, f"{path.name}: the header runs {args.config}"
        cfg = load_config(path, args.overrides)
        cfg.geometry(int(args.processes or 1))
        assert not cfg.train.fsdp or int(args.processes or 1) >= 2, f"{path.name}: FSDP needs 2+ processes"
    if load_config(path).train.fsdp:
        assert lines, f"{path.name} shards (train.fsdp): its header should say how to start the processes"


def check_example_dataset(cfg, adapter) -> None:
    """The example's dataset (relative to the repository root) loads, every image decodes, and every
    row has a number of condition images the model takes (one number for all rows)."""
    from trainer.data import check_condition_images, load_dataset

    data = cfg.data.model_copy(update={"dataset_dir": str(ROOT / cfg.data.dataset_dir)})
    train, test = load_dataset(data)
    for rows in (train, test or []):
        check_condition_images(rows, adapter.model_type, adapter.condition_images)
    assert all(row.images for row in train)


def test_the_readmes_memory_options_are_shown_at_their_defaults():
    """README "Memory and speed options" says its block shows the defaults: each value is the schema's
    (it showed ema_device: cpu, ref_param_device: cpu, mixed_precision: bf16, which a run gets only when set)."""
    import re

    import yaml

    from shared.config import ModelConfig, TrainConfig

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Memory and speed options\n.*?```yaml\n(.*?)```", text, re.S).group(1)
    shown = yaml.safe_load(block)
    for section, schema in (("model", ModelConfig), ("train", TrainConfig)):
        for key, value in shown[section].items():
            if key == "options":
                continue
            default = schema.model_fields[key].get_default(call_default_factory=True)
            if key == "mixed_precision":
                value = {"no": "no", False: "no"}.get(value, value)
            assert value == default, f"README shows {section}.{key}: {value!r}, the default is {default!r}"
