"""Condition images of image-conditioned (edit) models: how a sample's images are given and opened.

A sample's condition images travel as *sources*: a local file path (``str`` / ``Path``, what a
dataset row's ``image`` / ``images`` resolve to), the file's raw bytes (fetched from the blob store
in the distributed mode: the trainer uploads each dataset file once, unchanged), or an opened PIL
image. :func:`open_rows` turns one batch's sources into RGB PIL images for the adapter, opening
each distinct source once, so the members of a prompt group share their image objects (adapters
encode each distinct image once).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Sequence, Union

from PIL import Image

from shared.images import rgb

ImageSource = Union[str, Path, bytes, Image.Image]


def open_image(source: ImageSource) -> Image.Image:
    """One source as a fully loaded RGB PIL image (the file is closed again)."""
    if isinstance(source, Image.Image):
        return rgb(source)
    if isinstance(source, bytes):
        with Image.open(io.BytesIO(source)) as im:
            return rgb(im)
    with Image.open(source) as im:
        return rgb(im)


def _key(source: ImageSource):
    if isinstance(source, Image.Image):
        return ("pil", id(source))
    if isinstance(source, bytes):
        return ("bytes", hashlib.sha256(source).hexdigest())
    return ("path", str(source))


def fetch_rows(store, rows: Sequence[Sequence]) -> list[list[bytes]]:
    """Per sample, the bytes of its condition images' blobs (``BlobRef`` rows) from ``store``
    (:class:`shared.store.BlobStore`), each distinct blob read once (a group's members share theirs)."""
    fetched: dict[str, bytes] = {}
    for row in rows:
        for ref in row:
            if ref.uri not in fetched:
                fetched[ref.uri] = store.get_bytes(ref)
    return [[fetched[ref.uri] for ref in row] for row in rows]


def open_rows(rows: Sequence[Sequence[ImageSource]]) -> list[list[Image.Image]]:
    """Per sample, its condition images as RGB PIL images; a source repeated across samples (the
    members of a group) is opened once and the SAME object is returned for each."""
    cache: dict = {}
    out = []
    for row in rows:
        opened = []
        for source in row:
            key = _key(source)
            if key not in cache:
                cache[key] = open_image(source)
            opened.append(cache[key])
        out.append(opened)
    return out


def unreadable_reason(path: Path) -> str | None:
    """Why ``path`` is not a usable image (``None`` when it is): missing, not a file, or not
    decodable by PIL (the whole file is checked, not only its header)."""
    if not path.exists():
        return "no such file"
    if not path.is_file():
        return "not a file"
    try:
        with Image.open(path) as im:
            im.verify()  # reads the whole file: truncated or corrupt data fails here
    except Exception as e:  # PIL raises many types for bad data (OSError, SyntaxError, ...)
        return f"not a readable image ({type(e).__name__}: {e})"
    return None


def condition_count_error(model_type: str, allowed: tuple[int, int | None], count: int) -> str | None:
    """Why ``count`` condition images do not fit ``model_type`` (``allowed = (min, max)``, ``max``
    ``None`` = any), or ``None`` when they do."""
    lo, hi = allowed
    if lo <= count and (hi is None or count <= hi):
        return None
    if hi == 0:
        return (f"model_type {model_type} takes no condition images, but the row has {count}. Fix: remove "
                f'"image"/"images" from the dataset rows, or use an image-conditioned model '
                f"(flux1-kontext, qwen-image-edit-plus).")
    want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
    return (f"model_type {model_type} takes {want} condition image(s) per row, but the row has {count}. "
            f'Fix: give each row {want} image(s) with "image": "file.png" or "images": [...] '
            f"(paths relative to data.image_dir).")
