"""The trainer's embedding warm-up (``model.offload_text_encoders``): every train and eval prompt
is encoded before the first rollout, then the text encoders leave the accelerator
(:mod:`shared.embedding_cache`)."""

from __future__ import annotations

import time

from shared.config import Config
from shared.embedding_cache import cache_of, offload_encoders, warm_up


def offload_mode(cfg: Config) -> str | None:
    """``model.offload_text_encoders`` as ``None``, ``"cpu"`` or ``"drop"``."""
    value = cfg.model.offload_text_encoders
    return "cpu" if value is True else (None if value is False else value)


def warm_embeddings(cfg: Config, adapter, train_rows: list, eval_rows: list) -> dict[str, float]:
    """With ``model.offload_text_encoders``: encode every train row with the ``train.*`` settings
    and every eval row with the ``eval.*`` ones (guidance scale, resolution and frames, as rollouts
    and evaluation encode them), then offload the encoders. Returns what it did (empty without
    offloading): ``encoded`` keys, ``seconds``, and the cache's counters.

    Raises:
        shared.embedding_cache.CacheTooSmall: the embeddings do not fit ``embedding_cache_mb`` and
            there is no ``embedding_cache_dir``.
    """
    mode = offload_mode(cfg)
    if mode is None:
        return {}
    t0 = time.perf_counter()
    from trainer.evaluate import eval_settings

    t, e = cfg.train, cfg.eval
    encoded = 0
    by_settings: dict = {}  # eval rows by their source's settings (data.datasets[].eval overrides)
    for row in eval_rows or []:
        st = eval_settings(cfg, row.dataset)
        by_settings.setdefault((st.guidance_scale, st.resolution), []).append(row)
    for rows, guidance, resolution, frames, batch in (
            [(train_rows, t.encode_guidance_scale, t.resolution, t.num_frames, t.per_device_batch_size)]
            + [(rows, g, res, e.num_frames, e.per_device_batch_size) for (g, res), rows in by_settings.items()]):
        if not rows:
            continue
        images = [r.images for r in rows] if any(r.images for r in rows) else None
        encoded += warm_up(adapter, [r.prompt for r in rows], [r.negative_prompt for r in rows], guidance,
                           images=images, resolution=resolution, num_frames=frames, batch_size=batch)
    offload_encoders(adapter, mode)
    return {"encoded": encoded, "seconds": time.perf_counter() - t0, **cache_of(adapter).stats()}
