"""docs/extending.md runs as written.

Every fenced block of the guide that follows a marker ``<!-- test: NAME -->`` is read here: the
``*.py`` blocks are written as modules into a temporary folder put on ``sys.path`` (as a user's
plugin folder on ``PYTHONPATH``), the ``*.yaml`` blocks are merged into the tiny test config and
loaded with flowrl's own loader (:func:`shared.config.load_config`), and the shell and output
blocks are run or compared. The custom reward scores images in closed form, trains, is listed and
is served; the custom algorithm's loss is the documented formula and it trains; the adapter
subclass loads through ``load_adapter``, encodes with its prefix and trains; and the adapter
contract suite picks up the documented pytest plugin. Every claim the guide makes about how
flowrl treats dotted paths is checked against the code here too.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from shared.config import ALGORITHM_DEFAULTS, ConfigError, load_config
from tests.helpers.tiny import tiny_raw
from trainer import loop

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "extending.md"
MARKED = re.compile(r"<!-- test: (\S+) -->\n```(\w+)\n(.*?)\n```", re.S)
PLUGIN_MODULES = ("my_rewards", "my_algorithms", "my_models", "my_contract", "my_suites")
#: one small epoch on the tiny model (the algorithm contract suite's settings)
SMALL = ["train.max_epochs=1", "train.num_inference_steps=4", "train.resolution=8", "train.group_size=2",
         "train.unique_sample_num_per_epoch=2", "train.per_device_batch_size=2",
         "train.gradient_step_per_epoch=1", "eval.num_inference_steps=2", "eval.num_prompts=2"]


def doc_text() -> str:
    return DOC.read_text()


def marked_blocks() -> dict[str, tuple[str, str]]:
    """``{name: (language, code)}`` for every marked block of the guide."""
    found: dict[str, tuple[str, str]] = {}
    for name, lang, code in MARKED.findall(doc_text()):
        assert name not in found, f"two blocks of docs/extending.md are marked {name!r}"
        found[name] = (lang, code)
    return found


def block(name: str, lang: str) -> str:
    found = marked_blocks()
    assert name in found, f"docs/extending.md has no block marked <!-- test: {name} -->"
    assert found[name][0] == lang, f"block {name!r} is ```{found[name][0]}, expected ```{lang}"
    return found[name][1]


def section(title: str) -> str:
    """The guide's text from the heading ``title`` to the next heading of any level."""
    text = doc_text()
    start = text.index(title)
    end = re.search(r"^#", text[start + len(title):], re.M)
    return text[start:start + len(title) + end.start()] if end else text[start:]


@pytest.fixture
def plugins(tmp_path, monkeypatch) -> Path:
    """The guide's ``*.py`` blocks as modules in a folder on ``sys.path`` (fresh imports)."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    for name, (lang, code) in marked_blocks().items():
        if name.endswith(".py"):
            assert lang == "python", name
            (folder / name).write_text(code + "\n")
    for module in PLUGIN_MODULES:
        sys.modules.pop(module, None)
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    for module in PLUGIN_MODULES:
        sys.modules.pop(module, None)


def doc_config(tmp_path: Path, snippet: str, overrides: list[str] = (), raw_edit=None):
    """The tiny test config with the guide's YAML block ``snippet`` merged in (a section that is a
    mapping is updated key by key, a list replaces), written to a file and read with
    :func:`load_config` and :data:`SMALL` plus ``overrides`` as ``--set`` values."""
    raw = tiny_raw(tmp_path)
    for key, value in yaml.safe_load(block(snippet, "yaml")).items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key].update(value)
        else:
            raw[key] = value
    if raw_edit is not None:
        raw_edit(raw)
    path = tmp_path / f"{snippet}.config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path, [*SMALL, *overrides])


def train_spied(cfg, monkeypatch) -> tuple[dict, dict]:
    """``loop.train(cfg)`` and what the optimizer saw: the algorithm's class, whether any trainable
    weight changed, the epoch's metrics."""
    seen: dict = {}
    real = loop.optimize

    def spy(cfg_, accelerator, policy, algorithm, *args, **kwargs):
        before = {n: p.detach().clone() for n, p in policy.trainable.items()}
        step, metrics = real(cfg_, accelerator, policy, algorithm, *args, **kwargs)
        seen.update(algorithm=type(algorithm), metrics=metrics, adapter=type(policy.adapter),
                    changed=any(not torch.equal(before[n], p) for n, p in policy.trainable.items()))
        return step, metrics

    monkeypatch.setattr(loop, "optimize", spy)
    return loop.train(cfg, quiet=True), seen


