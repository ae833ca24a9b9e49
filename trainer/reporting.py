"""Metrics logging (tensorboard / wandb / swanlab / none, plus always ``metrics.jsonl``),
image grids and the end-of-run report with a reward curve."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


class MetricLogger:
    """Writes every metric to ``{run_dir}/metrics.jsonl`` and to the chosen backend."""

    def __init__(self, backend: str, run_dir: Path, project: str, run_name: str,
                 config: dict[str, Any], resume: bool = False, purge_step: int | None = None) -> None:
        """``resume``: the run continues from a checkpoint; a wandb / swanlab run then continues the
        online run this folder logged to before (its id is kept in ``logger_run.json``), instead of
        opening a second one. Without it a new online run is opened and its id kept.
        ``purge_step``: TensorBoard forgets this folder's events from that step on (what a crashed run
        logged after the checkpoint being resumed, as ``metrics.jsonl`` forgets it)."""
        self.run_dir = run_dir
        self.jsonl = (run_dir / "metrics.jsonl").open("a")
        self.backend = backend
        self._tb = self._wandb = self._swan = None
        if backend == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)
        elif backend == "wandb":
            self._wandb = _import_or_explain("wandb")
            run = self._wandb.init(project=project, name=run_name, config=config, dir=str(run_dir),
                                   **self._continued(resume))
            self._keep_id(run)
        elif backend == "swanlab":
            self._swan = _import_or_explain("swanlab")
            run = self._swan.init(project=project, experiment_name=run_name, config=config,
                                  logdir=str(run_dir), **self._continued(resume))
            self._keep_id(run)

    ID_FILE = "logger_run.json"

    def _continued(self, resume: bool) -> dict[str, Any]:
        """``{id, resume: "allow"}`` of the online run this folder logged to, when resuming."""
        path = self.run_dir / self.ID_FILE
        if not resume or not path.is_file():
            return {}
        saved = json.loads(path.read_text())
        return {"id": saved["id"], "resume": "allow"} if saved.get("backend") == self.backend else {}

    def _keep_id(self, run: Any) -> None:
        run_id = getattr(run, "id", None)
        if isinstance(run_id, str) and run_id:
            (self.run_dir / self.ID_FILE).write_text(json.dumps({"backend": self.backend, "id": run_id}))

    def log(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items()}
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self.jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)
        if self._swan is not None:
            self._swan.log(clean, step=step)

    def log_image(self, tag: str, path: Path, step: int) -> None:
        if self._tb is not None:
            arr = np.asarray(Image.open(path).convert("RGB"))
            self._tb.add_image(tag, arr, step, dataformats="HWC")
        if self._wandb is not None:
            self._wandb.log({tag: self._wandb.Image(str(path))}, step=step)
        if self._swan is not None:
            self._swan.log({tag: self._swan.Image(str(path))}, step=step)

    def log_videos(self, tag: str, videos: list[tuple[Path, str]], step: int) -> None:
        """Animated GIFs (:func:`save_video`) with their captions: wandb / swanlab videos; TensorBoard
        shows each under ``{tag}/{i}`` in its image tab (the GIF's own bytes, as its add_video does)."""
        if self._tb is not None:
            from tensorboard.compat.proto.summary_pb2 import Summary

            for i, (path, _) in enumerate(videos):
                with Image.open(path) as first:
                    w, h = first.size
                image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=Path(path).read_bytes())
                self._tb._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=f"{tag}/{i}", image=image)]),
                                                        step)
        if self._wandb is not None:
            self._wandb.log({tag: [self._wandb.Video(str(p), caption=c, format="gif") for p, c in videos]}, step=step)
        if self._swan is not None:
            media = getattr(self._swan, "Video", None) or self._swan.Image
            self._swan.log({tag: [media(str(p), caption=c) for p, c in videos]}, step=step)

    def close(self) -> None:
        self.jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._swan is not None:
            self._swan.finish()


