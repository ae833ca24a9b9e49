"""Run under ``torchrun --nproc_per_node 2``: checks :mod:`trainer.sharding`'s pieces against an
unsharded copy of the tiny transformer (full fine-tune, every parameter trainable) and writes
``{out}/probe-rank{r}.json`` for ``tests/trainer/test_fsdp.py`` to assert on.

Measured: the sharded forward equals the unsharded one; a :class:`SwapView` with perturbed
weights (pieces) equals ``ParamView`` of the unsharded copy with the whole perturbed weights, even
right after a no-grad forward left the root's parameters gathered; the live weights come back
afterwards; ``gather_like`` / ``piece_like`` round-trip; each process holds about half the bytes.
Both with ``reshard_after_forward`` true and false (where every block stays gathered after a
no-grad forward, so a swap must drop the gathered copies to be seen)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from shared.config import ModelConfig
from shared.models import ParamView, load_adapter
from trainer.sharding import (SwapView, gather, gather_like, local, model_class, param_bytes, piece_like,
                              shard_transformer)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    results = [probe(reshard) for reshard in (True, False)]
    (out / f"probe-rank{dist.get_rank()}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def probe(reshard_after_forward: bool) -> dict:
    rank = dist.get_rank()
    torch.manual_seed(0)
    adapter = load_adapter(ModelConfig(model_type="tiny"), device=torch.device("cpu"), seed=0)
    adapter.transformer.requires_grad_(True)
    plain = copy.deepcopy(adapter.transformer)
    whole_bytes = param_bytes(plain)
    blocks = shard_transformer(adapter.transformer, reshard_after_forward=reshard_after_forward)
    sharded = adapter.transformer
    bytes_here = param_bytes(sharded)
    params = dict(sharded.named_parameters())

    g = torch.Generator().manual_seed(1)  # the same draws on every process
    x = torch.randn(3, 3, 16, 16, generator=g)
    sigma = torch.tensor([0.9, 0.5, 0.2])
    cond = adapter.encode_prompts(["a red circle", "a blue square", "a green circle"], cfg=False)
    perturbed = {n: p.detach() + 0.05 * torch.randn(p.shape, generator=g) for n, p in plain.named_parameters()}
    pieces = {n: piece_like(v, params[n]).clone() for n, v in perturbed.items()}

    def v(module):
        with torch.no_grad():
            return adapter.velocity(x, sigma, cond, 1.0, transformer=module)

    live_plain = v(plain)
    live_sharded = v(sharded)  # leaves the root's own parameters gathered (no backward follows)
    swapped = v(SwapView(sharded, params, pieces))
    reference = v(ParamView(plain, perturbed))
    after = v(sharded)
    round_trip = max(float((gather_like(pieces[n], params[n]) - perturbed[n]).abs().max()) for n in perturbed)
    plain_params = dict(plain.named_parameters())
    live_gathered = max(float((gather(p.detach()) - plain_params[n].detach()).abs().max())
                        for n, p in params.items())
    result = {
        "rank": rank, "reshard_after_forward": reshard_after_forward, "blocks": blocks, "class": model_class(sharded).__name__,
        "sharded_vs_plain": float((live_sharded - live_plain).abs().max()),
        "swap_vs_paramview": float((swapped - reference).abs().max()),
        "swap_vs_live": float((swapped - live_plain).abs().max()),
        "restored_vs_live": float((after - live_plain).abs().max()),
        "gather_like_round_trip": round_trip, "gathered_live_vs_plain": live_gathered,
        "bytes_here": bytes_here, "bytes_whole": whole_bytes,
        "pieces_numel": sum(local(p).numel() for p in params.values()),
    }
    try:
        SwapView(sharded, params, pieces)(x)
        result["swap_with_grad"] = "no error"
    except RuntimeError as e:
        result["swap_with_grad"] = str(e)
    return result


if __name__ == "__main__":
    main(Path(sys.argv[1]))
