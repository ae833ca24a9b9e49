"""Exponential moving average (EMA) of the trainable weights, and its decay schedules.

The update is ``shadow <- d(k) * shadow + (1 - d(k)) * param`` for every trainable tensor,
where ``k`` is the caller's step counter (the trainer decides what a step is: an optimizer
step or an outer epoch) and ``d(k)`` comes from :func:`ema_decay`.

Conventions:
    * The shadow copy is always float32, whatever the parameters' dtype (bf16 weights would
      lose the small ``(1 - d) * param`` increments otherwise).
    * Only the tensors handed in are tracked: pass the trainable ones (e.g. the LoRA weights),
      keyed by their ``named_parameters()`` names.
    * The shadow lives on ``device`` (``"cpu"`` to save accelerator memory, or ``None`` to
      keep each tensor on its parameter's device).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch

from shared.config import parse_snapshot_decay

SCHEDULES = ("constant", "power", "linear", "piecewise_linear", "cosine", "warmup_cosine")

NamedTensors = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def _cosine_ramp(start: float, end: float, progress: float) -> float:
    """Half-cosine interpolation from ``start`` (progress 0) to ``end`` (progress >= 1)."""
    p = min(max(progress, 0.0), 1.0)
    return start + (end - start) * (1.0 - math.cos(math.pi * p)) / 2.0


def ema_decay(
    step: int,
    schedule: str,
    decay: float,
    *,
    initial_decay: float = 0.0,
    warmup_steps: int = 10,
    total_steps: int = 1000,
    flat_steps: int = 0,
    ramp_rate: float = 0.001,
) -> float:
    """The EMA decay ``d(k)`` to use at step ``k = step`` (k >= 0).

    With ``d = decay``, ``d0 = initial_decay``, ``W = warmup_steps``, ``T = total_steps``:

    * ``constant``:         ``d``
    * ``power``:            ``min(d, (1 + k) / (W + k))``
    * ``linear``:           ``d0 + (d - d0) * min(k / W, 1)``
    * ``piecewise_linear``: ``0`` if ``k < flat_steps`` else ``min((k - flat_steps) * ramp_rate, d)``
    * ``cosine``:           ``d0 + (d - d0) * (1 - cos(pi * min(k / T, 1))) / 2``
    * ``warmup_cosine``:    ``d0 * k / W`` for ``k < W``, then the cosine ramp from ``d0`` to
      ``d`` over the remaining ``T - W`` steps.

    A zero-length warmup/ramp (``W <= 0`` or ``T <= 0``, ``T <= W``) counts as already finished.

    Returns:
        The decay as a Python float.

    Raises:
        ValueError: unknown ``schedule`` (the message lists the choices), negative ``step``,
            or ``decay`` outside ``[0, 1]``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown EMA schedule '{schedule}'; choose one of: {', '.join(SCHEDULES)}")
    if step < 0:
        raise ValueError(f"EMA step must be >= 0, got {step}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    k, d, d0, W, T = float(step), float(decay), float(initial_decay), warmup_steps, total_steps

    if schedule == "constant":
        return d
    if schedule == "power":
        return min(d, (1.0 + k) / (W + k)) if W + k > 0 else d
    if schedule == "linear":
        frac = min(k / W, 1.0) if W > 0 else 1.0
        return d0 + (d - d0) * frac
    if schedule == "piecewise_linear":
        if k < flat_steps:
            return 0.0
        return min((k - flat_steps) * ramp_rate, d)
    if schedule == "cosine":
        return _cosine_ramp(d0, d, k / T if T > 0 else 1.0)
    # warmup_cosine
    if W > 0 and k < W:
        return d0 * k / W
    span = T - max(W, 0)
    return _cosine_ramp(d0, d, (k - max(W, 0)) / span if span > 0 else 1.0)


def snapshot_decay(step: int, spec: str) -> float:
    """The blend decay of a policy snapshot (CRD's old and sampling models) at optimizer step ``step``.

    ``spec`` is ``"start_step-start_value-slope-end_value"`` or a preset name
    (:func:`shared.config.parse_snapshot_decay`): ``start_value`` while ``step < start_step``, then
    ``min(start_value + (step - start_step) * slope, end_value)``. With the update
    ``snapshot <- d * snapshot + (1 - d) * param``, ``d = 0`` copies the policy (on-policy) and ``d = 1``
    freezes the snapshot.
    """
    start, v0, slope, end = parse_snapshot_decay(spec)
    if step < start:
        return v0
    return min(v0 + (step - start) * slope, end)


class EMA:
    """A float32 shadow copy of a set of named tensors, updated by exponential averaging.

    Args:
        named_params: ``{name: tensor}`` (or an iterable of ``(name, tensor)`` pairs, e.g.
            ``model.named_parameters()`` filtered to the trainable ones). Shapes are kept.
        device: where the shadow lives; ``None`` keeps each tensor on its parameter's device.

    Typical use::

        ema = EMA({n: p for n, p in model.named_parameters() if p.requires_grad}, device="cpu")
        ...optimizer.step()...
        ema.update(trainable, ema_decay(step, "power", 0.999))
        out = torch.func.functional_call(model, ema.as_params(trainable), args)
    """

    def __init__(self, named_params: NamedTensors, device: str | torch.device | None = None) -> None:
        params = dict(named_params)
        if not params:
            raise ValueError("EMA needs at least one tensor to track (got an empty set of parameters)")
        self.device = None if device is None else torch.device(device)
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().to(device=self._where(p), dtype=torch.float32, copy=True)
            for name, p in params.items()
        }

    def _where(self, p: torch.Tensor) -> torch.device:
        return p.device if self.device is None else self.device

    def _check_names(self, names: Iterable[str], what: str) -> None:
        names = set(names)
        missing = sorted(set(self.shadow) - names)
        extra = sorted(names - set(self.shadow))
        if missing or extra:
            raise KeyError(
                f"{what}: tensor names do not match the EMA's. Missing: {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}; unexpected: {extra[:5]}"
                f"{' ...' if len(extra) > 5 else ''}. Pass the same trainable set the EMA was built from."
            )

    @torch.no_grad()
    def update(self, named_params: NamedTensors, decay: float) -> None:
        """``shadow = decay * shadow + (1 - decay) * param`` for every tracked tensor (no grad).

        ``decay = 0`` copies the parameters; ``decay = 1`` leaves the shadow unchanged.
        """
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        params = dict(named_params)
        self._check_names(params, "EMA.update")
        for name, s in self.shadow.items():
            p = params[name].detach().to(device=s.device, dtype=torch.float32)
            if p.shape != s.shape:
                raise ValueError(f"EMA.update: '{name}' has shape {tuple(p.shape)}, shadow has {tuple(s.shape)}")
            if decay == 0.0:
                s.copy_(p)
            elif decay != 1.0:
                s.mul_(decay).add_(p, alpha=1.0 - decay)

    @torch.no_grad()
    def copy_to(self, named_params: NamedTensors) -> None:
        """Overwrite the given parameters in place with the shadow (cast to their dtype/device)."""
        params = dict(named_params)
        self._check_names(params, "EMA.copy_to")
        for name, s in self.shadow.items():
            params[name].copy_(s)  # copy_ casts dtype and moves device

    def as_params(self, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The shadow cast to each ``like[name]``'s dtype and device, for ``torch.func.functional_call``.

        Only tracked names are returned; ``like`` may hold more (e.g. frozen weights), which
        ``functional_call`` then takes from the module itself. When dtype and device already
        match, the returned tensor *is* the shadow tensor (no copy): do not modify it in place.

        Raises:
            KeyError: a tracked name is missing from ``like``.
        """
        missing = [n for n in self.shadow if n not in like]
        if missing:
            raise KeyError(f"EMA.as_params: no reference tensor for {missing[:5]}; pass the model's named parameters")
        return {n: s.to(device=like[n].device, dtype=like[n].dtype) for n, s in self.shadow.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{name: float32 tensor}`` (copies, safe to save)."""
        return {n: s.detach().clone() for n, s in self.shadow.items()}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a :meth:`state_dict` (names and shapes must match); kept float32 on the shadow's device."""
        self._check_names(state, "EMA.load_state_dict")
        for name, s in self.shadow.items():
            t = state[name]
            if t.shape != s.shape:
                raise ValueError(f"EMA.load_state_dict: '{name}' has shape {tuple(t.shape)}, expected {tuple(s.shape)}")
            s.copy_(t.to(device=s.device, dtype=torch.float32))
