"""Prompt datasets: txt / jsonl splits, errors that name file:line, optional test split."""

from __future__ import annotations

import json

import pytest

from trainer.data import DatasetError, PromptRow, load_prompts, read_split


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_txt_one_prompt_per_nonempty_line(tmp_path):
    write(tmp_path / "train.txt", "a red cube\n\n  a blue ball  \n\n")
    train, test = load_prompts(tmp_path)
    assert train == [PromptRow("a red cube"), PromptRow("a blue ball")]
    assert test is None  # the test split is optional


def png(path, size=(8, 6)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def test_jsonl_rows_with_optional_fields(tmp_path):
    png(tmp_path / "images" / "a.png")
    png(tmp_path / "images" / "b.png")
    for name in ("v1.mp4", "v2.mp4"):
        (tmp_path / "videos").mkdir(exist_ok=True)
        (tmp_path / "videos" / name).write_bytes(b"\0")
    rows = [
        {"prompt": "a cat"},
        {"prompt": " a dog ", "negative_prompt": "blurry", "image": "a.png", "images": ["b.png"]},
        {"prompt": "a clip", "videos": ["v1.mp4", "v2.mp4"], "metadata": {"k": 1}},
    ]
    write(tmp_path / "train.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    train, _ = load_prompts(tmp_path)
    assert train[0] == PromptRow("a cat")
    # paths resolved against {dataset_dir}/images and {dataset_dir}/videos
    images = tuple(str(tmp_path / "images" / n) for n in ("a.png", "b.png"))
    assert train[1] == PromptRow("a dog", "blurry", images, ())
    assert train[2].videos == tuple(str(tmp_path / "videos" / n) for n in ("v1.mp4", "v2.mp4"))
    assert train[2].images == ()
    assert train[1].source == f"{tmp_path / 'train.jsonl'}:2"


def test_a_missing_image_names_file_line_path_and_fix(tmp_path):
    png(tmp_path / "images" / "ok.png")
    path = write(tmp_path / "train.jsonl", '{"prompt": "a", "image": "ok.png"}\n'
                                           '{"prompt": "b", "images": ["ok.png", "gone.png"]}\n')
    with pytest.raises(DatasetError) as info:
        load_prompts(tmp_path)
    msg = str(info.value)
    assert f"{path}:2: image 'gone.png'" in msg and "no such file" in msg
    assert f"Fix: put the file at {tmp_path / 'images' / 'gone.png'}" in msg and "data.image_dir" in msg


@pytest.mark.parametrize("content", [b"not an image at all", None], ids=["garbage", "truncated-png"])
def test_an_unreadable_image_names_file_line_and_fix(tmp_path, content):
    bad = png(tmp_path / "images" / "bad.png", size=(64, 64))
    data = bad.read_bytes()
    bad.write_bytes(content if content is not None else data[: len(data) // 2])
    path = write(tmp_path / "train.jsonl", '{"prompt": "b", "image": "bad.png"}\n')
    with pytest.raises(DatasetError, match=rf"{path}:1: image 'bad.png' .*not a readable image.*Fix: replace"):
        load_prompts(tmp_path)


def test_image_dir_and_absolute_paths(tmp_path):
    elsewhere = png(tmp_path / "pics" / "x.png")
    absolute = png(tmp_path / "abs" / "y.png")
    data = tmp_path / "data"
    data.mkdir()
    write(data / "train.jsonl", json.dumps({"prompt": "a", "images": ["x.png", str(absolute)]}) + "\n")
    train, _ = load_prompts(data, image_dir=tmp_path / "pics")
    assert train[0].images == (str(elsewhere), str(absolute))
    with pytest.raises(DatasetError, match="no such file"):  # the default folder does not have it
        load_prompts(data)


def test_a_missing_video_is_named_too(tmp_path):
    path = write(tmp_path / "train.jsonl", '{"prompt": "a", "video": "clip.mp4"}\n')
    with pytest.raises(DatasetError, match=rf"{path}:1: video 'clip.mp4' .*no such file.*data.video_dir"):
        load_prompts(tmp_path)


def test_only_the_rows_kept_are_checked(tmp_path):
    write(tmp_path / "train.jsonl", '{"prompt": "a"}\n{"prompt": "b", "image": "gone.png"}\n')
    assert [r.prompt for r in load_prompts(tmp_path, max_size=1)[0]] == ["a"]


def test_load_dataset_reads_the_data_section(tmp_path):
    from shared.config import DataConfig
    from trainer.data import load_dataset

    png(tmp_path / "pics" / "x.png")
    write(tmp_path / "train.jsonl", '{"prompt": "a", "image": "x.png"}\n')
    train, _ = load_dataset(DataConfig(dataset_dir=str(tmp_path), image_dir=str(tmp_path / "pics")))
    assert train[0].images == (str(tmp_path / "pics" / "x.png"),)


def test_condition_images_checked_against_the_model(tmp_path):
    from trainer.data import check_condition_images

    for name in ("a.png", "b.png"):
        png(tmp_path / "images" / name)
    path = write(tmp_path / "train.jsonl", '{"prompt": "p", "image": "a.png"}\n{"prompt": "q"}\n'
                                           '{"prompt": "r", "images": ["a.png", "b.png"]}\n')
    rows, _ = load_prompts(tmp_path)
    with pytest.raises(DatasetError, match=rf"{path}:2: model_type flux1-kontext takes exactly 1 .*Fix"):
        check_condition_images(rows, "flux1-kontext", (1, 1))
    with pytest.raises(DatasetError, match=rf"{path}:1: model_type flux1 takes no condition images.*Fix"):
        check_condition_images(rows, "flux1", (0, 0))
    with pytest.raises(DatasetError, match=rf"{path}:3: 2 condition image.*{path}:1 has 1.*same number"):
        check_condition_images([rows[0], rows[2]], "qwen-image-edit-plus", (1, None))
    check_condition_images([rows[0], rows[0]], "flux1-kontext", (1, 1))
    check_condition_images([rows[1]], "flux1", (0, 0))


def test_jsonl_preferred_over_txt(tmp_path, caplog):
    write(tmp_path / "train.txt", "from txt\n")
    write(tmp_path / "train.jsonl", '{"prompt": "from jsonl"}\n')
    with caplog.at_level("WARNING", logger="flowrl.trainer"):
        assert read_split(tmp_path, "train") == [PromptRow("from jsonl")]
    assert "train.txt both exist: reading train.jsonl only" in caplog.text


def test_test_split_read_when_present(tmp_path):
    write(tmp_path / "train.txt", "a\nb\n")
    write(tmp_path / "test.jsonl", '{"prompt": "held out"}\n')
    train, test = load_prompts(tmp_path)
    assert [r.prompt for r in train] == ["a", "b"]
    assert test == [PromptRow("held out")]


def test_max_dataset_size_truncates_train_only(tmp_path):
    write(tmp_path / "train.txt", "\n".join(f"p{i}" for i in range(10)))
    write(tmp_path / "test.txt", "\n".join(f"t{i}" for i in range(5)))
    train, test = load_prompts(tmp_path, max_size=3)
    assert [r.prompt for r in train] == ["p0", "p1", "p2"]
    assert len(test) == 5
    assert len(load_prompts(tmp_path, max_size=100)[0]) == 10


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ('{"prompt": "x",}', "not valid JSON"),
        ('{"negative_prompt": "x"}', 'missing or empty "prompt"'),
        ('{"prompt": "   "}', 'missing or empty "prompt"'),
        ('{"prompt": 3}', 'missing or empty "prompt"'),
        ('{"prompt": "x", "promt": "y"}', "unknown key 'promt' (did you mean 'prompt'?)"),
        ('{"prompt": "x", "imges": ["a.png"]}', "unknown key 'imges' (did you mean 'images'?)"),
        ('{"prompt": "x", "negative_prompts": "ugly"}', "unknown key 'negative_prompts' (did you mean 'negative_prompt'?)"),
        ('{"prompt": "x", "vidoe": "a.mp4"}', "unknown key 'vidoe' (did you mean 'video'?)"),
        ('{"prompt": "x", "metadata": [1]}', '"metadata" must be a JSON object, got list'),
        ('{"prompt": "x", "tag": "a", "metadata": {"tag": "b"}}', "['tag'] given both as a column and inside"),
        ('["a prompt"]', "expected a JSON object, got list"),
        ('"a prompt"', "expected a JSON object, got str"),
        ('{"prompt": "x", "images": "a.png"}', '"images" must be a list of path strings'),
        ('{"prompt": "x", "videos": [1]}', '"videos" must be a list of path strings'),
        ('{"prompt": "x", "image": ["a.png"]}', '"image" must be a path string, got list'),
        ('{"prompt": "x", "negative_prompt": 1}', '"negative_prompt" must be a string'),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, bad_line, expected):
    # line 3 (the blank line 2 still counts), so the number is the editor's line number
    path = write(tmp_path / "train.jsonl", '{"prompt": "ok"}\n\n' + bad_line + '\n{"prompt": "ok"}\n')
    with pytest.raises(DatasetError) as info:
        load_prompts(tmp_path)
    msg = str(info.value)
    assert f"{path}:3:" in msg
    assert expected in msg


def test_bad_test_split_is_an_error_too(tmp_path):
    write(tmp_path / "train.txt", "a\n")
    path = write(tmp_path / "test.jsonl", '{"prompt": "ok"}\nnot json\n')
    with pytest.raises(DatasetError, match=f"{path}:2:"):
        load_prompts(tmp_path)


@pytest.mark.parametrize("name, content", [("train.txt", "\n  \n"), ("train.jsonl", "\n\n")])
def test_empty_file_is_an_error(tmp_path, name, content):
    path = write(tmp_path / name, content)
    with pytest.raises(DatasetError) as info:
        load_prompts(tmp_path)
    assert str(path) in str(info.value) and "no prompts" in str(info.value)


def test_missing_dataset_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError) as info:
        load_prompts(missing)
    msg = str(info.value)
    assert "data.dataset_dir" in msg and str(missing) in msg and "not a folder" in msg


def test_dataset_dir_is_a_file(tmp_path):
    path = write(tmp_path / "train.txt", "a\n")
    with pytest.raises(DatasetError, match="not a folder"):
        load_prompts(path)


def test_missing_train_file(tmp_path):
    write(tmp_path / "test.txt", "a\n")
    with pytest.raises(DatasetError) as info:
        load_prompts(tmp_path)
    msg = str(info.value)
    assert "train.txt" in msg and "train.jsonl" in msg and str(tmp_path) in msg


def test_read_split_missing_returns_none(tmp_path):
    assert read_split(tmp_path, "test") is None


def test_dataset_error_is_a_value_error():
    assert issubclass(DatasetError, ValueError)


def test_example_dataset_loads():
    from pathlib import Path

    root = Path(__file__).parents[2]
    train, test = load_prompts(root / "examples" / "data" / "tiny")
    assert train and test
