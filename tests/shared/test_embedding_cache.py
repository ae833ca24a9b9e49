"""The embedding cache (:mod:`shared.embedding_cache`): prompt / condition embeddings are encoded
once per distinct key and model fingerprint, reused from memory or disk bit for bit, never reused
for a changed model, and with ``model.offload_text_encoders`` the trainer encodes everything up
front and then runs no text-encoder forward at all (the encoders are made to raise) while training
exactly as without a cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from shared.embedding_cache import CacheTooSmall, cache_of, fingerprint_parts, model_fingerprint, warm_up
from shared.models import Conditioning
from shared.sampling import encode, encode_batches
from tests.helpers.pipeline_tests import load_tiny
from tests.helpers.tiny_pipelines import NEGATIVE, PROMPTS, TINY_PIPELINES, tiny_train_config

#: text-only with CFG and three encoders; padded-to-the-batch VL prompts; one condition image;
#: image-to-video (condition image + frames)
FAMILIES = ["sd3-5", "qwen-image", "flux1-kontext", "wan2_i2v"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipes")
    return {name: TINY_PIPELINES[name].save(root / name.replace("-", "_")) for name in FAMILIES}


def batch(spec, n: int = 4):
    """``n`` samples with repeats (groups), as rollouts see them: prompts, negatives, images."""
    prompts = [PROMPTS[i % 2] for i in range(n)]  # a, b, a, b
    images = None
    if spec.condition_images:
        rows = spec.encode_kwargs(2)["images"]
        images = [rows[i % 2] for i in range(n)]
    return prompts, [NEGATIVE] * n, images


def run(adapter, spec, n: int = 4, guidance: float = 3.0) -> Conditioning:
    prompts, negatives, images = batch(spec, n)
    return encode(adapter, prompts, negatives, guidance, images=images, resolution=spec.resolution)


def assert_identical(a: Conditioning, b: Conditioning) -> None:
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        assert a.tensors[k].dtype == b.tensors[k].dtype and torch.equal(a.tensors[k], b.tensors[k]), k
    assert (a.negative is None) == (b.negative is None)
    for k in a.negative or {}:
        assert torch.equal(a.negative[k], b.negative[k]), f"negative {k}"


def count_encodes(adapter) -> list[int]:
    """Patch ``adapter.encode_prompts`` to record each call's batch size."""
    calls: list[int] = []
    original = adapter.encode_prompts

    def counting(prompts, **kw):
        calls.append(len(prompts))
        return original(prompts, **kw)

    adapter.encode_prompts = counting
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_bit_identical_with_and_without_the_cache_from_memory_and_disk(family, folders, tmp_path):
    spec, folder = TINY_PIPELINES[family], folders[family]
    plain = load_tiny(spec, folder, embedding_cache_mb=0)  # nothing kept
    reference = run(plain, spec)
    assert not cache_of(plain).keeps and len(cache_of(plain)) == 0

    memory = load_tiny(spec, folder)  # the default in-memory LRU
    calls = count_encodes(memory)
    first = run(memory, spec)
    assert calls == [1, 1], "each distinct sample is encoded once, alone"
    again = run(memory, spec)
    assert calls == [1, 1], "a second epoch encoded again"
    for cond in (first, again):
        assert_identical(cond, reference)
    # the trainer's re-encoding in the Celery transport: other micro-batches, the same rows, no encoder
    prompts, negatives, images = batch(spec, 6)
    regrouped = encode_batches(memory, prompts, negatives, 3.0, 5, images=images, resolution=spec.resolution)
    assert calls == [1, 1]
    assert_identical(regrouped.select(torch.arange(4)), reference)

    disk = tmp_path / "embeddings"
    writer = load_tiny(spec, folder, embedding_cache_dir=str(disk))
    assert_identical(run(writer, spec), reference)
    files = sorted(disk.rglob("*.safetensors"))
    assert len(files) == 2 and (files[0].parent.parent / "model.json").is_file()
    reader = load_tiny(spec, folder, embedding_cache_dir=str(disk), embedding_cache_mb=0)  # a new process
    calls = count_encodes(reader)
    assert_identical(run(reader, spec), reference)
    assert calls == [] and cache_of(reader).disk_hits == 2


