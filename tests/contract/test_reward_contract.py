"""Contract suite: every registered reward (weight-free built-ins, the toy verifier, the learned
CLIP-family rewards on tiny random models saved locally, the remote client against a live local
server) honours the RewardModel contract of ``shared/rewards/base.py``:

* it is a RewardModel whose ``kind`` is one of KINDS and implements that kind's method;
* through ``score_all`` it returns ``[N]`` float32 on the CPU, each value finite or NaN
  (abstain), the same on a second call;
* called directly, that method returns one value per input (pairwise: probabilities in [0, 1]);
* pointwise: chunking does not change scores; groupwise/pairwise: reordering samples (groups
  interleaved) reorders the scores the same way;
* ``details`` returns ``{name: [B] tensor}``; unknown options raise TypeError naming them;
* a reward that reads condition images (``condition_images = True``) gets them through
  ``score_all`` (sliced and reordered with the samples) and refuses to score without them;
  likewise a reward that reads row metadata (``metadata = True``, GenEval rows here).

A reward registered without a case here fails ``test_every_registered_reward_has_a_case``:
add a case to CASES (a factory building it with tiny weights). A plugin's reward runs the suite
through a pytest plugin that adds its case to ``REWARD_CASES`` (tests/helpers/contract_cases.py,
docs/extending.md).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from shared.rewards import KINDS, REWARDS, RewardModel, build_reward, score_all
from tests.helpers.contract_cases import REWARD_CASES
from tests.helpers.contract_cases import RewardCase as Case

METHOD = {"pointwise": "score", "groupwise": "score_group", "pairwise": "compare"}


# --- assets: tiny models, built once per module ------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tests.helpers.tiny_clip import save_tiny_clip
    from shared.rewards.aesthetic import AestheticMLP

    root = tmp_path_factory.mktemp("reward_assets")
    clip = save_tiny_clip(root / "clip")
    clip768 = save_tiny_clip(root / "clip768", projection_dim=768, seed=1)
    torch.manual_seed(0)
    torch.save(AestheticMLP(768).state_dict(), root / "aesthetic_head.pth")
    from tests.helpers.tiny_detector import save_tiny_detector

    detector = save_tiny_detector(root / "detector")
    from transformers import CLIPModel

    from tests.shared.test_hps import to_open_clip

    torch.save({"state_dict": to_open_clip(CLIPModel.from_pretrained(clip).state_dict())}, root / "hps.pt")
    from tests.helpers.tiny_image_reward import save_tiny_image_reward

    image_reward, bert = save_tiny_image_reward(root / "imagereward")
    from tests.helpers.tiny_video_align import build_base, write_checkpoint, write_template_py

    write_checkpoint(root / "videoalign", build_base(root / "videoalign_base"))
    return {"videoalign": str(root / "videoalign"),
            "videoalign_template": str(write_template_py(root / "prompt_template.py")),
            "clip": str(clip), "clip768": str(clip768), "head": str(root / "aesthetic_head.pth"),
            "detector": str(detector), "hps": str(root / "hps.pt"), "imagereward": str(image_reward),
            "bert": str(bert)}


def _geneval(assets, stack, **extra) -> RewardModel:
    # threshold 0: the random detector's low-confidence detections count, so scores vary
    return build_reward("geneval", detector=assets["detector"], clip_model=assets["clip"], threshold=0.0,
                        counting_threshold=0.0, detector_size=64, **extra)


def _remote_geneval(assets, stack: contextlib.ExitStack, **extra) -> RewardModel:
    """``remote`` with ``metadata: true`` scoring ``geneval`` on a live server."""
    from services.reward import RewardServerSettings
    from tests.services.live_server import running_server

    served = {"reward_model": "geneval", "detector": assets["detector"], "clip_model": assets["clip"],
              "threshold": 0.0, "counting_threshold": 0.0, "detector_size": 64}
    settings = RewardServerSettings(rewards=[served], max_queue_delay_ms=0, log_level="warning")
    url = stack.enter_context(running_server(settings))
    model = build_reward("remote", url=url, metadata=True, **extra)
    stack.callback(model.close)
    return model


def _remote(assets, stack: contextlib.ExitStack, **extra) -> RewardModel:
    """``remote`` scoring ``brightness`` on a real reward server on a loopback port."""
    from services.reward import RewardServerSettings
    from tests.services.live_server import running_server

    settings = RewardServerSettings(rewards=[{"reward_model": "brightness"}], max_queue_delay_ms=0,
                                    log_level="warning")
    url = stack.enter_context(running_server(settings))
    model = build_reward("remote", url=url, **extra)
    stack.callback(model.close)
    return model


def _judge(name: str):
    def build(assets, stack: contextlib.ExitStack, **extra) -> RewardModel:
        """``vlm_judge`` asking a stand-in OpenAI-compatible judge on a loopback port."""
        from tests.helpers.fake_judge import judge_app, judge_state
        from tests.services.live_server import running_app

        url = stack.enter_context(running_app(judge_app(judge_state()), ready_path="/v1/models"))
        model = build_reward(name, url=f"{url}/v1", model="judge", **extra)
        stack.callback(model.close)
        return model
    return build


def _scale_judge(name: str, **fixed):
    def build(assets, stack: contextlib.ExitStack, **extra) -> RewardModel:
        """A judge writing a score on a scale, asking a stand-in server on a loopback port."""
        from tests.helpers.fake_judge import judge_state, score_app
        from tests.services.live_server import running_app

        url = stack.enter_context(running_app(score_app(judge_state()), ready_path="/v1/models"))
        model = build_reward(name, url=f"{url}/v1", **fixed, **extra)
        stack.callback(model.close)
        return model
    return build


def _rational(name: str):
    def build(assets, stack: contextlib.ExitStack, **extra) -> RewardModel:
        """A RationalRewards judge asking a stand-in OpenAI-compatible judge on a loopback port."""
        from tests.helpers.fake_judge import judge_state, rational_app
        from tests.services.live_server import running_app

        url = stack.enter_context(running_app(rational_app(judge_state()), ready_path="/v1/models"))
        model = build_reward(name, url=f"{url}/v1", **extra)
        stack.callback(model.close)
        return model
    return build


def _plain(name: str, **fixed):
    return lambda assets, stack, **extra: build_reward(name, **fixed, **extra)


def _clip(name: str, **fixed):
    def build(assets, stack, **extra):
        return build_reward(name, model_name_or_path=assets["clip"], processor_name_or_path=assets["clip"],
                            **fixed, **extra)
    return build


CASES = [
    Case("jpeg_incompressibility", _plain("jpeg_incompressibility")),
    Case("jpeg_compressibility", _plain("jpeg_compressibility")),
    Case("brightness", _plain("brightness")),
    Case("pairwise_brightness", _plain("pairwise_brightness")),
    Case("toy_geneval", _plain("toy_geneval"), toy_prompts=True),
    Case("toy_shape_quality", _plain("toy_shape_quality"), toy_prompts=True),
    Case("pickscore", _clip("pickscore")),
    Case("pickscore_rank", _clip("pickscore_rank", chunk_size=2)),
    Case("clip", _clip("clip")),
    Case("aesthetic", lambda assets, stack, **extra: build_reward(
        "aesthetic", model_name_or_path=assets["clip768"], head_path=assets["head"], **extra)),
    Case("remote", _remote),
    Case("vlm_judge", _judge("vlm_judge")),
    Case("vllm_evaluate", _judge("vllm_evaluate")),
    Case("rational_rewards_t2i", _rational("rational_rewards_t2i")),
    Case("rational_rewards_edit", _rational("rational_rewards_edit")),
    Case("source_similarity", _plain("source_similarity")),
    Case("ocr", _plain("ocr"), text_prompts=True),
    Case("remote+condition_images", lambda assets, stack, **extra: _remote_sources(assets, stack, **extra)),
    Case("geneval", _geneval),
    Case("hpsv2", lambda assets, stack, **extra: build_reward(
        "hpsv2", checkpoint=assets["hps"], processor_name_or_path=assets["clip"], **extra)),
    Case("remote+metadata", _remote_geneval),
    Case("unifiedreward", _scale_judge("unifiedreward")),
    Case("vlm_score", _scale_judge("vlm_score", model="judge")),
    Case("diversity", lambda assets, stack, **extra: build_reward(
        "diversity", model_name_or_path=assets["clip"], **extra)),
    Case("imagereward", lambda assets, stack, **extra: build_reward(
        "imagereward", checkpoint=assets["imagereward"], tokenizer_name_or_path=assets["bert"], **extra)),
    Case("videoalign", lambda assets, stack, **extra: build_reward(
        "videoalign", checkpoint=assets["videoalign"], template=assets["videoalign_template"], **extra),
        videos=True),
] + REWARD_CASES  # a plugin's (tests/helpers/contract_cases.py)


def _remote_sources(assets, stack: contextlib.ExitStack, **extra) -> RewardModel:
    """``remote`` with ``condition_images: true`` scoring ``source_similarity`` on a live server."""
    from services.reward import RewardServerSettings
    from tests.services.live_server import running_server

    settings = RewardServerSettings(rewards=[{"reward_model": "source_similarity"}], max_queue_delay_ms=0,
                                    log_level="warning")
    url = stack.enter_context(running_server(settings))
    model = build_reward("remote", url=url, condition_images=True, **extra)
    stack.callback(model.close)
    return model


def conditions(model: RewardModel, n: int = 6) -> dict:
    """``{"condition_images": rows}`` for a model that reads condition images (distinct images of
    another size than the outputs) and ``{"metadata": rows}`` for one that reads row metadata
    (GenEval rows), else ``{}``."""
    out = {}
    if model.condition_images:
        from tests.helpers.tiny_edit_pipelines import condition_rows

        out["condition_images"] = condition_rows(n, 1)
    if model.metadata:
        from tests.helpers.tiny_detector import geneval_rows

        out["metadata"] = geneval_rows(n)
    return out


@pytest.fixture(scope="module")
def built(assets):
    """``built(case)``: the case's model, built once per module (servers stop at module end)."""
    cache: dict[str, RewardModel] = {}
    with contextlib.ExitStack() as stack:
        def get(case: Case) -> RewardModel:
            if case.name not in cache:
                cache[case.name] = case.build(assets, stack, device="cpu", dtype="float32")
            return cache[case.name]
        yield get


