"""The wire messages of the distributed mode: pydantic models, JSON only (never pickle).

Small facts travel in the message; bulky data (latents, per-step log-probs, images, weights)
lives in the blob store (:mod:`shared.store`) and travels as a :class:`BlobRef`. Every
message carries ``protocol`` (:data:`PROTOCOL_VERSION`); a peer speaking another version is
rejected with an error that says so instead of being misread.

Flow (see ``design.md`` §1)::

    trainer --SampleJob--> sampler --RewardJob(Trajectory)--> reward --ScoredBatch--> trainer
    trainer --PolicyPublished (Redis key)--> samplers

Identities are deterministic: ``sample_id = "{run_id}/e{epoch}/g{group}/k{member}"``, so a
redelivered task produces the same ids and the trainer can keep exactly one score per id.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.protocol.names import PROTOCOL_VERSION


class Message(BaseModel):
    """Base of every wire message: strict (unknown fields are an error), immutable, versioned."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    protocol: int = PROTOCOL_VERSION

    @field_validator("protocol")
    @classmethod
    def _same_version(cls, v: int) -> int:
        if v != PROTOCOL_VERSION:
            raise ValueError(f"message speaks flowrl protocol {v}, this process speaks "
                             f"{PROTOCOL_VERSION}. Fix: run the same flowrl version on the trainer, "
                             f"the samplers and the reward workers.")
        return v


class BlobRef(Message):
    """Where a blob lives (an fsspec URL) and how to check it arrived intact: its size and a
    digest of its bytes, SHA-256 (published weights) or XXH3-128 (rollout blobs, which a sampler
    can produce again; :mod:`shared.store`). At least one digest; a reader checks each given."""

    uri: str
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    xxh3_128: str | None = Field(None, pattern=r"^[0-9a-f]{32}$")
    nbytes: int = Field(ge=0)

    @model_validator(mode="after")
    def _has_digest(self) -> "BlobRef":
        if self.sha256 is None and self.xxh3_128 is None:
            raise ValueError(f"blob reference {self.uri!r} has no digest. Fix: give sha256 or "
                             f"xxh3_128 (what shared.store.BlobStore.put_* returns).")
        return self


def sample_id(run_id: str, epoch: int, group: int, member: int) -> str:
    return f"{run_id}/e{epoch}/g{group}/k{member}"


def other_start(generation: str, current: str) -> bool:
    """``generation`` (a message's ``generation``) names another start of the trainer than ``current``;
    an empty id (unknown: a message from an older flowrl, or no start recorded) never counts as another."""
    return bool(generation) and bool(current) and generation != current


class SampleItem(Message):
    """One sample to roll out: its prompt, its group, its own noise seed and, for image-conditioned
    (edit) models, its condition images: the dataset's files, uploaded once per run unchanged
    (PNG, JPEG, ...) to the blob store, in the row's order."""

    sample_id: str
    prompt: str
    negative_prompt: str | None = None
    group_id: int
    seed: int
    images: list[BlobRef] = Field(default_factory=list)
    dataset: str = ""  # its data.datasets source ("" = one dataset folder): rewards[].datasets routing
    # the seed of its initial noise alone (train.shared_initial_noise: its group's); None = ``seed``'s first draw
    init_seed: int | None = None
    metadata: str = ""  # its dataset row's metadata (a JSON object's text; "" = none), for rewards that read it


class SamplingParams(Message):
    """How to roll out (mirrors ``train.*`` of the experiment config)."""

    resolution: tuple[int, int]
    num_inference_steps: int = Field(ge=1)
    guidance_scale: float = Field(ge=0)
    dynamics: Literal["Flow-SDE", "Dance-SDE", "CPS", "ODE"]
    noise_level: float = Field(ge=0)
    sde_steps: list[int]
    keep_means: bool = False
    log_prob_reduction: Literal["mean", "sum"] = "mean"
    batch_size: int = Field(gt=0)
    num_frames: int | None = Field(None, ge=1)  # video models: frames per video (None = the model's default)
    # precision of the latent chain and of the stored states (shared.sampling); bfloat16 halves
    # the trajectory blob and keeps log-probs exact (the chain continues from the rounded state)
    state_dtype: Literal["float32", "bfloat16"] = "float32"
    # where each sample's noise generator draws: "cpu" (the same numbers on every machine) or
    # "model" (the sampler's device: no CPU work before the first step on a GPU)
    noise_device: Literal["cpu", "model"] = "cpu"
    # the trainer's train.mixed_precision: samplers roll out under the same autocast, so the log-probs
    # the trainer recomputes match theirs (a PPO ratio of 1 before any update; float32 rollouts
    # replayed under bf16 autocast start ~1e-4 off, as much as Flow-GRPO's whole clip range)
    autocast: Literal["no", "fp16", "bf16"] = "no"
    # the deterministic steps after the last SDE step (MixGRPO-Flash, train.ode_tail): None = Euler on
    # the whole grid; else that solver on the tail cut to tail_ratio of its steps (shared.sampling.rollout)
    tail_solver: Literal["euler", "dpm_solver++"] | None = None
    tail_ratio: float = Field(1.0, gt=0, le=1)


