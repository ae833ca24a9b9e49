"""``flowrl eval CONFIG --checkpoint DIR``: rebuild the model, load the checkpoint, run eval.
``flowrl eval CONFIG --base``: the same evaluation of the untrained model (what training's base
evaluation measures), so a before/after pair can be measured outside a training run."""

from __future__ import annotations

import logging
from pathlib import Path

from shared.config import Config
from shared.models import load_adapter
from trainer import context_parallel
from trainer.checkpoint import checkpoint_epoch, load_checkpoint_weights
from trainer.data import check_condition_images, check_reward_rows, eval_subset, load_dataset
from trainer.evaluate import evaluate
from trainer.loop import check_media_geometry, make_accelerator
from shared.rewards.multi import build_rewards
from trainer.policy import Policy, attach_trainable
from shared.models.warm_start import warm_start

log = logging.getLogger("flowrl.trainer")


def eval_checkpoint(cfg: Config, checkpoint: str | Path | None) -> dict:
    """Evaluate ``checkpoint`` (``None``: the untrained model); eval grids go to
    ``<checkpoint>/eval`` (``None``: ``<output_dir>/<run_name>/base_eval``)."""
    accelerator = make_accelerator(cfg)
    if accelerator.num_processes % cfg.train.context_parallel:  # e.g. one process: each video whole, the same numbers
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"context_parallel": 1})})
    train_rows, test_rows = load_dataset(cfg.data)
    rows = eval_subset(test_rows or train_rows, cfg.eval.num_prompts)
    section, specs = cfg.evaluation_rewards()
    check_reward_rows(specs, rows, section)
    adapter = load_adapter(cfg.model, device=accelerator.device, seed=cfg.train.seed)
    check_media_geometry(cfg, adapter)
    context_parallel.check(cfg, adapter, accelerator.num_processes)
    check_condition_images(rows, adapter.model_type, adapter.condition_images)
    warm_start(cfg.model, adapter, "before")  # model.init_from: the run's base, as the trainer built it
    trainable = attach_trainable(adapter, cfg)
    warm_start(cfg.model, adapter, "after")
    # train.mixed_precision as training runs its evaluation (the forward under autocast; rewards in float32)
    accelerator.prepare_model(adapter.transformer, device_placement=False, evaluation_mode=True)
    policy = Policy(adapter, adapter.transformer, cfg, trainable)
    context_parallel.enable(cfg, [adapter.transformer, *policy.frozen_copies()], accelerator.device.type)
    epoch = 0
    if checkpoint is None:
        out_dir = Path(cfg.output_dir) / (cfg.run_name or "") / "base_eval"
    else:
        checkpoint = Path(checkpoint)
        load_checkpoint_weights(checkpoint, cfg, adapter, policy)
        if policy.ema is not None and not (checkpoint / "ema.safetensors").is_file():
            # a run without EMA (train.ema_decay: 0): the EMA would be the untrained weights
            log.warning("%s holds no EMA weights (its run had train.ema_decay 0): evaluating its weights", checkpoint)
            policy.ema = None
        epoch = checkpoint_epoch(checkpoint)
        out_dir = checkpoint / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = evaluate(cfg, accelerator, adapter, policy, build_rewards(specs, accelerator.device),
                      specs, rows, out_dir, epoch=epoch)
    result["grid"] = str(out_dir / result["grid"]) if result.get("grid") else None
    for video in result.get("videos", []):
        video["path"] = str(out_dir / video["path"])
    return result
