"""Activation offloading, ``model.activation_offload``: the tensors a training forward saves for its
backward wait in page-locked host memory instead of on the GPU, and come back when backward needs
them (PyTorch's saved-tensor hooks, as ``torch.autograd.graph.save_on_cpu``, without moving weights).

With ``model.gradient_checkpointing`` a block saves only its input, so the GPU holds about one block's
activations (its recomputation) plus the inputs of the others in host memory; without it, every
activation of the forward goes to the host. What stays: tensors already on the CPU, weights
(:func:`is_weight`: parameters, their views and autocast's copies, frozen leaves; they would otherwise
cross the bus at every call), and tensors under ``min_bytes`` (scales, masks, timesteps: not worth a
copy).
"""

from __future__ import annotations

import torch
from torch.autograd.graph import saved_tensors_hooks

#: smaller saved tensors stay where they are
MIN_BYTES = 1 << 16


def is_weight(t: torch.Tensor) -> bool:
    """Whether saved tensor ``t`` is (a view of) a weight rather than an activation: a parameter, a
    leaf outside autograd (a frozen weight or its cast, input data), or autocast's copy of a trained
    parameter (``ToCopyBackward0`` straight from the parameter's ``AccumulateGrad``)."""
    base = t._base if t._base is not None else t
    if isinstance(base, torch.nn.Parameter):
        return True
    fn = base.grad_fn
    if fn is None:
        return not base.requires_grad
    return type(fn).__name__ == "ToCopyBackward0" and any(
        f is not None and type(f).__name__ == "AccumulateGrad" for f, _ in fn.next_functions)


class OffloadActivations(saved_tensors_hooks):
    """Context manager: tensors saved for backward inside it go to host memory (``counts``: how many
    went, and their bytes, since it was made).

    Args:
        min_bytes: tensors smaller than this stay on their device.
        include_cpu: also copy tensors that are already on the CPU (only to test the round trip on a
            machine without a GPU; a copy there saves nothing).
    """

    def __init__(self, min_bytes: int = MIN_BYTES, include_cpu: bool = False) -> None:
        self.counts = {"tensors": 0, "bytes": 0}

        def pack(t: torch.Tensor):
            size = t.numel() * t.element_size()
            if (size < min_bytes or (t.device.type == "cpu" and not include_cpu) or t.layout != torch.strided
                    or is_weight(t)):
                return t
            pin = t.device.type != "cpu" and torch.cuda.is_available()
            host = torch.empty(t.size(), dtype=t.dtype, pin_memory=pin)  # (contiguous: the values, not the strides)
            host.copy_(t, non_blocking=pin)  # on t's stream, so before any later use of t's memory
            self.counts["tensors"] += 1
            self.counts["bytes"] += size
            return (t.device, host)

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            device, host = packed
            return host.to(device, non_blocking=host.is_pinned())

        super().__init__(pack, unpack)
