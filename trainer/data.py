"""Prompt datasets: a folder with ``train.txt|train.jsonl`` and optional ``test.txt|test.jsonl``.

``.txt``: one prompt per non-empty line. ``.jsonl``: one JSON object per line with a
``prompt`` string and optionally ``negative_prompt``, ``image``/``images``,
``video``/``videos`` (paths relative to ``data.image_dir`` / ``data.video_dir``, by default
``{dataset_dir}/images`` and ``{dataset_dir}/videos``; absolute paths are kept). At load every
image of the rows used is checked to exist and decode (videos: to exist), and the rows carry the
resolved paths. A bad row raises an error naming the file, the line and the fix; nothing is
skipped silently. :func:`check_condition_images` checks the rows against a model's number of
condition images.

Every other column of a ``.jsonl`` row, and the keys of an optional ``metadata`` object, are the
row's metadata: they travel with its samples to the rewards that read them
(``RewardModel.metadata``), e.g. GenEval's ``{"tag": ..., "include": [...], "exclude": [...]}``
as Flow-GRPO and Flow-Factory ship it. A column that looks like a misspelt flowrl key
(``promt``, ``imges``) is an error, not metadata.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from shared.condition_images import condition_count_error, unreadable_reason
from shared.registry import edit_distance

ALLOWED_KEYS = {"prompt", "negative_prompt", "image", "images", "video", "videos", "metadata"}
ROW_KEYS = ALLOWED_KEYS - {"metadata"}  # the columns flowrl itself reads; the rest is metadata
log = logging.getLogger("flowrl.trainer")


class DatasetError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class PromptRow:
    prompt: str
    negative_prompt: str | None = None
    images: tuple[str, ...] = ()  # condition images; resolved paths after load_prompts / read_split
    videos: tuple[str, ...] = ()
    source: str = dataclasses.field(default="", compare=False)  # "file:line" for error messages
    dataset: str = dataclasses.field(default="", compare=False)  # its data.datasets name ("" = data.dataset_dir)
    metadata: str = ""  # its other JSONL columns, as one JSON object text (sorted keys); "" = none


def _swapped(a: str, b: str) -> bool:
    """``a`` is ``b`` with two neighbouring letters swapped (``vidoe``, ``imgae``)."""
    diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    return len(a) == len(b) and len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] \
        and a[diff[1]] == b[diff[0]]


def misspelt(key: str) -> str | None:
    """The known row key ``key`` looks like a misspelling of (a different case, a plural of a singular
    key, two neighbouring letters swapped, or at most two edits away, one for keys under six letters),
    else None. A known key with another prefix or suffix (``prompt_id``, ``videoid``) is a column of its
    own, not a misspelling."""
    low = key.lower()
    if low in ALLOWED_KEYS:
        return low
    plural = [k for k in sorted(ALLOWED_KEYS) if low == k + "s"]  # negative_prompts, prompts
    if plural:
        return plural[0]
    swapped = [k for k in sorted(ALLOWED_KEYS) if _swapped(low, k)]
    if swapped:
        return swapped[0]
    if any(low.startswith(k) or low.endswith(k) for k in ALLOWED_KEYS):
        return None
    close = [(edit_distance(low, k), k) for k in sorted(ALLOWED_KEYS)]
    close = [(d, k) for d, k in close if d <= min(2, len(k) // 3)]
    return min(close)[1] if close else None


def _row_metadata(obj: dict, where: str) -> str:
    """The row's metadata (module docstring) as compact JSON with sorted keys, "" when it has none."""
    extra = {k: v for k, v in obj.items() if k not in ALLOWED_KEYS}
    for key in extra:
        close = misspelt(key)
        if close:
            raise DatasetError(f"{where}: unknown key {key!r} (did you mean {close!r}?). Fix: rename it; "
                               f"columns flowrl does not read ({', '.join(sorted(ROW_KEYS))}) are passed to "
                               f'rewards as metadata, so put a deliberate one under "metadata": {{...}}.')
    nested = obj.get("metadata") or {}
    if not isinstance(nested, dict):
        raise DatasetError(f'{where}: "metadata" must be a JSON object, got {type(nested).__name__}. Fix: '
                           f'"metadata": {{"tag": "counting", ...}}, or put the values in their own columns.')
    clash = sorted(set(nested) & set(extra))
    if clash:
        raise DatasetError(f'{where}: {clash} given both as a column and inside "metadata". Fix: keep one.')
    merged = {**nested, **extra}
    return json.dumps(merged, sort_keys=True, separators=(",", ":")) if merged else ""


