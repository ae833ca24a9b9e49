"""``flowrl serve reward``: run the reward server under uvicorn.

    flowrl serve reward --rewards brightness,toy_geneval [--host 127.0.0.1] [--port 8000]
                        [--max-batch-size N] [--max-queue-delay-ms MS] [--device cpu] [--token T]
                        [--torch-threads N]

Options left out come from the environment (``FLOWRL_REWARD_*``, see
:mod:`services.reward.settings`). Prefer ``FLOWRL_API_TOKEN`` over ``--token``: command lines
are visible to other users of the machine. Bad settings exit with status 2 and the reason.
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from shared.registry import RegistryError
from shared.serving import serve


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowrl serve reward",
                                description="Serve rewards over Open Inference Protocol v2 and Flow-Factory /compute.")
    p.add_argument("--rewards", help="comma-separated reward names or dotted paths (each served as a v2 model "
                                     "of that name), or a JSON list of {name, reward_model, ...options}")
    p.add_argument("--host", help="interface to listen on (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, help="TCP port (default 8000)")
    p.add_argument("--device", help="device the rewards run on (default cpu)")
    p.add_argument("--max-batch-size", type=int, help="samples merged into one scoring call (default 32)")
    p.add_argument("--max-queue-delay-ms", type=float, help="longest wait for more requests to merge (default 5)")
    p.add_argument("--max-request-bytes", type=int, help="largest accepted request body (default 64 MiB)")
    p.add_argument("--token", help="require 'Authorization: Bearer TOKEN' (prefer the FLOWRL_API_TOKEN env var)")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: half the CPUs)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, build the app and serve until interrupted. Returns the exit status."""
    args = _parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    from services.reward.server import create_app
    from services.reward.settings import RewardServerSettings

    try:
        settings = RewardServerSettings(**overrides)
        app = create_app(settings)
    except ValidationError as e:
        print(f"flowrl serve reward: invalid settings:\n{e}", file=sys.stderr)
        return 2
    except (RegistryError, ImportError) as e:
        print(f"flowrl serve reward: {e}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(settings.intra_op_threads())  # this process only serves: set before any model runs
    return serve("flowrl serve reward", app, settings, "use the rewards")


if __name__ == "__main__":
    sys.exit(main())
