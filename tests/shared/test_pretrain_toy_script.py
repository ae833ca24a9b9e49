"""``scripts/pretrain_toy.py`` end to end at a tiny size: a fresh pipeline with custom text
encoders, continued with ``--init``; both records name the text encoders the pipeline has, and
``--init`` with ``--text-width`` is refused. Two steps measure nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--num-images", "64", "--vae-steps", "2", "--dit-batch", "8", "--eval-every", "1000", "--threads", "1"]


def pretrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain_toy.py"), *TINY, *args],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_fresh_run_and_continuation_record_the_text_encoder_sizes(tmp_path):
    work = str(tmp_path / "work")
    first = pretrain("--out", str(tmp_path / "a"), "--workdir", work, "--dit-steps", "2",
                     "--text-width", "96", "--text-layers", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    record = json.loads((tmp_path / "a" / "pretrain.json").read_text())
    assert record["args"]["text_width"] == 96 and record["args"]["text_layers"] == 3
    assert record["stopped_at_step"] == 2 and record["init"] is None
    config = json.loads((tmp_path / "a" / "text_encoder" / "config.json").read_text())
    assert config["hidden_size"] == 96 and config["num_hidden_layers"] == 3

    again = pretrain("--init", str(tmp_path / "a"), "--out", str(tmp_path / "b"), "--workdir", work,
                     "--dit-steps", "1")
    assert again.returncode == 0, again.stderr[-3000:]
    record = json.loads((tmp_path / "b" / "pretrain.json").read_text())
    assert record["args"]["text_width"] == 96 and record["args"]["text_layers"] == 3  # not the flags' defaults
    assert record["init"]["args"]["text_width"] == 96 and record["stopped_at_step"] == 1

    refused = pretrain("--init", str(tmp_path / "a"), "--out", str(tmp_path / "c"), "--workdir", work,
                       "--dit-steps", "1", "--text-width", "128")
    assert refused.returncode != 0 and "--init continues one" in refused.stderr


def test_noise_levels_default_to_the_logit_normal_stream_and_shift_with_the_mean():
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("pretrain_toy", ROOT / "scripts" / "pretrain_toy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plain = torch.sigmoid(torch.randn(4096, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(module.noise_levels(4096, torch.Generator().manual_seed(3)), plain)
    shifted = module.noise_levels(4096, torch.Generator().manual_seed(3), mean=1.0, std=0.5)
    assert abs(shifted.median().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 0.02
    assert shifted.min() > 0 and shifted.max() < 1
    assert (shifted > 0.8).float().mean() > 2 * (plain > 0.8).float().mean()  # the noisier levels, more often
