"""``flowrl`` command line.

    flowrl train CONFIG [--set key=value ...]       embedded training (one process, or
                                                    several under `accelerate launch`)
    flowrl eval CONFIG --checkpoint DIR [--set ...] ODE evaluation of a saved checkpoint
    flowrl check CONFIG [--set ...]                 validate a config and print the derived batch geometry

Config problems exit with status 2 and one paragraph naming the key and the fix.
"""

from __future__ import annotations

import argparse
import json
import sys

from shared.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowrl", description="Online RL for flow-matching generators.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, helptext in [("train", "train with the embedded (local) transport"),
                           ("eval", "evaluate a checkpoint with the ODE sampler"),
                           ("check", "validate a config and print the derived batch geometry")]:
        s = sub.add_parser(name, help=helptext)
        s.add_argument("config", help="experiment YAML")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.learning_rate=1e-4 (repeatable)")
        if name == "eval":
            s.add_argument("--checkpoint", required=True, help="runs/<run>/checkpoints/<name>")
        if name == "check":
            s.add_argument("--world-size", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "check":
            print(json.dumps(cfg.geometry(args.world_size).__dict__, indent=2))
            return 0
        from trainer.data import DatasetError

        try:
            if args.command == "train":
                from trainer.loop import train

                train(cfg)
            else:
                from trainer.eval_cli import eval_checkpoint

                try:
                    result = eval_checkpoint(cfg, args.checkpoint)
                except FileNotFoundError as e:  # --checkpoint is not a flowrl checkpoint
                    print(f"flowrl: {e}", file=sys.stderr)
                    return 2
                print(json.dumps(result, indent=2))
        except DatasetError as e:
            print(f"flowrl: dataset error: {e}", file=sys.stderr)
            return 2
    except ConfigError as e:
        print(f"flowrl: config error in {args.config}:\n{e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
