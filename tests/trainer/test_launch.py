"""``flowrl train|trainer CONFIG --processes N|auto [--nodes M ...]``: the process count it
resolves, the launcher line it builds, the refusals, a real 2-process CPU run started by the flag
alone (the same run as under a hand-written ``accelerate launch``: groups split over both ranks,
DDP-identical weights), and the same over two "machines" (two launchers on this one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.tiny import tiny_raw
from trainer import launch
from trainer.cli import _parser
from trainer.launch import LaunchError, Nodes, launch_argv, relaunch_if_asked, resolve_nodes, resolve_processes

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("value,gpus,n", [("auto", 0, 1), ("auto", 1, 1), ("auto", 8, 8), ("3", 0, 3),
                                          ("4", 8, 4), ("8", 8, 8)])
def test_the_process_count_it_resolves(value, gpus, n):
    assert resolve_processes(value, gpus) == n


@pytest.mark.parametrize("value,gpus,words", [("two", 2, "not a number"), ("0", 2, "at least one"),
                                              ("-1", 0, "at least one"), ("4", 2, "--processes 2")])
def test_values_that_cannot_run_say_why(value, gpus, words):
    with pytest.raises(LaunchError, match=words):
        resolve_processes(value, gpus)


def test_the_launcher_line_runs_the_same_command():
    argv = launch_argv("trainer", "cfg.yaml", ["train.fsdp=true", "run_name=a b"], "latest", 4, 29511,
                       python="/py")
    assert argv[:3] == ["/py", "-m", "trainer.launch"]  # accelerate's launcher, keeping a child's exit status
    head = argv[: argv.index("trainer.cli") + 1]
    assert head[head.index("--num_processes") + 1] == "4" and "--multi_gpu" in head
    assert head[head.index("--main_process_port") + 1] == "29511"
    child = _parser().parse_args(argv[len(head):])  # what each started process parses
    assert (child.command, child.config, child.overrides, child.resume, child.processes) == \
        ("trainer", "cfg.yaml", ["train.fsdp=true", "run_name=a b"], "latest", None)


def test_under_a_launcher_it_trains_itself_and_refuses_a_different_count(monkeypatch):
    args = _parser().parse_args(["train", "cfg.yaml", "--processes", "4"])
    monkeypatch.setattr(launch.os, "execv", lambda *a: pytest.fail("must not start a launcher"))
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    relaunch_if_asked(args)  # one of the 4: returns
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError, match="one of 2"):
        relaunch_if_asked(args)


def test_one_process_needs_no_launcher(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(launch, "visible_gpus", lambda: 0)
    monkeypatch.setattr(launch.os, "execv", lambda *a: pytest.fail("must not start a launcher"))
    for value in (None, "1", "auto"):
        relaunch_if_asked(_parser().parse_args(["train", "cfg.yaml"] + (["--processes", value] if value else [])))


def test_a_bad_value_exits_2_before_anything_starts(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_raw(tmp_path, "grpo")))
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "train", str(cfg), "--processes", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "at least one process" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_a_geometry_the_process_count_cannot_split_exits_2_before_anything_starts(tmp_path):
    """One clear config error from the command itself, not one per started process under torch
    elastic's ChildFailedError traceback."""
    cfg = tmp_path / "cfg.yaml"
    raw = tiny_raw(tmp_path, "grpo")
    raw["train"].update(per_device_batch_size=16, gradient_step_per_epoch=2)  # 32 samples: 1 micro-batch on each of 2
    cfg.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "train", str(cfg), "--processes", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("config error") == 1 and "gradient_step_per_epoch=2 does not divide" in proc.stderr
    assert "starting 2 trainer processes" not in proc.stderr and "ChildFailedError" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def one_epoch_config(tmp_path: Path) -> Path:
    """The tiny GRPO run, one epoch of one optimizer step, as a YAML file."""
    raw = tiny_raw(tmp_path, "grpo")
    raw["train"].update(max_epochs=1, per_device_batch_size=8, gradient_step_per_epoch=1)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    return cfg