def test_a_sample_does_not_depend_on_its_batch_mates(folders):
    spec = TINY_PIPELINES["qwen-image"]  # prompts padded to the longest in a batch by the pipeline
    adapter = load_tiny(spec, folders["qwen-image"], embedding_cache_mb=0)
    alone = encode(adapter, [PROMPTS[2]], [None], 1.0)
    mixed = encode(adapter, [PROMPTS[3], PROMPTS[2], PROMPTS[0]], [None] * 3, 1.0)
    assert_identical(mixed.select(torch.tensor([1])), alone)


def test_keys_include_the_settings_and_the_condition_images(folders):
    spec = TINY_PIPELINES["flux1-kontext"]
    adapter = load_tiny(spec, folders["flux1-kontext"])
    calls = count_encodes(adapter)
    rows = spec.encode_kwargs(2)["images"]
    encode(adapter, PROMPTS[:1], [None], 1.0, images=rows[:1], resolution=spec.resolution)
    encode(adapter, PROMPTS[:1], [None], 1.0, images=rows[1:], resolution=spec.resolution)  # other image
    encode(adapter, PROMPTS[:1], [None], 1.0, images=rows[:1], resolution=(48, 48))  # other resolution
    assert calls == [1, 1, 1]
    sd3 = load_tiny(TINY_PIPELINES["sd3-5"], folders["sd3-5"])
    calls = count_encodes(sd3)
    encode(sd3, PROMPTS[:1], [NEGATIVE], 3.0)
    encode(sd3, PROMPTS[:1], ["other negative"], 3.0)  # another negative prompt
    encode(sd3, PROMPTS[:1], [NEGATIVE], 1.0)  # no CFG
    encode(sd3, PROMPTS[:1], ["ignored without CFG"], 1.0)  # the negative does not matter then
    assert calls == [1, 1, 1]


def test_a_changed_model_never_reuses_embeddings(folders, tmp_path):
    import shutil

    spec = TINY_PIPELINES["sd3-5"]
    folder = tmp_path / "pipe"
    shutil.copytree(folders["sd3-5"], folder)
    disk = str(tmp_path / "embeddings")
    base = load_tiny(spec, folder, embedding_cache_dir=disk)
    run(base, spec)
    fp = model_fingerprint(base)
    # another option that changes the encoding, another dtype: other fingerprints
    other = load_tiny(spec, folder, embedding_cache_dir=disk, options={"max_sequence_length": 8})
    assert model_fingerprint(other) != fp
    calls = count_encodes(other)
    run(other, spec)
    assert calls and cache_of(other).disk_hits == 0
    # a re-saved text encoder (same path) changes it; a trained transformer does not
    weights = next((folder / "text_encoder").glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert model_fingerprint(load_tiny(spec, folder, embedding_cache_dir=disk)) != fp
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns - 10**9))
    for f in (folder / "transformer").glob("*"):
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert model_fingerprint(load_tiny(spec, folder, embedding_cache_dir=disk)) == fp
    info = json.loads(next(Path(disk).rglob("model.json")).read_text())
    assert info["source"]["path"] == str(folder) and info["model_type"] == "sd3-5"


def test_an_in_memory_model_is_fingerprinted_by_its_weights():
    from shared.models.sd3 import SD3Adapter
    from tests.helpers.tiny_pipelines import build_sd3

    a = SD3Adapter.from_pipeline(build_sd3(0))
    b = SD3Adapter.from_pipeline(build_sd3(1))
    assert "weights_sha256" in fingerprint_parts(a)
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(a) == model_fingerprint(SD3Adapter.from_pipeline(build_sd3(0)))


def test_a_damaged_or_foreign_file_is_encoded_again(folders, tmp_path):
    spec = TINY_PIPELINES["sd3-5"]
    disk = tmp_path / "embeddings"
    reference = run(load_tiny(spec, folders["sd3-5"], embedding_cache_dir=str(disk)), spec)
    files = sorted(disk.rglob("*.safetensors"))
    files[0].write_bytes(b"not a safetensors file")
    adapter = load_tiny(spec, folders["sd3-5"], embedding_cache_dir=str(disk), embedding_cache_mb=0)
    calls = count_encodes(adapter)
    with pytest.warns(UserWarning, match="unreadable"):
        assert_identical(run(adapter, spec), reference)
    assert calls == [1] and cache_of(adapter).disk_hits == 1


def test_warm_up_that_does_not_fit_names_the_fix(folders):
    spec = TINY_PIPELINES["sd3-5"]
    adapter = load_tiny(spec, folders["sd3-5"], embedding_cache_mb=0.005)  # ~5 KiB: one entry
    with pytest.raises(CacheTooSmall, match="embedding_cache_mb.*Fix: raise model.embedding_cache_mb, or set "
                                            "model.embedding_cache_dir"):
        warm_up(adapter, PROMPTS, [None] * len(PROMPTS), 3.0, batch_size=2)


