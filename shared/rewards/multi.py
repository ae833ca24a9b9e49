"""The configured reward set of an experiment: build every ``rewards:`` entry, score with all.

Used by the embedded trainer, its evaluation and the distributed reward worker, so all three
build and apply rewards the same way.
"""

from __future__ import annotations

from typing import Any

import torch

from shared.rewards.base import RewardModel, RewardOutputError, build_reward, score_all


def resolve_device(device: str, default: str | torch.device) -> str:
    """``"auto"`` -> ``default`` (the process's device); anything else as given."""
    return str(default) if device == "auto" else device


def build_rewards(specs, device: str | torch.device,
                  built: dict[str, RewardModel] | None = None) -> dict[str, RewardModel]:
    """``{label: model}`` for a list of ``RewardSpec`` (``device: auto`` -> ``device``).

    ``built``: models already built, by :func:`reward_identity`; an entry with the same reward,
    dtype, device and options gets that model instead of a second copy (so ``rewards`` and
    ``eval_rewards`` naming the same PickScore load it once), and new ones are added to it."""
    built = {} if built is None else built
    out = {}
    for s in specs:
        dev = resolve_device(s.device, device)
        key = reward_identity(s, dev)
        if key not in built:
            built[key] = build_reward(s.reward_model, device=dev, dtype=s.dtype, **s.options)
        out[s.label] = built[key]
    return out


def reward_identity(spec, device: str) -> str:
    """What makes two reward entries the same model: the reward (case-insensitive), dtype,
    device and options; not the label, weight, batch size or routing."""
    import json

    return json.dumps([spec.reward_model.lower(), spec.dtype, str(device), spec.options], sort_keys=True, default=str)


def row_metadata(values: list) -> list[dict]:
    """Per sample its row metadata as a dict: ``values`` holds JSON object texts (``""`` = none)
    or dicts."""
    import json

    return [v if isinstance(v, dict) else json.loads(v) if v else {} for v in values]


def routed(spec, datasets: list[str] | None, n: int) -> list[int] | None:
    """The samples (positions) ``spec`` scores: those whose source (``datasets``, one
    ``data.datasets`` name per sample) is in ``spec.datasets``; None = all ``n`` of them."""
    names = getattr(spec, "datasets", None)
    if not names or not datasets:
        return None
    picks = [i for i, d in enumerate(datasets) if d in names]
    return None if len(picks) == n else picks


def score_specs(rewards: dict[str, RewardModel], specs, images: torch.Tensor, prompts: list[str],
                group_ids: torch.Tensor, sample_ids: list[str] | None = None,
                condition_images=None, first_index: int = 0,
                datasets: list[str] | None = None, metadata: list | None = None) -> dict[str, torch.Tensor]:
    """Score with every configured reward -> ``{label: [N] float32 CPU}`` (NaN = abstain).
    ``condition_images``: per sample its condition images (RGB PIL), or a callable returning
    them, called only when some reward reads them (``RewardModel.condition_images``).
    ``first_index``: the position of ``images[0]`` in the whole batch, when these are a slice of
    it (:class:`shared.rewards.overlap.BackgroundScorer`): errors name positions in the batch.
    ``datasets``: each sample's ``data.datasets`` name; a spec with ``datasets`` scores only the
    samples of those sources (:func:`routed`) and abstains (NaN) on the others.
    ``metadata``: each sample's row metadata, a JSON object text (``""`` = none, what plans and
    queue messages carry) or a dict; parsed only when some reward reads it (``RewardModel.metadata``).

    Raises:
        RewardOutputError: a reward returned inf (or a bad shape); the message names the reward's
            label and the sample: its id (``sample_ids``, the distributed mode's ids) or else its
            position and group id, and its prompt.
    """
    import contextlib

    if callable(condition_images):
        condition_images = condition_images() if any(r.condition_images for r in rewards.values()) else None
    # each reward in its own dtype (spec.dtype; geneval's detector in float32), as evaluation and the reward
    # workers score: training called this under the rollout's mixed-precision autocast, so its matmuls ran
    # in bf16 whatever the reward's dtype said (scores moved by ~0.01 on a tiny PickScore)
    no_autocast = contextlib.ExitStack()
    for device_type in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device_type):
            no_autocast.enter_context(torch.autocast(device_type, enabled=False))
    with no_autocast:
        return _score_specs(rewards, specs, images, prompts, group_ids, sample_ids, condition_images,
                            first_index, datasets, metadata)


def _score_specs(rewards, specs, images, prompts, group_ids, sample_ids, condition_images, first_index,
                 datasets, metadata) -> dict[str, torch.Tensor]:
    out = {}
    metadata = row_metadata(metadata) if metadata and any(r.metadata for r in rewards.values()) else None
    for spec in specs:
        picks = routed(spec, datasets, len(prompts))
        if picks is not None and not picks:
            out[spec.label] = torch.full((len(prompts),), float("nan"))
            continue
        sub = (lambda xs: xs) if picks is None else (lambda xs: [xs[i] for i in picks])  # noqa: E731
        try:
            values = score_all(rewards[spec.label], images if picks is None else images[picks], sub(prompts),
                               group_ids if picks is None else group_ids[picks], spec.batch_size,
                               None if condition_images is None else sub(condition_images),
                               None if metadata is None else sub(metadata)).float().cpu()
        except RewardOutputError as e:
            if e.index is None:
                raise RewardOutputError(f"rewards['{spec.label}'] ({spec.reward_model}): {e}") from None
            at = e.index if picks is None else picks[e.index]
            who = (f"sample id '{sample_ids[at]}'" if sample_ids is not None
                   else f"sample {first_index + at} of the batch (group {int(group_ids[at])})")
            raise RewardOutputError(
                f"rewards['{spec.label}'] ({spec.reward_model}) gave an invalid reward to {who}, prompt "
                f"{prompts[at]!r}: {e}. Fix the reward model (e.g. clamp its output), or return NaN "
                f"for samples it should abstain on", index=first_index + at) from None
        if picks is not None:
            values = torch.full((len(prompts),), float("nan")).index_copy_(0, torch.tensor(picks), values)
        out[spec.label] = values
    return out


def spec_dicts(specs) -> list[dict[str, Any]]:
    """Reward specs as plain JSON dicts (what travels in queue messages)."""
    return [s.model_dump(mode="json") for s in specs]