def test_two_processes_from_the_flag(tmp_path):
    cfg = one_epoch_config(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "train", str(cfg), "--processes", "2",
                           "--set", "run_name=flag"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "starting 2 trainer processes" in proc.stderr
    run_dir = tmp_path / "runs" / "flag"
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2
    ranks = [json.loads((run_dir / f"rank{r}_state.json").read_text()) for r in (0, 1)]
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"]
    groups = [set(r["last_epoch_group_ids"]) for r in ranks]
    assert groups[0] and groups[1] and not groups[0] & groups[1]


def test_a_resume_error_in_the_processes_exits_2_through_the_launcher(tmp_path):
    """Errors the processes find (resume, dataset, a config clash with the run folder) exit 2 in each; the
    launcher exited 1 (torch elastic's ChildFailedError), so a k8s Job retried the error 3 times."""
    cfg = one_epoch_config(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "train", str(cfg), "--processes", "2",
                           "--set", "run_name=none", "--resume", "latest"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "flowrl: cannot resume" in proc.stderr and "exited with status 2; stopping with 2" in proc.stderr


class _Exited(Exception):
    pass


@pytest.mark.parametrize("world", [None, "1", "2"])
def test_a_finished_process_of_a_multi_process_run_skips_interpreter_teardown(tmp_path, monkeypatch, world):
    """torch keeps gloo's process-group threads alive past destroy_process_group once DDP/FSDP held
    the group; a finished process of a launched run leaves with os._exit(0) instead of finalizing."""
    import os

    import trainer.loop
    from trainer.cli import main

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_raw(tmp_path, "grpo")))
    ran = []
    monkeypatch.setattr(trainer.loop, "train", lambda c, **kw: ran.append(c))

    def fake_exit(code):
        raise _Exited(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    for key in ("LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    if world is not None:
        monkeypatch.setenv("LOCAL_RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", world)
    if world == "2":
        with pytest.raises(_Exited) as exited:
            main(["train", str(cfg)])
        assert exited.value.args == (0,) and len(ran) == 1
    else:
        assert main(["train", str(cfg)]) == 0 and len(ran) == 1


def test_the_launcher_gives_its_processes_the_grace_period_to_checkpoint(monkeypatch):
    """SIGTERM to the launcher: torch elastic kills the processes after TORCH_ELASTIC_SHUTDOWN_TIMEOUT
    (30 s by default); --processes raises it to the deployments' grace period unless it is set."""
    started = []
    for key in ("LOCAL_RANK", "WORLD_SIZE", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(launch, "visible_gpus", lambda: 0)
    monkeypatch.setattr(launch.os, "execv", lambda exe, argv: started.append(
        launch.os.environ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]))
    relaunch_if_asked(_parser().parse_args(["train", "cfg.yaml", "--processes", "2"]))
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "77")
    relaunch_if_asked(_parser().parse_args(["train", "cfg.yaml", "--processes", "2"]))
    assert started == [str(launch.SHUTDOWN_TIMEOUT_S), "77"]


def test_the_machines_it_resolves_with_flags_and_environment():
    assert resolve_nodes(None, None, None, env={}) == Nodes()
    assert resolve_nodes("2", "1", "10.0.0.5:29600", env={}) == Nodes(2, 1, "10.0.0.5", 29600)
    assert resolve_nodes("2", None, None, env={"NODE_RANK": "1", "MASTER_ADDR": "head"}) == Nodes(2, 1, "head", 29500)
    # a Kubernetes Indexed Job numbers its pods; MASTER_PORT when the address has none
    env = {"JOB_COMPLETION_INDEX": "2", "MASTER_ADDR": "trainer-0.trainer", "MASTER_PORT": "29700"}
    assert resolve_nodes("3", None, None, env=env) == Nodes(3, 2, "trainer-0.trainer", 29700)
    assert resolve_nodes("2", "0", "[::1]", env={}).address == "[::1]"  # no port split inside an IPv6 literal


@pytest.mark.parametrize("flags,env,words", [
    (("0", "0", "h"), {}, "at least one machine"),
    (("2", None, "h"), {}, "needs this machine's rank"),
    (("2", "2", "h"), {}, "not one of 0 .. 1"),
    (("2", "1", None), {}, "meet at the first one.s address"),
    (("2", "x", "h"), {}, "is not a number"),
    (("2", "1", "h:port"), {}, "the port is not a number"),
])
def test_machines_that_cannot_meet_say_why(flags, env, words):
    with pytest.raises(LaunchError, match=words):
        resolve_nodes(*flags, env=env)


def test_the_launcher_line_over_several_machines():
    argv = launch_argv("train", "cfg.yaml", [], None, 4, 11111, python="/py", nodes=Nodes(2, 1, "head", 29600))
    head = argv[: argv.index("trainer.cli") + 1]
    value = lambda flag: head[head.index(flag) + 1]  # noqa: E731
    assert value("--num_processes") == "8" and value("--num_machines") == "2" and value("--machine_rank") == "1"
    assert value("--main_process_ip") == "head" and value("--main_process_port") == "29600"


def test_two_machines_of_one_process_each(tmp_path):
    """Two launchers (as on two machines, here both on the loopback) form one run of world size 2."""
    cfg = one_epoch_config(tmp_path)
    port = launch.free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "trainer.cli", "train", str(cfg), "--processes", "1",
                               "--nodes", "2", "--node-rank", str(rank), "--main-address", f"127.0.0.1:{port}",
                               "--set", "run_name=nodes"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    assert "machine 1 of 2" in outs[1][1]
    run_dir = tmp_path / "runs" / "nodes"
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2
    ranks = [json.loads((run_dir / f"rank{r}_state.json").read_text()) for r in (0, 1)]
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"]
    groups = [set(r["last_epoch_group_ids"]) for r in ranks]
    assert groups[0] and groups[1] and not groups[0] & groups[1]
