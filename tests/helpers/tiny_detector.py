"""A tiny random-weight Mask2Former instance-segmentation checkpoint for ``geneval`` tests (no
hub access): :func:`save_tiny_detector` writes the model and its image processor to one folder that
``from_pretrained`` reads, labelled with :data:`LABELS`. A forward pass on a CPU takes milliseconds."""

from __future__ import annotations

from pathlib import Path

import torch

LABELS = ["person", "bench", "dog", "cat", "mouse"]


def save_tiny_detector(directory: str | Path, seed: int = 0) -> Path:
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    try:  # transformers 5: the PIL backend needs no torchvision
        from transformers import Mask2FormerImageProcessorPil as Processor
    except ImportError:  # transformers 4
        from transformers import Mask2FormerImageProcessor as Processor
    directory = Path(directory)
    # 64 px inputs: the backbone's last stage is then 2x2 (GroupNorm needs more than one value)
    swin = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4, image_size=64,
                      out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=swin, hidden_dim=32, mask_feature_size=32, feature_size=32,
                               num_queries=8, decoder_layers=2, encoder_layers=1, encoder_feedforward_dim=64,
                               dim_feedforward=64, num_attention_heads=2, num_labels=len(LABELS),
                               id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    torch.manual_seed(seed)
    Mask2FormerForUniversalSegmentation(config).save_pretrained(directory)
    Processor(size={"height": 64, "width": 64}).save_pretrained(directory)
    return directory


def geneval_rows(n: int) -> list[dict]:
    """``n`` GenEval metadata rows over :data:`LABELS`, alternating two tags."""
    rows = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}]},
            {"tag": "counting", "include": [{"class": "bench", "count": 2}], "exclude": [{"class": "bench", "count": 3}]}]
    return [rows[i % 2] for i in range(n)]