class SampleJob(Message):
    """A batch of whole prompt groups for one sampler task.

    ``model`` is the experiment's ``model:`` section (a dict): a sampler loads that model once
    and refuses jobs for another. ``min_policy_version``: the sampler must use published weights
    of at least this version (it waits for them).
    """

    run_id: str
    job_id: str
    epoch: int = Field(ge=0)
    min_policy_version: int = Field(ge=0)
    items: list[SampleItem] = Field(min_length=1)
    params: SamplingParams
    model: dict[str, Any]
    model_seed: int = 0  # seed the trainer built the model with (random-init models need it)
    store_url: str  # blob store root for this run's outputs
    rewards: list[dict[str, Any]] = Field(min_length=1)  # ``rewards:`` specs, passed on to scoring
    key_prefix: str = "flowrl"
    # the trainer process (accelerate rank) that dispatched the job: its scores go to that process's
    # list (``RunKeys.scored_for``)
    trainer_rank: int = Field(0, ge=0)
    # the trainer start that dispatched it (its PolicyPublished.generation; "" = unknown): a job left in
    # the queue by a trainer that died is skipped once a resumed one has started (RunKeys.generation)
    generation: str = ""


class Trajectory(Message):
    """What a sampler produced for one job (tensors and images are in the blob store).

    ``tensors``: one safetensors blob written by :func:`shared.sampling.pack_trajectory` (every
    latent state once, log-probs, stds, sigmas, optional means); ``images``: one safetensors
    blob of 8-bit pixels ``[B, 3, H, W]``, or video frames ``[B, F, 3, H, W]``
    (:meth:`shared.store.BlobStore.put_images`). Rows of both follow ``sample_ids``. The
    trainer reads only ``tensors``, reward workers ``images`` (and, for rewards that compare an
    output with its source, ``condition_images``: per sample its :attr:`SampleItem.images`).
    """

    run_id: str
    job_id: str
    epoch: int
    policy_version: int = Field(ge=0)
    sample_ids: list[str]
    group_ids: list[int]
    prompts: list[str]
    sde_steps: list[int]
    store_url: str  # the blob store the refs below live in
    tensors: BlobRef
    images: BlobRef
    condition_images: list[list[BlobRef]] = Field(default_factory=list)  # [] or one list per sample
    worker: str = ""
    seconds: float = 0.0
    trainer_rank: int = Field(0, ge=0)  # the job's (where its scores go)
    generation: str = ""  # the job's (SampleJob.generation): a trainer discards another start's trajectories
    datasets: list[str] = Field(default_factory=list)  # [] or each sample's data.datasets source
    metadata: list[str] = Field(default_factory=list)  # [] or each sample's SampleItem.metadata

    @model_validator(mode="after")
    def _aligned(self) -> "Trajectory":
        n = len(self.sample_ids)
        if not (len(self.group_ids) == len(self.prompts) == n):
            raise ValueError(f"{n} sample ids, {len(self.group_ids)} group ids and "
                             f"{len(self.prompts)} prompts: one of each per sample")
        if self.datasets and len(self.datasets) != n:
            raise ValueError(f"{n} sample ids but sources for {len(self.datasets)} samples: none, or one "
                             f"per sample")
        if self.metadata and len(self.metadata) != n:
            raise ValueError(f"{n} sample ids but metadata for {len(self.metadata)} samples: none, or one per sample")
        if self.condition_images and len(self.condition_images) != n:
            raise ValueError(f"{n} sample ids but condition images for {len(self.condition_images)} samples: "
                             f"none, or one list per sample")
        return self


class RewardJob(Message):
    """Score one trajectory with every reward in ``rewards`` (the experiment's specs)."""

    trajectory: Trajectory
    rewards: list[dict[str, Any]] = Field(min_length=1)
    key_prefix: str = "flowrl"


class ScoredBatch(Message):
    """Rewards for one trajectory: ``rewards[label][i]`` scores ``trajectory.sample_ids[i]``.

    ``None`` means the reward abstains for that sample (NaN in tensors); non-finite floats are
    rejected at construction (a reward that produced NaN must say so with ``None`` or fail).
    """

    trajectory: Trajectory
    rewards: dict[str, list[float | None]]
    details: dict[str, list[float | None]] = Field(default_factory=dict)
    worker: str = ""
    seconds: float = 0.0

    @field_validator("rewards", "details")
    @classmethod
    def _finite_and_aligned(cls, v: dict[str, list[float | None]], info) -> dict:
        traj = info.data.get("trajectory")
        for label, values in v.items():
            if traj is not None and len(values) != len(traj.sample_ids):
                raise ValueError(f"reward {label!r}: {len(values)} values for "
                                 f"{len(traj.sample_ids)} samples")
            for i, x in enumerate(values):
                if x is not None and not math.isfinite(x):
                    sid = traj.sample_ids[i] if traj is not None else i
                    raise ValueError(f"reward {label!r} is {x} for sample {sid}: rewards must be "
                                     f"finite (None = abstain)")
        return v


class PolicyPublished(Message):
    """A new policy version: ``weights`` is a safetensors blob of parameter name -> tensor
    (the LoRA or full trainable parameters, in the names of the adapter's transformer)."""

    run_id: str
    version: int = Field(ge=0)
    weights: BlobRef
    finetune_type: Literal["lora", "full"]
    published_at: float
    # which start of the trainer published it (a fresh id each start, a resume included; "" = unknown):
    # a sampler waits for its job's start's policy (SampleJob.generation)
    generation: str = ""


class DeadLetter(Message):
    """A task that gave up (redelivery cap or a permanent error): reported, never silent."""

    run_id: str
    task: str
    job_id: str
    sample_ids: list[str]
    error: str
    attempts: int
    generation: str = ""  # the task's job's (SampleJob.generation): a resumed trainer ignores an earlier start's
