"""Exact resume (embedded): a run continued from its epoch-k checkpoint ends with bit-identical
parameters, EMA, optimizer moments and metric history to the same run trained without a stop.

The "stopped" run is the uninterrupted run's own folder copied as it was at the checkpoint
(its later checkpoints and final weights removed), then resumed; a real SIGKILL of
``flowrl train`` mid-epoch is in :func:`test_killed_cli_run_resumes_to_the_same_weights`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers.tiny import tiny_config, tiny_raw
from trainer.loop import train
from trainer.resume import ResumeError, find_checkpoint, stale_checkpoints

FAST = ["train.num_inference_steps=4", "eval.num_inference_steps=4", "train.group_size=4",
        "train.unique_sample_num_per_epoch=2", "train.per_device_batch_size=4",
        "train.gradient_step_per_epoch=2", "train.max_epochs=4", "train.save_freq=2",
        "train.lr_scheduler=cosine", "train.lr_warmup_steps=2"]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """Everything a checkpoint holds as tensors: LoRA, EMA, an algorithm's snapshots."""
    out = {f"lora/{k}": v for k, v in load_file(ckpt / "lora" / "pytorch_lora_weights.safetensors").items()}
    out.update({f"ema/{k}": v for k, v in load_file(ckpt / "ema.safetensors").items()})
    for snap in ckpt.glob("snapshot-*.safetensors"):
        out.update({f"{snap.stem}/{k}": v for k, v in load_file(snap).items()})
    return out


def stop_at(run_dir: Path, epoch: int, to: Path) -> Path:
    """A copy of ``run_dir`` as a run killed just after writing checkpoint-``epoch`` leaves it."""
    shutil.copytree(run_dir, to)
    for ckpt in (to / "checkpoints").iterdir():
        if ckpt.name != f"checkpoint-{epoch}":
            shutil.rmtree(ckpt)
    (to / "summary.json").unlink()
    return to / "checkpoints" / f"checkpoint-{epoch}"