def test_every_python_and_yaml_block_is_marked():
    text = doc_text()
    for lang in ("python", "yaml"):
        fenced = len(re.findall(rf"^```{lang}$", text, re.M))
        marked = sum(1 for lg, _ in marked_blocks().values() if lg == lang)
        assert fenced == marked, f"{fenced - marked} ```{lang} block(s) of docs/extending.md are not tested"


def test_intro_table_names_the_real_classes_and_registries():
    import importlib

    rows = re.findall(r"^\| `([\w.\[\]]+)` \| `([\w.]+)` \| `(\w+)` \(([\w/]+)\.py\) \|$", doc_text(), re.M)
    assert [r[0] for r in rows] == ["rewards[].reward_model", "train.trainer_type", "model.model_type"]
    for _, path, registry, file in rows:
        module, _, name = path.rpartition(".")
        base = getattr(importlib.import_module(module), name)
        reg = getattr(importlib.import_module(file.replace("/", ".")), registry)
        assert isinstance(base, type) and reg.kind in ("reward", "trainer_type", "model_type")


# --------------------------------------------------------------------------- 1. reward


def test_reward_scores_the_channel_mean(plugins):
    from shared.rewards import build_reward, score_all

    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 8, 8, generator=g)
    levels = torch.tensor([0.0, 0.25, 0.5, 1.0])
    for channel in (0, 2):
        model = build_reward("my_rewards.ChannelMean", channel=channel)
        x = images.clone()
        x[:, channel] = levels.view(4, 1, 1)  # the channel is constant: its mean is the level
        x[1, channel, :4] = 0.0  # image 1: half 0, half 0.25 -> 0.125
        got = score_all(model, x, ["p"] * 4, torch.tensor([0, 0, 1, 1]), batch_size=3)
        assert torch.allclose(got, torch.tensor([0.0, 0.125, 0.5, 1.0]))
    with pytest.raises(ValueError, match="channel must be 0, 1 or 2"):
        build_reward("my_rewards.ChannelMean", channel=3)
    with pytest.raises(TypeError, match="'chanel'.*did you mean 'channel'"):
        build_reward("my_rewards.ChannelMean", chanel=1)


def test_reward_yaml_and_option_check_at_load(plugins, tmp_path):
    cfg = doc_config(tmp_path, "reward.yaml")
    spec = cfg.rewards[0]
    assert (spec.label, spec.reward_model, spec.options, spec.weight) == \
        ("redness", "my_rewards.ChannelMean", {"channel": 0}, 1.0)
    with pytest.raises(ConfigError, match="unknown option 'chanel' \\(did you mean 'channel'\\?\\)"):
        doc_config(tmp_path, "reward.yaml", ["rewards.0.chanel=1"])


def test_reward_trains_by_its_dotted_path(plugins, tmp_path, monkeypatch):
    summary, seen = train_spied(doc_config(tmp_path, "reward.yaml"), monkeypatch)
    assert summary["optimizer_steps"] == 1 and seen["changed"]
    assert 0.0 <= summary["final/redness"] <= 1.0 and "base/redness" in summary


def test_flowrl_list_describes_the_reward(plugins, capsys):
    from trainer.cli import main

    command, *expected = block("list-reward", "text").splitlines()
    assert command.startswith("$ flowrl ")
    assert main(shlex.split(command)[2:]) == 0
    assert capsys.readouterr().out.splitlines()[:len(expected)] == expected


