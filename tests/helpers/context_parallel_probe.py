"""Run under ``torch.distributed.run --nproc_per_node 2``: a tiny ``WanTransformer3DModel`` split over the
2 processes by :func:`trainer.context_parallel.enable` against an unsplit copy on each process.
Writes ``probe-rank{r}.json`` to ``argv[1]``: the tokens of the input and those the first block sees
here, the largest difference of the output from the copy's, and of the gradient summed over the
processes (and of this process's alone) from the copy's gradient."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from diffusers import WanTransformer3DModel

from trainer import context_parallel


def build() -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = SimpleNamespace(train=SimpleNamespace(context_parallel=2), transport="local")  # all enable() reads
    g = torch.Generator().manual_seed(1)
    x, t, text = torch.randn(1, 4, 3, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 7, 16, generator=g)

    split = build()
    context_parallel.enable(cfg, [split], "cpu")
    seen = {}

    def record(module, args, output):  # inside the first block (diffusers splits within its forward)
        seen["tokens"] = args[0].shape[1]

    split.blocks[0].norm1.register_forward_hook(record)
    y = split(x, t, text, return_dict=False)[0]
    (y ** 2).mean().backward()
    local = flat_grad(split)
    summed = local.clone()
    dist.all_reduce(summed)

    one = build()
    y1 = one(x, t, text, return_dict=False)[0]
    (y1 ** 2).mean().backward()
    ref = flat_grad(one)
    (out / f"probe-rank{rank}.json").write_text(json.dumps({
        "tokens": 3 * 4 * 4, "block_tokens": int(seen["tokens"]),
        "output_vs_one": float((y - y1).abs().max()),
        "grad_sum_vs_one": float((summed - ref).abs().max()),
        "grad_local_vs_one": float((local - ref).abs().max()),
        "grad_scale": float(ref.abs().max())}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
