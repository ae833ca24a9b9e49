"""The blob store: bulky data of the distributed mode, addressed by fsspec URLs.

``file:///shared/volume/flowrl`` for one machine or a shared volume, ``memory://flowrl`` for
tests (one process), ``s3://bucket/prefix`` for clusters (needs ``s3fs``). Tensors are stored
as safetensors, image batches as safetensors of 8-bit pixels (lossless like PNG, without its
encode cost), never pickle. Every put returns a
:class:`~shared.protocol.BlobRef` with the SHA-256 of the bytes; every get checks it, so a
truncated or swapped blob is an error, not a silently wrong batch.

Writes are atomic where the filesystem allows: bytes go to a temporary name, then are renamed,
so a reader never sees half a blob. ``durable=True`` (published weights) also fsyncs local files
before the rename, so the blob survives a machine crash; rollouts, which can be redone, skip it.
"""

from __future__ import annotations

import hashlib
import os
import uuid

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shared.images import to_uint8_hwc
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

    def put_bytes(self, key: str, data: bytes, *, durable: bool = False) -> BlobRef:
        path = self._path(self.uri(key))
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        if self._local:
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
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
    def put_tensors(self, key: str, tensors: dict[str, torch.Tensor], *, durable: bool = False) -> BlobRef:
        data = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        return self.put_bytes(key, data, durable=durable)

    def get_tensors(self, ref: BlobRef) -> dict[str, torch.Tensor]:
        return st_load(self.get_bytes(ref))

    def put_images(self, key: str, images: torch.Tensor) -> BlobRef:
        """A batch ``[B, 3, H, W]`` float in [0, 1] as ONE safetensors blob of 8-bit pixels
        (``images [B, H, W, 3] uint8``): the same pixels a PNG would keep, without the per-image
        encode/decode cost on the rollout path. Inverse: :meth:`get_images`."""
        return self.put_tensors(key, {"images": torch.from_numpy(to_uint8_hwc(images))})

    def get_images(self, ref: BlobRef) -> torch.Tensor:
        """``[B, 3, H, W]`` float32 in [0, 1] from :meth:`put_images`."""
        return self.get_tensors(ref)["images"].permute(0, 3, 1, 2).float() / 255.0