def test_reward_served_and_scored_remotely(plugins, tmp_path):
    from services.reward import RewardServerSettings
    from services.reward.cli import _parser
    from shared.rewards import build_reward, score_all
    from tests.services.live_server import running_server

    tokens = shlex.split(block("serve", "bash"))
    at = tokens.index("flowrl")
    assert tokens[at + 1:at + 3] == ["serve", "reward"]
    args = {k: v for k, v in vars(_parser().parse_args(tokens[at + 3:])).items() if v is not None}
    settings = RewardServerSettings(**{**args, "max_queue_delay_ms": 0, "log_level": "warning"})
    spec = doc_config(tmp_path, "remote.yaml").rewards[0]
    assert spec.reward_model == "remote" and spec.options["model"] == settings.rewards[0].label
    # 8-bit levels: the PNG the client sends holds them exactly, so remote equals local
    levels = torch.tensor([0, 51, 128, 255]).float() / 255
    images = levels.view(4, 1, 1, 1).expand(4, 3, 8, 8).clone()
    images[:, 1:] = 0.5
    with running_server(settings) as url:
        remote = build_reward(spec.reward_model, **{**spec.options, "url": url})
        try:
            got = score_all(remote, images, ["p"] * 4, torch.arange(4), batch_size=4)
        finally:
            remote.close()
    assert torch.allclose(got, levels, atol=1e-6)


# --------------------------------------------------------------------------- 2. algorithm


def documented_loss(adv: list[float], ratio: list[float], clip_adv: float, c: float, w: float) -> float:
    """The guide's formula: mean_b max(-A'_b r_b, -A'_b clip(r_b, 1 - c, 1 + c))."""
    terms = []
    for a, r in zip(adv, ratio):
        a = max(-clip_adv, min(clip_adv, a))
        a = a if a >= 0 else w * a
        terms.append(max(-a * r, -a * max(1 - c, min(1 + c, r))))
    return sum(terms) / len(terms)


def test_algorithm_loss_is_the_documented_one(plugins, tmp_path):
    from trainer.algorithms import ALGORITHMS
    from trainer.algorithms.grpo import GRPO

    cfg = doc_config(tmp_path, "algorithm.yaml", ["train.clip_range=0.2"])
    algorithm = ALGORITHMS.get(cfg.train.trainer_type)(cfg)
    assert type(algorithm).__name__ == "NegativeWeightedGRPO" and isinstance(algorithm, GRPO)
    adv = [2.0, -2.0, 7.0, -1.0]  # 7 is clamped to adv_clip_range = 5
    batch = SimpleNamespace(advantages=torch.tensor(adv), log_probs=torch.zeros(4, 1))
    on_policy = SimpleNamespace(log_prob=torch.zeros(4))
    loss, _ = algorithm.surrogate(batch, 0, on_policy, None, None)
    assert math.isclose(float(loss), -(2 - 1 + 5 - 0.5) / 4, rel_tol=1e-6)  # -mean A'
    plain, _ = GRPO(cfg).surrogate(batch, 0, on_policy, None, None)
    assert math.isclose(float(plain), -(2 - 2 + 5 - 1) / 4, rel_tol=1e-6)
    ratio = [1.5, 0.5, 0.9, 1.1]
    moved = SimpleNamespace(log_prob=torch.tensor(ratio).log())
    loss, _ = algorithm.surrogate(batch, 0, moved, None, None)
    expected = documented_loss(adv, ratio, cfg.train.adv_clip_range, 0.2, 0.5)
    assert math.isclose(float(loss), expected, rel_tol=1e-5)


def test_algorithm_trains_by_its_dotted_path(plugins, tmp_path, monkeypatch):
    summary, seen = train_spied(doc_config(tmp_path, "algorithm.yaml"), monkeypatch)
    assert seen["algorithm"].__name__ == "NegativeWeightedGRPO"
    assert summary["optimizer_steps"] == 1 and seen["changed"]
    assert math.isfinite(seen["metrics"]["train/loss"])


def test_algorithm_interface_table_matches_the_base_class():
    from trainer.algorithms import Algorithm

    table = section("## 2. A training algorithm")
    rows = re.findall(r"^\| `(\w+)(?:\(.*?\))?`(?:, `(\w+)`)? \| (yes|no) \|", table, re.M)
    assert {r[0] for r in rows if r[2] == "yes"} == Algorithm.__abstractmethods__
    for first, second, _ in rows:
        assert all(hasattr(Algorithm, name) for name in (first, second) if name)


