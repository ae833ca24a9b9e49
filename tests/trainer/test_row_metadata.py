"""Dataset row metadata (the JSONL columns flowrl does not read, e.g. GenEval's ``tag`` /
``include`` / ``exclude``) reaching the rewards that read it (``RewardModel.metadata``): loading,
the epoch plan, local scoring and evaluation, the distributed mode's messages, sampler and
reward worker, and both HTTP protocols of the reward server and the ``remote`` client."""

from __future__ import annotations

import json
import math
import time
import uuid

import pytest
import torch

from shared.rewards.multi import build_rewards, score_specs
from tests.helpers.row_target import RowTarget
from tests.helpers.tiny import PROMPTS, tiny_raw
from trainer.data import DatasetError, load_prompts

TARGET = "tests.helpers.row_target.RowTarget"


def jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def targeted(tmp_path, n_train: int = 8):
    """A dataset whose row i has ``target = i / 10`` (train) or ``0.5 + i / 10`` (test)."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    jsonl(data / "train.jsonl", [{"prompt": PROMPTS[i], "target": i / 10, "tag": "t"} for i in range(n_train)])
    jsonl(data / "test.jsonl", [{"prompt": PROMPTS[i], "metadata": {"target": 0.5 + i / 10}} for i in range(3)])
    return data


def test_other_columns_and_the_metadata_object_become_the_rows_metadata(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    jsonl(data / "train.jsonl", [
        {"tag": "counting", "prompt": "a photo of three cats", "include": [{"class": "cat", "count": 3}],
         "exclude": [{"class": "cat", "count": 4}]},
        {"prompt": "plain"},
        {"prompt": "nested", "metadata": {"category": "colors"}, "extra": 1},
    ])
    (data / "test.txt").write_text("a text row\n")
    train, test = load_prompts(data)
    assert json.loads(train[0].metadata) == {"tag": "counting", "include": [{"class": "cat", "count": 3}],
                                             "exclude": [{"class": "cat", "count": 4}]}
    assert train[1].metadata == "" and test[0].metadata == ""
    assert json.loads(train[2].metadata) == {"category": "colors", "extra": 1}


def test_a_misspelt_known_column_is_an_error_not_metadata(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    jsonl(data / "train.jsonl", [{"prompt": "x", "negative_promt": "blurry"}])
    with pytest.raises(DatasetError, match=r"train.jsonl:1: unknown key 'negative_promt' \(did you mean "
                                           r"'negative_prompt'\?\)"):
        load_prompts(data)


def test_the_epoch_plan_carries_each_samples_rows_metadata(tmp_path):
    from shared.config import parse_config
    from trainer.collect import plan_epoch
    from trainer.data import load_dataset

    raw = tiny_raw(tmp_path)
    targeted(tmp_path)
    cfg = parse_config(raw)
    rows, _ = load_dataset(cfg.data)
    plan = plan_epoch(cfg, rows, 0, 0, 1)
    by_prompt = {r.prompt: r.metadata for r in rows}
    assert len(plan.metadata) == len(plan.prompts)
    assert plan.metadata == [by_prompt[p] for p in plan.prompts]
    keep = [0, 3, 5]
    assert plan.subset(keep).metadata == [plan.metadata[i] for i in keep]
    (tmp_path / "data" / "train.jsonl").unlink()
    (tmp_path / "data" / "train.txt").write_text("\n".join(PROMPTS) + "\n")  # no metadata anywhere: none carried
    rows, _ = load_dataset(cfg.data)
    assert plan_epoch(cfg, rows, 0, 0, 1).metadata == []


def test_score_specs_gives_metadata_only_to_rewards_that_read_it_aligned_and_routed():
    from shared.config import RewardSpec

    specs = [RewardSpec(reward_model=TARGET, name="target"), RewardSpec(reward_model="brightness")]
    rewards = build_rewards(specs, "cpu")
    metadata = [json.dumps({"target": 0.1}), "", {"target": 0.7}, json.dumps({"target": 0.3})]
    images = torch.rand(4, 3, 8, 8)
    out = score_specs(rewards, specs, images, ["a", "b", "c", "d"], torch.arange(4), metadata=metadata)
    got = out["target"].tolist()
    assert got[0] == pytest.approx(0.1) and math.isnan(got[1]) and got[2] == pytest.approx(0.7)
    assert got[3] == pytest.approx(0.3)
    # videos [N, F, 3, H, W]: every frame of a sample gets its sample's metadata
    out = score_specs(rewards, specs, torch.rand(4, 3, 3, 8, 8), list("abcd"), torch.arange(4), metadata=metadata)
    assert out["target"][2].item() == pytest.approx(0.7)
    # routed to one source: the others abstain, and the rest keep their own rows' metadata
    specs[0] = RewardSpec(reward_model=TARGET, name="target", datasets=["geneval"])
    out = score_specs(rewards, specs, images, list("abcd"), torch.arange(4), metadata=metadata,
                      datasets=["other", "geneval", "geneval", "other"])
    assert math.isnan(out["target"][0]) and math.isnan(out["target"][1]) and out["target"][2].item() == pytest.approx(0.7)
    # without metadata every sample's is {}
    assert torch.isnan(score_specs(rewards, specs[:1], images, list("abcd"), torch.arange(4))["target"]).all()


@pytest.mark.parametrize("overlap", [False, True])
def test_training_and_evaluation_score_each_sample_with_its_own_rows_metadata(tmp_path, overlap):
    from shared.config import apply_overrides, parse_config
    from trainer.collect import plan_epoch
    from trainer.data import load_dataset
    from trainer.loop import train

    raw = tiny_raw(tmp_path)
    targeted(tmp_path)
    raw["rewards"] = [{"reward_model": "brightness"}, {"name": "target", "reward_model": TARGET, "weight": 0.0}]
    cfg = parse_config(apply_overrides(raw, ["train.max_epochs=1", "eval.eval_freq=1", "eval.num_inference_steps=4",
                                             f"train.overlap_scoring={str(overlap).lower()}"]))
    train(cfg, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "runs" / "tiny_grpo" / "metrics.jsonl").read_text().splitlines()]
    train_rows, _ = load_dataset(cfg.data)
    plan = plan_epoch(cfg, train_rows, 0, 0, 1)
    expected = sum(json.loads(m)["target"] for m in plan.metadata) / len(plan.metadata)
    epoch = next(r for r in rows if "train/reward/target" in r)
    assert epoch["train/reward/target"] == pytest.approx(expected, abs=1e-6)
    evals = [r for r in rows if "eval/reward/target" in r]
    assert evals[-1]["eval/reward/target"] == pytest.approx(0.6, abs=1e-6)  # test targets 0.5, 0.6, 0.7
    assert evals[-1]["eval/target/has_target"] == 1.0  # details get the metadata too


def test_messages_carry_metadata_and_the_reward_worker_scores_with_it():
    from services.reward.worker import score_job
    from shared.protocol import RewardJob, SampleItem, Trajectory
    from shared.store import BlobStore
    from tests.shared.test_protocol import trajectory

    item = SampleItem(sample_id="r/e0/g0/k0", prompt="p", group_id=0, seed=1, metadata='{"target":0.25}')
    assert SampleItem.model_validate_json(item.model_dump_json()).metadata == '{"target":0.25}'
    with pytest.raises(ValueError, match="metadata for 1 samples"):
        Trajectory.model_validate({**trajectory().model_dump(), "metadata": ["{}"]})

    url = f"memory://flowrl-test-metadata-{uuid.uuid4().hex[:6]}"
    ref = BlobStore(url).put_images("run/e0/j0/images", torch.rand(3, 3, 8, 8))
    traj = Trajectory(run_id="run", job_id="run/e0/j0", epoch=0, policy_version=0,
                      sample_ids=[f"run/e0/g{i}/k0" for i in range(3)], group_ids=[0, 1, 2], prompts=["a", "b", "c"],
                      sde_steps=[], store_url=url, tensors=ref, images=ref,
                      metadata=['{"target":0.2}', "", '{"target":0.9}'])
    scored = score_job(RewardJob(trajectory=Trajectory.model_validate_json(traj.model_dump_json()),
                                 rewards=[{"reward_model": TARGET, "name": "target"}]))
    assert scored.rewards["target"][0] == pytest.approx(0.2) and scored.rewards["target"][1] is None
    assert scored.rewards["target"][2] == pytest.approx(0.9)


def test_the_sampler_copies_each_items_metadata_into_its_trajectory(redis_url):
    from services.sampler.runtime import SamplerRuntime
    from shared.models import load_adapter
    from shared.protocol import PolicyPublished
    from shared.queue import RunState
    from shared.store import BlobStore
    from tests.services.test_sampler import CFG, make_job
    from trainer.policy import attach_trainable

    state = RunState.connect(redis_url, "samplerun", f"test-{uuid.uuid4().hex[:8]}")
    try:
        trainable = attach_trainable(load_adapter(CFG.model, device=torch.device("cpu"), seed=0), CFG)
        store = BlobStore(f"memory://sampler-{uuid.uuid4().hex}")
        ref = store.put_tensors("samplerun/policy/v1.safetensors", {k: v.detach() for k, v in trainable.items()})
        state.publish(PolicyPublished(run_id="samplerun", version=1, weights=ref, finetune_type="lora",
                                      published_at=0.0))
        job = make_job(store.url)
        job = job.model_copy(update={"items": [item.model_copy(update={"metadata": json.dumps({"target": i}) if i % 2 else ""})
                                                for i, item in enumerate(job.items)]})
        traj = SamplerRuntime(device=torch.device("cpu"), policy_wait_s=5).run(job, state, attempt=1)
        assert traj.metadata == ["", '{"target": 1}', "", '{"target": 3}']
    finally:
        state.clear()


def test_the_reward_server_passes_metadata_over_v2_and_flow_factory(tmp_path):
    """The served reward reads metadata from v2's ``metadata`` input and from Flow-Factory's
    ``kwargs.metadata`` (JSON texts, as its client sends), and the ``remote`` client sends it."""
    import base64

    from fastapi.testclient import TestClient

    from services.reward import RewardServerSettings, create_app
    from shared.rewards.remote import RemoteReward
    from tests.services.test_reward_server import sample, v2_body

    images, pngs = sample(2, size=8)
    with TestClient(create_app(RewardServerSettings(rewards=TARGET))) as c:
        meta = c.get(f"/v2/models/{TARGET}").json()
        assert any(i["name"] == "metadata" for i in meta["inputs"])
        body = v2_body(pngs, ["a", "b"])
        body["inputs"].append({"name": "metadata", "shape": [2], "datatype": "BYTES",
                               "data": ['{"target": 0.3}', '{"target": 0.8}']})
        r = c.post(f"/v2/models/{TARGET}/infer", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == pytest.approx([0.3, 0.8])
        body["inputs"][-1]["data"] = ['{"target": 0.3}', "[1]"]
        r = c.post(f"/v2/models/{TARGET}/infer", json=body)
        assert r.status_code == 422 and "element 1 must be a JSON object" in r.json()["error"]

        b64 = [base64.b64encode(p).decode() for p in pngs]
        ff = {"prompt": ["a", "b"], "image": b64, "kwargs": {"metadata": ['{"target": 0.4}', '{"target": 0.1}']}}
        r = c.post("/compute", json=ff)
        assert r.status_code == 200, r.text
        assert r.json()["rewards"] == pytest.approx([0.4, 0.1])
        r = c.post("/compute", json={**ff, "kwargs": {"metadata": ['{"target": 0.4}']}})
        assert r.status_code == 422 and "one JSON object" in r.json()["error"]

        for protocol in ("v2", "flow-factory"):  # the client, over the same app
            remote = RemoteReward(url="http://testserver", protocol=protocol, metadata=True,
                                  model=TARGET if protocol == "v2" else None)
            remote._client = c
            got = remote.score(images, ["a", "b"], metadata=[{"target": 0.6}, {"target": 0.2}])
            assert got.tolist() == pytest.approx([0.6, 0.2]), protocol
    # a reward that does not read metadata: Flow-Factory's kwargs are ignored, v2's input refused
    with TestClient(create_app(RewardServerSettings(rewards="brightness"))) as c:
        assert c.post("/compute", json={"prompt": ["a", "b"], "image": b64,
                                        "kwargs": {"metadata": ["{}", "{}"]}}).status_code == 200
        r = c.post("/v2/models/brightness/infer", json=body)
        assert r.status_code == 422 and "unknown input 'metadata'" in r.json()["error"]


def test_a_geneval_run_on_rows_without_geneval_metadata_fails_at_load_naming_the_row(tmp_path):
    from shared.config import parse_config
    from trainer.loop import train

    raw = tiny_raw(tmp_path)
    data = tmp_path / "geneval"
    data.mkdir()
    jsonl(data / "train.jsonl", [{"prompt": "a photo of a dog", "tag": "single_object",
                                  "include": [{"class": "dog", "count": 1}]},
                                 {"prompt": "a photo of a cat", "tag": "single_object"}])
    raw["data"] = {"dataset_dir": str(data)}
    # the models are never loaded: the rows are checked first
    raw["rewards"] = [{"reward_model": "geneval", "detector": "nowhere/detector", "clip_model": "nowhere/clip"}]
    with pytest.raises(DatasetError, match=r"train.jsonl:2: rewards\['geneval'\] \(geneval\) cannot score this row: "
                                           r"the row has no GenEval 'include' list"):
        train(parse_config(raw), quiet=True)


@pytest.mark.parametrize("key, expected", [
    ("promt", "prompt"), ("Prompt", "prompt"), ("imges", "images"), ("vidoes", "videos"), ("imgs", "images"),
    ("negative_promt", "negative_prompt"), ("metadta", "metadata"),
    # columns of their own, not misspellings
    ("prompt_id", None), ("prompt_en", None), ("promptid", None), ("videoid", None), ("image_id", None),
    ("tag", None), ("include", None), ("exclude", None), ("class", None), ("caption", None), ("source", None)])
def test_what_counts_as_a_misspelt_column(key, expected):
    from trainer.data import misspelt

    assert misspelt(key) == expected


def test_a_null_metadata_object_is_none(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    jsonl(data / "train.jsonl", [{"prompt": "x", "metadata": None, "prompt_id": 7}])
    assert json.loads(load_prompts(data)[0][0].metadata) == {"prompt_id": 7}


def test_details_with_misaligned_metadata_is_an_error():
    from shared.rewards.base import details_all

    with pytest.raises(ValueError, match="metadata for 1 samples and 2 prompts"):
        details_all(RowTarget(), torch.rand(2, 3, 4, 4), ["a", "b"], [{}])


def test_evaluation_reduces_every_processs_detail_keys():
    """A process that saw none of a reward's (or a category's) prompts has fewer detail keys; every
    process must reduce the union, in one order."""
    import accelerate.utils

    from trainer.evaluate import union_keys

    class Two:
        num_processes = 2

    mine = {("geneval", "correct"): None, ("geneval", "correct/position"): None}
    theirs = [("geneval", "correct/counting"), ("geneval", "correct")]
    original = accelerate.utils.gather_object
    accelerate.utils.gather_object = lambda keys: list(keys) + theirs  # what all_gather_object returns
    try:
        assert union_keys(Two(), mine) == [("geneval", "correct"), ("geneval", "correct/counting"),
                                           ("geneval", "correct/position")]
    finally:
        accelerate.utils.gather_object = original


def test_flow_grpos_geneval_folder_loads_as_it_is(tmp_path):
    """Flow-GRPO's dataset/geneval names its splits train_metadata.jsonl / test_metadata.jsonl."""
    data = tmp_path / "geneval"
    data.mkdir()
    row = {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}
    jsonl(data / "train_metadata.jsonl", [row])
    jsonl(data / "test_metadata.jsonl", [row, {**row, "prompt": "a photo of a dog"}])
    train, test = load_prompts(data)
    assert [r.prompt for r in train] == ["a photo of a bench"] and len(test) == 2
    assert json.loads(train[0].metadata)["include"] == row["include"]
    assert train[0].source.endswith("train_metadata.jsonl:1")


def test_a_served_remote_reward_with_metadata_takes_the_metadata_input():
    """A reward server in front of another (``remote`` with ``metadata: true``) passes metadata on."""
    from fastapi.testclient import TestClient

    from services.reward import RewardServerSettings, create_app

    served = [{"reward_model": "remote", "url": "http://127.0.0.1:9", "metadata": True, "name": "relay"},
              {"reward_model": "remote", "url": "http://127.0.0.1:9", "condition_images": True, "name": "sources"},
              {"reward_model": "remote", "url": "http://127.0.0.1:9", "name": "plain"}]
    with TestClient(create_app(RewardServerSettings(rewards=served))) as c:
        inputs = lambda name: {i["name"] for i in c.get(f"/v2/models/{name}").json()["inputs"]}  # noqa: E731
        for _ in range(2):  # while loading (the options say) and once built (the models say)
            assert "metadata" in inputs("relay") and "metadata" not in inputs("plain")
            assert "condition_images" in inputs("sources") and "condition_images" not in inputs("relay")
            deadline = time.monotonic() + 30
            while not c.get("/v2/health/ready").status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.get("/v2/health/ready").status_code == 200