def inputs(case: Case, n: int = 6, size: int = 32):
    """``n`` images ``[n, 3, size, size]`` (a video case: 5-frame videos) in [0, 1] and prompts;
    groups of prompts alternate."""
    g = torch.Generator().manual_seed(0)
    if case.videos:
        return torch.rand(n, 5, 3, size, size, generator=g), [("a red circle", "two blue squares")[i % 2]
                                                               for i in range(n)]
    if case.text_prompts:
        from tests.helpers.text_images import render_text

        words = [("flow", "GRPO")[i % 2] for i in range(n)]
        images = torch.stack([render_text(w if i % 3 else "", size=96, seed=i) for i, w in enumerate(words)])
        return images, [f'A sign that says "{w}"' for w in words]
    if not case.toy_prompts:
        prompts = [("a red circle", "two blue squares")[i % 2] for i in range(n)]
        return torch.rand(n, 3, size, size, generator=g), prompts
    from shared.toy.scenes import sample_pair

    toy = ("a photo of a red circle", "a photo of two squares")
    pairs = [sample_pair(toy[i % 2], seed=i) for i in range(n)]
    images = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for _, a in pairs])
    images[::3] = torch.rand(len(images[::3]), *images.shape[1:], generator=g)  # some wrong images
    return images, [p for p, _ in pairs]


