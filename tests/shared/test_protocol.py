"""Wire messages: JSON round trips, strictness, version check, finite rewards."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from shared.protocol import (PROTOCOL_VERSION, BlobRef, DeadLetter, PolicyPublished, RewardJob,
                             RunKeys, SampleItem, SampleJob, SamplingParams, ScoredBatch, Trajectory,
                             sample_id)

REF = BlobRef(uri="memory://s/a", sha256="0" * 64, nbytes=3)


def trajectory(n: int = 2) -> Trajectory:
    return Trajectory(run_id="r", job_id="r/e0/j0", epoch=0, policy_version=1,
                      sample_ids=[sample_id("r", 0, 0, k) for k in range(n)], group_ids=[0] * n,
                      prompts=["p"] * n, sde_steps=[0, 1], store_url="memory://s", tensors=REF,
                      images=REF)


def job() -> SampleJob:
    return SampleJob(
        run_id="r", job_id="r/e0/j0", epoch=0, min_policy_version=0,
        items=[SampleItem(sample_id="r/e0/g0/k0", prompt="a red circle", group_id=0, seed=7)],
        params=SamplingParams(resolution=(64, 64), num_inference_steps=10, guidance_scale=4.5,
                              dynamics="Flow-SDE", noise_level=0.7, sde_steps=[0, 3], batch_size=8),
        model={"model_type": "tiny"}, store_url="memory://s", rewards=[{"reward_model": "brightness"}])


@pytest.mark.parametrize("message", [
    job(), trajectory(), RewardJob(trajectory=trajectory(), rewards=[{"reward_model": "brightness"}]),
    ScoredBatch(trajectory=trajectory(), rewards={"b": [0.5, None]}),
    PolicyPublished(run_id="r", version=3, weights=REF, finetune_type="lora", published_at=1.0),
    DeadLetter(run_id="r", task="flowrl.sample", job_id="j", sample_ids=["s"], error="boom", attempts=3),
], ids=lambda m: type(m).__name__)
def test_json_round_trip_is_exact(message):
    raw = message.model_dump_json()
    assert json.loads(raw)["protocol"] == PROTOCOL_VERSION
    assert type(message).model_validate_json(raw) == message


def test_unknown_fields_and_other_versions_are_rejected_with_a_reason():
    data = json.loads(job().model_dump_json())
    with pytest.raises(ValidationError, match="extra"):
        SampleJob.model_validate({**data, "surprise": 1})
    with pytest.raises(ValidationError, match="same flowrl version"):
        SampleJob.model_validate({**data, "protocol": PROTOCOL_VERSION + 1})


def test_scores_must_be_finite_and_aligned():
    with pytest.raises(ValidationError, match=r"inf for sample r/e0/g0/k1"):
        ScoredBatch(trajectory=trajectory(), rewards={"b": [0.1, float("inf")]})
    with pytest.raises(ValidationError, match="nan"):
        ScoredBatch(trajectory=trajectory(), rewards={"b": [float("nan"), 0.1]})
    with pytest.raises(ValidationError, match="1 values for 2 samples"):
        ScoredBatch(trajectory=trajectory(), rewards={"b": [0.1]})
    with pytest.raises(ValidationError, match="2 sample ids, 2 group ids and 1 prompts"):
        Trajectory(**{**trajectory().model_dump(), "prompts": ["p"]})


def test_blob_ref_needs_a_sha256_and_job_needs_items():
    with pytest.raises(ValidationError):
        BlobRef(uri="x", sha256="abc", nbytes=1)
    with pytest.raises(ValidationError):
        SampleJob(**{**job().model_dump(), "items": []})


def test_sample_ids_are_unique_and_keys_namespaced():
    ids = {sample_id("run", e, g, k) for e in range(3) for g in range(4) for k in range(5)}
    assert len(ids) == 60
    keys = RunKeys("run", "pfx")
    assert keys.scored == "pfx:run:scored" and keys.pattern() == "pfx:run:*"
    with pytest.raises(ValueError, match="no spaces"):
        RunKeys("bad run")