def same_tensors(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("trainer_type,extra", [
    ("grpo", []),
    ("grpo", ["train.max_staleness=1"]),  # an epoch sampled before the checkpoint travels in it
    ("nft", []),  # off-policy: samples drawn with the EMA
    ("grpo", ["train.optimizer=muon"]),  # Muon's momentum buffers resume too
    # samples drawn with a half-blended snapshot, implicit rewards against another
    ("crd", ["train.crd_sampling_decay=0-0.5-0.0-0.5"]),
    # GARDO's gated KL: its anchor (a snapshot), the adaptive fraction and the reset rule, rebuilt from metrics
    ("grpo", ["train.kl_beta=0.04", "rewards=[{reward_model: brightness}, {reward_model: jpeg_incompressibility, "
              "weight: 0}, {name: dim, reward_model: brightness, target: 0.2, weight: 0}]",
              "train.kl_gate={auxiliary: [jpeg_incompressibility, dim], reset_kl: 1.0e-6, reset_every: 2}"]),
])
def test_resumed_run_is_bit_identical(tmp_path, trainer_type, extra):
    cfg = tiny_config(tmp_path / "a", trainer_type, FAST + extra)
    full = train(cfg, quiet=True)
    run_a = Path(full["run_dir"])
    assert (run_a / "checkpoints" / "checkpoint-2" / "resume" / "state.json").is_file()
    if "train.max_staleness=1" in extra:  # the pending epoch's samples are in the checkpoint
        assert (run_a / "checkpoints" / "checkpoint-2" / "resume" / "pending-rank0.safetensors").is_file()

    ckpt = stop_at(run_a, 2, tmp_path / "b" / "runs" / run_a.name)
    resumed = train(tiny_config(tmp_path / "b", trainer_type, FAST + extra + [f"train.resume_from={ckpt}"]),
                    quiet=True)
    run_b = Path(resumed["run_dir"])
    assert run_b == ckpt.parent.parent.resolve()
    assert same_tensors(weights(run_a / "checkpoints" / "final"), weights(run_b / "checkpoints" / "final")) == []
    # counters and the whole history continue: the summary is the uninterrupted one's
    for key in ("epochs", "optimizer_steps", "policy_version", "samples"):
        assert resumed[key] == full[key], key
    hist = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    drop_time = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert drop_time(hist(run_b)) == drop_time(hist(run_a))
    assert resumed["final/brightness"] == full["final/brightness"]


def test_resume_auto_starts_continues_or_leaves_a_finished_run_alone(tmp_path):
    """``train.resume_from: auto`` (what compose / k8s restarts use): a run with no folder starts;
    one restarted after checkpoint-2 continues from it to the uninterrupted run's weights; one
    restarted before any checkpoint starts over and keeps no metrics of the failed attempt; a
    finished run is left as it is."""
    hist = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    auto = FAST + ["train.resume_from=auto"]
    full = train(tiny_config(tmp_path / "a", "grpo", auto), quiet=True)  # nothing there yet: a fresh run
    run_a = Path(full["run_dir"])
    assert full["epochs"] == 4 and [r["step"] for r in hist(run_a) if "train/loss" in r] == [1, 2, 3, 4]

    ckpt = stop_at(run_a, 2, tmp_path / "b" / "runs" / run_a.name)
    resumed = train(tiny_config(tmp_path / "b", "grpo", auto), quiet=True)
    assert same_tensors(weights(run_a / "checkpoints" / "final"), weights(ckpt.parent / "final")) == []
    assert resumed["optimizer_steps"] == full["optimizer_steps"]

    early = stop_at(run_a, 2, tmp_path / "c" / "runs" / run_a.name).parent.parent
    shutil.rmtree(early / "checkpoints")  # died before its first checkpoint
    again = train(tiny_config(tmp_path / "c", "grpo", auto), quiet=True)
    assert again["epochs"] == 4 and again["optimizer_steps"] == full["optimizer_steps"]
    assert [r["step"] for r in hist(early) if "train/loss" in r] == [1, 2, 3, 4]  # not 1, 2, 1, 2, 3, 4

    lines, mtime = hist(run_a), (run_a / "checkpoints" / "final").stat().st_mtime_ns
    assert train(tiny_config(tmp_path / "a", "grpo", auto), quiet=True) == full  # finished: nothing runs
    assert hist(run_a) == lines and (run_a / "checkpoints" / "final").stat().st_mtime_ns == mtime
    with pytest.raises(ResumeError, match="needs run_name"):
        train(tiny_config(tmp_path / "d", "grpo", auto + ["run_name=null"]), quiet=True)


def test_resume_refuses_another_experiment(tmp_path):
    cfg = tiny_config(tmp_path, "grpo", FAST + ["train.max_epochs=2", "train.save_freq=1"])
    run = Path(train(cfg, quiet=True)["run_dir"])
    ckpt = run / "checkpoints" / "checkpoint-1"
    bad = tiny_config(tmp_path, "grpo", FAST + ["train.learning_rate=1e-2",
                                                f"train.resume_from={ckpt}"])
    with pytest.raises(ResumeError, match=r"train\.learning_rate: checkpoint 0\.003, now 0\.01"):
        train(bad, quiet=True)
    with pytest.raises(ResumeError, match="raise train.max_epochs"):
        train(tiny_config(tmp_path, "grpo", FAST + ["train.max_epochs=1", f"train.resume_from={ckpt}"]),
              quiet=True)
    # what the evaluation measures: the base score is in the checkpoint, so another prompt set, seeds or
    # reward was reported as a gain (a new eval reward ended the run with a KeyError after its last epoch)
    for change, named in (("eval.num_prompts=2", r"eval\.num_prompts: checkpoint None, now 2"),
                          ("eval_rewards=[{reward_model: brightness}, {reward_model: toy_shape_quality}]",
                           "eval_rewards: checkpoint None")):
        with pytest.raises(ResumeError, match=named):
            train(tiny_config(tmp_path, "grpo", FAST + [change, f"train.resume_from={ckpt}"]), quiet=True)
    from trainer.resume import check_same_experiment

    resumed = train(tiny_config(tmp_path, "grpo", FAST + ["eval.eval_freq=1", "eval.per_device_batch_size=3",
                                                          f"train.resume_from={ckpt}"]), quiet=True)
    assert resumed["epochs"] == 4  # how often and in what batches may change
    two = "eval_rewards=[{reward_model: brightness, batch_size: %d}]"
    first = train(tiny_config(tmp_path / "e", "grpo", FAST + ["train.max_epochs=1", "train.save_freq=1",
                                                              two % 16]), quiet=True)
    first_ckpt = Path(first["checkpoint"])  # (final/: its trainer_state.json holds the config)
    check_same_experiment(first_ckpt, tiny_config(tmp_path / "e", "grpo", FAST + [two % 4]))  # a smaller batch: fine
    with pytest.raises(ResumeError, match=r"eval_rewards\[0\]\.target: checkpoint None, now 0\.5"):
        check_same_experiment(first_ckpt, tiny_config(tmp_path / "e", "grpo", FAST + [
            "eval_rewards=[{reward_model: brightness, target: 0.5}]"]))


def test_resume_latest_needs_a_run_and_finds_its_newest_checkpoint(tmp_path):
    with pytest.raises(ResumeError, match="no resumable checkpoint"):
        find_checkpoint("latest", tmp_path / "runs" / "nothing")
    with pytest.raises(ResumeError, match="not a resumable checkpoint"):
        find_checkpoint(str(tmp_path), tmp_path)
    for n in (2, 10, 4):
        (tmp_path / "checkpoints" / f"checkpoint-{n}" / "resume").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"checkpoint-{n}" / "resume" / "state.json").write_text("{}")
    (tmp_path / "checkpoints" / "checkpoint-12").mkdir()  # no resume state: not a candidate
    # a save killed before its rename: resume state written, but not a checkpoint (it raised ValueError)
    (tmp_path / "checkpoints" / "checkpoint-14.tmp" / "resume").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-14.tmp" / "resume" / "state.json").write_text("{}")
    assert find_checkpoint("latest", tmp_path).name == "checkpoint-10"


