"""Prompt datasets: a folder with ``train.txt|train.jsonl`` and optional ``test.txt|test.jsonl``.

``.txt``: one prompt per non-empty line. ``.jsonl``: one JSON object per line with a
``prompt`` string and optionally ``negative_prompt``, ``image``/``images``,
``video``/``videos`` (paths relative to ``data.image_dir`` / ``data.video_dir``).
A bad row raises an error naming the file, the line and the fix; nothing is skipped silently.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

ALLOWED_KEYS = {"prompt", "negative_prompt", "image", "images", "video", "videos", "metadata"}


class DatasetError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class PromptRow:
    prompt: str
    negative_prompt: str | None = None
    images: tuple[str, ...] = ()
    videos: tuple[str, ...] = ()


def _parse_jsonl_line(line: str, where: str) -> PromptRow:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: not valid JSON ({e.msg}). Fix: one JSON object per line, "
                           f'e.g. {{"prompt": "a red cube"}}.') from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}. Fix: write the row "
                           f'as {{"prompt": "..."}} (a plain-text prompt list belongs in train.txt).')
    unknown = set(obj) - ALLOWED_KEYS
    if unknown:
        raise DatasetError(f"{where}: unknown key(s) {sorted(unknown)}. Fix: use only "
                           f"{sorted(ALLOWED_KEYS)}.")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DatasetError(f'{where}: missing or empty "prompt" string. Fix: add '
                           f'"prompt": "..." to this row.')
    negative = obj.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise DatasetError(f'{where}: "negative_prompt" must be a string, got '
                           f'{type(negative).__name__}.')

    def listed(one: str, many: str) -> tuple[str, ...]:
        if one in obj and not isinstance(obj[one], str):
            raise DatasetError(f'{where}: "{one}" must be a path string, got '
                               f'{type(obj[one]).__name__}. Fix: use "{many}": [...] for several.')
        paths = obj.get(many, [])
        if not isinstance(paths, list) or not all(isinstance(x, str) for x in paths):
            raise DatasetError(f'{where}: "{many}" must be a list of path strings. Fix: '
                               f'"{many}": ["a.png"], or "{one}": "a.png" for one.')
        return tuple(([obj[one]] if one in obj else []) + paths)

    return PromptRow(prompt.strip(), negative, listed("image", "images"), listed("video", "videos"))


def _lines(path: Path) -> list[str]:
    """The file's lines as text; a line that is not UTF-8 is an error naming its number."""
    lines = []
    for n, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        try:
            lines.append(raw.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            raise DatasetError(f"{path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}). "
                               f"Fix: save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8).") from None
    if lines and lines[0].startswith("\ufeff"):  # a byte-order mark some editors write
        lines[0] = lines[0][1:]
    return lines


def read_split(dataset_dir: str | Path, split: str, max_size: int | None = None) -> list[PromptRow] | None:
    """Rows of ``{split}.jsonl`` or ``{split}.txt``; None if neither file exists."""
    root = Path(dataset_dir)
    jsonl, txt = root / f"{split}.jsonl", root / f"{split}.txt"
    if jsonl.is_file():
        rows = [_parse_jsonl_line(ln, f"{jsonl}:{n}") for n, ln in enumerate(_lines(jsonl), 1) if ln.strip()]
    elif txt.is_file():
        rows = [PromptRow(ln.strip()) for ln in _lines(txt) if ln.strip()]
    else:
        return None
    if not rows:
        raise DatasetError(f"{jsonl if jsonl.is_file() else txt} has no prompts. Fix: add at "
                           f"least one prompt.")
    return rows[:max_size] if max_size else rows


def load_prompts(dataset_dir: str | Path, max_size: int | None = None
                 ) -> tuple[list[PromptRow], list[PromptRow] | None]:
    """(train rows, test rows or None)."""
    if not Path(dataset_dir).is_dir():
        raise DatasetError(f"data.dataset_dir: {str(dataset_dir)!r} is not a folder. Fix: point it "
                           f"at a folder holding train.txt or train.jsonl.")
    train = read_split(dataset_dir, "train", max_size)
    if train is None:
        raise DatasetError(f"data.dataset_dir: {str(dataset_dir)!r} has no train.txt or "
                           f"train.jsonl. Fix: add one (one prompt per line).")
    return train, read_split(dataset_dir, "test")
