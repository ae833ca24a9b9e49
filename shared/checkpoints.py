"""Where a run's checkpoints are: ``<output_dir>/<run_name>/checkpoints/`` holds ``checkpoint-<N>``
folders (``train.save_freq``), ``final``, and ``*.tmp`` folders of a save in progress (or one a crash
interrupted), which never count as checkpoints."""

from __future__ import annotations

from pathlib import Path


def numbered_checkpoints(folder: Path) -> list[Path]:
    """The complete ``checkpoint-<N>`` folders of a run's ``checkpoints/`` folder, oldest (lowest N) first."""
    found = [p for p in Path(folder).glob("checkpoint-*") if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]))