def test_dotted_trainer_type_config_handling(plugins, tmp_path):
    """What the guide says about a dotted trainer_type's config."""
    dotted = doc_config(tmp_path, "algorithm.yaml")
    grpo = doc_config(tmp_path, "algorithm.yaml", ["train.trainer_type=grpo"])
    assert {k: getattr(dotted.train, k) for k in ALGORITHM_DEFAULTS["grpo"]} == \
        {k: getattr(grpo.train, k) for k in ALGORITHM_DEFAULTS["grpo"]}
    with pytest.raises(ConfigError, match="has no per-step log-probabilities"):  # checked as grpo is
        doc_config(tmp_path, "algorithm.yaml", ["train.dynamics_type=ODE"])
    for extra in (["train.noise_aware_weighting=true"], ["train.ode_tail={solver: euler}"]):  # grpo's options
        doc_config(tmp_path, "algorithm.yaml", extra)
    # a subclass of nft gets nft's defaults and geometry; one of dgpo its whole-group micro-batches
    (plugins / "my_more.py").write_text("from trainer.algorithms.nft import NFT\nfrom trainer.algorithms.dgpo import DGPO\n"
                                       "class MyNFT(NFT):\n    pass\nclass MyDGPO(DGPO):\n    pass\n")
    nft, mine = (doc_config(tmp_path, "algorithm.yaml", [f"train.trainer_type={t}", "train.dynamics_type=ODE"])
                 for t in ("nft", "my_more.MyNFT"))
    assert {k: getattr(mine.train, k) for k in ALGORITHM_DEFAULTS["nft"]} == \
        {k: getattr(nft.train, k) for k in ALGORITHM_DEFAULTS["nft"]}
    groups = ["train.group_size=4", "train.per_device_batch_size=2"]  # a micro-batch: half a group, or one whole
    dgpo, mine, plain = (doc_config(tmp_path, "algorithm.yaml", [f"train.trainer_type={t}", *groups])
                         for t in ("dgpo", "my_more.MyDGPO", "my_algorithms.NegativeWeightedGRPO"))
    assert mine.geometry(1) == dgpo.geometry(1) and dgpo.geometry(1).train_micro_batch == 4
    assert plain.geometry(1).train_micro_batch == 2
    with pytest.raises(ConfigError, match="unknown config key `train.negative_weight`"):
        doc_config(tmp_path, "algorithm.yaml", ["train.negative_weight=0.25"])
    # not imported at load: a trainer type or reward whose module is missing there still loads
    doc_config(tmp_path, "algorithm.yaml", ["train.trainer_type=no_such_plugin.Algo",
                                            "rewards.0.reward_model=no_such_plugin.Reward"])


# --------------------------------------------------------------------------- 3. model family


@pytest.fixture(scope="module")
def sd3_pipeline(tmp_path_factory) -> Path:
    from tests.helpers.tiny_pipelines import TINY_PIPELINES

    return TINY_PIPELINES["sd3-5"].save(tmp_path_factory.mktemp("tiny_sd3") / "pipe")


def model_config(tmp_path, pipeline: Path, overrides: list[str] = ()):
    def local(raw):
        raw["model"]["model_name_or_path"] = str(pipeline)

    return doc_config(tmp_path, "model.yaml", ["train.resolution=32", *overrides], local)


def test_adapter_subclass_loads_and_prefixes_prompts(plugins, tmp_path, sd3_pipeline):
    from shared.models import load_adapter
    from shared.models.sd3 import SD3Adapter

    cfg = model_config(tmp_path, sd3_pipeline)
    adapter = load_adapter(cfg.model, device="cpu", seed=0)
    assert type(adapter).__name__ == "PrefixedSD3" and isinstance(adapter, SD3Adapter)
    assert adapter.options["prompt_prefix"] == "a photo of "
    mine = adapter.encode_prompts(["a red circle"], cfg=True)
    plain = SD3Adapter.encode_prompts(adapter, ["a photo of a red circle"], cfg=True)
    assert all(torch.equal(mine.tensors[k], plain.tensors[k]) for k in plain.tensors)
    assert not torch.equal(mine.tensors["prompt_embeds"],
                           SD3Adapter.encode_prompts(adapter, ["a red circle"], cfg=False).tensors["prompt_embeds"])
    with pytest.raises(ConfigError, match="unknown .*option.*prompt_prefx"):  # said when the config loads
        model_config(tmp_path, sd3_pipeline, ["model.options.prompt_prefx=x"])


def test_adapter_subclass_trains_by_its_dotted_path(plugins, tmp_path, sd3_pipeline, monkeypatch):
    summary, seen = train_spied(model_config(tmp_path, sd3_pipeline), monkeypatch)
    assert seen["adapter"].__name__ == "PrefixedSD3"
    assert summary["optimizer_steps"] == 1 and seen["changed"]


