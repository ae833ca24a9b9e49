"""``flowrl`` command line.

    flowrl train CONFIG [--set key=value ...]       embedded training (one process, or
                  [--resume CHECKPOINT|latest]      several: --processes N|auto, or under
                  [--processes N|auto]              `accelerate launch`)
    flowrl eval CONFIG --checkpoint DIR [--set ...] ODE evaluation of a saved checkpoint
    flowrl eval CONFIG --base [--set ...]            the same evaluation of the untrained model
    flowrl check CONFIG [--set ...]                 validate a config and print the derived batch geometry
    flowrl list rewards|models|trainers [NAME]      what a config can name; NAME: its docs and options
    flowrl convert FF_CONFIG [-o OUT]               a Flow-Factory config as a flowrl one, with a note per
                                                    key it changed or dropped (shared/flow_factory.py)
    flowrl serve reward --rewards a,b [...]         run the reward server (services/reward/cli.py)
    flowrl serve sampler --config CONFIG [...]      a run's policy as an HTTP generator (services/sampler/cli.py)
    flowrl trainer CONFIG [--set ...]               the distributed controller (transport: celery;
                                                    --processes as for train)
    flowrl worker sampler|reward [--config CONFIG]  a Celery worker for the sample / reward queue
                                                    (settings from FLOWRL_QUEUE_* or the config's queue:)

Config problems exit with status 2 and one paragraph naming the key and the fix.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys

from shared.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowrl", description="Online RL for flow-matching generators.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, helptext in [("train", "train (transport from the config; default local, embedded)"),
                           ("trainer", "the distributed trainer: train through the Celery queues"),
                           ("eval", "evaluate a checkpoint with the ODE sampler"),
                           ("check", "validate a config and print the derived batch geometry")]:
        s = sub.add_parser(name, help=helptext)
        s.add_argument("config", help="experiment YAML")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.learning_rate=1e-4 (repeatable)")
        if name == "eval":
            which = s.add_mutually_exclusive_group(required=True)
            which.add_argument("--checkpoint", help="runs/<run>/checkpoints/<name>")
            which.add_argument("--base", action="store_true",
                               help="evaluate the untrained model (model.model_name_or_path), as training's "
                                    "base evaluation: same prompts and seeds; written to runs/<run>/base_eval")
        if name in ("train", "trainer"):
            s.add_argument("--resume", metavar="CHECKPOINT", help="continue a run exactly from "
                           "runs/<run>/checkpoints/checkpoint-<N>, or 'latest' (with --set run_name=<run>), "
                           "or 'auto' (latest if the run has a checkpoint, else start; for restart "
                           "policies); same as --set train.resume_from=...")
            s.add_argument("--processes", metavar="N|auto",
                           help="start N data-parallel trainer processes on this machine (one per GPU; "
                                "'auto': every visible GPU) through accelerate launch; needed by "
                                "train.fsdp (trainer/launch.py)")
            s.add_argument("--nodes", metavar="M", help="run over M machines: the same command on each, with "
                           "--node-rank and --main-address (trainer/launch.py)")
            s.add_argument("--node-rank", metavar="R", help="this machine's rank, 0 .. M-1 (default NODE_RANK or "
                           "JOB_COMPLETION_INDEX)")
            s.add_argument("--main-address", metavar="HOST[:PORT]", help="the address of the machine with rank 0 "
                           "(default MASTER_ADDR, MASTER_PORT; port 29500)")
        if name == "check":
            s.add_argument("--world-size", type=int, default=1)
            s.add_argument("--memory", action="store_true",
                           help="also print the persistent memory per process, by arithmetic from the "
                                "transformer's config (trainer/memory.py; activations not counted)")
    w = sub.add_parser("worker", help="run a Celery worker (one process, one task at a time)")
    w.add_argument("kind", choices=["sampler", "reward"])
    w.add_argument("--config", help="experiment YAML whose queue: settings to use (else FLOWRL_QUEUE_* env)")
    w.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    w.add_argument("--name", help="worker name (default {kind}-{pid}@{host})")
    w.add_argument("--loglevel", default="INFO")
    w.add_argument("--http-port", type=int, help="serve /health/live, /health/ready, /metrics and /admin/status|drain|resume on this port "
                   "(conventionally 9101 for samplers, 9102 for reward workers)")
    w.add_argument("--http-host", default="127.0.0.1", help="interface for --http-port (default loopback)")
    ls = sub.add_parser("list", help="list the registered rewards, models or trainers (or describe one)")
    ls.add_argument("section", choices=["rewards", "models", "trainers"])
    ls.add_argument("name", nargs="?", help="describe this one: docstring, kind and options")
    c = sub.add_parser("convert", help="translate a Flow-Factory config into a flowrl config")
    c.add_argument("config", help="Flow-Factory experiment YAML")
    c.add_argument("-o", "--output", help="write the flowrl YAML here (default: standard output)")
    s = sub.add_parser("serve", help="run a service's HTTP server (see: flowrl serve reward|sampler --help)")
    s.add_argument("service", choices=["reward", "sampler"])
    s.add_argument("args", nargs=argparse.REMAINDER, help="the service's own options")
    return p


def _enable_faulthandler() -> None:
    """Print every thread's Python stack if the process dies of a signal (SIGSEGV, SIGABRT from
    C++), so a crash in a multi-process run names where each rank was."""
    if faulthandler.is_enabled():
        return
    try:
        faulthandler.enable()
    except (AttributeError, ValueError, OSError):  # stderr replaced by an object without a file
        pass


def _exit_finished_process(code: int = 0) -> None:
    """End one process of a finished multi-process run without interpreter finalization.

    torch keeps a gloo process group (its worker threads) alive after ``destroy_process_group``
    whenever DDP or FSDP held it (checked: the threads outlive ``del`` of the model and
    ``gc.collect``), so it is torn down only while the interpreter finalizes, where a worker thread
    that frees a tensor with Python state can abort the process (pytorch/pytorch#179291). A CI run
    saw that once: a finished 2-process FSDP run, rank 0 "terminate called without an active
    exception" (SIGABRT) after its report, and the launcher reported the run as failed. Everything
    the run writes is closed by now (checkpoints, metrics, report, loggers)."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# The module holding each worker kind's metrics and its serve_in_thread (health + /metrics).
WORKER_HTTP = {"sampler": "services.sampler.app", "reward": "services.reward.worker_app"}


def _worker(args) -> int:
    """Start a sampler or reward worker; settings from the config's ``queue:`` if given."""
    import importlib
    import socket

    from shared.protocol import QUEUE_REWARD, QUEUE_SAMPLE
    from shared.queue import QueueSettings, export_settings, worker_argv

    if args.config:
        os.environ.update(export_settings(load_config(args.config, args.overrides).queue))
    name = args.name or f"{args.kind}-{os.getpid()}@{socket.gethostname()}"
    os.environ["FLOWRL_WORKER_NAME"] = name
    if args.http_port is not None:
        from shared.worker_http import prepare_multiprocess_dir

        prepare_multiprocess_dir()  # before prometheus_client is imported: the pool child's metrics, too
    # the worker's modules first, then the HTTP thread, started before Celery forks its pool (a fork
    # while another thread imports can hang the child: shared/worker_http.py serve_in_thread)
    from shared.queue import QueueEnvironmentError

    try:
        module = importlib.import_module(f"services.{args.kind}.worker")  # reads FLOWRL_QUEUE_* now
    except QueueEnvironmentError as e:
        print(f"flowrl: {e}", file=sys.stderr)
        return 2
    try:  # a worker's own environment (FLOWRL_REWARD_WORKER_MAX_MODELS), checked before it takes tasks
        getattr(module, "check_environment", lambda: None)()
    except ValueError as e:
        print(f"flowrl: {e}", file=sys.stderr)
        return 2
    queue = QueueSettings().queue(QUEUE_SAMPLE if args.kind == "sampler" else QUEUE_REWARD)
    if args.http_port is not None:
        from shared.serving import warn_if_open
        from shared.worker_http import WorkerControl

        warn_if_open(f"flowrl worker {args.kind}", args.http_host, args.http_port,
                     os.environ.get("FLOWRL_API_TOKEN") or None, "drain this worker (POST /admin/drain)")
        importlib.import_module(WORKER_HTTP[args.kind]).serve_in_thread(
            QueueSettings().broker_url, args.http_host, args.http_port, WorkerControl(module.app, name, queue))
    module.app.worker_main(worker_argv(queue, name, args.loglevel))
    return 0


def _list(args) -> int:
    """``flowrl list``: the registry's names, or one entry described (trainer/catalog.py)."""
    from shared.registry import RegistryError
    from trainer.catalog import describe, table

    try:
        print(describe(args.section, args.name) if args.name else table(args.section))
    except RegistryError as e:
        print(f"flowrl: {e}", file=sys.stderr)
        return 2
    return 0


def _convert(args) -> int:
    """``flowrl convert``: write the flowrl form of a Flow-Factory config (notes in its header and on
    stderr), then load it as ``flowrl train`` would; exit 2 when that fails, naming what to fix."""
    from pathlib import Path

    import yaml

    from shared.config import parse_config
    from shared.flow_factory import ConversionError, convert, dump

    try:
        ff = yaml.safe_load(Path(args.config).read_text())
        raw, notes = convert(ff)
    except (OSError, yaml.YAMLError, ConversionError) as e:
        print(f"flowrl: cannot convert {args.config}: {e}", file=sys.stderr)
        return 2
    processes = (ff.get("num_processes") or 1) if isinstance(ff, dict) else 1
    target = args.output or "CONFIG"
    header = [f"# converted from the Flow-Factory config {args.config} by `flowrl convert`",
              f"# launch: flowrl train {target}" + (f" --processes {processes}" if processes != 1 else "")]
    header += ["# " + line for line in ["notes:"] + [f"- {n}" for n in notes]] if notes else []
    text = "\n".join(header) + "\n" + dump(raw)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    for n in notes:
        print(f"flowrl convert: {n}", file=sys.stderr)
    try:
        parse_config(raw)
    except ConfigError as e:
        print(f"flowrl: the converted config does not load yet; fix it by hand:\n{e}", file=sys.stderr)
        return 2
    if args.output:
        print(f"flowrl convert: wrote {args.output}; `flowrl check {args.output}` prints its batch geometry",
              file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "convert":
        return _convert(args)
    if args.command == "list":
        return _list(args)
    if args.command == "serve":  # a console entry point into the service, not a trainer dependency
        if args.service == "sampler":
            from services.sampler.cli import main as serve_sampler

            return serve_sampler(args.args)
        from services.reward.cli import main as serve_reward

        return serve_reward(args.args)
    try:
        if args.command == "worker":
            return _worker(args)
        overrides = list(args.overrides)
        if getattr(args, "resume", None):
            overrides.append(f"train.resume_from={args.resume}")
        cfg = load_config(args.config, overrides)
        if args.command == "trainer":
            cfg.transport = "celery"
        if args.command == "check":
            print(json.dumps(cfg.geometry(args.world_size).__dict__, indent=2))
            if args.memory:
                from trainer.memory import memory_report

                try:
                    print(json.dumps(memory_report(cfg, args.world_size), indent=2))
                except ValueError as e:
                    print(f"flowrl: {e}", file=sys.stderr)
                    return 2
            return 0
        if args.command in ("train", "trainer"):
            from trainer.launch import LaunchError, launched_world_size, relaunch_if_asked

            try:
                relaunch_if_asked(args, cfg)  # returns here only when this process trains itself
            except LaunchError as e:
                print(f"flowrl: {e}", file=sys.stderr)
                return 2
        from trainer.data import DatasetError
        from trainer.resume import ResumeError

        try:
            if args.command in ("train", "trainer"):
                from trainer.loop import train
                from trainer.preempt import EXIT_INTERRUPTED, EXIT_STOPPED, Stopped, StopRequest

                _enable_faulthandler()
                code, first = 0, os.environ.get("RANK", "0") == "0"  # the one process that speaks
                with StopRequest(announce=first) as stop:
                    try:
                        train(cfg, stop=stop)
                    except Stopped as e:
                        if first:
                            print(f"flowrl: {e}. Continue with: flowrl {args.command} {args.config} "
                                  "--resume auto (same run_name)", file=sys.stderr)
                        code = EXIT_STOPPED
                    except KeyboardInterrupt:  # Ctrl-C: stop now, one line instead of a traceback per process
                        if first:
                            print(f"flowrl: interrupted (Ctrl-C). Continue from the run's newest checkpoint with: "
                                  f"flowrl {args.command} {args.config} --resume latest (same run_name); SIGTERM "
                                  f"instead finishes the epoch and writes a checkpoint first", file=sys.stderr)
                        code = EXIT_INTERRUPTED
                if (launched_world_size() or 1) > 1:
                    _exit_finished_process(code)
                if code:
                    return code
            else:
                from trainer.eval_cli import eval_checkpoint

                try:
                    result = eval_checkpoint(cfg, None if args.base else args.checkpoint)
                except FileNotFoundError as e:  # --checkpoint is not a flowrl checkpoint
                    print(f"flowrl: {e}", file=sys.stderr)
                    return 2
                if os.environ.get("RANK", "0") == "0":  # one result, from the process that wrote the grid
                    print(json.dumps(result, indent=2))
        except DatasetError as e:
            print(f"flowrl: dataset error: {e}", file=sys.stderr)
            return 2
        except ResumeError as e:
            print(f"flowrl: cannot resume: {e}", file=sys.stderr)
            return 2
    except ConfigError as e:
        print(f"flowrl: config error in {getattr(args, 'config', None)}:\n{e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
