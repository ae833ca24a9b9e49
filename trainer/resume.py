"""Exact resume: what a checkpoint holds beyond the weights, and how a run picks it up.

A checkpoint folder (``runs/<run>/checkpoints/checkpoint-<epochs>``, see
:mod:`trainer.checkpoint`) gets a ``resume/`` subfolder, written inside the same temporary
folder that is renamed into place, so a crash never leaves half a checkpoint:

* ``state.json``: epochs done, optimizer steps, policy version, samples used, training
  seconds, the metric history and evaluations (so the final report covers the whole run),
  the LR schedule's ``state_dict``, the optimizer's hyper-parameters (``param_groups``), the
  grad scaler's state (fp16), and the epoch already dispatched but not yet trained, if any;
* ``optimizer.safetensors``: the optimizer's per-parameter tensors (AdamW moments, step),
  keys ``"<param index>/<name>"`` -- no pickle;
* ``rng-rank<r>.json``: every random generator of process ``r`` (python, numpy, torch CPU,
  every CUDA device);
* ``pending-rank<r>.safetensors`` + ``pending-rank<r>.json`` (local transport, only when an
  epoch was sampled before the checkpoint, i.e. ``train.max_staleness: 1``): that epoch's
  scored rollouts, so resuming neither loses nor re-draws them.

The data-loader position is the epoch number: an epoch's prompt groups and seeds are a pure
function of (run seed, epoch) (:func:`trainer.collect.epoch_plan`). Model/LoRA weights and
the EMA are the checkpoint's own files (:func:`trainer.checkpoint.load_checkpoint_weights`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from shared.checkpoints import numbered_checkpoints

log = logging.getLogger("flowrl.trainer")

RESUME_DIR = "resume"


@dataclasses.dataclass
class Progress:
    """The loop's counters: everything besides tensors that a resumed run continues from."""

    epoch: int = 0  # epochs done (the next epoch to train)
    step: int = 0  # optimizer steps done
    version: int = 0  # policy version (one per trained epoch)
    samples_used: int = 0
    train_seconds: float = 0.0
    history: list[dict] = dataclasses.field(default_factory=list)  # per-epoch metrics
    evals: list[dict] = dataclasses.field(default_factory=list)  # evaluation results
    pending_epoch: int | None = None  # dispatched before the checkpoint, not yet trained
    pending_version: int | None = None  # the policy version it was dispatched with


class ResumeError(ValueError):
    """A checkpoint cannot be resumed from (missing, incomplete, or from another experiment)."""


# ---------------------------------------------------------------------------- locate

def find_checkpoint(spec: str, run_dir: Path) -> Path:
    """``spec``: a checkpoint folder, or ``latest`` (the newest ``checkpoint-N`` of ``run_dir``)."""
    if spec != "latest":
        path = Path(spec)
        if not (path / RESUME_DIR / "state.json").is_file():
            raise ResumeError(
                f"train.resume_from={spec!r} is not a resumable checkpoint (no {RESUME_DIR}/state.json). "
                f"Fix: pass runs/<run>/checkpoints/checkpoint-<N> of a run with train.save_freq > 0, "
                f"or 'latest' together with the run's run_name.")
        return path
    found = newest_checkpoint(run_dir)
    if found is None:
        raise ResumeError(
            f"train.resume_from=latest: no resumable checkpoint under {run_dir / 'checkpoints'}. "
            f"Fix: set run_name to the run to resume (it names the folder) and train.save_freq > 0 "
            f"so checkpoints are written; or start without resume_from (or with 'auto', which starts "
            f"over when there is none).")
    return found


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The highest ``checkpoint-N`` of ``run_dir`` with resume state, or None (an interrupted
    ``checkpoint-N.tmp`` save is not one)."""
    found = [p for p in numbered_checkpoints(run_dir / "checkpoints") if (p / RESUME_DIR / "state.json").is_file()]
    return found[-1] if found else None


def stale_checkpoints(run_dir: Path, keep: int | None) -> list[Path]:
    """The ``checkpoint-N`` folders of ``run_dir`` beyond the newest ``keep`` (oldest first), the
    ones ``train.keep_checkpoints`` deletes; ``[]`` for ``keep=None``. Only complete folders
    (named ``checkpoint-<int>``) count: ``final`` and unfinished ``*.tmp`` ones are left alone."""
    if keep is None:
        return []
    found = numbered_checkpoints(run_dir / "checkpoints")
    return found[:-keep] if len(found) > keep else []


def finished_summary(run_dir: Path, max_epochs: int, max_train_seconds: float | None = None) -> dict | None:
    """The ``summary.json`` of ``run_dir`` when that run already trained ``max_epochs`` epochs, or
    ended on its ``train.max_train_seconds`` budget and the budget was not raised since (``resume_from:
    auto`` trained such a run again, from its last periodic checkpoint or from scratch, and replaced
    its final weights, summary and metrics)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    if summary.get("epochs", 0) >= max_epochs:
        return summary
    budget = summary.get("max_train_seconds")
    if (summary.get("stopped_by") == "budget" and budget is not None and max_train_seconds is not None
            and max_train_seconds <= budget):
        return summary
    return None


