"""Prompt / condition embeddings, computed once and reused: :class:`EmbeddingCache` and
:func:`encode_cached` (what :func:`shared.sampling.encode` runs, so the embedded trainer, the
trainer's re-encoding in the Celery transport, resume, eval and the sampler service all use it).

**What an embedding depends on.** One sample's conditioning is a function of its *encode key*:
the prompt, the negative prompt (with CFG), whether CFG is on, its condition images (by content
digest: a dataset file and the same file's bytes in the blob store give the same key), and, for
image-conditioned families, the rollout resolution (and for image-to-video the frame count). The
model side is the *fingerprint* (:func:`model_fingerprint`): the adapter class and options, the
model folder's files other than the transformer (names, sizes and modification times, or the
Hub's content-addressed blob names), the frozen parts' dtypes and device type, and the torch /
diffusers / transformers versions. A changed text encoder, VAE, option or library gives another
fingerprint, so stale embeddings are never reused.

**Canonical encoding.** Each distinct key in a call is encoded on its own (a batch of one), and
the batch is assembled from those rows. So a sample's conditioning never depends on its batch
mates (padding, batch size), and the results with a cache, without one (``embedding_cache_mb:
0``), from memory or from disk are bit-identical; trainer and samplers agree to the bit whatever
their micro-batch sizes.

Encoding runs in the encoders' own dtypes (``model.options.text_dtype``), with autocast off even
inside the trainer's mixed-precision context: the samplers do not autocast, and both must agree.

**Where entries live.** An in-memory LRU (CPU tensors, ``model.embedding_cache_mb``) and,
optionally, a folder (``model.embedding_cache_dir``): one safetensors file per entry,
``{dir}/{fingerprint[:32]}/{name[:2]}/{name}.safetensors`` with ``name = sha256(fingerprint, key)``;
the file's metadata repeats the fingerprint and key and is checked on read. Writes go to a
temporary file and are renamed, so processes sharing the folder never see half a file. A folder
``{dir}/{fingerprint[:32]}/model.json`` lists what the fingerprint was made of.

**Text encoders off the GPU** (``model.offload_text_encoders``): after a call that had to encode,
the adapter's encoder modules (:meth:`~shared.models.base.FlowModelAdapter.encoder_modules`: the
text encoders, and Wan I2V's CLIP image encoder; the VAE stays, it decodes) move to the CPU; a
later miss moves them back for that call only. The trainer first encodes every train and eval
prompt (:func:`warm_up`), so after the start no encoder runs at all; ``"drop"`` then frees them
(moves them to the ``meta`` device) and a later miss is an error naming the fix.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from shared.models.base import Conditioning, FlowModelAdapter

#: bump when the entry layout or the encode-key scheme changes (old files are then never read)
FORMAT = 1
OFFLOAD_MODES = ("cpu", "drop")


# --------------------------------------------------------------------------- keys


_digests: dict[tuple, str] = {}


def image_digest(source) -> str:
    """SHA-256 of a condition image: a file's bytes (path) or the bytes themselves, which agree
    for a dataset file and its blob-store copy; a PIL image by mode, size and pixels."""
    from PIL import Image

    if isinstance(source, bytes):
        return hashlib.sha256(source).hexdigest()
    if isinstance(source, Image.Image):
        h = hashlib.sha256(f"pil:{source.mode}:{source.size}".encode())
        h.update(source.tobytes())
        return h.hexdigest()
    path = Path(source)
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _digests:
        _digests[memo] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _digests[memo]


def encode_key(prompt: str, negative: str | None, *, cfg: bool, images=None, resolution=None,
               num_frames: int | None = None) -> str:
    """The JSON string a sample's conditioning is a function of (with the model fingerprint)."""
    key: dict[str, Any] = {"prompt": prompt, "cfg": bool(cfg), "negative": (negative or "") if cfg else None}
    if images is not None:
        key["images"] = [image_digest(s) for s in images]
    if resolution is not None:
        key["resolution"] = list(resolution)
    if num_frames is not None:
        key["num_frames"] = int(num_frames)
    return json.dumps(key, sort_keys=True, ensure_ascii=False)