def test_drop_then_a_new_prompt_names_the_fix(folders):
    from shared.embedding_cache import offload_encoders

    spec = TINY_PIPELINES["sd3-5"]
    adapter = load_tiny(spec, folders["sd3-5"], offload_text_encoders="drop")
    warm_up(adapter, PROMPTS[:2], [None] * 2, 1.0)
    offload_encoders(adapter, "drop")
    assert all(p.device.type == "meta" for m in adapter.encoder_modules().values() for p in m.parameters())
    encode(adapter, PROMPTS[:2], [None] * 2, 1.0)  # cached: fine
    with pytest.raises(RuntimeError, match="not in the embedding cache.*drop.*Fix: use offload_text_encoders: cpu"):
        encode(adapter, PROMPTS[2:3], [None], 1.0)


def test_cpu_offload_brings_the_encoders_back_for_a_miss_only(folders):
    spec = TINY_PIPELINES["sd3-5"]
    adapter = load_tiny(spec, folders["sd3-5"], offload_text_encoders=True)
    moves = []
    for name, module in adapter.encoder_modules().items():
        original = module.to
        module.to = lambda *a, _o=original, _n=name, **k: moves.append((_n, str(a[0]) if a else k)) or _o(*a, **k)
    encode(adapter, PROMPTS[:1], [None], 1.0)
    assert {n for n, _ in moves} == set(adapter.encoder_modules()) and moves[-1][1] == "cpu"
    moves.clear()
    encode(adapter, PROMPTS[:1], [None], 1.0)
    assert moves == [], "a cache hit moved the encoders"


def test_the_samplers_adapter_gets_the_configured_cache(tmp_path):
    from services.sampler.runtime import SamplerRuntime

    runtime = SamplerRuntime(device=torch.device("cpu"))
    runtime.ensure_model({"model_type": "tiny", "embedding_cache_dir": str(tmp_path / "e"),
                          "embedding_cache_mb": 16}, seed=0)
    cache = cache_of(runtime.adapter)
    assert cache.directory == tmp_path / "e" and cache.max_bytes == 16 * 2**20


# --------------------------------------------------------------------------- the trainer


def _raise_on_forward(modules: dict) -> None:
    def boom(module, args, kwargs=None):
        raise AssertionError(f"text encoder {type(module).__name__} ran after the warm-up")

    for m in modules.values():
        m.register_forward_pre_hook(boom)


def test_trainer_after_warm_up_runs_no_encoder_and_trains_exactly_as_without_a_cache(folders, tmp_path, monkeypatch):
    """Two epochs with eval of sd3-5 (CFG, three text encoders): once without any cache, once with
    ``offload_text_encoders: drop`` and a disk cache, the encoders made to raise after the warm-up."""
    import trainer.loop as loop
    from trainer.loop import train

    spec = TINY_PIPELINES["sd3-5"]
    train_cfg = {"max_epochs": 2}
    plain = tiny_train_config(spec, folders["sd3-5"], tmp_path / "plain", model={"embedding_cache_mb": 0},
                              train=train_cfg)
    a = train(plain, quiet=True)

    real = loop.warm_embeddings
    warmed = []

    def warm_then_forbid(cfg, adapter, train_rows, eval_rows):
        out = real(cfg, adapter, train_rows, eval_rows)
        warmed.append(out)
        _raise_on_forward(adapter.encoder_modules())
        return out

    monkeypatch.setattr(loop, "warm_embeddings", warm_then_forbid)
    cached = tiny_train_config(spec, folders["sd3-5"], tmp_path / "cached", train=train_cfg,
                               model={"offload_text_encoders": "drop",
                                      "embedding_cache_dir": str(tmp_path / "embeddings")})
    b = train(cached, quiet=True)
    assert warmed and warmed[0]["encoded"] == len(PROMPTS) and warmed[0]["misses"] == len(PROMPTS)
    state = lambda s: json.loads((Path(s["run_dir"]) / "rank0_state.json").read_text())  # noqa: E731
    assert state(a)["param_checksum"] == state(b)["param_checksum"]
    assert state(a)["param_abs_sum"] == state(b)["param_abs_sum"]
    for key in ("base/brightness", "final/brightness"):
        assert a[key] == b[key]
