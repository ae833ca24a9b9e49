"""``flowrl serve sampler``: run the generation server (:mod:`services.sampler.server`) under uvicorn.

    flowrl serve sampler --config CONFIG [--checkpoint DIR] [--live] [--set key=value ...]
                         [--host 127.0.0.1] [--port 8001] [--device cpu] [--token T]

Options left out come from the environment (``FLOWRL_SAMPLER_*``, :mod:`services.sampler.settings`).
Prefer ``FLOWRL_API_TOKEN`` over ``--token``: command lines are visible to other users of the
machine. Bad settings or a bad config exit with status 2 and the reason.
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from shared.serving import serve


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowrl serve sampler",
                                description="Serve a run's policy (a checkpoint, or the base) as an HTTP generator.")
    p.add_argument("--config", help="experiment YAML: its model: is built, its eval: gives the defaults")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--checkpoint", help="runs/<run>/checkpoints/<name> (default: the base model)")
    p.add_argument("--live", action="store_true", default=None,
                   help="serve the checkpoint's live weights, not its EMA (what evaluation scores)")
    p.add_argument("--host", help="interface to listen on (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, help="TCP port (default 8001)")
    p.add_argument("--device", help="device the model runs on (default cpu)")
    p.add_argument("--batch-size", type=int, help="images per model call (default eval.per_device_batch_size)")
    p.add_argument("--token", help="require 'Authorization: Bearer TOKEN' (prefer the FLOWRL_API_TOKEN env var)")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, build the app and serve until interrupted. Returns the exit status."""
    args = _parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    from services.sampler.server import create_app
    from services.sampler.settings import SamplerServerSettings
    from shared.config import ConfigError

    try:
        settings = SamplerServerSettings(**overrides)
        app = create_app(settings)
    except ValidationError as e:
        print(f"flowrl serve sampler: invalid settings:\n{e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"flowrl serve sampler: config error in {overrides.get('config')}:\n{e}", file=sys.stderr)
        return 2
    return serve("flowrl serve sampler", app, settings, "generate images and load checkpoints")


if __name__ == "__main__":
    sys.exit(main())
