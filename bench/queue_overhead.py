"""Queue overhead: move one SD3.5-M-at-512px rollout batch through blob store + Celery + Redis
and back, and compare with the time an H100 needs to SAMPLE that batch.

The batch is the peer recipe's group: 24 samples, 10 SDE steps recorded (latent states
``[16, 64, 64]`` float32 for 11 steps: x_0..x_10), per-step log-probs and stds, and 24 decoded
images 512x512 (smooth synthetic pictures). One round trip, as the distributed mode runs it:

1. sampler side: :func:`services.sampler.runtime.write_trajectory` (pack, hash, write both
   blobs) and ``send_task`` of the :class:`~shared.protocol.RewardJob` (the real code);
2. a real reward worker process (``flowrl worker reward``): fetch the images, score them
   (``brightness``, ~free), push the :class:`~shared.protocol.ScoredBatch` to Redis;
3. trainer side: pop it, read + verify + unpack the trajectory blob.

The reward's own compute is measured separately in this process and subtracted (it is not
transport). GPU reference: ``reference/gpu-limits-h100.json`` (SD3.5-M architecture, 512 px,
batch-16 transformer forward, 10 steps with CFG), eager and ``torch.compile``d.

    python bench/queue_overhead.py --repeats 7     # needs Redis (FLOWRL_QUEUE_BROKER_URL)

Writes ``bench/results/queue_overhead_cpu.json`` and the table in ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.protocol import (QUEUE_REWARD, TASK_REWARD, RewardJob, SampleItem, SampleJob,  # noqa: E402
                             SamplingParams)
from shared.queue import QueueSettings, RunState, delete_namespace_queues, make_celery  # noqa: E402
from shared.rewards import build_reward  # noqa: E402
from shared.sampling import Rollout, unpack_trajectory  # noqa: E402
from shared.store import BlobStore  # noqa: E402
from services.sampler.runtime import write_trajectory  # noqa: E402

REFERENCE = Path(os.environ.get("FLOWRL_GPU_LIMITS", ROOT.parent / "shared" / "reference" / "gpu-limits-h100.json"))
B, STEPS, C, HW, RES = 24, 10, 16, 64, 512


def synthetic_batch(seed: int = 0) -> Rollout:
    g = torch.Generator().manual_seed(seed)
    chain = torch.randn(B, STEPS + 1, C, HW, HW, generator=g)
    smooth = torch.rand(B, 3, 8, 8, generator=g)
    images = torch.nn.functional.interpolate(smooth, size=RES, mode="bicubic").clamp(0, 1)
    steps = list(range(STEPS))
    return Rollout(final_latents=chain[:, -1], images=images, sigmas=torch.linspace(1, 0, STEPS + 1),
                   sde_steps=steps, latents=chain[:, :STEPS], next_latents=chain[:, 1:],
                   log_probs=torch.randn(B, STEPS, generator=g), stds=torch.rand(B, STEPS, generator=g),
                   means=None)


def gpu_reference() -> dict:
    rows = json.loads(REFERENCE.read_text())["results"]
    sd = [r for r in rows if r["model"] == "sd3.5-medium-arch" and r["batch"] == 16]
    eager = next(r for r in sd if r["mode"] == "fwd")["img_per_s_10step_cfg"]
    compiled = next(r for r in sd if r["mode"].startswith("fwd-compiled"))["img_per_s_10step_cfg"]
    return {"source": str(REFERENCE.name), "eager_s": B / eager, "compiled_s": B / compiled}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--store", default=None, help="blob store url (default: a fresh file:// temp dir)")
    args = p.parse_args()

    ns = f"bench-{uuid.uuid4().hex[:8]}"
    settings = QueueSettings(namespace=ns, key_prefix=ns)
    tmp = tempfile.mkdtemp(prefix="flowrl-queue-bench-")
    store = BlobStore(args.store or f"file://{tmp}/blobs")
    env = {**os.environ, "FLOWRL_QUEUE_BROKER_URL": settings.broker_url, "FLOWRL_QUEUE_NAMESPACE": ns,
           "FLOWRL_QUEUE_KEY_PREFIX": ns}
    log = open(Path(tmp) / "reward-worker.log", "wb")
    worker = subprocess.Popen([sys.executable, "-m", "trainer.cli", "worker", "reward", "--name", f"r-{ns}"],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    app = make_celery(settings, name="bench")
    state = RunState.connect(settings.broker_url, "bench", ns)
    roll = synthetic_batch()
    job = SampleJob(run_id="bench", job_id="bench/e0/j0", epoch=0, min_policy_version=0,
                    items=[SampleItem(sample_id=f"bench/e0/g0/k{k}", prompt="a photo", group_id=0, seed=k)
                           for k in range(B)],
                    params=SamplingParams(resolution=(RES, RES), num_inference_steps=STEPS, guidance_scale=4.5,
                                          dynamics="Flow-SDE", noise_level=0.7, sde_steps=roll.sde_steps,
                                          batch_size=B),
                    model={"model_type": "sd3-5"}, store_url=store.url, rewards=[{"reward_model": "brightness"}],
                    key_prefix=ns)
    reward = build_reward("brightness")
    t = time.perf_counter()
    reward.score(roll.images, ["a photo"] * B)
    reward_compute = time.perf_counter() - t
    rows = []
    try:
        for rep in range(args.repeats + 1):  # the first trip warms the worker up and is dropped
            t0 = time.perf_counter()
            job = job.model_copy(update={"job_id": f"bench/e{rep}/j0"})
            traj = write_trajectory(store, job, roll, 0)
            t1 = time.perf_counter()
            app.send_task(TASK_REWARD, args=[RewardJob(trajectory=traj, rewards=job.rewards,
                                                       key_prefix=ns).model_dump_json()],
                          queue=settings.queue(QUEUE_REWARD))
            scored = state.pop_scored(timeout=120)
            if scored is None:
                raise RuntimeError(f"no scored batch within 120 s; worker log: {Path(tmp) / 'reward-worker.log'}")
            t2 = time.perf_counter()
            back = unpack_trajectory(store.get_tensors(scored.trajectory.tensors))
            t3 = time.perf_counter()
            assert torch.equal(back.latents, roll.latents) and len(scored.rewards["brightness"]) == B
            if rep:
                rows.append({"sampler_write_s": t1 - t0, "queue_and_reward_worker_s": t2 - t1,
                             "trainer_read_s": t3 - t2, "total_s": t3 - t0,
                             "reward_worker_task_s": scored.seconds})
            store.delete_prefix("bench")
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        state.clear()
        delete_namespace_queues(state.redis, ns)
        app.close()
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    med["transport_s"] = med["total_s"] - reward_compute
    gpu = gpu_reference()
    nbytes = traj.tensors.nbytes + traj.images.nbytes
    result = {
        "bench": "queue_overhead", "device": "cpu", "host": platform.node(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "repeats": args.repeats, "store": store.url.split("://")[0],
        "batch": {"samples": B, "sde_steps": STEPS, "latent": [C, HW, HW], "image": [3, RES, RES],
                  "trajectory_bytes": traj.tensors.nbytes, "images_bytes": traj.images.nbytes},
        "median": med, "reward_compute_s": reward_compute, "gpu_reference": gpu,
        "ratio_vs_gpu_eager": med["transport_s"] / gpu["eager_s"],
        "ratio_vs_gpu_compiled": med["transport_s"] / gpu["compiled_s"],
        "throughput_MB_s": nbytes / med["transport_s"] / 1e6,
    }
    print(json.dumps(result))
    out = ROOT / "bench" / "results" / "queue_overhead_cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    write_doc(result)


def write_doc(r: dict) -> None:
    doc = ROOT / "docs" / "performance.md"
    text = doc.read_text() if doc.exists() else "# Performance\n"
    m, gpu = r["median"], r["gpu_reference"]
    table = "\n".join([
        "<!-- queue_overhead_cpu:start -->",
        f"Measured by `python bench/queue_overhead.py --repeats {r['repeats']}` "
        f"(`bench/results/queue_overhead_cpu.json`) on {r['cpus']} CPU cores, {r['store']}:// store, "
        f"local Redis; one batch = {r['batch']['samples']} samples, {r['batch']['sde_steps']} SDE steps, "
        f"{(r['batch']['trajectory_bytes'] + r['batch']['images_bytes']) / 1e6:.0f} MB. Medians:",
        "",
        "| step | seconds |",
        "|---|---|",
        f"| sampler: pack + hash + write trajectory and images | {m['sampler_write_s']:.3f} |",
        f"| Celery hop + reward worker (fetch images, score) + Redis | {m['queue_and_reward_worker_s']:.3f} |",
        f"| trainer: read + verify + unpack trajectory | {m['trainer_read_s']:.3f} |",
        f"| total round trip | {m['total_s']:.3f} |",
        f"| minus the reward's own compute ({r['reward_compute_s']:.3f} s) = transport | {m['transport_s']:.3f} |",
        "",
        f"Sampling the same batch on one H100 (from `{gpu['source']}`): {gpu['eager_s']:.2f} s eager, "
        f"{gpu['compiled_s']:.2f} s compiled. Transport / GPU sampling time: "
        f"**{100 * r['ratio_vs_gpu_eager']:.1f}%** (eager), **{100 * r['ratio_vs_gpu_compiled']:.1f}%** "
        f"(compiled); target < 3%.",
        "<!-- queue_overhead_cpu:end -->"])
    start, end = "<!-- queue_overhead_cpu:start -->", "<!-- queue_overhead_cpu:end -->"
    if start in text:
        text = text[:text.index(start)] + table + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n## Queue overhead (distributed mode)\n\n" + table + "\n"
    doc.parent.mkdir(exist_ok=True)
    doc.write_text(text)


if __name__ == "__main__":
    main()
