"""The blob store: bulky data of the distributed mode, addressed by fsspec URLs.

``file:///shared/volume/flowrl`` for one machine or a shared volume, ``memory://flowrl`` for
tests (one process), ``s3://bucket/prefix`` for clusters (needs ``s3fs``: ``flowrl[s3]``). Tensors are stored
as safetensors, image batches as safetensors of 8-bit pixels (lossless like PNG, without its
encode cost), never pickle.

Integrity: every put returns a :class:`~shared.protocol.BlobRef` with a digest of the bytes;
every get checks it, so a truncated or swapped blob is an error, not a silently wrong batch.
The digest is SHA-256 by default (published weights: a cryptographic hash, and the samplers
recognise weights by it); rollout blobs use ``digest="xxh3_128"`` (xxHash's 128-bit XXH3,
~20x faster than SHA-256 here), enough to catch truncation, overwrites and corruption of
data that a sampler can simply produce again.

No extra copies: tensors are written straight from their memory, chunk by chunk, each chunk
hashed while it is in cache (the safetensors file is laid out here, not built as one bytes
object first); reads fill one buffer chunk by chunk, hashing as they go, and the tensors
returned are views into that buffer.

Writes are atomic where the filesystem allows: bytes go to a temporary name, then are renamed,
so a reader never sees half a blob. ``durable=True`` (published weights) also fsyncs local files
before the rename, so the blob survives a machine crash; rollouts, which can be redone, skip it.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import fsspec
import numpy as np
import torch
import xxhash

from shared.protocol import BlobRef

Digest = Literal["sha256", "xxh3_128"]
CHUNK = 1 << 20  # bytes written / read / hashed at a time (stays in cache)

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.complex64: "C64",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code
_CODES = {v: k for k, v in _DTYPES.items()}


class BlobIntegrityError(IOError):
    """A blob's bytes do not match the digest / size its reference promised."""


def _hasher(digest: str):
    if digest == "sha256":
        return hashlib.sha256()
    if digest == "xxh3_128":
        return xxhash.xxh3_128()
    raise ValueError(f"unknown blob digest {digest!r}. Fix: use 'sha256' or 'xxh3_128'.")


def _bytes_of(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's memory as a flat uint8 array (no copy when it is contiguous)."""
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    return t.reshape(-1).view(torch.uint8).numpy()


class Entry:
    """One tensor of a safetensors file: its dtype, shape and ``chunks()``, which yields its
    bytes in order as CPU tensors / arrays / bytes (it may wait for them: a streaming writer
    hands a generator that blocks until the producer has the next part)."""

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], chunks: Callable[[], Iterable]):
        if dtype not in _DTYPES:
            raise TypeError(f"dtype {dtype} cannot be stored in safetensors. Fix: convert the "
                            f"tensor to one of {sorted(str(d) for d in _DTYPES)}.")
        self.dtype, self.shape, self.chunks = dtype, tuple(int(s) for s in shape), chunks
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def of(cls, t: torch.Tensor) -> "Entry":
        return cls(t.dtype, tuple(t.shape), lambda: (t,))