def test_killed_cli_run_resumes_to_the_same_weights(tmp_path):
    """SIGKILL ``flowrl train`` after its epoch-2 checkpoint, mid-run; ``--resume latest``. A quiet
    machine runs a tiny epoch in ~0.25 s, so the run is long enough (20 epochs) that the kill lands
    well before its end."""
    slow = FAST + ["train.max_epochs=20", "train.save_freq=2"]

    def write_config(root: Path) -> Path:
        from shared.config import apply_overrides

        raw = apply_overrides(tiny_raw(root), slow)
        path = root / "config.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    flowrl = [sys.executable, "-m", "trainer.cli"]
    # one torch thread: bit-identical weights need a run that is deterministic at all, and two CPU
    # threads are not here (identical uninterrupted runs differ by ~1e-8 in one run of four: the
    # threaded float reductions); this test is about what a kill and resume change
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    ref = subprocess.run(flowrl + ["train", str(write_config(tmp_path / "ref"))], env=env,
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]

    config = write_config(tmp_path / "killed")
    proc = subprocess.Popen(flowrl + ["train", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "runs" / "tiny_grpo" / "checkpoints" / "checkpoint-2"
    deadline = time.monotonic() + 240
    while not ckpt.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert ckpt.is_dir(), "the run never wrote checkpoint-2"
    time.sleep(0.05)  # into epoch 3
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (ckpt.parent / "final").exists(), "the run finished before it could be killed"

    again = subprocess.run(flowrl + ["train", str(config), "--resume", "latest"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    a = weights(tmp_path / "ref" / "runs" / "tiny_grpo" / "checkpoints" / "final")
    b = weights(ckpt.parent / "final")
    assert same_tensors(a, b) == []
    summary = json.loads((ckpt.parent.parent / "summary.json").read_text())
    assert summary["epochs"] == 20


def test_stale_checkpoints_are_the_older_numbered_ones(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-4", "checkpoint-12.tmp", "final"):
        (ckpts / name).mkdir(parents=True)
    assert stale_checkpoints(tmp_path, None) == []
    assert [p.name for p in stale_checkpoints(tmp_path, 2)] == ["checkpoint-2"]  # by number, not by name
    assert [p.name for p in stale_checkpoints(tmp_path, 1)] == ["checkpoint-2", "checkpoint-4"]
    assert stale_checkpoints(tmp_path, 3) == []


def test_keep_checkpoints_rotates_and_the_newest_still_resumes(tmp_path):
    cfg = tiny_config(tmp_path / "a", "grpo", FAST + ["train.save_freq=1", "train.keep_checkpoints=2"])
    full = train(cfg, quiet=True)
    run_a = Path(full["run_dir"])
    # checkpoint-1..3 were written (the 4th epoch's is the final one); the oldest went
    assert sorted(p.name for p in (run_a / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3", "final"]
    # a kept checkpoint is whole: resuming from epoch 2 ends where the run ended, and the
    # checkpoint it resumed from goes once checkpoint-3 is complete
    ckpt = stop_at(run_a, 2, tmp_path / "b" / "runs" / run_a.name)
    cfg_b = tiny_config(tmp_path / "b", "grpo", FAST + ["train.save_freq=1", "train.keep_checkpoints=1",
                                                        f"train.resume_from={ckpt}"])
    resumed = train(cfg_b, quiet=True)
    assert same_tensors(weights(Path(full["checkpoint"])), weights(Path(resumed["checkpoint"]))) == []
    assert sorted(p.name for p in (ckpt.parent).iterdir()) == ["checkpoint-3", "final"]


def test_a_fresh_run_sets_an_earlier_run_of_its_name_aside(tmp_path):
    """A fresh run whose folder holds an earlier run moves that run to ``<name>.previous-<k>``: nothing of
    either is lost or mixed (before, the new run's checkpoint-1 was deleted by keep_checkpoints as older
    than the earlier run's checkpoint-3, and metrics.jsonl held both runs)."""
    keep = FAST + ["train.save_freq=1", "train.keep_checkpoints=1"]
    run = Path(train(tiny_config(tmp_path, "grpo", keep), quiet=True)["run_dir"])
    (run / "base_eval").mkdir()  # a `flowrl eval` of the base model, say
    again = train(tiny_config(tmp_path, "grpo", keep + ["train.max_epochs=2"]), quiet=True)
    assert Path(again["run_dir"]) == run
    aside = run.with_name(f"{run.name}.previous-1")
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["checkpoint-3", "final"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-1", "final"]
    assert (aside / "base_eval").is_dir() and not (run / "base_eval").exists()
    steps = lambda d: [json.loads(line)["step"] for line in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert sorted(set(steps(aside))) == [0, 1, 2, 3, 4] and sorted(set(steps(run))) == [0, 1, 2]
    summary = json.loads((aside / "summary.json").read_text())
    assert summary["epochs"] == 4 and summary["run_dir"] == str(aside)
    assert summary["checkpoint"] == str(aside / "checkpoints" / "final") and summary["report"] == str(aside / "report.md")
    # a third run takes the next free name; the second is kept as it was
    train(tiny_config(tmp_path, "grpo", keep + ["train.max_epochs=1"]), quiet=True)
    assert json.loads((run.with_name(f"{run.name}.previous-2") / "summary.json").read_text())["epochs"] == 2
    assert json.loads((run / "summary.json").read_text())["epochs"] == 1


def test_a_fresh_run_does_not_start_from_weights_it_would_move_aside(tmp_path, monkeypatch):
    """``model.init_from`` inside the earlier run's folder is refused (the weights would move, and a
    resume or a sampler would read the new run's checkpoint of that name); so is a folder that
    cannot be moved, before anything is written."""
    import trainer.loop
    from shared.config import ConfigError

    run = Path(train(tiny_config(tmp_path, "grpo", FAST + ["train.save_freq=1", "train.max_epochs=1"]),
                     quiet=True)["run_dir"])
    warm = run / "checkpoints" / "final"
    with pytest.raises(ConfigError, match=f"model.init_from: {warm} lies in {run}.*Fix: give this run its own name"):
        train(tiny_config(tmp_path, "grpo", FAST + [f"model.init_from={warm}"]), quiet=True)
    elsewhere = train(tiny_config(tmp_path, "grpo", FAST + [f"model.init_from={warm}", "run_name=warm",
                                                          "train.max_epochs=1"]), quiet=True)
    assert Path(elsewhere["run_dir"]).name == "warm" and warm.is_dir()

    def cannot(run_dir):
        raise OSError(16, "Device or resource busy", str(run_dir))

    monkeypatch.setattr(trainer.loop, "set_aside", cannot)
    with pytest.raises(ConfigError, match="could not be moved aside.*Device or resource busy.*Fix: give this run"):
        train(tiny_config(tmp_path, "grpo", FAST), quiet=True)
    assert json.loads((run / "summary.json").read_text())["epochs"] == 1  # untouched


def test_set_aside_leaves_a_folder_without_a_run(tmp_path):
    from trainer.resume import set_aside

    assert set_aside(tmp_path / "missing") is None
    (tmp_path / "run" / "base_eval").mkdir(parents=True)
    assert set_aside(tmp_path / "run") is None and (tmp_path / "run" / "base_eval").is_dir()
    (tmp_path / "run" / "checkpoints").mkdir()
    assert set_aside(tmp_path / "run") == tmp_path / "run.previous-1"
    assert (tmp_path / "run.previous-1" / "base_eval").is_dir() and not (tmp_path / "run").exists()


def test_a_checkpoint_written_before_a_config_key_existed_still_resumes(tmp_path):
    """Keys added in a later flowrl version are absent from an older checkpoint's trainer_state.json;
    at their defaults they are no difference (a set one is)."""
    from trainer.resume import check_same_experiment

    cfg = tiny_config(tmp_path / "a", "grpo", FAST)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    saved = json.loads(json.dumps(cfg.model_dump()))
    for section, key in (("model", "init_from"), ("train", "keep_checkpoints"), ("train", "offload_samples_to_cpu"),
                         ("train", "rollout_noise_device")):  # (an older key with a default that is not None)
        del saved[section][key]
    (ckpt / "trainer_state.json").write_text(json.dumps({"config": saved}))
    check_same_experiment(ckpt, cfg)
    changed = tiny_config(tmp_path / "a", "grpo", FAST + [f"model.init_from={tmp_path}"])
    with pytest.raises(ResumeError, match="model.init_from: checkpoint None"):
        check_same_experiment(ckpt, changed)


def test_a_resumed_epochs_samples_wait_on_the_host_with_offload_samples_to_cpu(tmp_path, monkeypatch):
    """The epoch a checkpoint had sampled (``max_staleness: 1``) comes back where that epoch's samples
    waited: on the host with ``train.offload_samples_to_cpu`` (it came back to the model's device, which
    a run that needs the offload to fit cannot hold). The model's "device" here is PyTorch's meta
    device, so the CPU can tell the two apart."""
    import types

    import trainer.transport
    from shared.sampling import Rollout
    from trainer.collect import Samples
    from trainer.resume import load_rank_state, save_rank_state

    g = torch.Generator().manual_seed(0)
    states = torch.randn(2, 3, 4, 2, 2, generator=g)  # [B, states, C, h, w]: steps 0-1 and the state after
    roll = Rollout(final_latents=torch.randn(2, 4, 2, 2, generator=g), images=None, sigmas=torch.linspace(1, 0, 3),
                   sde_steps=[0, 1], latents=states[:, :2], next_latents=states[:, 1:],
                   log_probs=torch.randn(2, 2, generator=g), stds=torch.rand(2, 2, generator=g), means=None)
    save_rank_state(tmp_path / "ckpt" / "resume", 0, Samples(None, roll, {"r": torch.tensor([0.5, 1.0])}, [1, 1], {}))
    adapter = types.SimpleNamespace(transformer=torch.nn.Linear(1, 1, device="meta"))
    cfg = tiny_config(tmp_path, "grpo", ["train.offload_samples_to_cpu=true"])
    encoded = torch.zeros(2)
    monkeypatch.setattr(trainer.transport, "encode_batches", lambda *a, **k: encoded)
    samples = load_rank_state(tmp_path / "ckpt", 0, adapter, types.SimpleNamespace(
        prompts=["a", "b"], negatives=[None, None], condition_images=None), cfg, world=1)
    for name in ("latents", "next_latents", "log_probs", "stds", "final_latents"):
        assert torch.equal(getattr(samples.rollout, name), getattr(roll, name)), name  # on the host, whole
    assert samples.cond is encoded and samples.policy_versions == [1, 1]


def test_a_queue_run_resuming_an_embedded_checkpoint_samples_its_pending_epoch_again(tmp_path, caplog):
    """A flowrl train checkpoint (max_staleness 1: the epoch sampled ahead is in it) resumed by flowrl
    trainer (transport celery): the saved samples are not queue messages (collect died with an
    AttributeError), so the queue samples that epoch again, with a warning."""
    import logging
    import types

    from shared.sampling import Rollout
    from trainer.collect import Samples
    from trainer.resume import load_rank_state, save_rank_state

    g = torch.Generator().manual_seed(0)
    states = torch.randn(2, 3, 4, 2, 2, generator=g)
    roll = Rollout(final_latents=torch.randn(2, 4, 2, 2, generator=g), images=None, sigmas=torch.linspace(1, 0, 3),
                   sde_steps=[0, 1], latents=states[:, :2], next_latents=states[:, 1:],
                   log_probs=torch.randn(2, 2, generator=g), stds=torch.rand(2, 2, generator=g), means=None)
    save_rank_state(tmp_path / "ckpt" / "resume", 0, Samples(None, roll, {"r": torch.tensor([0.5, 1.0])}, [1, 1], {}))
    cfg = tiny_config(tmp_path, "grpo")
    cfg.transport = "celery"  # what flowrl trainer does with the same YAML
    adapter = types.SimpleNamespace(transformer=torch.nn.Linear(1, 1))
    plan = types.SimpleNamespace(prompts=["a", "b"], negatives=[None, None], condition_images=None)
    with caplog.at_level(logging.WARNING, logger="flowrl.trainer"):
        assert load_rank_state(tmp_path / "ckpt", 0, adapter, plan, cfg, world=1) is None
    assert "sampled by an embedded run" in caplog.text


def test_a_line_cut_short_does_not_stop_the_resume(tmp_path):
    """A run that died mid-write (disk full, power) left half a line in metrics.jsonl: every resume
    then failed on a JSONDecodeError, and a restart policy retried it until it gave up."""
    from trainer.resume import truncate_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "train/rew')
    assert truncate_jsonl(path, lambda r: r["step"] <= 2) == 1
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_resume_auto_leaves_a_run_its_budget_ended_alone_until_the_budget_is_raised(tmp_path):
    """A run that train.max_train_seconds ended was trained again by resume_from auto (docker compose up
    once more): from scratch or its last periodic checkpoint, replacing its final weights and history."""
    auto = FAST + ["train.resume_from=auto", "train.max_train_seconds=0.001"]  # over budget after epoch 1
    first = train(tiny_config(tmp_path, "grpo", auto), quiet=True)
    assert first["epochs"] == 1 and first["stopped_by"] == "budget"
    final = Path(first["checkpoint"])
    mtime = final.stat().st_mtime_ns
    assert train(tiny_config(tmp_path, "grpo", auto), quiet=True) == first  # nothing runs
    assert final.stat().st_mtime_ns == mtime
    raised = train(tiny_config(tmp_path, "grpo", FAST + ["train.resume_from=auto", "train.max_train_seconds=1000"]),
                   quiet=True)
    assert raised["epochs"] == 4 and raised["stopped_by"] == "max_epochs"


def test_going_back_to_an_earlier_checkpoint_moves_the_later_ones_aside(tmp_path):
    """Resumed from checkpoint-2 of a run that went on to checkpoint-5 and final: the later ones stayed,
    so keep_checkpoints deleted the new checkpoint-3 (older than 4 and 5), --resume latest after a crash
    took the abandoned checkpoint-5 and --resume auto read the old summary and did nothing."""
    six = FAST + ["train.max_epochs=6", "train.save_freq=1"]
    run = Path(train(tiny_config(tmp_path, "grpo", six), quiet=True)["run_dir"])
    ckpts = run / "checkpoints"
    branch = train(tiny_config(tmp_path, "grpo", six + ["train.keep_checkpoints=2", "train.learning_rate=3e-3",
                                                        f"train.resume_from={ckpts / 'checkpoint-2'}"]), quiet=True)
    assert branch["epochs"] == 6
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-4", "checkpoint-5", "final", "superseded-1"]
    aside = ckpts / "superseded-1"
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint-3", "checkpoint-4", "checkpoint-5", "final",
                                                       "summary.json"]
    assert json.loads((run / "summary.json").read_text())["checkpoint"] == branch["checkpoint"]


def test_going_back_from_a_finished_run_moves_its_final_aside(tmp_path):
    """A finished run's last epoch has final/ only, so going back to its newest checkpoint-N found no later
    numbered one and left final/ and summary.json: a crash of the new branch, then --resume auto, read the
    old summary and trained nothing."""
    run = Path(train(tiny_config(tmp_path, "grpo", FAST), quiet=True)["run_dir"])  # checkpoint-2, final (4)
    branch = tiny_config(tmp_path, "grpo", FAST + [f"train.resume_from={run / 'checkpoints' / 'checkpoint-2'}",
                                                   "train.max_epochs=3"])
    assert train(branch, quiet=True)["epochs"] == 3
    aside = run / "checkpoints" / "superseded-1"
    assert sorted(p.name for p in aside.iterdir()) == ["final", "summary.json"]
    assert json.loads((aside / "summary.json").read_text())["epochs"] == 4


def test_a_checkpoint_holding_a_key_its_trainer_ignores_still_resumes(tmp_path):
    """A grpo run written before timestep_fraction on grpo became an error holds 0.9 there: with the key
    dropped from the YAML (as the error says) the resume compared 0.9 with the filled 0.99 and refused."""
    run = Path(train(tiny_config(tmp_path, "grpo", FAST), quiet=True)["run_dir"])
    ckpt = run / "checkpoints" / "checkpoint-2"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["config"]["train"]["timestep_fraction"] = 0.9  # what the older version let it write
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    resumed = train(tiny_config(tmp_path, "grpo", FAST + [f"train.resume_from={ckpt}"]), quiet=True)
    assert resumed["epochs"] == 4


def test_a_process_the_checkpoints_run_did_not_have_seeds_its_generators(tmp_path):
    """Continuing a 1-process run on 2 processes: rank 1 has no rng-rank1.json; it stopped the resume
    (after rank 0 had already cut metrics.jsonl and moved later checkpoints aside). Now it seeds its
    generators from the run's seed and its rank, and the epoch is sampled again."""
    import random

    from trainer.resume import load_rank_state, save_rank_state

    save_rank_state(tmp_path / "ckpt" / "resume", 0)  # written by one process
    cfg = tiny_config(tmp_path, "grpo")
    draws = []
    for _ in range(2):
        random.seed(123)
        torch.manual_seed(123)  # whatever state the process had
        assert load_rank_state(tmp_path / "ckpt", 1, None, None, cfg, world=2) is None
        draws.append((torch.rand(3), random.random()))
    assert torch.equal(draws[0][0], draws[1][0]) and draws[0][1] == draws[1][1]  # from the run's seed
    torch.manual_seed(123)
    assert not torch.equal(torch.rand(3), draws[0][0])  # ... not from whatever state the process had
    assert load_rank_state(tmp_path / "ckpt", 0, None, None, cfg, world=2) is None  # rank 0 restores its own
    with pytest.raises(ResumeError, match="holds no resume state"):
        load_rank_state(tmp_path / "empty", 0, None, None, cfg, world=1)
