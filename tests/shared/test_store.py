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
    import importlib.util

    if importlib.util.find_spec("s3fs") is None:  # this machine has no s3fs: the error says how to get it
        with pytest.raises(ImportError, match=r"s3://.*flowrl\[s3\]"):
            BlobStore("s3://bucket/prefix")


def test_image_batches_travel_as_8_bit_pixels(store):
    images = torch.rand(5, 3, 6, 7)
    ref = store.put_images("run/e0/j0/images.safetensors", images)
    assert ref.nbytes < 5 * 3 * 6 * 7 + 200  # one byte per channel value (+ header)
    assert torch.equal(store.get_images(ref), (images * 255).round() / 255)


@pytest.mark.parametrize("digest", ["sha256", "xxh3_128"])
def test_both_digests_round_trip_and_catch_changes(store, digest):
    tensors = {"states": torch.randn(3, 5, 4, 4).bfloat16(), "steps": torch.arange(3),
               "flags": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4),
               "odd": torch.arange(7, dtype=torch.int8)}
    ref = store.put_tensors("run/e0/t.safetensors", tensors, digest=digest)
    assert getattr(ref, digest) is not None and ref.model_dump()["sha256" if digest == "xxh3_128" else "xxh3_128"] is None
    back = store.get_tensors(ref)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
    corrupt = bytearray(store.get_bytes(ref))
    corrupt[-3] ^= 1  # one flipped bit in the data, same size
    store.put_bytes("run/e0/t.safetensors", bytes(corrupt))
    with pytest.raises(BlobIntegrityError, match=f"{digest}.*must run again"):
        store.get_tensors(ref)
    store.put_bytes("run/e0/t.safetensors", bytes(corrupt) + b"x")  # longer than promised
    with pytest.raises(BlobIntegrityError, match="more than"):
        store.get_tensors(ref)


def test_blob_refs_need_a_digest():
    with pytest.raises(ValueError, match="no digest"):
        BlobRef(uri="memory://s/a", nbytes=3)
    with pytest.raises(ValueError):
        BlobRef(uri="memory://s/a", xxh3_128="0" * 64, nbytes=3)  # that is a SHA-256's length


def test_files_are_standard_safetensors_both_ways(tmp_path):
    """What put_tensors writes, the safetensors library reads (and the reverse), bit-exact,
    including tensors whose data is not aligned to their element size in the other writer's file."""
    from safetensors.torch import load as st_load, save as st_save

    s = BlobStore(f"file://{tmp_path}")
    tensors = {"a": torch.randn(2, 3), "b": torch.arange(5, dtype=torch.int8), "c": torch.randn(3).double(),
               "d": torch.randn(2, 2).half()}
    ref = s.put_tensors("x.safetensors", tensors, digest="xxh3_128")
    back = st_load((tmp_path / "x.safetensors").read_bytes())
    assert ref.nbytes == (tmp_path / "x.safetensors").stat().st_size
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    theirs = s.put_bytes("y.safetensors", st_save(tensors), digest="xxh3_128")
    mine = s.get_tensors(theirs)
    assert all(mine[k].dtype == v.dtype and torch.equal(mine[k], v) for k, v in tensors.items())


def test_not_safetensors_says_so(store):
    ref = store.put_bytes("run/junk.bin", b"\xff" * 20, digest="xxh3_128")
    with pytest.raises(ValueError, match="not a safetensors file.*Fix"):
        store.get_tensors(ref)


def test_images_8_bit_exact_for_batches_and_video_and_old_blobs(store):
    """put_images keeps round(x * 255) of every pixel (the PNG convention of shared.images),
    in the input's layout, also for video frames; get_images still reads the older HWC blobs."""
    from shared.images import to_uint8_hwc

    images = torch.rand(4, 3, 5, 6)
    images[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 0.5 / 255])  # the ends and a tie
    ref = store.put_images("run/i.safetensors", images, digest="xxh3_128")
    u8 = store.get_tensors(ref)["images_chw"]
    assert torch.equal(u8.permute(0, 2, 3, 1), torch.from_numpy(to_uint8_hwc(images)))
    assert torch.equal(store.get_images(ref), torch.from_numpy(to_uint8_hwc(images)).permute(0, 3, 1, 2).float() / 255)
    video = torch.rand(2, 3, 3, 4, 4)  # [B, F, 3, H, W]
    back = store.get_images(store.put_images("run/v.safetensors", video))
    assert back.shape == video.shape and torch.equal(back, (video * 255).round() / 255)
    old = store.put_tensors("run/old.safetensors", {"images": torch.from_numpy(to_uint8_hwc(images))})
    assert torch.equal(store.get_images(old), store.get_images(ref))
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, H, W\]"):
        store.put_images("run/bad.safetensors", torch.rand(2, 4, 4, 3))
    with pytest.raises(KeyError, match="not images"):
        store.get_images(store.put_tensors("run/t.safetensors", {"x": torch.zeros(1)}))


def test_get_images_refills_a_buffer_that_fits(store):
    a, b = torch.rand(2, 3, 4, 5), torch.rand(2, 3, 4, 5)
    ra, rb = store.put_images("run/a.safetensors", a), store.put_images("run/b.safetensors", b)
    buf = store.get_images(ra)
    again = store.get_images(rb, out=buf)
    assert again is buf and torch.equal(buf, (b * 255).round() / 255)
    other = store.get_images(store.put_images("run/c.safetensors", torch.rand(1, 3, 4, 5)), out=buf)
    assert other is not buf and other.shape == (1, 3, 4, 5)


def test_images_open_whole_from_a_path_bytes_or_pil_whatever_their_mode(tmp_path):
    """Condition images open as loaded RGB copies that outlive their file (an RGB file came back closed
    and unloaded for a moment: unreadable), and a 16-bit grayscale one is scaled, not clipped to white."""
    import io

    import numpy as np
    from PIL import Image

    from shared.condition_images import open_image

    rgb = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(np.full((4, 4), 32768, np.uint16)).save(tmp_path / "gray16.png")
    assert np.array_equal(np.asarray(open_image(tmp_path / "a.png")), rgb)
    assert np.asarray(open_image((tmp_path / "a.png").read_bytes())).shape == (6, 5, 3)
    assert np.asarray(open_image(str(tmp_path / "a.jpg"))).shape == (6, 5, 3)
    pil = Image.open(io.BytesIO((tmp_path / "a.png").read_bytes()))
    assert np.array_equal(np.asarray(open_image(pil)), rgb)
    assert np.asarray(open_image(tmp_path / "gray16.png")).tolist()[0][0] == [128, 128, 128]