def _layout(entries: dict[str, Entry], metadata: dict[str, str] | None,
            keep_order: bool = False) -> tuple[bytes, list[str]]:
    """The safetensors header (8-byte length + JSON padded to 8 bytes) and the tensor order:
    largest element size first, so every tensor's data starts aligned to its element size
    (``keep_order``: the dict's order, for bytes that arrive in that order)."""
    size = lambda n: torch.empty((), dtype=entries[n].dtype).element_size()  # noqa: E731
    order = list(entries) if keep_order else sorted(entries, key=lambda n: (-size(n), n))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        e = entries[name]
        header[name] = {"dtype": _DTYPES[e.dtype], "shape": list(e.shape),
                        "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


def _pieces(header: bytes, entries: dict[str, Entry], order: list[str]) -> Iterator[memoryview]:
    """The file's bytes in order, in pieces of at most :data:`CHUNK` bytes (views, not copies)."""
    yield memoryview(header)
    for name in order:
        e, written = entries[name], 0
        for part in e.chunks():
            arr = _bytes_of(part) if isinstance(part, torch.Tensor) else np.frombuffer(part, np.uint8)
            view = memoryview(arr)
            for s in range(0, len(view), CHUNK):
                yield view[s:s + CHUNK]
            written += len(view)
        if written != e.nbytes:
            raise ValueError(f"tensor {name!r}: its parts hold {written} bytes, its dtype and shape "
                             f"{e.dtype} {list(e.shape)} need {e.nbytes}")


class BlobStore:
    """Blobs under one root URL. Keys are ``/``-separated relative paths (``run/e0/j1.st``)."""

    def __init__(self, url: str) -> None:
        if "://" not in url:
            raise ValueError(f"blob store url {url!r} has no scheme. Fix: use file:///abs/path, "
                             f"memory://name or s3://bucket/prefix.")
        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except ImportError as e:  # fsspec knows the scheme, its filesystem package is missing
            scheme = url.split("://", 1)[0]
            extra = " (pip install 'flowrl[s3]')" if scheme in ("s3", "s3a") else ""
            raise ImportError(f"blob store url {url!r} needs the package fsspec uses for {scheme}://: {e}{extra}. "
                              f"Fix: install it where the sampler, reward workers and trainer run.") from e
        self._local = self.fs.protocol in ("file", "local") or "file" in self.fs.protocol

    # ------------------------------------------------------------------ bytes
    def uri(self, key: str) -> str:
        return f"{self.url}/{key.lstrip('/')}"

    def _path(self, uri: str) -> str:
        if not uri.startswith(self.url + "/"):
            raise ValueError(f"blob {uri!r} is not under this store ({self.url}). Fix: give the "
                             f"sampler, reward worker and trainer the same store url.")
        return f"{self.root}/{uri[len(self.url) + 1:]}"

    def _put_pieces(self, key: str, pieces: Iterable, *, durable: bool, digest: Digest) -> BlobRef:
        """Write ``pieces`` (bytes-like, in order) as one blob, hashing each piece as it goes."""
        h = _hasher(digest)
        path = self._path(self.uri(key))
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        n = 0
        try:
            if self._local:
                with open(tmp, "wb", buffering=0) as f:
                    for piece in pieces:
                        h.update(piece)
                        view = memoryview(piece)
                        while view:  # a raw write may take fewer bytes than given
                            view = view[f.write(view):]
                        n += len(piece)
                    if durable:
                        os.fsync(f.fileno())
                os.replace(tmp, path)
            else:
                with self.fs.open(tmp, "wb") as f:
                    for piece in pieces:
                        h.update(piece)
                        f.write(bytes(piece) if isinstance(piece, memoryview) else piece)
                        n += len(piece)
                self.fs.mv(tmp, path)
        except BaseException:
            try:
                self.fs.rm(tmp)
            except (OSError, FileNotFoundError):
                pass
            raise
        return BlobRef(uri=self.uri(key), nbytes=n, **{digest: h.hexdigest()})

    def put_bytes(self, key: str, data: bytes, *, durable: bool = False,
                  digest: Digest = "sha256") -> BlobRef:
        view = memoryview(data)
        return self._put_pieces(key, (view[s:s + CHUNK] for s in range(0, len(view), CHUNK)),
                                durable=durable, digest=digest)

    def _read_into(self, ref: BlobRef) -> torch.Tensor:
        """The blob's bytes as a uint8 tensor, checked against ``ref`` (size and digest).

        Local files are mapped (private, copy-on-write), not copied: the digest pass reads the
        page cache through the mapping and the tensors returned are views of it. Blobs are never
        changed in place (writes go to a new file that is renamed over), so what was checked
        stays what is read. Other filesystems are read chunk by chunk into one buffer."""
        digest = "xxh3_128" if ref.xxh3_128 is not None else "sha256"
        expected = ref.xxh3_128 if ref.xxh3_128 is not None else ref.sha256
        h = _hasher(digest)
        path = self._path(ref.uri)
        if self._local:
            with open(path, "rb") as f:
                got = os.fstat(f.fileno()).st_size
                if got == ref.nbytes and got:
                    buf = torch.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY),
                                           dtype=torch.uint8)
                else:
                    buf = torch.empty(0, dtype=torch.uint8)
            view = memoryview(buf.numpy())
            h.update(view)
            longer = got > ref.nbytes
        else:
            buf = empty((ref.nbytes,), torch.uint8)
            view = memoryview(buf.numpy())
            got = 0
            with self.fs.open(path, "rb") as f:
                while got < ref.nbytes:
                    k = f.readinto(view[got:got + CHUNK])
                    if not k:
                        break
                    h.update(view[got:got + k])
                    got += k
                longer = bool(f.read(1))
        if got != ref.nbytes or h.hexdigest() != expected:
            size = f"{got} bytes" if not longer else f"more than {ref.nbytes} bytes"
            raise BlobIntegrityError(
                f"blob {ref.uri}: got {size} whose {digest} differs from its reference "
                f"({ref.nbytes} bytes, {digest} {expected[:12]}...). It was overwritten or truncated; "
                f"the task that wrote it must run again.")
        if ref.sha256 is not None and digest != "sha256" and \
                hashlib.sha256(view).hexdigest() != ref.sha256:  # a reference with both: check both
            raise BlobIntegrityError(f"blob {ref.uri}: its SHA-256 differs from its reference. It was "
                                     f"overwritten; the task that wrote it must run again.")
        return buf

    def get_bytes(self, ref: BlobRef) -> bytes:
        return self._read_into(ref).numpy().tobytes()

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._path(self.uri(key)))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every blob under ``prefix`` (garbage collection of a finished epoch)."""
        path = self._path(self.uri(prefix))
        if not self.fs.exists(path):
            return 0
        files = self.fs.find(path)
        self.fs.rm(path, recursive=True)
        return len(files)

    # ------------------------------------------------------------------ typed
    def put_entries(self, key: str, entries: dict[str, Entry], *, durable: bool = False,
                    digest: Digest = "sha256", keep_order: bool = False,
                    metadata: dict[str, str] | None = None) -> BlobRef:
        """One safetensors blob whose tensors' bytes come from each :class:`Entry`'s chunks,
        written as they arrive (``keep_order``: in the dict's order; see :func:`_layout`)."""
        header, order = _layout(entries, metadata, keep_order)
        return self._put_pieces(key, _pieces(header, entries, order), durable=durable, digest=digest)

    def put_tensors(self, key: str, tensors: dict[str, torch.Tensor], *, durable: bool = False,
                    digest: Digest = "sha256") -> BlobRef:
        """``tensors`` as one safetensors blob, written from the tensors' own memory."""
        return self.put_entries(key, {k: Entry.of(v) for k, v in tensors.items()},
                                 durable=durable, digest=digest)

    def get_tensors(self, ref: BlobRef) -> dict[str, torch.Tensor]:
        """The tensors of a safetensors blob, checked; views into one buffer read once."""
        return parse_safetensors(self._read_into(ref), ref.uri)

    def put_images(self, key: str, images: torch.Tensor, *, digest: Digest = "sha256") -> BlobRef:
        """Images ``[..., 3, H, W]`` float in [0, 1] (a batch ``[B, 3, H, W]``, video frames
        ``[B, F, 3, H, W]``) as ONE safetensors blob of 8-bit pixels in the same layout
        (``images_chw``, uint8, ``round(x * 255)``): the pixels a PNG would keep, without the
        per-image encode/decode cost on the rollout path. Converted one image at a time, in
        cache, and streamed to the store. Inverse: :meth:`get_images`."""
        if images.ndim < 3 or images.shape[-3] != 3:
            raise ValueError(f"images must be [..., 3, H, W] float in [0, 1], got shape "
                             f"{tuple(images.shape)}")
        return self.put_entries(key, {"images_chw": Entry(torch.uint8, tuple(images.shape),
                                                          lambda: uint8_chunks(images))},
                                 digest=digest)

    def get_images(self, ref: BlobRef, out: torch.Tensor | None = None) -> torch.Tensor:
        """``[..., 3, H, W]`` float32 in [0, 1] from :meth:`put_images` (also reads the older
        ``images`` blobs of 8-bit ``[B, H, W, 3]`` pixels). ``out``: a float32 CPU tensor to
        fill and return when its shape fits (a long-lived process reusing one buffer skips
        first-touching fresh memory for every batch)."""
        t = self.get_tensors(ref)
        if "images_chw" in t:
            u8 = t["images_chw"]
        elif "images" in t:
            u8 = t["images"].movedim(-1, -3)
        else:
            raise KeyError(f"blob {ref.uri} holds {sorted(t)}, not images. Fix: pass the "
                           f"trajectory's `images` reference, not its `tensors`.")
        if out is None or out.shape != u8.shape or out.dtype != torch.float32 or out.device.type != "cpu":
            out = empty(u8.shape, torch.float32)
        return out.copy_(u8).div_(255.0)  # = u8.float() / 255


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty`` whose memory numpy allocates: numpy asks the kernel for huge pages for
    large buffers, which makes first touching a fresh 70 MB buffer 2-4x cheaper (page faults
    dominate a pass over fresh memory on a small CPU). Falls back to ``torch.empty``."""
    try:
        np_dtype = {torch.bfloat16: np.uint16, torch.bool: np.bool_}.get(dtype) or \
            torch.empty((), dtype=dtype).numpy().dtype
    except TypeError:
        return torch.empty(shape, dtype=dtype)
    t = torch.from_numpy(np.empty(shape, dtype=np_dtype))
    return t.view(dtype) if t.dtype != dtype else t


def uint8_chunks(images: torch.Tensor) -> Iterator:
    """The 8-bit pixels (``round(x * 255)``, clamped) of float ``images [..., 3, H, W]`` in
    order: converted on the device where they live (then moved once), on the CPU one image at a
    time with numpy (single-threaded small ops stay in cache and do not wait on a busy
    intra-op thread pool; ``rint`` rounds half to even like ``torch.round``)."""
    flat = images.detach().reshape(-1, *images.shape[-3:])
    if flat.device.type != "cpu":
        yield to_uint8(flat).cpu()
        return
    tmp = np.empty(flat.shape[1:], dtype=np.float32)
    out = np.empty(flat.shape[1:], dtype=np.uint8)
    for img in flat:
        np.multiply(img.float().numpy(), np.float32(255), out=tmp)
        np.clip(np.rint(tmp, out=tmp), 0, 255, out=tmp)
        out[...] = tmp
        yield out  # (reused: the writer consumes it before asking for the next)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[..., 3, H, W]`` float in [0, 1] -> uint8 of the same layout (``round(x * 255)``,
    clamped), computed where ``images`` lives."""
    return (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)


def parse_safetensors(buf: torch.Tensor, name: str = "blob") -> dict[str, torch.Tensor]:
    """The tensors of safetensors bytes held in the uint8 tensor ``buf``, as views into it
    (copied only where a tensor's data is not aligned to its element size)."""
    def bad(why: str) -> ValueError:
        return ValueError(f"{name} is not a safetensors file: {why}. Fix: read it with the "
                          f"reference its writer returned (a BlobRef of put_tensors / put_images).")

    if buf.numel() < 8:
        raise bad(f"{buf.numel()} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", buf[:8].numpy().tobytes())
    if 8 + n > buf.numel():
        raise bad(f"header length {n} runs past the {buf.numel()} bytes")
    try:
        header = json.loads(buf[8:8 + n].numpy().tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not JSON ({e})") from None
    data = buf[8 + n:]
    out: dict[str, torch.Tensor] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = _CODES[info["dtype"]], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry {key!r} is {info!r}") from None
        if not 0 <= a <= b <= data.numel():
            raise bad(f"entry {key!r} spans bytes {a}..{b} of {data.numel()}")
        raw = data[a:b]
        size = torch.empty((), dtype=dtype).element_size()
        if (b - a) != int(np.prod(shape, dtype=np.int64)) * size:
            raise bad(f"entry {key!r}: {b - a} bytes for {info['dtype']} {shape}")
        if b == a:
            out[key] = torch.empty(shape, dtype=dtype)
            continue
        if (8 + n + a) % size:
            raw = raw.clone()
        out[key] = raw.view(dtype).reshape(shape)
    return out
