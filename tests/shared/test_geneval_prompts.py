"""scripts/make_geneval_prompts.py: GenEval-format rows that ``geneval`` accepts, balanced over the
six tasks, deterministic, with test combinations held out of training; the shipped sample set
examples/data/geneval is its output."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import make_geneval_prompts as gp  # noqa: E402

from shared.rewards.geneval import GenEval, check_metadata  # noqa: E402


def test_rows_are_geneval_rows_over_coco_balanced_and_deterministic():
    train, test = gp.make(600, 120, seed=3)
    assert (train, test) == gp.make(600, 120, seed=3) and train != gp.make(600, 120, seed=4)[0]
    assert Counter(r["tag"] for r in train) == {t: 100 for t in gp.TAGS}
    assert Counter(r["tag"] for r in test) == {t: 20 for t in gp.TAGS}
    for r in train + test:
        check_metadata(r, r["prompt"])
        assert GenEval.row_problem(r, {"detector": "nowhere"}) is None
        assert {i["class"] for i in r["include"] + r.get("exclude", [])} <= set(gp.COCO)
    assert len(gp.COCO) == 80 and len(set(gp.COCO)) == 80


def test_test_combinations_never_appear_in_training():
    train, test = gp.make(3000, 300)
    seen = {gp.combination(r) for r in train}
    assert not seen & {gp.combination(r) for r in test}
    # the pair of a two-object row is unordered: "a cat and a dog" holds "a dog and a cat" out too
    r = {"tag": "two_object", "include": [{"class": "dog"}, {"class": "cat"}]}
    assert gp.combination(r) == ("two_object", "cat", "dog")


@pytest.mark.parametrize("name, expected", [("person", "people"), ("mouse", "computer mice"), ("bus", "buses"),
                                            ("knife", "knives"), ("dog", "dogs"), ("wine glass", "wine glasses")])
def test_counting_prompts_use_real_plurals(name, expected):
    assert gp.plural(name) == expected


def test_the_script_writes_both_splits_and_the_shipped_sample_is_its_output(tmp_path, capsys):
    gp.main(["--out", str(tmp_path), "--train", "48", "--test", "12", "--seed", "0"])
    assert "wrote 48 train and 12 test rows" in capsys.readouterr().out
    for split in ("train", "test"):
        assert (tmp_path / f"{split}.jsonl").read_text() == (ROOT / "examples/data/geneval" / f"{split}.jsonl").read_text()
    rows = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 48
