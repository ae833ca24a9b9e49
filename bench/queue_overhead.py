"""Queue overhead: move one SD3.5-M-at-512px rollout batch through blob store + Celery + Redis
and back, and compare with the time an H100 needs to SAMPLE that batch.

The batch follows the SD3.5-M recipe (``examples/grpo/lora/sd3-5.yaml``, read here): one group
of 24 samples at 512 px, rolled out in micro-batches of ``per_device_batch_size`` (8), latent
states in the config's ``rollout_state_dtype`` (bfloat16, as its model runs in bf16). Recorded:
10 SDE steps (the issue's shape; the recipe itself trains 2 of steps 1-5 per epoch, which
stores 3 states instead of 11), i.e. 11 latent states ``[16, 64, 64]``, per-step log-probs and
stds, and 24 decoded images 512x512 (smooth synthetic pictures). One round trip, as the
distributed mode runs it, with the real code:

1. sampler side: :class:`services.sampler.runtime.TrajectoryWriter` (pack, convert to 8 bit,
   hash, write both blobs) and ``send_task`` of the :class:`~shared.protocol.RewardJob`;
2. a real reward worker process (``flowrl worker reward``): fetch the images, score them
   (``brightness``, ~free), push the :class:`~shared.protocol.ScoredBatch` to Redis;
3. trainer side: pop it, read + verify + unpack the trajectory blob to float32 tensors.

Two ways, both measured:

* **serial**: the whole batch is written after sampling, then the hop, then the read: the full
  cost of moving the batch, as if nothing overlapped.
* **overlapped** (what the sampler does): each micro-batch is handed to the writer when it is
  sampled; sampling is stood in for by an idle wait of the H100's time for that micro-batch
  (the GPU works, this CPU is free; an eager sampler's launch thread would also keep one core
  busy). **Exposed** = what is left after the last micro-batch is sampled: the tail of the
  write, then the hop and the trainer's read. In an epoch of several jobs the hop and the read
  of all but the last job overlap later sampling too (the trainer reads each trajectory as
  its scores arrive); this one-job bench counts them as exposed.

The reward's own compute is measured separately in this process and subtracted (it is not
transport). GPU reference: ``reference/gpu-limits-h100.json`` (SD3.5-M architecture, 512 px,
batch-16 transformer forward, 10 steps with CFG), eager and ``torch.compile``d. A per-step
profile (same data, this process) says where the serial time goes.

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

from shared.config import load_config  # noqa: E402
from shared.protocol import (QUEUE_REWARD, TASK_REWARD, RewardJob, SampleItem, SampleJob,  # noqa: E402
                             SamplingParams)
from shared.queue import QueueSettings, RunState, delete_namespace_queues, make_celery  # noqa: E402
from shared.rewards import build_reward  # noqa: E402
from shared.sampling import Rollout, pack_trajectory, unpack_trajectory  # noqa: E402
from shared.store import BlobStore  # noqa: E402
from services.sampler.runtime import TrajectoryWriter  # noqa: E402

REFERENCE = Path(os.environ.get("FLOWRL_GPU_LIMITS", ROOT.parent / "shared" / "reference" / "gpu-limits-h100.json"))
RECIPE = ROOT / "examples" / "grpo" / "lora" / "sd3-5.yaml"
SDE_STEPS, C, VAE = 10, 16, 8  # SD3: 16 latent channels, 8x VAE


def recipe() -> dict:
    t = load_config(RECIPE).train
    res = t.resolution if isinstance(t.resolution, int) else t.resolution[0]
    return {"config": str(RECIPE.relative_to(ROOT)), "samples": t.group_size, "resolution": res,
            "micro_batch": t.per_device_batch_size, "state_dtype": t.rollout_state_dtype,
            "mixed_precision": t.mixed_precision, "sde_steps": SDE_STEPS}


def synthetic_batch(r: dict, seed: int = 0) -> Rollout:
    g = torch.Generator().manual_seed(seed)
    b, hw = r["samples"], r["resolution"] // VAE
    chain = torch.randn(b, SDE_STEPS + 1, C, hw, hw, generator=g)
    if r["state_dtype"] == "bfloat16":  # a bf16-state rollout's states are exact in bf16
        chain = chain.bfloat16().float()
    smooth = torch.rand(b, 3, 8, 8, generator=g)
    images = torch.nn.functional.interpolate(smooth, size=r["resolution"], mode="bicubic").clamp(0, 1)
    steps = list(range(SDE_STEPS))
    return Rollout(final_latents=chain[:, -1], images=images, sigmas=torch.linspace(1, 0, SDE_STEPS + 1),
                   sde_steps=steps, latents=chain[:, :SDE_STEPS], next_latents=chain[:, 1:],
                   log_probs=torch.randn(b, SDE_STEPS, generator=g), stds=torch.rand(b, SDE_STEPS, generator=g),
                   means=None)


def micro_batches(roll: Rollout, size: int) -> list[Rollout]:
    cut = lambda t, s: None if t is None else t[s:s + size]  # noqa: E731
    return [Rollout(final_latents=cut(roll.final_latents, s), images=cut(roll.images, s), sigmas=roll.sigmas,
                    sde_steps=roll.sde_steps, latents=cut(roll.latents, s), next_latents=cut(roll.next_latents, s),
                    log_probs=cut(roll.log_probs, s), stds=cut(roll.stds, s), means=cut(roll.means, s))
            for s in range(0, roll.final_latents.shape[0], size)]


def gpu_reference(samples: int) -> dict:
    rows = json.loads(REFERENCE.read_text())["results"]
    sd = [r for r in rows if r["model"] == "sd3.5-medium-arch" and r["batch"] == 16]
    eager = next(r for r in sd if r["mode"] == "fwd")["img_per_s_10step_cfg"]
    compiled = next(r for r in sd if r["mode"].startswith("fwd-compiled"))["img_per_s_10step_cfg"]
    return {"source": str(REFERENCE.name), "eager_s": samples / eager, "compiled_s": samples / compiled}


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def profile(store: BlobStore, job: SampleJob, roll: Rollout, r: dict, repeats: int) -> dict:
    """Each step of the serial path on its own (same data, this process), medians."""
    steps: dict[str, list[float]] = {}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        steps.setdefault(name, []).append(time.perf_counter() - t)
        return out

    pixels = None
    for rep in range(repeats + 1):
        packed = timed("sampler: pack states", lambda: pack_trajectory(roll, r["state_dtype"]))
        tref = timed("sampler: hash + write trajectory blob",
                     lambda: store.put_tensors(f"prof/{rep}/t.safetensors", packed, digest="xxh3_128"))
        iref = timed("sampler: to 8 bit + hash + write images blob",
                     lambda: store.put_images(f"prof/{rep}/i.safetensors", roll.images, digest="xxh3_128"))
        pixels = timed("reward worker: read + verify images, to float (its reused buffer)",
                       lambda: store.get_images(iref, out=pixels if rep else None))
        t = timed("trainer: read + verify trajectory blob", lambda: store.get_tensors(tref))
        timed("trainer: unpack (states to float32)", lambda: unpack_trajectory(t))
        store.delete_prefix("prof")
        if rep == 0:
            steps.clear()  # warm-up
    return {k: statistics.median(v) for k, v in steps.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--store", default=None, help="blob store url (default: a fresh file:// temp dir)")
    p.add_argument("--state-dtype", choices=["float32", "bfloat16"], default=None,
                   help="latent state dtype (default: the recipe's train.rollout_state_dtype)")
    p.add_argument("--no-doc", action="store_true", help="write only the JSON (to bench/results/"
                   "queue_overhead_cpu_<dtype>.json), not docs/performance.md")
    args = p.parse_args()

    r = recipe()
    if args.state_dtype:
        r["state_dtype"] = args.state_dtype
    b = r["samples"]
    gpu = gpu_reference(b)
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
    roll = synthetic_batch(r)
    parts = micro_batches(roll, r["micro_batch"])
    job = SampleJob(run_id="bench", job_id="bench/e0/j0", epoch=0, min_policy_version=0,
                    items=[SampleItem(sample_id=f"bench/e0/g0/k{k}", prompt="a photo", group_id=0, seed=k)
                           for k in range(b)],
                    params=SamplingParams(resolution=(r["resolution"],) * 2, num_inference_steps=SDE_STEPS,
                                          guidance_scale=4.5, dynamics="Flow-SDE", noise_level=0.7,
                                          sde_steps=roll.sde_steps, batch_size=r["micro_batch"],
                                          state_dtype=r["state_dtype"]),
                    model={"model_type": "sd3-5"}, store_url=store.url, rewards=[{"reward_model": "brightness"}],
                    key_prefix=ns)
    reward = build_reward("brightness")
    t = time.perf_counter()
    reward.score(roll.images, ["a photo"] * b)
    reward_compute = time.perf_counter() - t

    def trip(job: SampleJob, overlapped: bool) -> dict:
        load = os.getloadavg()[0]
        writer = TrajectoryWriter(store, job)
        t0 = time.perf_counter()
        if overlapped:  # hand over each micro-batch after the H100's time for it
            for part in parts:
                time.sleep(gpu["eager_s"] * part.final_latents.shape[0] / b)
                writer.add(part)
        else:
            writer.add(roll)
        t_sampled = time.perf_counter()
        traj = writer.finish(0)
        app.send_task(TASK_REWARD, args=[RewardJob(trajectory=traj, rewards=job.rewards,
                                                   key_prefix=ns).model_dump_json()],
                      queue=settings.queue(QUEUE_REWARD))
        t1 = time.perf_counter()
        scored = state.pop_scored(timeout=120)
        if scored is None:
            raise RuntimeError(f"no scored batch within 120 s; worker log: {Path(tmp) / 'reward-worker.log'}")
        t2 = time.perf_counter()
        back = unpack_trajectory(store.get_tensors(scored.trajectory.tensors))
        t3 = time.perf_counter()
        assert torch.equal(back.latents, roll.latents) and len(scored.rewards["brightness"]) == b
        store.delete_prefix("bench")
        return {"sampler_write_s": t1 - t_sampled, "queue_and_reward_worker_s": t2 - t1,
                "trainer_read_s": t3 - t2, "total_s": t3 - t_sampled, "reward_worker_task_s": scored.seconds,
                "load_1min": load, "trajectory_bytes": traj.tensors.nbytes, "images_bytes": traj.images.nbytes,
                **({"job_wall_s": t1 - t0} if overlapped else {})}

    serial, overlapped = [], []
    try:
        for rep in range(args.repeats + 1):  # the first trips warm the worker up and are dropped
            s = trip(job.model_copy(update={"job_id": f"bench/s{rep}/j0"}), overlapped=False)
            o = trip(job.model_copy(update={"job_id": f"bench/o{rep}/j0"}), overlapped=True)
            if rep:
                serial.append(s)
                overlapped.append(o)
        steps = profile(store, job, roll, r, args.repeats)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        state.clear()
        delete_namespace_queues(state.redis, ns)
        app.close()
    keys = ("sampler_write_s", "queue_and_reward_worker_s", "trainer_read_s", "total_s", "reward_worker_task_s")
    ser = {k: med(serial, k) for k in keys}
    ser["transport_s"] = ser["total_s"] - reward_compute
    ovl = {k: med(overlapped, k) for k in (*keys, "job_wall_s")}
    ovl["exposed_s"] = ovl["total_s"] - reward_compute
    loads = [x["load_1min"] for x in serial + overlapped]
    result = {
        "bench": "queue_overhead", "device": "cpu", "host": platform.node(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "repeats": args.repeats, "store": store.url.split("://")[0],
        "store_dir": tmp if args.store is None else args.store,
        "load_1min": {"median": statistics.median(loads), "min": min(loads), "max": max(loads)},
        "batch": {**r, "latent": [C, r["resolution"] // VAE, r["resolution"] // VAE],
                  "image": [3, r["resolution"], r["resolution"]],
                  "trajectory_bytes": serial[0]["trajectory_bytes"], "images_bytes": serial[0]["images_bytes"]},
        "serial": ser, "overlapped": ovl, "profile_s": steps, "reward_compute_s": reward_compute,
        "gpu_reference": gpu,
        "ratio_serial_vs_gpu_eager": ser["transport_s"] / gpu["eager_s"],
        "ratio_serial_vs_gpu_compiled": ser["transport_s"] / gpu["compiled_s"],
        "ratio_exposed_vs_gpu_eager": ovl["exposed_s"] / gpu["eager_s"],
        "ratio_exposed_vs_gpu_compiled": ovl["exposed_s"] / gpu["compiled_s"],
        "throughput_MB_s": (serial[0]["trajectory_bytes"] + serial[0]["images_bytes"]) / ser["transport_s"] / 1e6,
    }
    print(json.dumps(result))
    name = f"queue_overhead_cpu_{r['state_dtype']}.json" if args.no_doc else "queue_overhead_cpu.json"
    (ROOT / "bench" / "results" / name).write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_doc:
        write_doc(result)


def write_doc(r: dict) -> None:
    doc = ROOT / "docs" / "performance.md"
    text = doc.read_text() if doc.exists() else "# Performance\n"
    s, o, gpu, bt, ld = r["serial"], r["overlapped"], r["gpu_reference"], r["batch"], r["load_1min"]
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    tmp = Path(r["store_dir"])
    where = (f"a fresh directory under `{tmp.parent}`" if tmp.name.startswith("flowrl-queue-bench-")
             else f"`{r['store_dir']}`")
    table = "\n".join([
        "<!-- queue_overhead_cpu:start -->",
        f"Measured by `python bench/queue_overhead.py --repeats {r['repeats']}` "
        f"(`bench/results/queue_overhead_cpu.json`) on {r['cpus']} CPU cores (1-minute load "
        f"{ld['median']:.2f}, {ld['min']:.2f}-{ld['max']:.2f}"
        f"{', while other jobs shared the machine' if ld['median'] > r['cpus'] / 2 else ', otherwise quiet'}), "
        f"{r['store']}:// store in {where}, local Redis. One batch = `{bt['config']}`: "
        f"{bt['samples']} samples at {bt['resolution']} px in micro-batches of {bt['micro_batch']}, "
        f"{bt['sde_steps']} SDE steps recorded, {bt['state_dtype']} states "
        f"({bt['trajectory_bytes'] / 1e6:.1f} MB trajectory + {bt['images_bytes'] / 1e6:.1f} MB images). "
        f"Medians of {r['repeats']} round trips each:",
        "",
        "| step | serial (s) | overlapped (s) |",
        "|---|---|---|",
        f"| sampler: pack + 8 bit + hash + write both blobs (overlapped: only the tail left after sampling) "
        f"| {s['sampler_write_s']:.3f} | {o['sampler_write_s']:.3f} |",
        f"| Celery hop + reward worker (fetch images, score) + Redis | {s['queue_and_reward_worker_s']:.3f} "
        f"| {o['queue_and_reward_worker_s']:.3f} |",
        f"| trainer: read + verify + unpack trajectory | {s['trainer_read_s']:.3f} | {o['trainer_read_s']:.3f} |",
        f"| total | {s['total_s']:.3f} | {o['total_s']:.3f} |",
        f"| minus the reward's own compute ({r['reward_compute_s']:.3f} s) | **{s['transport_s']:.3f}** "
        f"| **{o['exposed_s']:.3f}** |",
        "",
        f"Sampling the same batch on one H100 (from `{gpu['source']}`): {gpu['eager_s']:.2f} s eager, "
        f"{gpu['compiled_s']:.2f} s compiled. Target: transport < 3% of it.",
        "",
        f"- **serial** (the whole cost of moving the batch, nothing overlapped): "
        f"**{pct(r['ratio_serial_vs_gpu_eager'])}** of eager, **{pct(r['ratio_serial_vs_gpu_compiled'])}** "
        f"of compiled sampling time.",
        f"- **exposed** (overlapped: what is left after the last micro-batch is sampled, counting the hop "
        f"and the read as exposed too): **{pct(r['ratio_exposed_vs_gpu_eager'])}** of eager, "
        f"**{pct(r['ratio_exposed_vs_gpu_compiled'])}** of compiled. Sampling was an idle wait of "
        f"{gpu['eager_s']:.2f} s here; the job took {o['job_wall_s']:.2f} s from the first micro-batch "
        f"to the message sent.",
        "",
        "Where the serial time goes (each step alone, same data, medians):",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.3f} |" for k, v in r["profile_s"].items()],
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
