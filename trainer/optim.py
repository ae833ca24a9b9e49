"""The policy's optimizer: ``train.optimizer: adamw`` (the default) or ``muon``.

``muon`` is :class:`torch.optim.Muon` (momentum SGD whose update is orthogonalized by
Newton-Schulz iterations, Jordan et al. 2024) on the 2-D trainable matrices -- all of a LoRA's
factors, a full fine-tune's hidden linear weights -- and AdamW on the rest: biases, norms,
convolution kernels, and the matrices whose name has one of ``train.muon_exclude``'s parts
(embedders, the output projection, modulation tables: the Muon authors keep a network's input and
output layers on AdamW). Both take ``adam_weight_decay``; Muon ``train.learning_rate``, AdamW
``muon_adamw_learning_rate`` (default: the same) and its ``adam_betas`` / ``adam_epsilon``.
With ``muon_adjust_lr_fn: match_rms_adamw`` (the default) Muon scales each matrix's step by
``0.2 sqrt(max(A, B))`` so that its RMS matches AdamW's, and an AdamW learning rate carries over
(Moonshot's "Muon is Scalable"); ``original`` is Keller Jordan's ``sqrt(max(1, A / B))``, with
Muon's own, larger learning rates (0.02).

:class:`MuonWithAdamW` presents the two as one ``torch.optim.Optimizer`` (its ``param_groups`` are
theirs, so LR schedules, gradient clipping and checkpoints see one optimizer; its ``state_dict``
has the standard layout, Muon's parameters numbered first).
"""

from __future__ import annotations

from typing import Any

import torch


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on the 2-D parameters of ``params``, AdamW on the others (module docstring).

    Args:
        params: the trainable tensors (any order), or ``(name, tensor)`` pairs (then a matrix whose
            name contains one of ``exclude`` goes to AdamW).
        lr: Muon's learning rate; ``adamw_lr`` AdamW's (None: ``lr``).
        weight_decay: both optimizers'.
        betas, eps: AdamW's.
        momentum, nesterov, ns_steps, adjust_lr_fn: Muon's.
    """

    def __init__(self, params, *, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 adjust_lr_fn: str = "match_rms_adamw", adamw_lr: float | None = None,
                 exclude: tuple[str, ...] = ()) -> None:
        named = [p if isinstance(p, tuple) else ("", p) for p in params]
        muon = lambda name, p: p.ndim == 2 and not any(part in name for part in exclude)  # noqa: E731
        matrices = [p for name, p in named if muon(name, p)]
        others = [p for name, p in named if not muon(name, p)]
        self.parts: list[torch.optim.Optimizer] = []
        if matrices:
            self.parts.append(torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                               nesterov=nesterov, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn))
        if others:
            self.parts.append(torch.optim.AdamW(others, lr=lr if adamw_lr is None else adamw_lr, betas=betas,
                                                eps=eps, weight_decay=weight_decay))
        super().__init__([p for _, p in named], {"lr": lr})
        self.param_groups = [g for part in self.parts for g in part.param_groups]  # the parts' own dicts
        self._built = True

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_built", False):
            raise NotImplementedError("MuonWithAdamW takes its parameters when it is made; build a new one instead "
                                      "of adding a parameter group")
        super().add_param_group(param_group)

    def __getstate__(self):
        raise TypeError("MuonWithAdamW is not copied or pickled (its two parts would be lost); save its "
                        "state_dict() instead")

    @property
    def state(self) -> dict:  # type: ignore[override]
        """Per-parameter state of both parts (read-only view)."""
        merged: dict = {}
        for part in getattr(self, "parts", []):
            merged.update(part.state)
        return merged

    @state.setter
    def state(self, value) -> None:  # Optimizer.__init__ assigns an empty one; the parts keep theirs
        pass

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The standard layout over both parts: parameters numbered part by part, groups in order."""
        state, groups, offset = {}, [], 0
        for part in self.parts:
            sd = part.state_dict()
            for index, entries in sd["state"].items():
                state[index + offset] = entries
            for group in sd["param_groups"]:
                groups.append({**group, "params": [i + offset for i in group["params"]]})
            offset += sum(len(g["params"]) for g in part.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"optimizer state has {len(groups)} parameter groups, this optimizer {len(self.param_groups)} "
                             f"(Muon's and AdamW's): it was saved by another optimizer (train.optimizer) or model. Fix: "
                             f"resume with the train.optimizer the checkpoint was trained with.")
        offset, g = 0, 0
        for part in self.parts:
            n = sum(len(x["params"]) for x in part.param_groups)
            mine = groups[g:g + len(part.param_groups)]
            part.load_state_dict({
                "state": {int(i) - offset: v for i, v in state_dict["state"].items() if offset <= int(i) < offset + n},
                "param_groups": [{**x, "params": [i - offset for i in x["params"]]} for x in mine]})
            offset, g = offset + n, g + len(part.param_groups)
        self.param_groups = [x for part in self.parts for x in part.param_groups]


def build(cfg, params) -> torch.optim.Optimizer:
    """The optimizer ``cfg.train`` asks for over ``params`` (tensors or ``(name, tensor)`` pairs)."""
    t = cfg.train
    if t.optimizer == "muon":
        return MuonWithAdamW(params, lr=t.learning_rate, weight_decay=t.adam_weight_decay, betas=t.adam_betas,
                             eps=t.adam_epsilon, momentum=t.muon_momentum, nesterov=t.muon_nesterov,
                             ns_steps=t.muon_ns_steps, adjust_lr_fn=t.muon_adjust_lr_fn,
                             adamw_lr=t.muon_adamw_learning_rate, exclude=tuple(t.muon_exclude))
    tensors = [p[1] if isinstance(p, tuple) else p for p in params]
    return torch.optim.AdamW(tensors, lr=t.learning_rate, betas=t.adam_betas, weight_decay=t.adam_weight_decay,
                             eps=t.adam_epsilon)
