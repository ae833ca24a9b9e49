"""Counting reads of tensor values back to the host: each is a device sync on a GPU, which the
hot loops (rollout steps, training units) must not do. Tests arm the counter around the code
under test; on the CPU the count is the same as it would be on a GPU."""

from __future__ import annotations

import traceback

import torch


class HostReads:
    """Counts reads of tensor values back to the host (``bool``, ``item``, ``tolist``, ...: each a
    device sync on a GPU) while ``armed``."""

    NAMES = ("__bool__", "item", "tolist", "__int__", "__float__", "cpu", "numpy")

    def __init__(self, monkeypatch):
        self.armed, self.where = False, []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(t, *args, _name=name, _original=original, **kwargs):
                if self.armed:
                    frame = traceback.extract_stack()[-2]
                    self.where.append(f"{_name} at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}")
                return _original(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)
