"""Prompts longer than a text encoder takes are truncated with ONE warning per model, not one per
prompt or batch, and diffusers' own per-batch truncation log lines are silenced (ours replaces
them). Token counts follow each family's encode path (special tokens, chat templates)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from shared.config import ModelConfig
from shared.models import MODELS, load_adapter
from shared.models.prompt_length import DIFFUSERS_TRUNCATION, PromptTruncatedWarning
from shared.sampling import encode
from tests.helpers.tiny_pipelines import TINY_PIPELINES

LONG = " ".join(f"word{i} red cube blue sphere" for i in range(60))  # ~300 words
SHORT = "a red cube"


def _truncation_warnings(record) -> list[warnings.WarningMessage]:
    return [w for w in record if issubclass(w.category, PromptTruncatedWarning)]


def test_tiny_model_warns_once_for_all_batches():
    adapter = load_adapter(ModelConfig(model_type="tiny"), device=torch.device("cpu"), seed=0)
    limit = int(adapter.options["max_tokens"])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        encode(adapter, [SHORT] * 4, [None] * 4, guidance_scale=1.0)
        assert not _truncation_warnings(record)
        for _ in range(3):  # three batches with long prompts: one warning
            encode(adapter, [LONG, SHORT, LONG + " more"], [None] * 3, guidance_scale=1.0)
    (w,) = _truncation_warnings(record)
    msg = str(w.message)
    assert f"2 of 2 new prompts are longer than the tiny word tokenizer takes ({limit} tokens)" in msg
    assert "Fix:" in msg and "shown once per model" in msg


def test_negative_prompts_count_only_with_cfg():
    adapter = load_adapter(ModelConfig(model_type="tiny"), device=torch.device("cpu"), seed=0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        encode(adapter, [SHORT], [LONG], guidance_scale=1.0)  # negatives unused without CFG
        assert not _truncation_warnings(record)
        encode(adapter, [SHORT], [LONG], guidance_scale=4.0)
    assert len(_truncation_warnings(record)) == 1


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("model_type", ["sd3-5", "flux1", "z-image", "qwen-image", "wan2_t2v", "flux2", "flux2-klein"])
def test_pipeline_families_warn_once_and_silence_diffusers(model_type):
    spec = TINY_PIPELINES[model_type]
    adapter = MODELS.get(model_type).from_pipeline(spec.build(0), spec.options)
    limits = adapter.prompt_token_limits()
    assert limits and all(lim.count(SHORT) <= lim.limit for lim in limits), [(lim.encoder, lim.limit) for lim in limits]
    capture = _Capture()
    loggers = [logging.getLogger(type(adapter.pipeline).__module__), logging.getLogger("transformers")]
    for logger in loggers:
        logger.addHandler(capture)
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            encode(adapter, [SHORT, SHORT], [None, None], guidance_scale=spec.guidance_scale)
            assert not _truncation_warnings(record)
            for _ in range(2):
                encode(adapter, [LONG, SHORT], [None, None], guidance_scale=spec.guidance_scale)
    finally:
        for logger in loggers:
            logger.removeHandler(capture)
    (w,) = _truncation_warnings(record)
    assert "1 of 1 new prompts are longer than" in str(w.message)
    noise = [m for m in capture.messages if m.startswith((DIFFUSERS_TRUNCATION, "Token indices sequence length"))]
    assert not noise, noise


@pytest.mark.parametrize("model_type", ["z-image", "qwen-image"])
def test_chat_template_counts_match_the_encoded_length(model_type):
    """The count is what the pipeline really encodes: the prompt mask of a prompt under the limit."""
    spec = TINY_PIPELINES[model_type]
    adapter = MODELS.get(model_type).from_pipeline(spec.build(0), spec.options)
    (limit,) = adapter.prompt_token_limits()
    for prompt in (SHORT, "two green triangles"):
        mask = adapter.encode_prompts([prompt], cfg=False).tensors["prompt_mask"]
        assert limit.count(prompt) == int(mask.sum()), prompt


@pytest.mark.parametrize("model_type", ["flux2", "flux2-klein"])
def test_flux2_counts_are_the_pipelines_unpadded_tokens(model_type):
    """FLUX.2's counts: the tokens its chat template gives a prompt, which the pipeline pads to
    ``max_sequence_length`` (so the count is the attention mask's sum there)."""
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    spec = TINY_PIPELINES[model_type]
    adapter = MODELS.get(model_type).from_pipeline(spec.build(0), spec.options)
    (limit,) = adapter.prompt_token_limits()
    tok, length = adapter.pipeline.tokenizer, limit.limit
    for prompt in (SHORT, "two green triangles left of a cube"):
        if model_type == "flux2":
            mask = tok.apply_chat_template(format_input([prompt], system_message=adapter.pipeline.system_message),
                                           add_generation_prompt=False, tokenize=True, return_dict=True,
                                           return_tensors="pt", padding="max_length", truncation=True,
                                           max_length=length)["attention_mask"]
        else:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=False)
            mask = tok(text, return_tensors="pt", padding="max_length", truncation=True,
                       max_length=length)["attention_mask"]
        assert limit.count(prompt) == int(mask.sum()) < length, prompt
