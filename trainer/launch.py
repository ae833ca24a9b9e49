"""``flowrl train|trainer CONFIG --processes N``: start N data-parallel trainer processes on this
machine without writing the ``accelerate launch`` line by hand.

The command replaces itself (``exec``) with ``python -m trainer.launch --multi_gpu --num_processes N
--num_machines 1 --main_process_port P -m trainer.cli <the same command>``: accelerate's launcher
(``accelerate.commands.launch``) in this module's :func:`run_launcher`, so a container's stop signal
reaches the launcher, which passes it on to every process, and the launcher exits with the first
failed process's status (2 for a config, dataset or resume error, 143 after SIGTERM; torch elastic's
``ChildFailedError`` made it 1, and a k8s Job retried a config error). ``auto``
is the number of GPUs this process sees (``CUDA_VISIBLE_DEVICES``, the container's devices), 1
without a GPU.

Several machines: the same command on each, with ``--nodes M`` (the same everywhere), the
machine's ``--node-rank`` (0 on the first; else ``NODE_RANK``, or ``JOB_COMPLETION_INDEX`` in a
Kubernetes Indexed Job) and the first machine's ``--main-address HOST[:PORT]`` (else
``MASTER_ADDR`` / ``MASTER_PORT``; port 29500 unless given): accelerate's ``--num_machines``,
``--machine_rank``, ``--main_process_ip``, with ``--num_processes`` the total over the machines.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import NamedTuple

# set by torchrun / accelerate launch in each process they start
_LAUNCHED = ("LOCAL_RANK", "WORLD_SIZE")
SHUTDOWN_TIMEOUT_S = 300  # as compose's stop_grace_period and the k8s trainer's grace period
DEFAULT_PORT = 29500  # several machines must agree on the port: no free-port pick there


class LaunchError(ValueError):
    """A ``--processes`` value that cannot run here; the message names the fix."""


def resolve_processes(value: str, gpus: int) -> int:
    """The number of trainer processes ``--processes value`` asks for on a machine with ``gpus``
    visible GPUs: ``auto`` is ``max(gpus, 1)``; a number must be >= 1 and, where there are GPUs,
    at most ``gpus`` (one process per GPU). Without a GPU any number runs CPU processes (gloo)."""
    if value == "auto":
        return max(gpus, 1)
    try:
        n = int(value)
    except ValueError:
        raise LaunchError(f"--processes {value!r} is not a number. Fix: --processes N (N >= 1), or "
                          "--processes auto (one per visible GPU).") from None
    if n < 1:
        raise LaunchError(f"--processes {n}: at least one process is needed. Fix: --processes 1 or more.")
    if gpus and n > gpus:
        raise LaunchError(f"--processes {n} but this machine shows {gpus} GPU(s) (one process per GPU). "
                          f"Fix: --processes {gpus} (or auto), or make more GPUs visible "
                          "(CUDA_VISIBLE_DEVICES, the container's GPU reservation).")
    return n


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launched_world_size() -> int | None:
    """The process count of the launcher this process runs under, or None when it runs alone."""
    if not any(k in os.environ for k in _LAUNCHED):
        return None
    return int(os.environ.get("WORLD_SIZE", "1"))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Nodes(NamedTuple):
    """The machines of a run: how many, this one's rank, the first one's address and port."""

    count: int = 1
    rank: int = 0
    address: str | None = None
    port: int | None = None


def resolve_nodes(nodes: str | None, node_rank: str | None, main_address: str | None,
                  env: dict | None = None) -> Nodes:
    """``--nodes`` / ``--node-rank`` / ``--main-address`` with their environment fallbacks (module
    docstring). Raises :class:`LaunchError` naming the fix."""
    env = os.environ if env is None else env
    try:
        count = int(nodes) if nodes is not None else 1
    except ValueError:
        raise LaunchError(f"--nodes {nodes!r} is not a number. Fix: --nodes M, the number of machines.") from None
    if count < 1:
        raise LaunchError(f"--nodes {count}: at least one machine. Fix: --nodes 1 or more.")
    if count == 1:
        return Nodes()
    raw_rank = node_rank if node_rank is not None else env.get("NODE_RANK", env.get("JOB_COMPLETION_INDEX"))
    if raw_rank is None:
        raise LaunchError(f"--nodes {count} needs this machine's rank. Fix: --node-rank R (0 on the first machine), "
                          "or set NODE_RANK (a Kubernetes Indexed Job sets JOB_COMPLETION_INDEX).")
    try:
        rank = int(raw_rank)
    except ValueError:
        raise LaunchError(f"--node-rank {raw_rank!r} is not a number. Fix: --node-rank 0 .. {count - 1}.") from None
    if not 0 <= rank < count:
        raise LaunchError(f"--node-rank {rank} is not one of 0 .. {count - 1} (--nodes {count}). Fix: number the "
                          f"machines 0 to {count - 1}, 0 being the one whose address the others are given.")
    address = main_address or env.get("MASTER_ADDR")
    if not address:
        raise LaunchError(f"--nodes {count}: the machines meet at the first one's address. Fix: --main-address "
                          "HOST[:PORT] (the machine with --node-rank 0), or set MASTER_ADDR (and MASTER_PORT).")
    host, _, port = address.rpartition(":") if address.count(":") == 1 else (address, "", "")
    try:
        port_n = int(port or env.get("MASTER_PORT") or DEFAULT_PORT)
    except ValueError:
        raise LaunchError(f"--main-address {address!r}: the port is not a number. Fix: HOST:PORT.") from None
    return Nodes(count, rank, host, port_n)


def launch_argv(command: str, config: str, overrides: list[str], resume: str | None, processes: int,
                port: int, python: str = sys.executable, nodes: Nodes = Nodes()) -> list[str]:
    """The argv that runs ``flowrl <command> <config>`` (with its ``--set`` overrides and
    ``--resume``) as ``processes`` processes on this machine, rendezvous on ``port`` (or, over
    several machines, ``nodes.port`` of ``nodes.address``)."""
    machines = ["--num_machines", "1", "--main_process_port", str(port)]
    if nodes.count > 1:
        machines = ["--num_machines", str(nodes.count), "--machine_rank", str(nodes.rank),
                    "--main_process_ip", nodes.address, "--main_process_port", str(nodes.port)]
    argv = [python, "-m", "trainer.launch", "--multi_gpu",
            "--num_processes", str(processes * nodes.count), *machines,
            # the trainer's Accelerator takes these from the config (train.mixed_precision, model.compile)
            "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "trainer.cli", command, config]
    for o in overrides:
        argv += ["--set", o]
    if resume:
        argv += ["--resume", resume]
    return argv


def relaunch_if_asked(args, cfg=None) -> None:
    """Replace this process by the launcher when ``args.processes`` asks for more than one process
    and none runs yet; return when this process should train itself. Raises :class:`LaunchError`
    when the value cannot run here or disagrees with the launcher it already runs under; with the
    run's ``cfg``, its batch geometry is checked for the whole process count first (a
    ``ConfigError``: once here, instead of once per started process under the launcher's traceback)."""
    nodes_flag = getattr(args, "nodes", None)
    if args.processes is None and nodes_flag is None:
        return
    processes = args.processes or "auto"
    world = launched_world_size()
    if world is not None:  # already one of the launched processes
        count = int(nodes_flag) if nodes_flag and nodes_flag.isdigit() else 1
        if processes != "auto" and int(processes) * count != world:
            raise LaunchError(f"--processes {processes}" + (f" on {count} machines" if count > 1 else "")
                              + f" but this process was started as one of {world} (accelerate launch / "
                              "torchrun). Fix: drop --processes when you launch by hand, or let "
                              "`flowrl ... --processes N` start them.")
        return
    nodes = resolve_nodes(nodes_flag, getattr(args, "node_rank", None), getattr(args, "main_address", None))
    n = resolve_processes(processes, visible_gpus())
    if n == 1 and nodes.count == 1:
        return
    if cfg is not None:
        cfg.geometry(n * nodes.count)
    port = int(os.environ.get("MASTER_PORT") or free_port())
    argv = launch_argv(args.command, args.config, args.overrides, args.resume, n, port, nodes=nodes)
    # on SIGTERM the launcher gives its processes this long to finish the epoch and write a
    # checkpoint (trainer/preempt.py) before it kills them; torch elastic's own default is 30 s
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))
    where = f" (machine {nodes.rank} of {nodes.count})" if nodes.count > 1 else ""
    print(f"flowrl: starting {n} trainer processes{where}: {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    os.execv(argv[0], argv)


def run_launcher(argv: list[str]) -> int:
    """accelerate's launcher on ``argv`` (its command line); the first failed process's exit status
    when one failed (its own message is already on stderr), else 0."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except SignalException as e:  # SIGTERM to the launcher: its processes checkpointed and stopped
        print(f"flowrl: the launcher got {e.sigval.name}; its processes stopped", file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode if isinstance(failure.exitcode, int) and failure.exitcode > 0 else 1
        if failure.exitcode is not None and failure.exitcode < 0:  # killed by a signal: the shell's 128 + n
            code = 128 - failure.exitcode
        print(f"flowrl: trainer process {rank} exited with status {failure.exitcode}; stopping with {code}",
              file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(run_launcher(sys.argv[1:]))