def test_model_type_is_checked_at_load(plugins, tmp_path):
    """A misspelled family stops at load naming the nearest; a dotted path imports there and must be an
    adapter; one that does not import is left to the process that loads the model."""
    model = lambda model_type: {**tiny_raw(tmp_path), "model": {"model_type": model_type}}  # noqa: E731
    with pytest.raises(ConfigError, match="unknown model_type 'sd35'. Did you mean 'sd3-5'"):
        load_config(_write(tmp_path, model("sd35")))
    with pytest.raises(ConfigError, match="not a subclass of shared.models.base.FlowModelAdapter"):
        load_config(_write(tmp_path, model("my_rewards.ChannelMean")))
    sd3 = {**tiny_raw(tmp_path), "model": {"model_type": "my_models.PrefixedSD3", "model_name_or_path": "org/sd3"}}
    assert load_config(_write(tmp_path, sd3)).model.model_type == "my_models.PrefixedSD3"
    with pytest.raises(ConfigError, match="model_name_or_path is required"):  # what its loader would refuse
        load_config(_write(tmp_path, model("my_models.PrefixedSD3")))
    assert load_config(_write(tmp_path, model("not_installed_here.Family"))).model.model_type == "not_installed_here.Family"


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "raw.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_new_family_methods_are_the_abstract_ones():
    from shared.models.base import FlowModelAdapter
    from shared.models.pipeline import PipelineAdapter

    text = section("### A new family")
    assert FlowModelAdapter.__abstractmethods__ == {"load", "encode_prompts", "latent_shape", "predict",
                                                    "decode", "save_pretrained"}
    assert all(f"`{name}`" in text for name in FlowModelAdapter.__abstractmethods__)
    assert PipelineAdapter.__abstractmethods__ == {"encode_prompts", "latent_shape", "predict"}
    assert "then it implements `encode_prompts`, `latent_shape` and `predict`" in " ".join(text.split())
    for name in ("sample_shape", "sigmas", "velocity", "encode_latents", "encoder_modules",
                 "prompt_token_limits", "default_lora_targets", "video", "condition_images", "unused_parameters"):
        assert f"`{name}`" in text and hasattr(FlowModelAdapter, name), name


def test_contract_suite_runs_on_the_plugin(plugins):
    """The documented command, with the plugin folder on PYTHONPATH: it collects the number of
    tests the guide names, and two of them (loading, load errors) pass here."""
    tokens = shlex.split(block("contract", "bash"))
    at = tokens.index("python")
    argv = [sys.executable, *tokens[at + 1:], "-p", "no:cacheprovider", "-q"]
    k = argv.index("-k") + 1
    env = {**os.environ, "PYTHONPATH": str(plugins)}

    def run(args: list[str]) -> str:
        done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    count = re.search(r"This ran (\d+) tests", " ".join(section("### Running the adapter").split()))
    assert count, "the guide no longer says how many contract tests ran"
    collected = run([*argv, "--collect-only"])
    assert f"{count.group(1)}/" in collected and "[prefixed-sd3" in collected, collected[-2000:]
    two = [*argv[:k], f"{argv[k]} and (loads_from_a_local or load_errors)", *argv[k + 1:]]
    assert "2 passed" in run(two)


def test_reward_and_algorithm_suites_run_on_the_plugins(plugins):
    """The documented commands, with the plugin folder on PYTHONPATH: each runs the number of tests
    the guide names for the plugin's reward / algorithm, and they pass."""
    text = " ".join(section("## 4. The reward and algorithm contract suites").split())
    counts = re.search(r"The first ran (\d+) tests for `ChannelMean` and the second (\d+) for", text)
    assert counts, "the guide no longer says how many contract tests ran"
    lines = block("suites", "bash").splitlines()
    assert len(lines) == 2
    for line, count in zip(lines, counts.groups()):
        tokens = shlex.split(line)
        argv = [sys.executable, *tokens[tokens.index("python") + 1:], "-p", "no:cacheprovider", "-q"]
        done = subprocess.run(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(plugins)}, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert re.search(rf"\b{count} passed, \d+ deselected", done.stdout), done.stdout[-1000:]

