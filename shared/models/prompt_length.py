"""Prompts longer than a text encoder takes: truncated (as the pipelines do), with ONE warning.

Each adapter lists its text encoders' limits (:meth:`FlowModelAdapter.prompt_token_limits`,
one :class:`TokenLimit` per tokenizer, counting tokens exactly as its encode path does:
special tokens and chat templates included). :func:`check_prompt_lengths` runs before every
prompt encoding (:func:`shared.sampling.encode`): the first time a prompt is over a limit it
warns once for that model (how many prompts of the batch, the longest, the limit, the fix) and
silences diffusers' own per-batch truncation log lines, which would repeat every step (and
transformers' misleading "will result in indexing errors": the pipelines do truncate).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Callable

DIFFUSERS_TRUNCATION = "The following part of your input was truncated"


class PromptTruncatedWarning(UserWarning):
    """Some prompts are longer than a text encoder takes; the excess tokens are dropped."""


@dataclass(frozen=True)
class TokenLimit:
    """One text encoder's prompt limit."""

    encoder: str  # how the warning names it, e.g. "CLIP-L (tokenizer)"
    limit: int  # tokens it takes, special tokens / template included
    count: Callable[[str], int]  # tokens a prompt becomes on the encode path
    fix: str  # how to keep more of a long prompt


def tokens(tokenizer, text: str) -> int:
    """Tokens ``text`` becomes with ``tokenizer`` (special tokens included, never truncated, and
    without transformers' own "sequence is longer than" log line)."""
    return len(tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])


class _DropDiffusersTruncation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(DIFFUSERS_TRUNCATION)


def _quiet_pipeline(adapter) -> None:
    """Drop diffusers' truncation log lines (one per batch) and transformers' "sequence length is
    longer than the specified maximum" line (the pipeline's untruncated count) for this pipeline."""
    pipeline = getattr(adapter, "pipeline", None)
    if pipeline is None:
        return
    logger = logging.getLogger(type(pipeline).__module__)
    if not any(isinstance(f, _DropDiffusersTruncation) for f in logger.filters):
        logger.addFilter(_DropDiffusersTruncation())
    for attr in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        flags = getattr(getattr(pipeline, attr, None), "deprecation_warnings", None)
        if isinstance(flags, dict):  # transformers warns once per tokenizer, after this flag is set
            flags["sequence-length-is-longer-than-the-specified-maximum"] = True


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def check_prompt_lengths(adapter, prompts: list[str]) -> None:
    """Warn once per ``adapter`` when a prompt exceeds one of its encoders' limits.

    Prompts already checked are remembered (a dataset's prompts repeat every epoch); after the
    warning nothing more is checked: the pipelines truncate silently from then on.
    """
    if getattr(adapter, "_prompt_truncation_warned", False):
        return
    limits: list[TokenLimit] = adapter.prompt_token_limits()
    if not limits:
        return
    _quiet_pipeline(adapter)
    seen: set[str] = adapter.__dict__.setdefault("_prompt_lengths_checked", set())
    fresh = [p for p in dict.fromkeys(prompts) if p not in seen]
    for limit in limits:
        over = [(n, p) for p in fresh if (n := limit.count(p)) > limit.limit]
        if over:
            n, longest = max(over)
            adapter._prompt_truncation_warned = True
            warnings.warn(
                f"{len(over)} of {len(fresh)} new prompts are longer than {limit.encoder} takes ({limit.limit} "
                f"tokens) and are truncated; the longest, {_short(longest)!r}, is {n} tokens. Text past the "
                f"limit does not condition the image. Fix: {limit.fix}. This warning is shown once per model; "
                f"later long prompts are truncated the same way.", PromptTruncatedWarning, stacklevel=3)
            return
    seen.update(fresh)


#: the fix for encoders whose limit is ``model.options.max_sequence_length``
MAX_SEQUENCE_FIX = "shorten the prompts, or raise model.options.max_sequence_length"
#: the fix for CLIP text encoders (a fixed 77-token window)
CLIP_FIX = "CLIP reads at most 77 tokens; shorten the prompts (the T5 encoder reads up to max_sequence_length)"
