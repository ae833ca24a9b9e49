"""The blob store on memory:// and file:// URLs: typed round trips, integrity, cleanup."""

from __future__ import annotations

import uuid

import pytest
import torch

from shared.protocol import BlobRef
from shared.images import decode_image, encode_png
from shared.store import BlobIntegrityError, BlobStore


@pytest.fixture(params=["memory", "file"])
def store(request, tmp_path):
    url = f"memory://store-{uuid.uuid4().hex}" if request.param == "memory" else f"file://{tmp_path}/blobs"
    s = BlobStore(url)
    yield s
    s.delete_prefix("")


def test_tensors_round_trip_bit_exact(store):
    tensors = {"latents": torch.randn(2, 3, 4, 4), "log_probs": torch.randn(2, 3).double(),
               "ids": torch.arange(5)}
    ref = store.put_tensors("run/e0/j0/a0/trajectory.safetensors", tensors)
    assert ref.uri == store.uri("run/e0/j0/a0/trajectory.safetensors") and ref.nbytes > 0
    back = store.get_tensors(ref)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)


def test_png_round_trip_is_exact_for_8_bit_images():
    image = torch.randint(0, 256, (3, 8, 12)).float() / 255
    data = encode_png(image)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert torch.equal(decode_image(data), image)


def test_a_changed_blob_is_an_error_not_a_wrong_batch(store):
    ref = store.put_bytes("run/x.bin", b"hello")
    store.put_bytes("run/x.bin", b"HELLO")  # overwritten behind the reference's back
    with pytest.raises(BlobIntegrityError, match="must run again"):
        store.get_bytes(ref)
    fake = BlobRef(uri=ref.uri, sha256=ref.sha256, nbytes=4)
    with pytest.raises(BlobIntegrityError):
        store.get_bytes(fake)


def test_delete_prefix_removes_one_epoch_only(store):
    store.put_bytes("run/e0/a.bin", b"a")
    store.put_bytes("run/e0/j1/b.bin", b"b")
    keep = store.put_bytes("run/e1/c.bin", b"c")
    assert store.delete_prefix("run/e0") == 2
    assert not store.exists("run/e0/a.bin") and store.get_bytes(keep) == b"c"
    assert store.delete_prefix("run/e9") == 0


def test_file_writes_leave_no_temporaries(tmp_path):
    s = BlobStore(f"file://{tmp_path}")
    s.put_bytes("a/b/c.bin", b"x" * 1000)
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["c.bin"]


def test_bad_urls_say_how_to_fix_them(tmp_path):
    with pytest.raises(ValueError, match="no scheme"):
        BlobStore(str(tmp_path))
    s = BlobStore(f"file://{tmp_path}/one")
    other = BlobStore(f"file://{tmp_path}/two").put_bytes("k", b"1")
    with pytest.raises(ValueError, match="same store url"):
        s.get_bytes(other)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        encode_png(torch.zeros(1, 3, 4, 4))


def test_image_batches_travel_as_8_bit_pixels(store):
    images = torch.rand(5, 3, 6, 7)
    ref = store.put_images("run/e0/j0/images.safetensors", images)
    assert ref.nbytes < 5 * 3 * 6 * 7 + 200  # one byte per channel value (+ header)
    assert torch.equal(store.get_images(ref), (images * 255).round() / 255)
