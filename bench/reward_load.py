"""Load test of the reward server: N concurrent clients against the real server for D seconds.

The server runs as ``flowrl serve reward`` in a subprocess (uvicorn, the production entry point)
on a loopback port; the clients are ``httpx.AsyncClient`` coroutines in this process, each in a
closed loop (send one v2 ``infer`` request, wait for the answer, send the next). Two rewards:

* ``brightness``: weight-free (the server's own overhead: HTTP, JSON, PNG decode, batching);
* ``clip``: a tiny random-weight CLIP (``tests/helpers/tiny_clip.py``: 2-layer towers of width
  32, 32x32 inputs), so a real transformers model runs in the batcher's worker thread.

Reported per reward: requests, throughput (requests/s and images/s), latency p50/p90/p99/max,
mean batch fill (samples per merged batch, from the server's ``flowrl_reward_batch_size``
histogram: the difference of ``_sum / _count`` between the start and end of the timed window),
and errors (non-200 answers and transport errors, by kind). Target: zero errors and
p99 < 4 x p50.

    python bench/reward_load.py                       # 64 clients, 60 s per reward
    python bench/reward_load.py --duration 10 --rewards brightness

Writes ``bench/results/reward_load_cpu.json`` (``--out``) and the table in ``docs/reliability.md``
(``--no-doc`` to skip; ``--doc-from FILE`` rewrites the table from a results file), and prints one
JSON line per reward.
The clients share the machine with the server: on a small CPU box the figures include the
clients' own CPU use (JSON, base64), so they are a floor for the server on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["a photo of a red circle", "a photo of a blue square", "two green triangles", "a yellow star"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def request_bodies(count: int, images: int, size: int, seed: int = 0) -> list[bytes]:
    """``count`` distinct v2 infer bodies (JSON, base64 PNGs), each ``images`` random images."""
    rng = np.random.default_rng(seed)
    bodies = []
    for i in range(count):
        pngs = [_png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(images)]
        prompts = [PROMPTS[(i + k) % len(PROMPTS)] for k in range(images)]
        body = {"inputs": [
            {"name": "image", "shape": [images], "datatype": "BYTES",
             "data": [base64.b64encode(p).decode() for p in pngs]},
            {"name": "prompt", "shape": [images], "datatype": "BYTES", "data": prompts}]}
        bodies.append(json.dumps(body).encode())
    return bodies


def served_rewards(names: list[str], workdir: Path) -> list[dict]:
    """The ``--rewards`` JSON list for ``names`` (``clip`` gets a tiny random checkpoint)."""
    out = []
    for name in names:
        if name == "clip":
            from tests.helpers.tiny_clip import save_tiny_clip

            path = save_tiny_clip(workdir / "tiny_clip")
            out.append({"name": "clip", "reward_model": "clip", "model_name_or_path": str(path)})
        else:
            out.append({"name": name, "reward_model": name})
    return out


class Server:
    """``flowrl serve reward`` in a subprocess; stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, rewards: list[dict], *, max_batch_size: int, max_queue_delay_ms: float) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [sys.executable, "-m", "trainer.cli", "serve", "reward", "--rewards", json.dumps(rewards),
                     "--host", "127.0.0.1", "--port", str(self.port), "--max-batch-size", str(max_batch_size),
                     "--max-queue-delay-ms", str(max_queue_delay_ms), "--log-level", "warning"]

    def __enter__(self) -> "Server":
        env = os.environ | {"PYTHONPATH": str(ROOT), "FLOWRL_API_TOKEN": ""}
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"reward server exited with {self.proc.returncode}:\n{self._output()}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"reward server not ready after 180 s:\n{self._output()}")
            time.sleep(0.1)

    def _output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


HISTOGRAMS = ("flowrl_reward_batch_size", "flowrl_reward_model_seconds", "flowrl_reward_queue_seconds",
              "flowrl_reward_request_seconds")


