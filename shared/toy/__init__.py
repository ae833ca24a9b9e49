"""The toy world of a miniature GenEval: procedural scenes with prompts (:mod:`shared.toy.scenes`)
and a programmatic verifier (:mod:`shared.toy.verify`), used to pretrain a tiny text-to-image
model and as the ``toy_geneval`` reward. Images are ``uint8 [H, W, 3]`` RGB."""

from shared.toy.scenes import (
    BACKGROUND,
    CATEGORIES,
    COLORS,
    IMAGE_SIZE,
    RELATIONS,
    SHAPES,
    Obj,
    ObjectSpec,
    PromptSpec,
    Scene,
    all_prompts,
    parse_prompt,
    prompt_text,
    render,
    sample_pair,
    sample_scene,
    split,
    training_pairs,
    write_dataset,
)
from shared.toy.verify import Detection, Verdict, detect, verify

__all__ = [
    "BACKGROUND",
    "CATEGORIES",
    "COLORS",
    "IMAGE_SIZE",
    "RELATIONS",
    "SHAPES",
    "Obj",
    "ObjectSpec",
    "PromptSpec",
    "Scene",
    "all_prompts",
    "parse_prompt",
    "prompt_text",
    "render",
    "sample_pair",
    "sample_scene",
    "split",
    "training_pairs",
    "write_dataset",
    "Detection",
    "Verdict",
    "detect",
    "verify",
]
