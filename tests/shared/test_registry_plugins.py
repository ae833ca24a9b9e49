"""Dotted plugin paths must name a subclass of the registry's base (trainer_type: Algorithm;
model_type: FlowModelAdapter); the error names the base and the fix."""

from __future__ import annotations

import pytest

from shared.models.base import MODELS
from shared.registry import RegistryError
from trainer.algorithms import ALGORITHMS


@pytest.mark.parametrize("registry, base", [(ALGORITHMS, "Algorithm"), (MODELS, "FlowModelAdapter")])
def test_a_plugin_path_must_name_a_subclass(registry, base):
    with pytest.raises(RegistryError, match=f"not a subclass of .*{base}.*Fix: point it at your subclass"):
        registry.get("collections.OrderedDict")
    assert registry.get("trainer.algorithms.nft.NFT" if base == "Algorithm" else "shared.models.sd3.SD3Adapter")
