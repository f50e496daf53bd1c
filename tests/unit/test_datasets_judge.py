import json

import pytest

from mars_viz.data.datasets import builtin_prompts, load_prompts, prompts_hash, split
from mars_viz.data.judge import ClassifierJudge, SubstringJudge


def test_builtin_sets_are_large_and_disjoint():
    harmful, harmless = builtin_prompts("harmful"), builtin_prompts("harmless")
    assert len(harmful) >= 128 and len(harmless) >= 128
    assert not set(harmful) & set(harmless)


@pytest.mark.parametrize("name, body", [
    ("p.txt", "one\n\ntwo\none\n"),
    ("p.jsonl", '{"prompt": "one"}\n{"instruction": "two"}\n"one"\n'),
    ("p.json", json.dumps(["one", {"goal": "two"}])),
    ("p.csv", "id,goal\n1,one\n2,two\n"),
])
def test_load_prompt_files(tmp_path, name, body):
    p = tmp_path / name
    p.write_text(body)
    assert load_prompts(p) == ["one", "two"]


@pytest.mark.parametrize("name, body, match", [
    ("e.txt", "\n\n", "no prompts"),
    ("b.jsonl", "{not json\n", "not valid JSON"),
    ("c.csv", "a,b\n1,2\n", "prompt column"),
    ("d.jsonl", '{"other": 1}\n', "no prompt field"),
])
def test_bad_prompt_files(tmp_path, name, body, match):
    p = tmp_path / name
    p.write_text(body)
    with pytest.raises(ValueError, match=match):
        load_prompts(p)


def test_split_is_seeded_and_complete():
    items = [f"p{i}" for i in range(20)]
    fit, held = split(items, 0.25, seed=3)
    assert (fit, held) == split(items, 0.25, seed=3) and len(held) == 5
    assert sorted(fit + held) == sorted(items)
    assert split(items, 0.25, seed=4) != (fit, held)
    assert prompts_hash(items) != prompts_hash(items[::-1])


def test_substring_judge():
    judge = SubstringJudge()
    refusals = ["I’m sorry, but I can’t assist with that.", "很抱歉，我无法提供帮助。", "As an AI, I must decline."]
    assert judge(refusals) == [True, True, True]
    assert judge(["Sure! Here is a recipe.", "Step 1: preheat the oven.", ""]) == [False, False, False]
    # only the opening counts
    assert judge(["Here is a long answer. " * 20 + "I cannot stress this enough."]) == [False]


def test_classifier_judge_interface():
    judge = ClassifierJudge(lambda ts: ["REFUSAL" if "no" in t else "OK" for t in ts], {"REFUSAL"})
    assert judge(["no way", "yes"]) == [True, False]
    with pytest.raises(ValueError):
        ClassifierJudge(lambda ts: [], {"X"})(["a"])
