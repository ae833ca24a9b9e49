"""Invalid reward values are refused with the reward's name and the sample (id or position and
group, and its prompt), on every path that scores: ``score_all``, the experiment's reward set
(``score_specs``: embedded trainer and evaluation) and the distributed reward worker.

Policy (docs/reliability.md): +inf / -inf (and, for pairwise rewards, probabilities outside
[0, 1]) are errors; NaN is the documented "abstain" value (the advantage code leaves the sample
out of that reward's statistics) and passes; over HTTP, where NaN cannot travel, the reward
server refuses NaN too (tests/services/test_reward_server.py).
"""

from __future__ import annotations

import pytest
import torch

from services.reward.worker import score_job
from shared.config import RewardSpec
from shared.protocol import RewardJob, Trajectory
from shared.rewards import RewardModel, RewardOutputError, score_all
from shared.rewards.multi import build_rewards, score_specs
from shared.store import BlobStore

PROMPTS = [f"prompt {i}" for i in range(6)]


class InfAt(RewardModel):
    """Pointwise 0.5, except ``value`` for the sample whose prompt is ``prompt``."""

    kind = "pointwise"

    def __init__(self, *, prompt: str = "prompt 4", value: float = float("inf"), **options) -> None:
        super().__init__(**options)
        self.prompt, self.value = prompt, value

    def score(self, images, prompts):
        return torch.tensor([self.value if p == self.prompt else 0.5 for p in prompts])


class GroupInfAt(InfAt):
    kind = "groupwise"

    def score_group(self, images, prompts):
        return self.score(images, prompts)


class PairOutOfRange(InfAt):
    kind = "pairwise"

    def compare(self, a, b, prompts):
        return torch.tensor([1.5 if p == self.prompt else 0.5 for p in prompts])


def images(n: int) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_score_all_names_the_sample_position_and_prompt(value):
    with pytest.raises(RewardOutputError) as info:  # batch_size 2: the bad sample is in the third chunk
        score_all(InfAt(value=value), images(6), PROMPTS, torch.zeros(6, dtype=torch.long), batch_size=2)
    assert info.value.index == 4
    assert f"returned {value} for sample 4, prompt 'prompt 4'" in str(info.value) and "InfAt" in str(info.value)


def test_groupwise_and_pairwise_name_the_position_in_the_whole_batch():
    groups = torch.tensor([0, 1, 0, 1, 0, 1])  # members not contiguous: sample 4 is member 2 of group 0
    with pytest.raises(RewardOutputError) as info:
        score_all(GroupInfAt(), images(6), PROMPTS, groups, batch_size=2)
    assert info.value.index == 4 and "prompt 'prompt 4'" in str(info.value)
    with pytest.raises(RewardOutputError) as info:  # group 0 = samples 0, 2, 4: the pair (2, 4) is out of range
        score_all(PairOutOfRange(prompt="prompt 2"), images(6), PROMPTS, groups, batch_size=1)
    assert info.value.index == 2 and "probabilities in [0, 1]" in str(info.value)


def test_nan_abstains_and_is_not_an_error():
    out = score_all(InfAt(value=float("nan")), images(6), PROMPTS, torch.zeros(6, dtype=torch.long), batch_size=4)
    assert torch.isnan(out[4]) and not torch.isnan(out[[0, 1, 2, 3, 5]]).any()


def _specs() -> list[RewardSpec]:
    return [RewardSpec(reward_model="brightness"),
            RewardSpec(name="aesthetic_v2", reward_model=f"{__name__}.InfAt", batch_size=4)]


def test_reward_set_names_label_and_sample_id_or_group():
    specs = _specs()
    models = build_rewards(specs, "cpu")
    groups = torch.tensor([10, 10, 11, 11, 12, 12])
    with pytest.raises(RewardOutputError) as info:
        score_specs(models, specs, images(6), PROMPTS, groups, sample_ids=[f"run/e0/g{g}/k{i % 2}" for i, g in
                                                                            enumerate(groups.tolist())])
    msg = str(info.value)
    assert f"rewards['aesthetic_v2'] ({__name__}.InfAt)" in msg
    assert "sample id 'run/e0/g12/k0'" in msg and "prompt 'prompt 4'" in msg and "Fix" in msg
    with pytest.raises(RewardOutputError, match=r"sample 4 of the batch \(group 12\), prompt 'prompt 4'"):
        score_specs(models, specs, images(6), PROMPTS, groups)  # embedded: no ids, position and group