def _import_or_explain(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise ImportError(
            f"logging_backend: {name} needs the '{name}' package. Fix: pip install 'flowrl[{name}]' "
            f"or set logging_backend: tensorboard (offline) or none."
        ) from None


#: frames of a video an eval grid shows (evenly spaced, first and last included)
GRID_FRAMES = 8


def grid_frames(num_frames: int) -> list[int]:
    """The frames of a video a grid row shows: up to :data:`GRID_FRAMES`, evenly spread, first and last included."""
    k = min(num_frames, GRID_FRAMES)
    return sorted({round(i * (num_frames - 1) / max(k - 1, 1)) for i in range(k)})


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None, upscale: int = 4) -> Path:
    """Save ``[N, 3, H, W]`` images in [0, 1] (or uint8) as one PNG grid (nearest upscaled for small
    images). Videos ``[N, F, 3, H, W]``: one row per video, up to :data:`GRID_FRAMES` of its frames."""
    if images.dtype == torch.uint8:
        images = images.float() / 255
    if images.ndim == 5:
        picks = grid_frames(images.shape[1])
        images, nrow = images[:, picks].flatten(0, 1), len(picks)
    n, _, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    pad = 2
    grid = np.ones((ncol * (h + pad) + pad, nrow * (w + pad) + pad, 3), dtype=np.uint8) * 255
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = arr[i]
    img = Image.fromarray(grid)
    if upscale > 1 and max(h, w) < 128:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def markdown_text(text: str) -> str:
    """``text`` on one Markdown line, its markup characters escaped."""
    out = " ".join(text.split())
    for ch in "\\`*_[]<>|#":
        out = out.replace(ch, "\\" + ch)
    return out


def save_video(frames: torch.Tensor, path: Path, fps: float) -> Path:
    """Save a video ``[F, 3, H, W]`` (uint8, or float in [0, 1]) as a looping animated GIF at ``fps``
    (PIL alone: no video codec to install; wandb and swanlab play it, TensorBoard's image tab and
    Markdown viewers animate it). GIF keeps 256 colours a frame and frame times in 1/100 s, so the
    frames' times alternate (:func:`gif_frame_times`; 16 fps: 60, 60, 70, 60 ms, ...) to keep the clip's
    pace: a preview, not the samples."""
    if frames.dtype != torch.uint8:
        from shared.store import to_uint8

        frames = to_uint8(frames)
    pictures = [Image.fromarray(f) for f in frames.permute(0, 2, 3, 1).cpu().numpy()]
    path.parent.mkdir(parents=True, exist_ok=True)
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=gif_frame_times(len(pictures), fps),
                     loop=0)
    return path


def gif_frame_times(n: int, fps: float) -> list[int]:
    """Milliseconds each of ``n`` frames shows at ``fps``, in the whole 1/100 s a GIF stores: frame
    ``i`` ends at ``i + 1`` frame periods rounded to 1/100 s, so no frame is more than 5 ms off its
    time and the clip lasts ``n / fps`` seconds to 1/100 s. At least 2/100 s a frame (browsers show a
    shorter delay as 1/10 s), which caps the pace at 50 fps."""
    ends = [round((i + 1) * 100 / fps) for i in range(n)]
    return [10 * max(2, end - start) for start, end in zip([0] + ends[:-1], ends)]