def histogram_totals(metrics_text: str, model: str) -> dict[str, float]:
    """``{name_sum: v, name_count: v}`` of the server's histograms for ``model`` (Prometheus text)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.labels.get("model") == model and s.name.rsplit("_", 1)[0] in HISTOGRAMS and s.name.endswith(("_sum", "_count")):
                out[s.name] = out.get(s.name, 0.0) + s.value  # request_seconds: summed over protocols
    return out


async def drive(url: str, model: str, bodies: list[bytes], *, clients: int, duration: float,
                warmup: float, server_pid: int | None = None) -> dict:
    """Run ``clients`` closed-loop clients; latencies and errors of requests sent after ``warmup``.

    Each client has its own ``httpx.AsyncClient`` (one keep-alive connection): one shared pool
    of 64 connections costs httpcore O(connections) per request in pool bookkeeping, which made
    the client, not the server, the bottleneck (measured: 100 req/s instead of ~1000)."""
    endpoint = f"{url}/v2/models/{model}/infer"
    latencies: list[float] = []
    errors: dict[str, int] = {}
    start = time.monotonic()
    timed_from, stop = start + warmup, start + warmup + duration

    async def client(k: int) -> None:
        i = k
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(limits=limits, timeout=60) as http:
            while (sent := time.monotonic()) < stop:
                body = bodies[i % len(bodies)]
                i += clients
                try:
                    r = await http.post(endpoint, content=body, headers={"Content-Type": "application/json"})
                    kind = None if r.status_code == 200 else f"http {r.status_code}: {r.text[:120]}"
                except httpx.HTTPError as e:
                    kind = f"{type(e).__name__}: {e}"[:160]
                if sent < timed_from:
                    continue
                if kind is None:
                    latencies.append(time.monotonic() - sent)
                else:
                    errors[kind] = errors.get(kind, 0) + 1

    async with httpx.AsyncClient(timeout=60) as admin:
        tasks = [asyncio.create_task(client(k)) for k in range(clients)]
        await asyncio.sleep(max(0.0, timed_from - time.monotonic()))
        before = histogram_totals((await admin.get(f"{url}/metrics")).text, model)
        cpu0, own0 = cpu_seconds(server_pid) if server_pid else None, time.process_time()
        await asyncio.gather(*tasks)
        wall = time.monotonic() - timed_from
        cpu1, own1 = cpu_seconds(server_pid) if server_pid else None, time.process_time()
        after = histogram_totals((await admin.get(f"{url}/metrics")).text, model)
    return {"latencies": latencies, "errors": errors, "wall_s": wall,
            "server": {k: after[k] - before.get(k, 0.0) for k in after},
            "server_cpu_s": None if cpu0 is None or cpu1 is None else cpu1 - cpu0, "client_cpu_s": own1 - own0}


def summarize(model: str, raw: dict, *, images: int, max_batch_size: int) -> dict:
    lat = np.array(raw["latencies"]) * 1000.0
    ok, wall = len(lat), raw["wall_s"]
    n_err = sum(raw["errors"].values())
    p50, p90, p99 = (float(np.percentile(lat, q)) for q in (50, 90, 99)) if ok else (float("nan"),) * 3
    srv = raw["server"]
    batches = srv.get("flowrl_reward_batch_size_count", 0.0)
    fill = srv.get("flowrl_reward_batch_size_sum", 0.0) / batches if batches else float("nan")

    def mean_ms(name: str) -> float | None:
        n = srv.get(f"{name}_count", 0.0)
        return round(1000.0 * srv[f"{name}_sum"] / n, 1) if n else None

    return {
        "reward": model, "requests_ok": ok, "errors": n_err, "error_kinds": raw["errors"],
        "seconds": round(wall, 2), "requests_per_s": round(ok / wall, 1), "images_per_s": round(ok * images / wall, 1),
        "latency_ms": {"p50": round(p50, 1), "p90": round(p90, 1), "p99": round(p99, 1),
                       "max": round(float(lat.max()), 1) if ok else None, "mean": round(float(lat.mean()), 1) if ok else None},
        "p99_over_p50": round(p99 / p50, 2) if ok else None,
        "mean_batch_fill": round(fill, 2), "mean_batch_fill_fraction": round(fill / max_batch_size, 3),
        "batches": int(batches),
        "server_mean_ms": {"request": mean_ms("flowrl_reward_request_seconds"),
                           "queue": mean_ms("flowrl_reward_queue_seconds"),
                           "model_per_batch": mean_ms("flowrl_reward_model_seconds")},
        "server_cpu_per_s": round(raw["server_cpu_s"] / wall, 2) if raw.get("server_cpu_s") is not None else None,
        "client_cpu_per_s": round(raw["client_cpu_s"] / wall, 2),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
        "target_met": bool(n_err == 0 and ok and p99 < 4 * p50),
    }


DOC = ROOT / "docs" / "reliability.md"
START, END = "<!-- reward_load_cpu:start -->", "<!-- reward_load_cpu:end -->"


def write_doc(report: dict, doc: Path = DOC) -> None:
    """Put the results table between the markers in ``docs/reliability.md`` (or append it)."""
    st = report["settings"]
    rows = ["| reward | req/s | images/s | p50 ms | p90 ms | p99 ms | p99/p50 | mean batch fill | "
            "server: request / queue ms, model ms per batch | errors | target |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lat, srv = r["latency_ms"], r["server_mean_ms"]
        rows.append(f"| {r['reward']} | {r['requests_per_s']} | {r['images_per_s']} | {lat['p50']} | {lat['p90']} | "
                    f"{lat['p99']} | {r['p99_over_p50']} | {r['mean_batch_fill']} of {st['max_batch_size']} | "
                    f"{srv['request']} / {srv['queue']}, {srv['model_per_batch']} | {r['errors']} | "
                    f"{'met' if r['target_met'] else '**not met**'} |")
    table = "\n".join([
        START,
        f"Measured by `{report['command'].strip()}` (`bench/results/reward_load_cpu.json`): "
        f"{st['clients']} clients, {st['duration_s']:g} s timed per reward after {st['warmup_s']:g} s of warm-up, "
        f"{st['images_per_request']} {st['image_size']}x{st['image_size']} PNG per request, max_batch_size "
        f"{st['max_batch_size']}, max_queue_delay_ms {st['max_queue_delay_ms']:g}; server and clients on the same "
        f"{report['cpus']}-CPU machine with other jobs running (1-minute load average {report['loadavg_1m_before']} "
        f"before the run, then after each reward: "
        + ", ".join(f"{r['reward']} {r['loadavg_1m_after']}" for r in report["results"])
        + f"), torch {report['torch']}.",
        "", *rows, END])
    text = doc.read_text() if doc.exists() else "# Reliability\n"
    if START in text:
        text = text[:text.index(START)] + table + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Load\n\n" + table + "\n"
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rewards", default="brightness,clip", help="comma-separated: brightness, clip (tiny random)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=60.0, help="timed seconds per reward")
    p.add_argument("--warmup", type=float, default=3.0, help="untimed seconds before the timed window")
    p.add_argument("--images", type=int, default=1, help="images per request")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "reward_load_cpu.json"))
    p.add_argument("--no-doc", action="store_true", help="do not update the table in docs/reliability.md")
    p.add_argument("--doc-from", metavar="JSON", help="only rewrite the docs table from an earlier results file")
    args = p.parse_args(argv)
    if args.doc_from:
        write_doc(json.loads(Path(args.doc_from).read_text()))
        return 0

    import torch

    load_before = os.getloadavg()[0]  # other work on the machine skews the figures: recorded
    names = [n.strip() for n in args.rewards.split(",") if n.strip()]
    bodies = request_bodies(4 * args.clients, args.images, args.image_size)
    results = []
    with tempfile.TemporaryDirectory(prefix="flowrl-load-") as tmp:
        for served in served_rewards(names, Path(tmp)):
            with Server([served], max_batch_size=args.max_batch_size,
                        max_queue_delay_ms=args.max_queue_delay_ms) as server:
                raw = asyncio.run(drive(server.url, served["name"], bodies, clients=args.clients,
                                        duration=args.duration, warmup=args.warmup,
                                        server_pid=server.proc.pid))
            row = summarize(served["name"], raw, images=args.images, max_batch_size=args.max_batch_size)
            print(json.dumps(row), flush=True)
            results.append(row)
    report = {
        "bench": "reward_load", "device": "cpu", "host": platform.node(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(),
        "loadavg_1m_before": round(load_before, 2),
        "command": "python bench/reward_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"clients": args.clients, "duration_s": args.duration, "warmup_s": args.warmup,
                     "images_per_request": args.images, "image_size": args.image_size,
                     "max_batch_size": args.max_batch_size, "max_queue_delay_ms": args.max_queue_delay_ms},
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if not args.no_doc:
        write_doc(report)
    return 0 if all(r["target_met"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
