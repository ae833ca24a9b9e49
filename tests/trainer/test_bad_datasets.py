"""Bad dataset rows stop the run with an error naming the file, the line and the fix (nothing is
skipped silently), through the ``flowrl train`` command line too. The per-row JSONL cases
(malformed JSON, missing prompt, wrong types, unknown keys) are in test_data.py; this file adds
encodings, line endings and the end-to-end exit status."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.helpers.tiny import tiny_raw
from trainer.cli import main as flowrl
from trainer.data import DatasetError, load_prompts


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DatasetError) as info:
        load_prompts(tmp_path)
    msg = str(info.value)
    assert f"{path}:3: not UTF-8 text (byte 0xe9 at column 16)" in msg and "Fix: save the file as UTF-8" in msg


def test_txt_not_utf8_too(tmp_path):
    (tmp_path / "train.txt").write_bytes(b"a red cube\n\xff\xfeblue\n")
    with pytest.raises(DatasetError, match=r"train.txt:2: not UTF-8"):
        load_prompts(tmp_path)


def test_bom_and_crlf_are_fine(tmp_path):
    (tmp_path / "train.jsonl").write_bytes('\ufeff{"prompt": "a"}\r\n{"prompt": "b\u2028c"}\r\n'.encode())
    train, _ = load_prompts(tmp_path)
    assert [r.prompt for r in train] == ["a", "b\u2028c"]  # U+2028 inside a JSON string is not a line break


@pytest.mark.parametrize("name, first, second", [("train.txt", "a red cube\n", "a blue ball\n"),
                                                 ("train.jsonl", '{"prompt": "a red cube"}\n', '{"prompt": "a blue ball"}\n')])
def test_a_bom_where_two_files_were_joined_is_dropped(tmp_path, name, first, second):
    """``cat a.txt b.txt > train.txt`` with a byte-order mark on each: the second mark sits mid-file,
    invisible; it began a prompt (.txt) or failed the row as not JSON (.jsonl)."""
    (tmp_path / name).write_bytes(("\ufeff" + first + "\ufeff" + second).encode())
    train, _ = load_prompts(tmp_path)
    assert [r.prompt for r in train] == ["a red cube", "a blue ball"]


def test_a_json_value_that_is_not_an_object_says_how_to_write_it(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"prompt": "ok"}\n"just a prompt"\n')
    with pytest.raises(DatasetError, match=r'train.jsonl:2: expected a JSON object, got str. Fix: .*"prompt"'):
        load_prompts(tmp_path)


@pytest.mark.parametrize("row, expected", [
    ('{"prompt": "x"', "not valid JSON"),
    ('{"image": "a.png"}', 'missing or empty "prompt"'),
    ('{"prompt": ["a", "b"]}', 'missing or empty "prompt"'),
])
def test_flowrl_train_exits_2_naming_file_line_and_fix(tmp_path, capsys, row, expected):
    raw = tiny_raw(tmp_path)
    data = tmp_path / "data"
    (data / "train.txt").unlink()
    (data / "train.jsonl").write_text('{"prompt": "a red circle"}\n' + row + "\n")
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(json.loads(json.dumps(raw))))
    assert flowrl(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"flowrl: dataset error: {data / 'train.jsonl'}:2:" in err and expected in err and "Fix" in err
