"""``flowrl train|trainer CONFIG --processes N``: start N data-parallel trainer processes on this
machine without writing the ``accelerate launch`` line by hand.

The command replaces itself (``exec``) with ``python -m accelerate.commands.launch --multi_gpu
--num_processes N --num_machines 1 --main_process_port P -m trainer.cli <the same command>``,
so a container's stop signal reaches the launcher, which passes it on to every process. ``auto``
is the number of GPUs this process sees (``CUDA_VISIBLE_DEVICES``, the container's devices), 1
without a GPU. Several machines: use ``accelerate launch`` (or torchrun) with their own rendezvous
options, as in the README.
"""

from __future__ import annotations

import os
import socket
import sys

# set by torchrun / accelerate launch in each process they start
_LAUNCHED = ("LOCAL_RANK", "WORLD_SIZE")
SHUTDOWN_TIMEOUT_S = 300  # as compose's stop_grace_period and the k8s trainer's grace period


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


def launch_argv(command: str, config: str, overrides: list[str], resume: str | None, processes: int,
                port: int, python: str = sys.executable) -> list[str]:
    """The argv that runs ``flowrl <command> <config>`` (with its ``--set`` overrides and
    ``--resume``) as ``processes`` processes on this machine, rendezvous on ``port``."""
    argv = [python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--main_process_port", str(port),
            # the trainer's Accelerator takes these from the config (train.mixed_precision, model.compile)
            "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "trainer.cli", command, config]
    for o in overrides:
        argv += ["--set", o]
    if resume:
        argv += ["--resume", resume]
    return argv


def relaunch_if_asked(args) -> None:
    """Replace this process by the launcher when ``args.processes`` asks for more than one process
    and none runs yet; return when this process should train itself. Raises :class:`LaunchError`
    when the value cannot run here or disagrees with the launcher it already runs under."""
    if args.processes is None:
        return
    world = launched_world_size()
    if world is not None:  # already one of the launched processes
        if args.processes != "auto" and int(args.processes) != world:
            raise LaunchError(f"--processes {args.processes} but this process was started as one of "
                              f"{world} (accelerate launch / torchrun). Fix: drop --processes when you "
                              "launch by hand, or let `flowrl ... --processes N` start them.")
        return
    n = resolve_processes(args.processes, visible_gpus())
    if n == 1:
        return
    port = int(os.environ.get("MASTER_PORT") or free_port())
    argv = launch_argv(args.command, args.config, args.overrides, args.resume, n, port)
    # on SIGTERM the launcher gives its processes this long to finish the epoch and write a
    # checkpoint (trainer/preempt.py) before it kills them; torch elastic's own default is 30 s
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))
    print(f"flowrl: starting {n} trainer processes: {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    os.execv(argv[0], argv)
