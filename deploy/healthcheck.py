"""Container health check: exit 0 when URL answers 2xx within the timeout, else 1.

    python deploy/healthcheck.py http://127.0.0.1:8000/v2/health/ready [--timeout 3]
    python deploy/healthcheck.py --post http://127.0.0.1:9101/admin/drain   # a worker's admin route


Used by docker-compose.yml (sampler, reward server, preview server) and by the reward and
preview servers' readiness probes in k8s/. Sends ``Authorization: Bearer $FLOWRL_API_TOKEN`` when
that variable is set: those servers protect their readiness with the token, and a probe cannot read a Secret
into an HTTP header. Standard library only, so it runs in any image with Python and no curl
(``docker compose exec sampler python deploy/healthcheck.py --post ...``: the admin ports are on the
compose network only). ``--post`` sends a POST and prints the answer's body.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request


def check(url: str, timeout: float, method: str = "GET") -> tuple[bool, str]:
    request = urllib.request.Request(url, method=method)
    token = os.environ.get("FLOWRL_API_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (http only, from config)
            body = response.read(2000).decode(errors="replace") if method == "POST" else ""
            return 200 <= response.status < 300, f"{url}: HTTP {response.status}" + (f" {body}" if body else "")
    except urllib.error.HTTPError as e:
        return False, f"{url}: HTTP {e.code} {e.read(500).decode(errors='replace')}"
    except (urllib.error.URLError, OSError) as e:
        return False, f"{url}: {e}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--post", action="store_true", help="send a POST (a worker's /admin/drain or /admin/resume)")
    args = p.parse_args(argv)
    ok, message = check(args.url, args.timeout, "POST" if args.post else "GET")
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