# --------------------------------------------------------------------------- fingerprint


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for name in ("diffusers", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def _resolve_source(path: str) -> Path | None:
    """A local folder for ``model_name_or_path``: itself, or the Hub cache's snapshot of a hub id."""
    p = Path(path)
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, local_files_only=True))
    except Exception:  # not a hub id, or not cached: fall back to the weights
        return None


def _source_files(root: Path) -> list[list]:
    """``[relative path, size, identity]`` for the folder's files outside ``transformer*/`` (the
    trained part); identity is the Hub blob name (a content hash) for symlinked files, else the
    modification time in ns."""
    files = []
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root).as_posix()
        if rel.split("/")[0].startswith("transformer") or not f.is_file():
            continue
        st = f.stat()
        files.append([rel, st.st_size, Path(os.path.realpath(f)).name if f.is_symlink() else st.st_mtime_ns])
    return files


def _weights_digest(modules: dict[str, nn.Module]) -> str:
    h = hashlib.sha256()
    for name in sorted(modules):
        for pname, t in sorted(modules[name].state_dict().items()):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}.{pname}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint_parts(adapter: FlowModelAdapter) -> dict[str, Any]:
    """What :func:`model_fingerprint` hashes (also written to ``model.json`` next to the entries)."""
    modules = adapter.encoder_modules()
    vae = getattr(getattr(adapter, "pipeline", None), "vae", None)
    if vae is not None and adapter.condition_images != (0, 0):
        modules = {**modules, "vae": vae}  # condition latents come from the VAE
    parts: dict[str, Any] = {
        "format": FORMAT, "adapter": f"{type(adapter).__module__}.{type(adapter).__qualname__}",
        "model_type": getattr(adapter, "model_type", None),
        "options": json.loads(json.dumps(getattr(adapter, "options", {}), sort_keys=True, default=str)),
        "dtypes": {n: str(next(m.parameters()).dtype) for n, m in sorted(modules.items())
                   if next(m.parameters(), None) is not None},
        "transformer_dtype": str(next(adapter.transformer.parameters()).dtype),
        "device": adapter_device(adapter).type, "versions": _versions()}
    source = getattr(adapter, "source_path", None)
    root = _resolve_source(source) if source else None
    if root is not None:
        parts["source"] = {"path": str(source), "files": _source_files(root)}
    else:  # built in memory (tests, scripts) or not resolvable: the weights themselves
        parts["weights_sha256"] = _weights_digest(modules)
    return parts


def model_fingerprint(adapter: FlowModelAdapter) -> str:
    """SHA-256 (hex) of :func:`fingerprint_parts`; computed once per adapter."""
    cached = adapter.__dict__.get("_embedding_fingerprint")
    if cached is None:
        parts = fingerprint_parts(adapter)
        cached = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        adapter.__dict__["_embedding_fingerprint"] = cached
        adapter.__dict__["_embedding_fingerprint_parts"] = parts
    return cached


def adapter_device(adapter: FlowModelAdapter) -> torch.device:
    return next(adapter.transformer.parameters()).device


# --------------------------------------------------------------------------- the cache


Entry = dict[str, torch.Tensor]  # "pos.<name>" / "neg.<name>" -> [1, ...] tensors


def to_entry(cond: Conditioning) -> Entry:
    """A batch-of-one :class:`Conditioning` as flat named tensors."""
    out = {f"pos.{k}": v for k, v in cond.tensors.items()}
    if cond.negative is not None:
        out.update({f"neg.{k}": v for k, v in cond.negative.items()})
    return out


def from_entry(entry: Entry) -> Conditioning:
    pos = {k[4:]: v for k, v in entry.items() if k.startswith("pos.")}
    neg = {k[4:]: v for k, v in entry.items() if k.startswith("neg.")}
    return Conditioning(pos, neg or None)


def _nbytes(entry: Entry) -> int:
    return sum(t.numel() * t.element_size() for t in entry.values())


class CacheTooSmall(RuntimeError):
    """The warm-up's embeddings do not fit the in-memory cache and there is no disk cache."""


