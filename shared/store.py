"""The blob store: bulky data of the distributed mode, addressed by fsspec URLs.

``file:///shared/volume/flowrl`` for one machine or a shared volume, ``memory://flowrl`` for
tests (one process), ``s3://bucket/prefix`` for clusters (needs ``s3fs``). Tensors are stored
as safetensors, images as PNG, never pickle. Every put returns a
:class:`~shared.protocol.BlobRef` with the SHA-256 of the bytes; every get checks it, so a
truncated or swapped blob is an error, not a silently wrong batch.

Writes are atomic where the filesystem allows: bytes go to a temporary name, are flushed and
fsynced (local files), then renamed, so a reader never sees half a blob.
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid

import fsspec
import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shared.protocol import BlobRef


class BlobIntegrityError(IOError):
    """A blob's bytes do not match the SHA-256 / size its reference promised."""


class BlobStore:
    """Blobs under one root URL. Keys are ``/``-separated relative paths (``run/e0/j1.st``)."""

    def __init__(self, url: str) -> None:
        if "://" not in url:
            raise ValueError(f"blob store url {url!r} has no scheme. Fix: use file:///abs/path, "
                             f"memory://name or s3://bucket/prefix.")
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self._local = self.fs.protocol in ("file", "local") or "file" in self.fs.protocol

    # ------------------------------------------------------------------ bytes
    def uri(self, key: str) -> str:
        return f"{self.url}/{key.lstrip('/')}"

    def _path(self, uri: str) -> str:
        if not uri.startswith(self.url + "/"):
            raise ValueError(f"blob {uri!r} is not under this store ({self.url}). Fix: give the "
                             f"sampler, reward worker and trainer the same store url.")
        return f"{self.root}/{uri[len(self.url) + 1:]}"

    def put_bytes(self, key: str, data: bytes) -> BlobRef:
        path = self._path(self.uri(key))
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        if self._local:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, path)
        return BlobRef(uri=self.uri(key), sha256=hashlib.sha256(data).hexdigest(), nbytes=len(data))

    def get_bytes(self, ref: BlobRef) -> bytes:
        with self.fs.open(self._path(ref.uri), "rb") as f:
            data = f.read()
        if len(data) != ref.nbytes or hashlib.sha256(data).hexdigest() != ref.sha256:
            raise BlobIntegrityError(
                f"blob {ref.uri}: got {len(data)} bytes with a different SHA-256 than its reference "
                f"({ref.nbytes} bytes, {ref.sha256[:12]}...). It was overwritten or truncated; the "
                f"task that wrote it must run again.")
        return data

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
    def put_tensors(self, key: str, tensors: dict[str, torch.Tensor]) -> BlobRef:
        return self.put_bytes(key, st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))

    def get_tensors(self, ref: BlobRef) -> dict[str, torch.Tensor]:
        return st_load(self.get_bytes(ref))

    def put_image(self, key: str, image: torch.Tensor) -> BlobRef:
        """``image [3, H, W]`` float in [0, 1] -> PNG (8-bit, lossless for what it keeps)."""
        return self.put_bytes(key, encode_png(image))

    def get_image(self, ref: BlobRef) -> torch.Tensor:
        return decode_image(self.get_bytes(ref))


def encode_png(image: torch.Tensor) -> bytes:
    """``[3, H, W]`` float in [0, 1] -> PNG bytes (rounded to 8 bits)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected one image [3, H, W], got shape {tuple(image.shape)}")
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes) -> torch.Tensor:
    """PNG/JPEG/... bytes -> ``[3, H, W]`` float32 in [0, 1] (RGB)."""
    with Image.open(io.BytesIO(data)) as im:
        array = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0