def supersede_later(run_dir: Path, checkpoint: Path) -> Path | None:
    """A run resumed from its own ``checkpoint-N`` while later checkpoints exist (going back to try
    something else): those, ``final/`` and ``summary.json`` move into ``checkpoints/superseded-<k>``
    (the first free ``k``); returns it, or None when nothing is later.

    Left in place, ``--resume latest`` after a crash continued the abandoned ``checkpoint-M``,
    ``--resume auto`` read the old summary and did nothing, and ``train.keep_checkpoints`` deleted the
    new run's checkpoints as older than the abandoned ones."""
    from trainer.checkpoint import checkpoint_epoch

    run_dir, checkpoint = Path(run_dir).resolve(), Path(checkpoint).resolve()
    folder = run_dir / "checkpoints"
    if checkpoint.parent != folder or not checkpoint.name.rsplit("-", 1)[-1].isdigit():
        return None  # another run's checkpoint, or final/
    n = int(checkpoint.name.rsplit("-", 1)[1])
    later = [p for p in numbered_checkpoints(folder) if int(p.name.rsplit("-", 1)[1]) > n]
    final = folder / "final"  # (a finished run's last epoch has final/ only)
    if not later and not ((final / "trainer_state.json").is_file() and checkpoint_epoch(final) > n):
        return None
    k = 1
    while (dest := folder / f"superseded-{k}").exists():
        k += 1
    dest.mkdir()
    for path in [*later, folder / "final", run_dir / "summary.json"]:
        if path.exists():
            path.rename(dest / path.name)
    log.warning("resumed from %s: what the run it left wrote later (%s) was moved to %s", checkpoint.name,
                ", ".join(p.name for p in dest.iterdir()), dest)
    return dest


# what makes a folder a run's: a fresh run does not write into a folder holding these
RUN_MARKS = ("metrics.jsonl", "summary.json", "checkpoints")


def set_aside(run_dir: Path) -> Path | None:
    """Move an earlier run out of ``run_dir`` before a fresh run (no ``train.resume_from``) of the
    same name starts there; returns where it went (``<run_dir>.previous-<k>``, the first free
    ``k``), or None when ``run_dir`` holds no run (:data:`RUN_MARKS`; e.g. only a ``flowrl eval``
    of the base model).

    Writing into it instead mixes two runs: their ``metrics.jsonl`` and event files interleave,
    ``train.resume_from: latest`` finds the earlier run's newest checkpoint, and
    ``train.keep_checkpoints`` deletes the new run's checkpoints as older than the earlier run's
    higher-numbered ones."""
    run_dir = Path(run_dir)
    if not any((run_dir / mark).exists() for mark in RUN_MARKS):
        return None
    k = 1
    while (aside := run_dir.with_name(f"{run_dir.name}.previous-{k}")).exists():
        k += 1
    run_dir.rename(aside)
    summary = aside / "summary.json"  # its paths (run_dir, checkpoint, report) follow it
    if summary.is_file():
        try:
            data = json.loads(summary.read_text())
        except ValueError:
            return aside

        def moved(value):
            inside = isinstance(value, str) and (value == str(run_dir) or value.startswith(f"{run_dir}/"))
            return str(aside) + value[len(str(run_dir)):] if inside else value

        summary.write_text(json.dumps({key: moved(value) for key, value in data.items()}, indent=2))
    return aside