class EmbeddingCache:
    """Encoded conditioning per (model fingerprint, encode key): an LRU in CPU memory of at most
    ``max_mb`` MiB and, with ``directory``, safetensors files (module docstring).

    ``offload``: ``None``, ``"cpu"`` or ``"drop"`` (``model.offload_text_encoders``). Counters:
    ``hits`` (memory), ``disk_hits``, ``misses`` (encoded), ``evicted``.
    """

    def __init__(self, max_mb: float = 1024, directory: str | Path | None = None,
                 offload: str | None = None) -> None:
        if offload not in (None, *OFFLOAD_MODES):
            raise ValueError(f"model.offload_text_encoders={offload!r}: use false, true (= 'cpu') or 'drop'.")
        self.max_bytes = int(max_mb * 2**20)
        self.directory = None if directory is None else Path(directory).expanduser()
        self.offload = offload
        self.dropped = False  # the encoders were freed (offload "drop" after the warm-up)
        self._memory: collections.OrderedDict[tuple[str, str], tuple[Entry, int]] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.disk_hits = self.misses = self.evicted = 0
        if self.directory is not None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ValueError(f"model.embedding_cache_dir: cannot create {str(self.directory)!r} ({e}). Fix: "
                                 f"point it at a writable folder (shared by trainer and samplers when they "
                                 f"should share embeddings), or remove the key.") from None

    @classmethod
    def from_config(cls, model_cfg: Any) -> "EmbeddingCache":
        """From ``model.embedding_cache_mb`` / ``embedding_cache_dir`` / ``offload_text_encoders``."""
        offload = getattr(model_cfg, "offload_text_encoders", False)
        offload = "cpu" if offload is True else (None if offload is False else offload)
        return cls(getattr(model_cfg, "embedding_cache_mb", 1024), getattr(model_cfg, "embedding_cache_dir", None),
                   offload)

    @property
    def keeps(self) -> bool:
        """Whether entries are kept at all (memory or disk)."""
        return self.max_bytes > 0 or self.directory is not None

    @property
    def memory_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._memory)

    # -------------------------------------------------------------- disk
    def path(self, fingerprint: str, key: str) -> Path:
        assert self.directory is not None
        name = hashlib.sha256(f"{fingerprint}\n{key}".encode()).hexdigest()
        return self.directory / fingerprint[:32] / name[:2] / f"{name}.safetensors"

    def _read(self, fingerprint: str, key: str) -> Entry | None:
        from safetensors import safe_open

        path = self.path(fingerprint, key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("fingerprint") != fingerprint or meta.get("key") != key:
                    return None
                return {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:  # a damaged file: encode again and overwrite it
            warnings.warn(f"embedding cache file {path} is unreadable ({type(e).__name__}: {e}); encoding "
                          f"again and rewriting it.", stacklevel=3)
            return None

    def _write(self, fingerprint: str, key: str, entry: Entry, parts: dict | None) -> None:
        from safetensors.torch import save_file

        path = self.path(fingerprint, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        info = path.parent.parent / "model.json"
        if parts is not None and not info.exists():
            tmp_info = info.with_name(f".model.json.{os.getpid()}.{threading.get_ident()}")
            tmp_info.write_text(json.dumps(parts, indent=1, sort_keys=True) + "\n")
            os.replace(tmp_info, info)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        save_file({k: v.contiguous() for k, v in entry.items()}, str(tmp),
                  metadata={"format": str(FORMAT), "fingerprint": fingerprint, "key": key})
        os.replace(tmp, path)

    # -------------------------------------------------------------- lookups
    def get(self, fingerprint: str, key: str) -> Entry | None:
        """The entry (CPU tensors) or ``None``; a disk hit also enters the memory LRU."""
        with self._lock:
            item = self._memory.get((fingerprint, key))
            if item is not None:
                self._memory.move_to_end((fingerprint, key))
                self.hits += 1
                return item[0]
        if self.directory is None:
            return None
        entry = self._read(fingerprint, key)
        if entry is not None:
            self.disk_hits += 1
            self._remember(fingerprint, key, entry)
        return entry

    def put(self, fingerprint: str, key: str, entry: Entry, parts: dict | None = None) -> Entry:
        """Keep ``entry`` (moved to CPU; returned) in memory and, with a folder, on disk."""
        entry = {k: v.detach().to("cpu", copy=True) for k, v in entry.items()}  # own storage each
        if self.directory is not None:
            self._write(fingerprint, key, entry, parts)
        self._remember(fingerprint, key, entry)
        return entry

    def _remember(self, fingerprint: str, key: str, entry: Entry) -> None:
        size = _nbytes(entry)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._memory.pop((fingerprint, key), None)
            if old is not None:
                self._bytes -= old[1]
            self._memory[(fingerprint, key)] = (entry, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, freed) = self._memory.popitem(last=False)
                self._bytes -= freed
                self.evicted += 1

    def stats(self) -> dict[str, float]:
        return {"hits": self.hits, "disk_hits": self.disk_hits, "misses": self.misses,
                "evicted": self.evicted, "entries": len(self._memory), "memory_mb": self._bytes / 2**20}


def cache_of(adapter: FlowModelAdapter) -> EmbeddingCache:
    """The adapter's cache (``adapter.embedding_cache``; :func:`shared.models.load_adapter` sets it
    from the config); an adapter built otherwise gets the default in-memory one."""
    cache = getattr(adapter, "embedding_cache", None)
    if cache is None:
        cache = EmbeddingCache()
        adapter.embedding_cache = cache
    return cache


# --------------------------------------------------------------------------- encoders on/off the GPU


def _modules_device(modules: dict[str, nn.Module]) -> set[str]:
    return {p.device.type for m in modules.values() for p in m.parameters()}


def _empty_device_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def offload_encoders(adapter: FlowModelAdapter, mode: str = "cpu") -> None:
    """Move the encoder modules off the accelerator: ``"cpu"`` (brought back on a miss) or
    ``"drop"`` (to the ``meta`` device: memory freed; a later miss is an error naming the fix)."""
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"offload mode {mode!r}: use 'cpu' or 'drop'.")
    cache = cache_of(adapter)
    cache.offload = cache.offload or ("cpu" if mode == "drop" else mode)  # misses bring them back ("cpu")
    for module in adapter.encoder_modules().values():
        module.to("meta" if mode == "drop" else "cpu")
    cache.dropped = cache.dropped or mode == "drop"
    _empty_device_cache(adapter_device(adapter))


@contextlib.contextmanager
def encoders_ready(adapter: FlowModelAdapter, what: Sequence[str]) -> Iterator[None]:
    """The encoder modules on the adapter's device for the body (``what``: the prompts about to be
    encoded, for the error message); with ``offload`` they go back to the CPU afterwards."""
    cache = cache_of(adapter)
    if cache.dropped:
        shown = ", ".join(repr(p[:60]) for p in list(what)[:3])
        raise RuntimeError(
            f"{len(what)} prompt(s) ({shown}) are not in the embedding cache, but model.offload_text_encoders: "
            f"drop freed the text encoders after the warm-up. Fix: use offload_text_encoders: cpu (a new prompt "
            f"then brings the encoders back for a moment), or make sure every prompt the run uses is in the "
            f"dataset (train.* and test.*), so the warm-up encodes it.")
    modules = adapter.encoder_modules()
    device = adapter_device(adapter)
    moved = [m for m in modules.values() if {p.device for p in m.parameters()} - {device}]
    for m in moved:
        m.to(device)
    try:
        yield
    finally:
        if cache.offload is not None:
            for m in modules.values():
                m.to("cpu")
            _empty_device_cache(device)


# --------------------------------------------------------------------------- encoding


def _count_error(model_type: str, counts: list[int]) -> str:
    return (f"{model_type}: rows of one batch have {counts} condition images; all rows must have the same "
            f"number (condition latents are batched). Fix: give every dataset row the same number of images.")


def encode_cached(adapter: FlowModelAdapter, prompts: list[str], negatives: list[str | None], *, cfg: bool,
                  images: Sequence[Sequence] | None = None, resolution: tuple[int, int] | None = None,
                  num_frames: int | None = None) -> Conditioning:
    """Conditioning for ``prompts`` (``[B, ...]`` tensors on the adapter's device), each distinct
    encode key encoded once, alone (module docstring), or taken from the cache.

    Args:
        negatives: per prompt, ``None`` = the empty prompt (used with ``cfg`` only).
        images: per prompt, its condition image sources (image-conditioned families only; ``None``
            for text-only ones); resolution / num_frames: passed to image-conditioned families'
            ``encode_prompts`` (and part of their keys).
    """
    from shared.condition_images import open_rows

    conditioned = adapter.condition_images != (0, 0)
    if conditioned and images is not None:
        counts = sorted({len(row) for row in images})
        if len(counts) > 1:
            raise ValueError(_count_error(adapter.model_type, counts))
    extra_key: dict[str, Any] = {}
    if conditioned:
        extra_key = {"resolution": resolution, "num_frames": num_frames if adapter.video else None}
    keys = [encode_key(p, n, cfg=cfg, images=None if not conditioned or images is None else images[i], **extra_key)
            for i, (p, n) in enumerate(zip(prompts, negatives))]
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    cache = cache_of(adapter)
    fingerprint = model_fingerprint(adapter) if cache.directory is not None else ""
    found: dict[str, Entry | None] = {k: cache.get(fingerprint, k) for k in first}
    missing = [k for k, e in found.items() if e is None]
    if missing:
        # in the encoders' own dtypes, never under a caller's autocast (the trainer's mixed precision):
        # the trainer and the samplers (which do not autocast) then encode alike
        device = adapter_device(adapter)
        with encoders_ready(adapter, [prompts[first[k]] for k in missing]), torch.no_grad(), \
                torch.autocast(device.type, enabled=False):
            for k in missing:
                i = first[k]
                kwargs: dict[str, Any] = {}
                if conditioned:
                    kwargs = {"images": None if images is None else open_rows([images[i]]),
                              "resolution": resolution}
                    if adapter.video:
                        kwargs["num_frames"] = num_frames
                cond = adapter.encode_prompts([prompts[i]], cfg=cfg, negative_prompts=[negatives[i] or ""], **kwargs)
                entry = to_entry(cond)
                cache.misses += 1
                if cache.keeps:
                    entry = cache.put(fingerprint, k, entry, adapter.__dict__.get("_embedding_fingerprint_parts"))
                found[k] = entry
    order = list(first)
    stacked = Conditioning.cat([from_entry(found[k]) for k in order])  # type: ignore[arg-type]
    if len(order) != len(keys):
        where = {k: j for j, k in enumerate(order)}
        stacked = stacked.select(torch.tensor([where[k] for k in keys], dtype=torch.long))
    return stacked.to(adapter_device(adapter))


def warm_up(adapter: FlowModelAdapter, prompts: list[str], negatives: list[str | None], guidance_scale: float, *,
            images: Sequence[Sequence] | None = None, resolution=None, num_frames: int | None = None,
            batch_size: int = 64) -> int:
    """Encode every distinct sample of ``prompts`` (as :func:`shared.sampling.encode` would for a
    rollout with these settings) into the cache; returns how many keys were encoded now. Raises
    :class:`CacheTooSmall` when the cache cannot keep them all (no folder, memory too small), since
    every later epoch would then run the encoders again."""
    from shared.sampling import encode

    cache = cache_of(adapter)
    before, evicted = cache.misses, cache.evicted
    for s in range(0, len(prompts), batch_size):
        sl = slice(s, s + batch_size)
        encode(adapter, prompts[sl], negatives[sl], guidance_scale, None if images is None else images[sl],
               resolution, num_frames)
        if cache.directory is None and (cache.evicted > evicted or (cache.misses > before and not cache.keeps)):
            raise CacheTooSmall(
                f"the embeddings of the {len(prompts)} prompts do not fit model.embedding_cache_mb="
                f"{cache.max_bytes / 2**20:g} (about {cache.memory_bytes / 2**20:.0f} MiB held after "
                f"{cache.misses - before} of them), so the text encoders would run again every epoch. Fix: raise "
                f"model.embedding_cache_mb, or set model.embedding_cache_dir to keep them on disk.")
    return cache.misses - before
