"""Video plumbing outside the model adapters: ``train.num_frames`` / ``eval.num_frames``, rewards on
videos ``[B, F, 3, H, W]`` (per frame and averaged, or native), eval grids of videos, and the trainer's
start-up check that the frames fit the model."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from shared.config import parse_config
from shared.rewards import build_reward
from shared.rewards.base import RewardModel, details_all, score_all
from shared.rewards.builtin import luma
from trainer.reporting import GRID_FRAMES, save_grid


def videos(b: int = 4, f: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, f, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_num_frames_config_keys():
    raw = {"rewards": [{"reward_model": "brightness"}], "train": {"num_frames": 5}}
    cfg = parse_config(raw)
    assert cfg.train.num_frames == 5 and cfg.eval.num_frames == 5  # eval defaults to train's
    cfg = parse_config({**raw, "eval": {"num_frames": 21}})
    assert cfg.eval.num_frames == 21
    assert parse_config({"rewards": raw["rewards"]}).train.num_frames is None
    with pytest.raises(ValueError, match="train.num_frames"):
        parse_config({**raw, "train": {"num_frames": 0}})


@pytest.mark.parametrize("name,kind", [("brightness", "pointwise"), ("pairwise_brightness", "pairwise")])
def test_image_rewards_score_videos_per_frame(name, kind):
    model = build_reward(name)
    assert model.kind == kind and model.video == "frames"
    v = videos()
    groups = torch.tensor([0, 0, 1, 1])
    got = score_all(model, v, ["p"] * 4, groups, batch_size=3)
    per_frame = torch.stack([score_all(model, v[:, f], ["p"] * 4, groups, batch_size=3) for f in range(3)], 1)
    torch.testing.assert_close(got, per_frame.mean(1))
    if kind == "pointwise":
        torch.testing.assert_close(got, torch.stack([luma(x).mean() for x in v]))


class FirstFrameOnly(RewardModel):
    """Abstains (NaN) on every frame but the first (marked by a white pixel)."""

    kind = "pointwise"

    def score(self, images, prompts):
        first = images[:, 0, 0, 0] == 1.0
        return torch.where(first, luma(images), torch.full_like(first, float("nan"), dtype=torch.float32))

    def details(self, images, prompts):
        return {"luma": luma(images)}


class NativeVideo(RewardModel):
    """Gets the whole video: the luma change from the first to the last frame."""

    kind = "pointwise"
    video = "native"

    def score(self, images, prompts):
        assert images.ndim == 5
        return luma(images[:, -1]) - luma(images[:, 0])


def test_frame_mean_ignores_abstaining_frames_and_native_rewards_get_the_video():
    v = videos()
    v[:, 0, 0, 0, 0] = 1.0
    v[2] = v[2].clone()
    v[2, 0, 0, 0, 0] = 0.5  # sample 2: every frame abstains
    got = score_all(FirstFrameOnly(), v, ["p"] * 4, torch.arange(4), batch_size=2)
    expected = luma(v[:, 0])
    expected[2] = float("nan")
    torch.testing.assert_close(got, expected, equal_nan=True)
    torch.testing.assert_close(details_all(FirstFrameOnly(), v, ["p"] * 4)["luma"],
                               torch.stack([luma(x).mean() for x in v]))
    torch.testing.assert_close(score_all(NativeVideo(), v, ["p"] * 4, torch.arange(4), batch_size=3),
                               luma(v[:, -1]) - luma(v[:, 0]))
    with pytest.raises(TypeError, match="video must be one of"):
        type("Bad", (RewardModel,), {"video": "whole"})


def test_eval_grid_of_videos_is_a_row_of_frames_per_video(tmp_path):
    save_grid(videos(2, 20), tmp_path / "grid.png", upscale=1)
    with Image.open(tmp_path / "grid.png") as im:  # 2 rows of GRID_FRAMES frames, 8 px + 2 px padding
        assert im.size == (GRID_FRAMES * 10 + 2, 2 * 10 + 2)
    save_grid(videos(3, 2), tmp_path / "short.png", upscale=1)
    with Image.open(tmp_path / "short.png") as im:
        assert im.size == (2 * 10 + 2, 3 * 10 + 2)


def test_trainer_refuses_frames_for_an_image_model(tmp_path):
    from trainer.loop import train

    (tmp_path / "train.txt").write_text("a red circle\n")
    cfg = parse_config({"rewards": [{"reward_model": "brightness"}], "logging_backend": "none",
                        "output_dir": str(tmp_path / "runs"), "data": {"dataset_dir": str(tmp_path)},
                        "train": {"num_frames": 5, "resolution": 32, "group_size": 2,
                                  "unique_sample_num_per_epoch": 1, "per_device_batch_size": 2}})
    with pytest.raises(ValueError, match="generates images.*num_frames"):
        train(cfg, quiet=True)


def test_save_video_writes_a_looping_gif(tmp_path):
    from trainer.reporting import save_video

    clip = torch.zeros(5, 3, 8, 12)
    for f in range(5):
        clip[f, 0] = f / 4  # the red channel brightens frame by frame
    path = save_video(clip, tmp_path / "v.gif", fps=8)
    with Image.open(path) as gif:
        assert gif.n_frames == 5 and gif.size == (12, 8) and gif.info["loop"] == 0
        reds = []
        for f in range(5):
            gif.seek(f)
            assert gif.info["duration"] == [120, 130, 130, 120, 120][f]  # 8 fps: ends at 12, 25, 38, 50, 62 cs
            reds.append(gif.convert("RGB").getpixel((0, 0))[0])
    assert reds == sorted(reds) and reds[0] == 0 and reds[-1] == 255


def test_gif_frame_times_keep_the_pace():
    from trainer.reporting import gif_frame_times

    assert gif_frame_times(4, 16) == [60, 60, 70, 60]  # frames end at 6.25, 12.5, 18.75, 25 cs: 6, 12, 19, 25
    for fps in (8, 12, 16, 24, 30):
        times = gif_frame_times(48, fps)
        assert abs(sum(times) - 48 * 1000 / fps) <= 5  # the whole clip to 1/100 s
        assert all(abs(sum(times[:i + 1]) - (i + 1) * 1000 / fps) <= 5 for i in range(48))  # each frame
    assert gif_frame_times(3, 100) == [20, 20, 20]  # at least 1/50 s a frame


def test_eval_writes_and_logs_videos_of_a_video_model(tmp_path):
    """A tiny wan2_t2v run: each evaluation writes ``eval.num_videos`` of its grid's videos as GIFs
    (all ``eval.num_frames`` frames at ``eval.video_fps``), TensorBoard gets them under
    ``eval/videos/{i}`` and the report shows the last evaluation's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.helpers.tiny_pipelines import TINY_PIPELINES, tiny_train_config
    from trainer.loop import train

    spec = TINY_PIPELINES["wan2_t2v"]
    cfg = tiny_train_config(spec, spec.save(tmp_path / "pipe"), tmp_path, train={"num_frames": 5})
    cfg.logging_backend = "tensorboard"
    cfg.eval.num_frames, cfg.eval.num_videos, cfg.eval.video_fps, cfg.eval.num_prompts = 9, 2, 8.0, 3
    train(cfg, quiet=True)
    run = tmp_path / "runs" / spec.model_type
    for epoch in (0, 1):  # before and after training
        gifs = sorted((run / "images" / f"eval_videos_epoch{epoch:04d}").glob("*.gif"))
        assert [g.name for g in gifs] == ["00.gif", "01.gif"]
        with Image.open(gifs[0]) as gif:
            assert gif.n_frames == 9 and gif.info["duration"] in (120, 130)  # (the first frame's)
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"eval/videos/0", "eval/videos/1"} <= set(events.Tags()["images"])
    assert len(events.Images("eval/videos/0")) == 2  # epochs 0 and 1
    report = (run / "report.md").read_text()
    assert "images/eval_videos_epoch0001/00.gif" in report


def test_eval_gifs_are_previews_and_prompts_stay_plain_text():
    from trainer.evaluate import VIDEO_MAX_SIDE, video_entry
    from trainer.reporting import markdown_text

    big = video_entry(torch.rand(3, 3, 480, 832))
    assert big.dtype == torch.uint8 and big.shape == (3, 3, round(480 * VIDEO_MAX_SIDE / 832), VIDEO_MAX_SIDE)
    small = torch.rand(2, 3, 32, 48)
    assert torch.equal(video_entry(small), (small * 255).round().to(torch.uint8))
    assert markdown_text("a [red] *cat*\non a `mat`") == r"a \[red\] \*cat\* on a \`mat\`"