def run_dir_of(checkpoint: Path) -> Path:
    """``runs/<run>/checkpoints/checkpoint-N`` -> ``runs/<run>``."""
    return Path(checkpoint).resolve().parent.parent


# ---------------------------------------------------------------------------- optimizer

def optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer ``state_dict`` as (flat tensors, JSON-able rest).

    Tensor keys are ``"<param index>/<state name>"``; the rest holds the non-tensor per-param
    state entries and ``param_groups`` (learning rates, betas, ... and param indices). Sharded
    moments (``train.fsdp``) are gathered whole, so every process must call it then.
    """
    from trainer.sharding import gather

    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in sd["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}/{name}"] = gather(value.detach()).contiguous().cpu()
            else:
                scalars[f"{index}/{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(optimizer, tensors: dict[str, torch.Tensor], rest: dict) -> None:
    """Inverse of :func:`optimizer_tensors` (moments are moved to their parameters' devices
    by the optimizer's own ``load_state_dict``; a sharded parameter's moments are cut to this
    process's piece, so a checkpoint resumes on any number of processes, with or without FSDP)."""
    from trainer.sharding import is_sharded, shard_like

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(rest["scalars"].items()):
        index, name = key.split("/", 1)
        p = params[int(index)] if int(index) < len(params) else None
        if p is not None and is_sharded(p) and torch.is_tensor(value) and value.shape == p.shape:
            value = shard_like(value, p)
        state.setdefault(int(index), {})[name] = value
    groups = [{**g, **({"betas": tuple(g["betas"])} if "betas" in g else {})} for g in rest["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------------------- RNG

def rng_state() -> dict:
    """Every random generator of this process, as JSON-able values."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], np_state[1].tolist(), *[float(x) if isinstance(x, float) else int(x)
                                                            for x in np_state[2:]]],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ---------------------------------------------------------------------------- save / load

def save_resume(directory: Path, progress: Progress, optimizer, lr_schedule, scaler=None,
                optimizer_state: tuple[dict, dict] | None = None) -> None:
    """Write ``state.json`` and ``optimizer.safetensors`` into ``directory`` (main process).
    ``optimizer_state``: :func:`optimizer_tensors`' result, when every process had to gather it."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors, rest = optimizer_state or optimizer_tensors(optimizer)
    save_file(tensors, directory / "optimizer.safetensors")
    state = {"progress": dataclasses.asdict(progress), "optimizer": rest,
             "lr_schedule": lr_schedule.state_dict(),
             "scaler": None if scaler is None else scaler.state_dict()}
    (directory / "state.json").write_text(json.dumps(state, indent=1))


def save_rank_state(directory: Path, rank: int, pending=None) -> None:
    """This process's RNG and, if given, its dispatched-but-untrained ``Samples``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"rng-rank{rank}.json").write_text(json.dumps(rng_state()))
    if pending is not None:
        from trainer.collect import samples_tensors

        save_file(samples_tensors(pending), directory / f"pending-rank{rank}.safetensors")
        (directory / f"pending-rank{rank}.json").write_text(json.dumps(
            {"policy_versions": pending.policy_versions, "metrics": pending.metrics}))


def load_resume(checkpoint: Path, optimizer, lr_schedule, scaler=None) -> Progress:
    """Restore optimizer, LR schedule and scaler from ``checkpoint``; return its progress."""
    directory = Path(checkpoint) / RESUME_DIR
    state = json.loads((directory / "state.json").read_text())
    load_optimizer(optimizer, load_file(directory / "optimizer.safetensors"), state["optimizer"])
    lr_schedule.load_state_dict(state["lr_schedule"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return Progress(**state["progress"])


def load_rank_state(checkpoint: Path, rank: int, adapter=None, plan=None, cfg=None, world: int | None = None):
    """Return this process's saved pending ``Samples`` (or None), then restore its RNG (last,
    so the generators continue exactly where the checkpoint left them).

    Rebuilding the samples needs ``adapter``/``plan``/``cfg``: the conditioning is re-encoded
    from the plan's prompts (deterministic) instead of being stored. A checkpoint written by more
    processes than ``world`` holds pending samples cut for its own layout (a process it did not have
    seeds its generators from ``train.seed`` and its rank), and one resumed through the
    queue (``flowrl trainer``) holds them in the embedded run's form: they are not used (the caller
    samples that epoch again).
    """
    directory = Path(checkpoint) / RESUME_DIR
    rng = directory / f"rng-rank{rank}.json"
    pending_file = directory / f"pending-rank{rank}.safetensors"
    written_by = len(list(directory.glob("rng-rank*.json")))
    if not rng.is_file():
        if not written_by:
            raise ResumeError(f"{rng} is missing, and every other process's too: {checkpoint} holds no resume "
                              f"state. Fix: resume from a checkpoint-N folder written by flowrl train.")
        # a process the checkpoint's run did not have (continued on more GPUs): every draw of the run is
        # seeded from train.seed, epoch and rank; its global generators start from a seed of its own
        seed = (((cfg.train.seed if cfg is not None else 0) * 1_000_003 + rank) * 1_000_003) % 2**32
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        if rank == written_by:
            log.warning("the checkpoint was written by %d process(es) and resumes on more: the new processes "
                        "start their generators from the run's seed (the run continues, not bit for bit)",
                        written_by)
        return None
    samples = None
    if world is not None and written_by != world and pending_file.is_file():
        if rank == 0:
            log.warning("the checkpoint was written by %d processes and resumes on %d: the epoch it had already "
                        "sampled is sampled again (the run continues, not bit for bit)", written_by, world)
    elif pending_file.is_file() and cfg is not None and cfg.transport != "local":
        if rank == 0:  # (a flowrl train checkpoint resumed by flowrl trainer: its samples are not queue messages)
            log.warning("the checkpoint's epoch sampled ahead was sampled by an embedded run (transport: local) and "
                        "this run uses the queue: the samplers sample it again (the run continues, not bit for bit)")
    elif pending_file.is_file() and adapter is not None:
        from shared.sampling import unpack_trajectory
        from trainer.collect import Samples, tensors_parts
        from trainer.transport import encode_plan, sample_device

        trajectory, rewards = tensors_parts(load_file(pending_file))
        meta = json.loads((directory / f"pending-rank{rank}.json").read_text())
        device = sample_device(cfg, adapter)  # the host with train.offload_samples_to_cpu, as when sampled
        roll = unpack_trajectory({k: v.to(device) for k, v in trajectory.items()})
        samples = Samples(encode_plan(cfg, adapter, plan), roll, rewards, meta["policy_versions"], meta["metrics"])
    set_rng_state(json.loads(rng.read_text()))
    return samples


def truncate_jsonl(path: Path, keep) -> int:
    """Drop the lines of a JSON-lines file for which ``keep(record)`` is false (what a crashed
    run wrote after the checkpoint being resumed); atomic. Returns how many were dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short when the run died (disk full, power): dropped
            log.warning("%s:%d is not a whole JSON line (cut short when the run stopped?); dropped", path, n)
            continue
        if keep(record):
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
    return len(lines) - len(kept)


# settings a resumed run may change; any other difference means another experiment
# (the dataset may move between machines; its rows must stay the same for an exact resume)
MAY_CHANGE = {"train": {"resume_from", "max_epochs", "max_train_seconds", "save_freq", "keep_checkpoints",
                        "offload_samples_to_cpu",  # where the epoch's samples wait: the same numbers
                        "log_samples_freq",
                        # DDP <-> FSDP: the same math; a checkpoint holds whole tensors either way
                        "fsdp", "fsdp_reshard_after_forward", "fsdp_shard_size", "dist_timeout_s"},
              "data": {"dataset_dir"},
              # memory / speed options (same math; attn_backend may differ in the last bits)
              "model": {"attn_backend", "gradient_checkpointing", "activation_offload", "embedding_cache_mb", "embedding_cache_dir",
                        "offload_text_encoders"},
              # how often and in what batches; not what is measured: the base evaluation, in the checkpoint,
              # and the final one must be the same prompts, seeds and settings to compare
              "eval": {"eval_freq", "per_device_batch_size", "num_videos", "video_fps"}}
CHECKED = ("model", "train", "rewards", "data", "eval", "eval_rewards")


def _field_default(model, key: str):
    """The default of ``model``'s field ``key`` as trainer_state.json would store it (None if unknown)."""
    spec = getattr(model, "model_fields", {}).get(key)
    if spec is None or spec.is_required():
        return None
    value = spec.get_default(call_default_factory=True)
    return json.loads(json.dumps(value, default=str))


def _default(section: str, key: str):
    """The default of config key ``section.key`` (a ``rewards`` entry's for ``eval_rewards``)."""
    from shared.config import Config, RewardSpec

    model = RewardSpec if section == "eval_rewards" else getattr(Config.model_fields.get(section), "annotation", None)
    return _field_default(model, key)


def check_same_experiment(checkpoint: Path, cfg) -> None:
    """Raise :class:`ResumeError` naming the keys where ``cfg`` differs from the checkpoint's run."""
    saved = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["config"]
    now = json.loads(json.dumps(cfg.model_dump()))  # as trainer_state.json stores it
    from shared.config import unread_train_keys

    diffs = []
    unread = {"train": unread_train_keys(cfg.train.trainer_type)}  # whatever a checkpoint holds there
    for section in CHECKED:
        a, b = saved.get(section), now.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if key in unread.get(section, ()):
                    continue
                # a key newer than the checkpoint counts as its default there (written before it existed)
                before = a[key] if key in a else _default(section, key)
                if key not in MAY_CHANGE.get(section, set()) and before != b.get(key):
                    diffs.append(f"{section}.{key}: checkpoint {a.get(key)!r}, now {b.get(key)!r}")
        elif section == "eval_rewards" and isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):  # entry by entry: how it is batched or placed may change
                for key in sorted((set(x) | set(y)) - {"batch_size", "device", "weight"}):
                    if x.get(key, _default(section, key)) != y.get(key, _default(section, key)):
                        diffs.append(f"eval_rewards[{i}].{key}: checkpoint {x.get(key)!r}, now {y.get(key)!r}")
        elif a != b:
            diffs.append(f"{section}: checkpoint {a!r}, now {b!r}")
    if diffs:
        raise ResumeError(
            f"cannot resume from {checkpoint}: the config differs from the run that wrote it in "
            f"{len(diffs)} setting(s): " + "; ".join(diffs[:6]) + (" ..." if len(diffs) > 6 else "")
            + ". Only train.max_epochs, train.max_train_seconds, train.save_freq, train.keep_checkpoints, train.log_samples_freq, train.fsdp, data.dataset_dir, the "
            "model's memory and speed options, eval.eval_freq and eval.per_device_batch_size (and logging, queue settings) may change; "
            "what the evaluation measures may not (its base score is in the checkpoint: another prompt set or seeds would "
            "be reported as a gain; `flowrl eval` measures a checkpoint any way you like). Fix: use the run's config, or "
            "start a new run.")
