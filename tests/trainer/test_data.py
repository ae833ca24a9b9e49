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


def test_jsonl_rows_with_optional_fields(tmp_path):
    rows = [
        {"prompt": "a cat"},
        {"prompt": " a dog ", "negative_prompt": "blurry", "image": "a.png", "images": ["b.png"]},
        {"prompt": "a clip", "videos": ["v1.mp4", "v2.mp4"], "metadata": {"k": 1}},
    ]
    write(tmp_path / "train.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    train, _ = load_prompts(tmp_path)
    assert train[0] == PromptRow("a cat")
    assert train[1] == PromptRow("a dog", "blurry", ("a.png", "b.png"), ())
    assert train[2].videos == ("v1.mp4", "v2.mp4") and train[2].images == ()


def test_jsonl_preferred_over_txt(tmp_path):
    write(tmp_path / "train.txt", "from txt\n")
    write(tmp_path / "train.jsonl", '{"prompt": "from jsonl"}\n')
    assert read_split(tmp_path, "train") == [PromptRow("from jsonl")]


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
        ('{"prompt": "x", "promt": "y"}', "unknown key(s) ['promt']"),
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