def _parse_jsonl_line(line: str, where: str) -> PromptRow:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: not valid JSON ({e.msg}). Fix: one JSON object per line, "
                           f'e.g. {{"prompt": "a red cube"}}.') from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}. Fix: write the row "
                           f'as {{"prompt": "..."}} (a plain-text prompt list belongs in train.txt).')
    metadata = _row_metadata(obj, where)
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

    return PromptRow(prompt.strip(), negative, listed("image", "images"), listed("video", "videos"), where,
                     metadata=metadata)


def _resolve_media(rows: list[PromptRow], image_dir: Path, video_dir: Path) -> list[PromptRow]:
    """Rows with their image / video paths resolved against the folders and checked (images must
    decode, videos exist); the first bad one is an error naming file:line, the path and the fix."""
    checked: dict[Path, str | None] = {}

    def resolve(row: PromptRow, rel: str, folder: Path, key: str, check) -> str:
        path = Path(rel) if Path(rel).is_absolute() else folder / rel
        if path not in checked:
            checked[path] = check(path)
        reason = checked[path]
        if reason is None:
            return str(path)
        if reason in ("no such file", "not a file"):
            fix = (f"put the file at {path}, or set data.{key}_dir to the folder that holds it "
                   f"(default: {{dataset_dir}}/{key}s; it is now {folder})")
        else:
            fix = f"replace {path} with a valid image (PNG, JPEG, WebP, ...)"
        raise DatasetError(f"{row.source}: {key} {rel!r} -> {path}: {reason}. Fix: {fix}.")

    def exists(path: Path) -> str | None:
        return None if path.is_file() else "no such file" if not path.exists() else "not a file"

    out = []
    for row in rows:
        if not (row.images or row.videos):
            out.append(row)
            continue
        images = tuple(resolve(row, p, image_dir, "image", unreadable_reason) for p in row.images)
        videos = tuple(resolve(row, p, video_dir, "video", exists) for p in row.videos)
        out.append(dataclasses.replace(row, images=images, videos=videos))
    return out


def check_condition_images(rows: list[PromptRow], model_type: str, allowed: tuple[int, int | None]) -> None:
    """Every row has a number of condition images ``model_type`` takes (``allowed = (min, max)``,
    the adapter's ``condition_images``) and, for image-conditioned models, all rows the same
    number (condition latents are batched). Errors name the row's file:line and the fix."""
    for row in rows:
        if (error := condition_count_error(model_type, allowed, len(row.images))) is not None:
            raise DatasetError(f"{row.source or 'a dataset row'}: {error}")
    counts = {len(row.images) for row in rows}
    if allowed != (0, 0) and len(counts) > 1:
        first = rows[0]
        other = next(r for r in rows if len(r.images) != len(first.images))
        raise DatasetError(
            f"{other.source}: {len(other.images)} condition image(s), but {first.source} has "
            f"{len(first.images)}; {model_type} batches condition latents, so every row needs the same "
            f"number. Fix: give every row the same number of images (or split the dataset).")