def save_group_grid(images: torch.Tensor, group_ids: torch.Tensor, rewards: torch.Tensor,
                    advantages: torch.Tensor, path: Path, prompts: list[str] | None = None,
                    max_groups: int = 4, max_members: int = 8, tile: int = 128) -> Path:
    """One row per prompt group (the first ``max_groups`` of the epoch), its members side by side
    (up to ``max_members``) under the group's prompt (``prompts``, per sample), each captioned with
    its reward ``r`` and advantage ``A``: what a group
    relative update learns from, to look at while a run trains. ``images`` ``[n, 3, H, W]`` in
    [0, 1] (videos ``[n, F, 3, H, W]``: the middle frame); ``group_ids``, ``rewards`` (NaN: no
    score), ``advantages`` ``[n]``. Tiles are resized to ``tile`` pixels on their long side."""
    from PIL import ImageDraw

    from shared.images import to_uint8_hwc

    if images.ndim == 5:
        images = images[:, images.shape[1] // 2]
    order: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids.tolist()):
        if g in order or len(order) < max_groups:
            order.setdefault(g, []).append(i)
    rows = [members[:max_members] for members in order.values()]
    h, w = images.shape[-2:]
    scale = tile / max(h, w)
    th, tw, caption, pad = round(h * scale), round(w * scale), 14, 2
    cols = max(len(r) for r in rows)
    row_h = caption + th + caption + pad  # the prompt, the tiles, their scores
    grid = Image.new("RGB", (pad + cols * (tw + pad), pad + len(rows) * row_h), "white")
    draw = ImageDraw.Draw(grid)
    arr = to_uint8_hwc(images)
    resample = Image.NEAREST if max(h, w) < tile else Image.BILINEAR
    for r, members in enumerate(rows):
        if prompts is not None:
            draw.text((pad + 2, pad + r * row_h + 1), prompts[members[0]][:cols * tw // 6], fill=(0, 0, 0))
        for c, i in enumerate(members):
            x, y = pad + c * (tw + pad), pad + r * row_h + caption
            grid.paste(Image.fromarray(arr[i]).resize((tw, th), resample), (x, y))
            reward = float(rewards[i])
            text = ("r=nan" if math.isnan(reward) else f"r={reward:.2f}") + f" A={float(advantages[i]):+.2f}"
            draw.text((x + 2, y + th + 1), text, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def progress_postfix(metrics: dict[str, float], last_eval: dict[str, float], train_label: str,
                     eval_label: str) -> dict[str, str]:
    """The progress bar's fields: the epoch's mean training reward (``reward``), the last
    evaluation's mean reward (``eval``) and, when that reward summarizes its details into an
    ``accuracy`` (toy_geneval's GenEval overall score), that accuracy (``acc``)."""
    out = {"reward": f"{metrics.get(f'train/reward/{train_label}', 0.0):.4f}",
           "eval": f"{last_eval.get(f'eval/reward/{eval_label}', float('nan')):.4f}"}
    accuracy = last_eval.get(f"eval/{eval_label}/accuracy")
    if accuracy is not None:
        out["acc"] = f"{accuracy:.4f}"
    return out


def detail_keys(ev: dict[str, Any]) -> list[str]:
    """Reward-detail keys of an eval dict (``eval/{label}/{key}`` minus ``eval/``), sorted."""
    return sorted(k[len("eval/"):] for k in ev if k.startswith("eval/") and not k.startswith("eval/reward/"))


def detail_styles(keys: list[str]) -> list[tuple[str, str, str]]:
    """``(key, colour, line style)`` per detail key: keys ending in the same name share a colour
    and each family (the part before it) has its own line style, so e.g.
    ``toy_geneval/accuracy/position`` and ``toy_geneval/present/position`` are paired at a glance."""
    parts = [k.rsplit("/", 1) for k in keys]  # [family, name] ([key] when it has no "/")
    names = sorted({p[-1] for p in parts})
    families = sorted({p[0] for p in parts})
    styles = ["-", "--", ":", "-."]
    return [(k, f"C{names.index(p[-1]) % 10}", styles[families.index(p[0]) % 4]) for k, p in zip(keys, parts)]


def plot_curves(path: Path, history: list[dict[str, float]], evals: list[dict[str, float]],
                reward_names: list[str], title: str) -> Path:
    """Reward vs training wall-clock time (train rollouts per epoch, eval points); a second panel
    with the reward details (e.g. per-category accuracy) when the rewards report any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    details = detail_keys(evals[-1]) if evals else []
    fig, axes = plt.subplots(1, 2 if details else 1, figsize=(13 if details else 7, 4), squeeze=False)
    ax = axes[0][0]
    minutes = lambda rows: [r.get("time/train_seconds", 0.0) / 60 for r in rows]  # noqa: E731
    for name in reward_names:
        key = f"train/reward/{name}"
        if history and key in history[0]:
            values = [h[key] for h in history]
            line, = ax.plot(minutes(history), values, label=f"train {name} (rollouts)", alpha=0.35)
            if len(values) >= 20:  # a noisy per-epoch curve: its trend, a centred mean of 10 epochs
                window = [values[max(0, i - 5):i + 5] for i in range(len(values))]
                ax.plot(minutes(history), [sum(w) / len(w) for w in window], color=line.get_color(),
                        label=f"train {name}, mean of 10 epochs")
        ekey = f"eval/reward/{name}"
        if evals and ekey in evals[0]:
            ax.plot(minutes(evals), [e[ekey] for e in evals], "o-", label=f"eval {name} (ODE, fixed seeds)")
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if details:
        ax = axes[0][1]
        for key, color, style in detail_styles(details):
            ax.plot(minutes(evals), [e.get(f"eval/{key}", float("nan")) for e in evals], marker="o",
                    linestyle=style, color=color, label=key)
        ax.set_xlabel("training time (minutes)")
        ax.set_title("eval details (held-out prompts)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(run_dir: Path, history: list[dict[str, float]], evals: list[dict[str, float]],
                 reward_names: list[str], summary: dict[str, Any]) -> Path:
    """``report.md``: base vs final eval rewards and details, the reward-vs-time curve
    (``reward_curve.png``), the before/after eval grids (same prompts and seeds) and every eval grid."""
    plot_curves(run_dir / "reward_curve.png", history, evals, reward_names,
                f"{summary.get('trainer_type')} on {summary.get('model_type')}")
    lines = [f"# flowrl run `{summary.get('run_name')}`", "",
             f"- algorithm: {summary.get('trainer_type')}, model: {summary.get('model_type')}",
             f"- epochs: {summary.get('epochs')}, training time: {summary.get('train_seconds', 0):.1f} s (all starts), "
             f"wall time of this start: {summary.get('seconds', 0):.1f} s", ""]
    for name in reward_names:
        base, final = summary.get(f"base/{name}"), summary.get(f"final/{name}")
        if base is not None and final is not None:
            lines.append(f"- eval `{name}`: base {base:.4f} -> final {final:.4f} ({final - base:+.4f})")
    details = detail_keys(evals[-1]) if evals else []
    if details:
        lines += ["", "| eval detail | base | final | change |", "|---|---|---|---|"]
        fell = []
        for key in details:
            base, final = summary.get(f"base/{key}"), summary.get(f"final/{key}")
            if base is not None and final is not None:
                lines.append(f"| {key} | {base:.3f} | {final:.3f} | {final - base:+.3f} |")
                if final < base:
                    fell.append(f"{key} ({final - base:+.3f})")
        # a gain in the overall score bought with a loss elsewhere (reward hacking of one part)
        lines += ["", "Below their base value: " + (", ".join(fell) if fell else "none") + "."]
    lines += ["", "![reward vs time](reward_curve.png)", ""]
    if len(evals) > 1 and evals[0].get("grid") and evals[-1].get("grid"):
        lines += ["## Before and after (same prompts, same seeds)", "",
                  "| before (base model) | after |", "|---|---|",
                  f"| ![before]({evals[0]['grid']}) | ![after]({evals[-1]['grid']}) |", ""]
    if evals and evals[-1].get("videos"):
        lines += ["## Videos of the last evaluation", ""]
        lines += [f"![video {n}]({v['path']}) {markdown_text(v['prompt'])}"
                  for n, v in enumerate(evals[-1]["videos"])] + [""]
    lines += ["## Every evaluation", ""]
    for e in evals:
        grid = e.get("grid")
        if grid:
            lines.append(f"epoch {int(e['epoch'])}: ![eval grid]({grid})")
    report = run_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return report