def test_reward_worker_error_names_the_sample_id():
    """The distributed reward worker scores a job whose reward returns inf: the error (which the
    task turns into a dead letter, tests/integration) names the reward and the sample id."""
    store = BlobStore("memory://flowrl-test-bad-rewards")
    ref = store.put_images("run/e0/j0/images", images(6))
    ids = [f"run/e0/g{i // 2}/k{i % 2}" for i in range(6)]
    traj = Trajectory(run_id="run", job_id="run/e0/j0", epoch=0, policy_version=0, sample_ids=ids,
                      group_ids=[i // 2 for i in range(6)], prompts=PROMPTS, sde_steps=[],
                      store_url="memory://flowrl-test-bad-rewards", tensors=ref, images=ref)
    job = RewardJob(trajectory=traj, rewards=[s.model_dump(mode="json") for s in _specs()])
    with pytest.raises(RewardOutputError, match=r"rewards\['aesthetic_v2'\].*sample id 'run/e0/g2/k0'"):
        score_job(job)


def test_reward_worker_builds_one_model_per_reward_and_options():
    """Entries differing only in name or weight (another run's, say) share the worker's model; other
    options get their own (the cache was keyed by the whole entry: a copy per name and weight)."""
    import services.reward.worker as worker

    store = BlobStore("memory://flowrl-test-worker-cache")
    ref = store.put_images("run/e0/j0/images", images(2))
    traj = Trajectory(run_id="run", job_id="run/e0/j0", epoch=0, policy_version=0, sample_ids=["a", "b"],
                      group_ids=[0, 0], prompts=PROMPTS[:2], sde_steps=[],
                      store_url="memory://flowrl-test-worker-cache", tensors=ref, images=ref)
    worker._models.clear()
    for entries in ([{"reward_model": "brightness", "name": "b1"}],
                    [{"reward_model": "brightness", "name": "b2", "weight": 0.5},
                     {"reward_model": "brightness", "name": "b3", "weight": 2.0}]):
        scored = worker.score_job(RewardJob(trajectory=traj, rewards=entries))
        assert set(scored.rewards) == {e["name"] for e in entries}
    assert len(worker._models) == 1
    worker.score_job(RewardJob(trajectory=traj, rewards=[{"reward_model": "toy_shape_quality", "name": "q"}]))
    assert len(worker._models) == 2
    worker._models.clear()


def test_reward_worker_keeps_at_most_its_cap_of_models(monkeypatch):
    """A worker serving run after run with other rewards lets the least recently used model go
    beyond FLOWRL_REWARD_WORKER_MAX_MODELS (it kept every one); a job needing more keeps all of its."""
    import services.reward.worker as worker
    from shared.rewards.multi import reward_identity
    from shared.config import RewardSpec

    store = BlobStore("memory://flowrl-test-worker-cap")
    ref = store.put_images("run/e0/j0/images", images(2))
    traj = Trajectory(run_id="run", job_id="run/e0/j0", epoch=0, policy_version=0, sample_ids=["a", "b"],
                      group_ids=[0, 0], prompts=PROMPTS[:2], sde_steps=[],
                      store_url="memory://flowrl-test-worker-cap", tensors=ref, images=ref)
    monkeypatch.setenv(worker.MAX_MODELS_ENV, "2")
    worker._models.clear()
    key = lambda e: reward_identity(RewardSpec(**e), "cpu")  # noqa: E731
    a, b, c = ({"reward_model": "brightness", "name": f"b{t}", "target": t} for t in (0.1, 0.5, 0.9))
    from shared.rewards import multi

    resident: list[int] = []  # models held when each one is built: the cap holds while loading too
    real_build = multi.build_reward
    monkeypatch.setattr(multi, "build_reward", lambda *args, **kw: (resident.append(len(worker._models)),
                                                                    real_build(*args, **kw))[1])
    for entries in ([a], [b], [a], [c]):  # a used again after b: b is the least recent when c comes
        worker.score_job(RewardJob(trajectory=traj, rewards=entries))
    assert list(worker._models) == [key(a), key(c)]
    assert resident == [0, 1, 1]  # a, b, c built: c after b left, never 3 held
    worker.score_job(RewardJob(trajectory=traj, rewards=[a, b, c]))  # one job needs three: all stay
    assert set(worker._models) == {key(a), key(b), key(c)}
    worker._models.clear()
    monkeypatch.setenv(worker.MAX_MODELS_ENV, "0")
    with pytest.raises(ValueError, match="FLOWRL_REWARD_WORKER_MAX_MODELS='0' must be a whole number >= 1"):
        worker.check_environment()


def test_flowrl_worker_reward_stops_on_a_bad_model_cap(monkeypatch, capsys):
    """``flowrl worker reward`` with FLOWRL_REWARD_WORKER_MAX_MODELS=two stops before taking tasks,
    exit 2, one line naming the variable and the fix (each job would have failed instead)."""
    from trainer.cli import main

    monkeypatch.setenv("FLOWRL_REWARD_WORKER_MAX_MODELS", "two")
    monkeypatch.setenv("FLOWRL_WORKER_NAME", "unset-by-test")
    assert main(["worker", "reward", "--name", "cap-test"]) == 2
    err = capsys.readouterr().err
    assert "FLOWRL_REWARD_WORKER_MAX_MODELS='two'" in err and "Fix:" in err
