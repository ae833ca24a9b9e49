"""The shipped toy pipeline (``assets/toy-sd3``, written by ``scripts/pretrain_toy.py``): small,
loadable by plain diffusers and by the ``sd3-5`` adapter, draws real shapes, and is decent but
imperfect on the held-out prompts, as its pretraining record says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shared.toy import CATEGORIES

ROOT = Path(__file__).resolve().parents[2]
ASSET = ROOT / "assets" / "toy-sd3"
RECORD = json.loads((ASSET / "pretrain.json").read_text())


def test_small_enough_to_ship():
    total = sum(f.stat().st_size for f in ASSET.rglob("*") if f.is_file())
    assert total <= 25_000_000, f"assets/toy-sd3 is {total / 1e6:.1f} MB; the limit is 25 MB"


def record_geneval_overall() -> float:
    """GenEval's overall score of the record: the unweighted mean of its category accuracies (the
    record's own ``accuracy`` is the per-image mean, ``accuracy/per_image`` in evaluation)."""
    cats = [RECORD["final"][f"accuracy/{c}"] for c in CATEGORIES]
    return sum(cats) / len(cats)


def test_pretraining_left_room_for_rl():
    for acc in (RECORD["final"]["accuracy"], record_geneval_overall()):
        assert 0.25 <= acc <= 0.65, f"held-out accuracy after pretraining is {acc}"
    assert RECORD["args"]["seed"] == 0 and RECORD["curve"], "pretrain.json lacks its record"


def test_plain_diffusers_pipeline_draws_the_prompted_shape():
    from diffusers import StableDiffusion3Pipeline

    from shared.toy.verify import verify

    pipe = StableDiffusion3Pipeline.from_pretrained(ASSET, text_encoder_3=None, tokenizer_3=None,
                                                    image_encoder=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a photo of a square"
    images = pipe([prompt] * 4, num_inference_steps=10, height=64, width=64, guidance_scale=1.0,
                  max_sequence_length=0, output_type="np",
                  generator=[torch.Generator().manual_seed(s) for s in range(4)]).images
    assert images.shape == (4, 64, 64, 3)
    correct = [verify((im * 255).round().astype("uint8"), prompt).correct for im in images]
    assert sum(correct) >= 2, f"only {sum(correct)} of 4 samples show a square"


@pytest.fixture(scope="module")
def base_eval(tmp_path_factory):
    """``flowrl eval``'s code path on the untrained model (a fresh, zero-effect LoRA)."""
    from accelerate import Accelerator

    from shared.config import load_config
    from shared.models import load_adapter
    from trainer.data import load_prompts
    from trainer.evaluate import evaluate
    from shared.rewards.multi import build_rewards
    from trainer.policy import Policy, attach_trainable

    out = tmp_path_factory.mktemp("base_eval")
    args = RECORD["args"]  # evaluate exactly as the pretraining record did
    cfg = load_config(ROOT / "examples" / "toy" / "grpo.yaml",
                      ["eval.images_per_prompt=1", f"output_dir={out}", f"eval.guidance_scale={args['guidance']}",
                       f"eval.num_inference_steps={args['eval_steps']}"])
    accelerator = Accelerator(cpu=True)
    _, test_rows = load_prompts(ROOT / cfg.data.dataset_dir)
    adapter = load_adapter(cfg.model.model_copy(update={"model_name_or_path": str(ASSET)}),
                           device=accelerator.device, seed=0)
    policy = Policy(adapter, adapter.transformer, cfg, attach_trainable(adapter, cfg))
    return evaluate(cfg, accelerator, adapter, policy, build_rewards(cfg.rewards, "cpu"), cfg.rewards,
                    test_rows, out, epoch=0)


def test_base_accuracy_reproduces_the_pretraining_record(base_eval):
    """Same held-out prompts, seeds (prompt i -> seed i), ODE grid and weights as the record."""
    assert base_eval["eval/toy_geneval/accuracy/per_image"] == pytest.approx(RECORD["final"]["accuracy"], abs=0.03)
    assert base_eval["eval/toy_geneval/accuracy"] == pytest.approx(record_geneval_overall(), abs=0.05)
    for key, value in RECORD["final"].items():
        if key.startswith("accuracy/"):
            assert base_eval[f"eval/toy_geneval/{key}"] == pytest.approx(value, abs=0.15), key