def check_reward_rows(specs, rows: list[PromptRow] | None, section: str = "rewards") -> None:
    """Every row a reward that reads row metadata will score (its ``datasets``, else all) has
    metadata it can use (``RewardModel.row_problem``); the first that does not is an error naming
    its file:line. Rewards given by a dotted path that does not import here are left out."""
    from shared.rewards import REWARDS

    for spec in specs:
        try:
            cls = REWARDS.get(spec.reward_model)
        except Exception:  # noqa: BLE001 - a plugin only the reward worker has: checked there
            continue
        if not getattr(cls, "metadata", False):
            continue
        for row in rows or []:
            if spec.datasets and row.dataset not in spec.datasets:
                continue
            problem = cls.row_problem(json.loads(row.metadata) if row.metadata else {}, spec.options)
            if problem:
                raise DatasetError(f"{row.source or 'a dataset row'}: {section}['{spec.label}'] ({spec.reward_model}) "
                                   f"cannot score this row: {problem}")


def _lines(path: Path) -> list[str]:
    """The file's lines as text; a line that is not UTF-8 is an error naming its number."""
    lines = []
    for n, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        try:
            lines.append(raw.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            raise DatasetError(f"{path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}). "
                               f"Fix: save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8).") from None
    # a byte-order mark some editors write, also where files were concatenated (cat a.txt b.txt): the
    # mark is invisible in an editor, and it would begin that prompt or fail that JSON row
    return [line[1:] if line.startswith("\ufeff") else line for line in lines]


def read_split(dataset_dir: str | Path, split: str, max_size: int | None = None, *,
               image_dir: str | Path | None = None, video_dir: str | Path | None = None
               ) -> list[PromptRow] | None:
    """Rows of ``{split}.jsonl`` or ``{split}.txt`` (else ``{split}_metadata.jsonl``, as Flow-GRPO's
    ``dataset/geneval`` names them); None if none of them exists. Image and video
    paths of the rows kept are resolved against ``image_dir`` / ``video_dir`` (default
    ``{dataset_dir}/images`` / ``videos``) and checked."""
    root = Path(dataset_dir)
    jsonl, txt = root / f"{split}.jsonl", root / f"{split}.txt"
    if not jsonl.is_file() and not txt.is_file() and (root / f"{split}_metadata.jsonl").is_file():
        jsonl = root / f"{split}_metadata.jsonl"  # Flow-GRPO's GenEval folder names its splits so
    if jsonl.is_file() and txt.is_file():
        log.warning("%s and %s both exist: reading %s only", jsonl, txt.name, jsonl.name)
    if jsonl.is_file():
        rows = [_parse_jsonl_line(ln, f"{jsonl}:{n}") for n, ln in enumerate(_lines(jsonl), 1) if ln.strip()]
    elif txt.is_file():
        rows = [PromptRow(ln.strip(), source=f"{txt}:{n}") for n, ln in enumerate(_lines(txt), 1) if ln.strip()]
    else:
        return None
    if not rows:
        raise DatasetError(f"{jsonl if jsonl.is_file() else txt} has no prompts. Fix: add at "
                           f"least one prompt.")
    rows = rows[:max_size] if max_size else rows
    return _resolve_media(rows, Path(image_dir) if image_dir is not None else root / "images",
                          Path(video_dir) if video_dir is not None else root / "videos")


def load_prompts(dataset_dir: str | Path, max_size: int | None = None, *,
                 image_dir: str | Path | None = None, video_dir: str | Path | None = None
                 ) -> tuple[list[PromptRow], list[PromptRow] | None]:
    """(train rows, test rows or None); ``image_dir`` / ``video_dir``: ``data.image_dir`` /
    ``data.video_dir`` (``None`` = ``{dataset_dir}/images`` / ``videos``)."""
    if not Path(dataset_dir).is_dir():
        raise DatasetError(f"data.dataset_dir: {str(dataset_dir)!r} is not a folder. Fix: point it "
                           f"at a folder holding train.txt or train.jsonl.")
    media = {"image_dir": image_dir, "video_dir": video_dir}
    train = read_split(dataset_dir, "train", max_size, **media)
    if train is None:
        raise DatasetError(f"data.dataset_dir: {str(dataset_dir)!r} has no train.txt or "
                           f"train.jsonl. Fix: add one (one prompt per line).")
    return train, read_split(dataset_dir, "test", **media)


def load_dataset(data_cfg) -> tuple[list[PromptRow], list[PromptRow] | None]:
    """:func:`load_prompts` for a ``data:`` config section (``shared.config.DataConfig``).

    With ``data.datasets``: every source's rows, tagged with its name (``PromptRow.dataset``), in
    the list's order: the train rows of the sources that train, and as held-out rows each evaluated
    source's test split (its train rows when it has none, as for one folder); None when no source
    is evaluated."""
    if data_cfg.datasets is None:
        return load_prompts(data_cfg.dataset_dir, data_cfg.max_dataset_size, image_dir=data_cfg.image_dir,
                            video_dir=data_cfg.video_dir)
    train: list[PromptRow] = []
    held: list[PromptRow] = []
    for src in data_cfg.datasets:
        where = f"data.datasets '{src.name}'"
        if not Path(src.dataset_dir).is_dir():
            raise DatasetError(f"{where}: dataset_dir {str(src.dataset_dir)!r} is not a folder. Fix: point it at a "
                               f"folder holding its splits ({src.train.split if src.train else 'train'}.jsonl, ...).")
        tag = lambda rows: [dataclasses.replace(r, dataset=src.name) for r in rows]  # noqa: E731
        media = {"image_dir": src.image_dir, "video_dir": src.video_dir}
        split = src.train.split if src.train else "train"
        mine = None
        if src.train is not None:
            mine = read_split(src.dataset_dir, split, src.train.max_dataset_size, **media)
            if mine is None:
                raise DatasetError(f"{where}: {str(src.dataset_dir)!r} has no {split}.txt or {split}.jsonl. Fix: add "
                                   f"one, or set train.split to the file's name without its extension.")
            train += tag(mine)
        if src.eval is not None:  # (only the rows evaluated are resolved and checked)
            rows = read_split(src.dataset_dir, src.eval.split, src.eval.max_dataset_size, **media)
            if rows is None and "split" in src.eval.model_fields_set:  # named on purpose: not a fallback
                raise DatasetError(f"{where}: {str(src.dataset_dir)!r} has no {src.eval.split}.txt or "
                                   f"{src.eval.split}.jsonl, which eval.split names. Fix: add it, or drop eval.split "
                                   f"(then test, else the train rows, are evaluated).")
            if rows is None:  # no test split: the train rows are evaluated, as for one folder
                rows = mine if mine is not None else read_split(src.dataset_dir, split, **media)
            if rows is None:
                raise DatasetError(f"{where}: {str(src.dataset_dir)!r} has neither {src.eval.split}.txt|jsonl nor "
                                   f"{split}.txt|jsonl to evaluate on. Fix: add one, or set eval.split.")
            held += tag(rows[:src.eval.max_dataset_size] if src.eval.max_dataset_size else rows)
    return train, held or None


def eval_subset(rows: list[PromptRow], n: int | None) -> list[PromptRow]:
    """The held-out rows ``eval.num_prompts`` = ``n`` evaluates (None: all): the first ``n``; with
    several ``data.datasets`` sources, ``n`` shared among them in turn (each source's first rows), so no
    evaluated source drops out (the first source's rows alone filled ``n``). The rows keep their order."""
    if n is None or n >= len(rows):
        return rows
    sources = list(dict.fromkeys(r.dataset for r in rows))
    if len(sources) < 2:
        return rows[:n]
    queues = [[i for i, r in enumerate(rows) if r.dataset == s] for s in sources]
    picked: list[int] = []
    for k in range(max(len(q) for q in queues)):
        picked += [q[k] for q in queues if k < len(q)][: n - len(picked)]
    return [rows[i] for i in sorted(picked)]