# --- the contract ------------------------------------------------------------------------------------


def test_every_registered_reward_has_a_case():
    missing = sorted(set(REWARDS.names()) - {c.name.split("+")[0] for c in CASES})
    assert not missing, (f"registered rewards without a contract case: {missing}. Fix: add a Case to CASES "
                         f"in tests/contract/test_reward_contract.py that builds each with tiny weights.")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kind_and_interface(built, case):
    model = built(case)
    assert isinstance(model, RewardModel) and model.kind in KINDS
    method = METHOD[model.kind]
    assert getattr(type(model), method) is not getattr(RewardModel, method), (
        f"{case.name} is {model.kind} but does not implement {method}()")
    assert isinstance(model.required_fields, tuple) and "image" in model.required_fields
    assert isinstance(model.name, str) and model.name


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_score_all_shape_dtype_values(built, case):
    model = built(case)
    images, prompts = inputs(case)
    ids = torch.tensor([0, 1, 0, 1, 0, 1])  # interleaved groups of 3
    out = score_all(model, images, prompts, ids, batch_size=4, **conditions(model))
    assert out.shape == (6,) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert bool((torch.isfinite(out) | torch.isnan(out)).all())
    assert not bool(torch.isnan(out).all()), f"{case.name} abstained on every sample"
    again = score_all(model, images, prompts, ids, batch_size=4, **conditions(model))
    assert torch.allclose(out, again, atol=1e-6, equal_nan=True), f"{case.name} is not deterministic"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_direct_call_returns_one_value_per_input(built, case):
    model = built(case)
    images, prompts = inputs(case)
    a, pa = images[0::2], prompts[0::2]  # one prompt group of 3
    extra = {k: v[0::2] for k, v in conditions(model).items()}
    if model.kind == "pairwise":
        out = model.compare(a, images[1::2], pa, **extra)
        assert bool(((out >= 0) & (out <= 1)).all())
    else:
        out = getattr(model, METHOD[model.kind])(a, pa, **extra)
    assert isinstance(out, torch.Tensor) and out.shape == (3,) and out.dtype.is_floating_point


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_chunking_and_order(built, case):
    model = built(case)
    images, prompts = inputs(case)
    ids = torch.tensor([0, 1, 0, 1, 0, 1])
    extra = conditions(model)
    out = score_all(model, images, prompts, ids, batch_size=6, **extra)
    if model.kind == "pointwise":
        for bs in (1, 4):
            assert torch.allclose(score_all(model, images, prompts, ids, batch_size=bs, **extra), out, atol=1e-5,
                                  equal_nan=True)
    perm = torch.tensor([3, 0, 5, 2, 1, 4])
    moved = {k: [v[int(i)] for i in perm] for k, v in extra.items()}  # conditions move with their samples
    shuffled = score_all(model, images[perm], [prompts[i] for i in perm], ids[perm], batch_size=6, **moved)
    assert torch.allclose(shuffled, out[perm], atol=1e-5, equal_nan=True)
    if "condition_images" in extra:
        with pytest.raises(ValueError, match="condition.*Fix"):
            score_all(model, images, prompts, ids, batch_size=6, metadata=extra.get("metadata"))
    if "metadata" in extra:  # (the remote one: the server's 422, as a RemoteRewardError)
        with pytest.raises(Exception, match="no GenEval 'include' list.*Fix"):
            score_all(model, images, prompts, ids, batch_size=6)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_details_are_per_sample(built, case):
    model = built(case)
    images, prompts = inputs(case)
    details = model.details(images[:3], prompts[:3], **{k: v[:3] for k, v in conditions(model).items()
                                                        if k == "metadata"})
    assert isinstance(details, dict)
    for key, value in details.items():
        assert isinstance(key, str) and isinstance(value, torch.Tensor) and value.shape == (3,)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_unknown_option_is_rejected_by_name(assets, case):
    with contextlib.ExitStack() as stack, pytest.raises(TypeError, match="'no_such_option'"):
        case.build(assets, stack, no_such_option=1)
