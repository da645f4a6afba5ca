"""Few-shot stage: solved examples in the prompt lift accuracy on a task built for it; the
derived task asks about held-out documents only; bad task files are reported by line."""

import json
import random

import pytest
import torch

from tasks.fewshot import (
    FewshotConfig,
    Question,
    build_prompt,
    draw_examples,
    fewshot,
    split_pool,
)
from tasks.pretrain import PretrainConfig, pretrain
from tasks.shards import write_records
from tasks.stage import StageInputError
from tasks.tokenize import TokenizeConfig, tokenize_corpus

LABELS = ["zork", "blip", "quax", "drem", "fonk", "glim", "trov", "yeld", "prax", "snib", "wutz",
          "kelp"]
KEYS = ["apple", "river", "stone", "cloud", "tiger", "maple", "candle", "bridge", "copper",
        "garden", "lemon", "piano", "rocket", "saddle", "tunnel", "violet", "walnut", "yarn",
        "anchor", "basket", "cactus", "dolphin", "engine", "falcon", "glacier", "harbor", "island",
        "jacket", "kettle", "ladder", "meadow", "needle", "orchid", "pepper", "quilt"]


@pytest.fixture(scope="module")
def copier(tmp_path_factory):
    """A tiny model pretrained on documents of "key: label" lines, one label per document:
    to predict a label it must copy the one seen earlier in its context. At the start of
    a document (a zero-shot prompt) nothing tells the label."""
    root = tmp_path_factory.mktemp("fewshot")
    rng = random.Random(0)
    records = []
    for i in range(400):
        label = rng.choice(LABELS)
        lines = [f"{rng.choice(KEYS)}: {label}" for _ in range(rng.randint(4, 10))]
        records.append({"id": f"d{i}", "url": f"http://x/{i}", "text": "\n".join(lines)})
    write_records(records, root / "corpus")
    tokenize_corpus(TokenizeConfig(vocab_size=420), root / "corpus", root / "tokens")
    threads = torch.get_num_threads()
    try:  # the copying ability appears after ~350 steps; 500 leave a margin
        pretrain(PretrainConfig(d_model=32, n_layers=2, n_heads=4, context_length=32,
                                batch_size=16, max_steps=500, learning_rate=1e-2,
                                warmup_steps=10, val_every_steps=500, val_batches=1,
                                num_threads=1, seed=0), root / "tokens", root / "model")
    finally:
        torch.set_num_threads(threads)
    return root


def label_task(path, label, n=30, seed=0):
    """Questions "<key>:" whose answer is always ``label`` among 4 labels: arbitrary, so
    only examples can reveal it."""
    rng = random.Random(f"{seed}:{label}")
    lines = []
    for _ in range(n):
        choices = [label, *rng.sample([x for x in LABELS if x != label], 3)]
        rng.shuffle(choices)
        lines.append(json.dumps({"question": rng.choice(KEYS), "choices": choices,
                                 "answer": choices.index(label)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_solved_examples_beat_zero_shot(copier, tmp_path):
    k0, k3 = [], []
    for label in ("zork", "blip", "quax"):
        config = FewshotConfig(data_path=str(label_task(tmp_path / f"{label}.jsonl", label)),
                               question_template="{question}:", fewshot_delimiter="\n",
                               shots=[3, 1], shot_pool=8, seed=1)
        result = fewshot(config, copier / "tokens", copier / "model", None, tmp_path / label)
        stats = result["stats"]
        assert result["count"] == 22 and result["unit"] == "questions"  # 30 less the pool
        assert stats["fewshot_chance_accuracy"] == 0.25
        assert stats["fewshot_pool"] == 8
        assert stats["fewshot_accuracy_k1"] >= stats["fewshot_accuracy_k0"]
        k0.append(stats["fewshot_accuracy_k0"])
        k3.append(stats["fewshot_accuracy_k3"])
        report = json.loads((tmp_path / label / "fewshot.json").read_text())
        assert report["accuracy"] == pytest.approx({"0": stats["fewshot_accuracy_k0"],
                                                    "1": stats["fewshot_accuracy_k1"],
                                                    "3": stats["fewshot_accuracy_k3"]},
                                                   abs=1e-4)
        assert report["prompt_example"]["3"].count(f": {label}\n") == 3
        assert all((tmp_path / label / p).is_file() for p in result["artifacts"].values())
    mean_k0, mean_k3 = sum(k0) / 3, sum(k3) / 3
    print(f"few-shot label tasks: k0 {k0}, k3 {k3}")
    assert mean_k3 >= mean_k0 + 0.4, (k0, k3)
    assert min(k3) >= 0.9, k3


def test_examples_come_from_the_pool_and_grow_with_k():
    questions = [Question(f"q{i}", ["a", "b", "c"], i % 3, f"s{i}") for i in range(20)]
    evaluated, pool = split_pool(questions, 5, 100, seed=0)
    assert len(pool) == 5 and len(evaluated) == 15
    assert not {q.source for q in pool} & {q.source for q in evaluated}
    three = draw_examples(pool, evaluated[0], 0, 3, seed=7, exclude_choices=False)
    assert draw_examples(pool, evaluated[0], 0, 1, seed=7, exclude_choices=False) == three[:1]
    assert draw_examples(pool, evaluated[0], 0, 3, seed=7, exclude_choices=False) == three
    assert all(q in pool for q in three)
    config = FewshotConfig(description="Answer.\n", question_template="{question}")
    prompt = build_prompt(config, evaluated[0], three[:2])
    assert prompt == ("Answer.\n" + "".join(f"{q.text} {q.answer_text}\n\n" for q in three[:2])
                      + evaluated[0].text)
    with pytest.raises(StageInputError, match="leave none to evaluate"):
        split_pool(questions, 20, 100, seed=0)


def pydoc_corpus(root):
    """Pydoc-like pages: 14 modules, and 3 topic pages that share the URL stem 'topic'."""
    rng = random.Random(3)
    names = ["json", "socket", "pathlib", "csv", "zipfile", "struct", "shutil", "glob",
             "heapq", "bisect", "queue", "uuid", "hmac", "gzip"]
    records = [{"id": f"m-{name}", "url": f"http://pydoc.localhost/{name}.html",
                "title": f"Pydoc: module {name}",
                "text": " ".join(rng.choice(KEYS) for _ in range(120)) + f" {name}"}
               for name in names]
    records += [{"id": f"t-{i}", "url": f"http://pydoc.localhost/topic?key=T{i}",
                 "title": f"Pydoc: TOPIC T{i}", "text": "words " * 50} for i in range(3)]
    write_records(records, root / "corpus")
    held_out = ["m-json", "m-csv", "m-glob", "m-uuid", "m-gzip", "t-0"]
    (root / "tokens").mkdir()
    (root / "tokens" / "val_ids.json").write_text(json.dumps(held_out))
    return {r["id"]: r for r in records}, {"json", "csv", "glob", "uuid", "gzip"}


def test_derived_task_asks_about_held_out_documents(copier, tmp_path):
    docs, held_out_labels = pydoc_corpus(tmp_path)
    config = FewshotConfig(max_questions=20, shots=[2], shot_pool=6, passage_chars=60)
    result = fewshot(config, tmp_path / "tokens", copier / "model", tmp_path / "corpus",
                     tmp_path / "out")
    assert result["count"] == 20 and result["stats"]["fewshot_chance_accuracy"] == 0.25
    questions = [json.loads(line) for line in
                 (tmp_path / "out" / "fewshot_questions.jsonl").read_text().splitlines()]
    pool = [json.loads(line) for line in
            (tmp_path / "out" / "fewshot_pool.jsonl").read_text().splitlines()]
    assert len(questions) == 20 and len(pool) == 6
    for q in questions:  # every choice a held-out module: none stands out by rarity
        assert len(set(q["choices"])) == 4 and set(q["choices"]) <= held_out_labels
        assert q["question"].startswith("Passage: ") and q["question"].endswith("\nModule:")
    assert {q["choices"][q["answer"]] for q in pool}.isdisjoint(held_out_labels)
    assert all("topic" not in q["choices"] for q in questions + pool)
    report = json.loads((tmp_path / "out" / "fewshot.json").read_text())
    assert report["held_out"] and report["labels"] == 14
    for row in report["sample"]:
        assert docs[row["source"]]["title"] == f"Pydoc: module {row['answer_text']}"
        assert row["source"] in {"m-json", "m-csv", "m-glob", "m-uuid", "m-gzip"}
    assert report["prompt_example"]["2"].count("\nModule: ") == 2
    assert (tmp_path / "out" / "fewshot_accuracy.png").stat().st_size > 1000


def test_without_held_out_ids_the_derived_task_still_runs(copier, tmp_path, caplog):
    pydoc_corpus(tmp_path)
    config = FewshotConfig(max_questions=8, shots=[1], shot_pool=4, passage_chars=60)
    with caplog.at_level("WARNING"):
        result = fewshot(config, None, copier / "model", tmp_path / "corpus", tmp_path / "o")
    assert result["count"] == 8
    assert "may have trained on" in caplog.text


@pytest.mark.parametrize("content, message", [
    ('{"question": "a", "choices": ["x", "y"], "answer": 0}\n{"question": "b"\n',
     r"q.jsonl:2: not valid JSON"),
    ('\n{"question": "a", "choices": ["x"], "answer": 0}\n', r"q.jsonl:2: \"choices\""),
    ('{"question": "a", "choices": ["x", "y"], "answer": 2}\n', r"q.jsonl:1: \"answer\""),
    ('{"question": "a", "choices": ["x", "x"], "answer": 0}\n', r"q.jsonl:1: .*repeats"),
    ('{"question": "", "choices": ["x", "y"], "answer": 0}\n', r"q.jsonl:1: \"question\""),
    ('["a"]\n', r"q.jsonl:1: expected an object"),
])
def test_bad_records_are_reported_with_file_and_line(copier, tmp_path, content, message):
    path = tmp_path / "q.jsonl"
    path.write_text(content)
    with pytest.raises(StageInputError, match=message):
        fewshot(FewshotConfig(data_path=str(path)), None, copier / "model", None, tmp_path)


def test_settings_that_cannot_work_are_refused(copier, tmp_path):
    assert FewshotConfig(shots=[5, 1, 5]).shots == [0, 1, 5]
    with pytest.raises(ValueError, match="between 0 and"):
        FewshotConfig(shots=[-1])
    with pytest.raises(ValueError, match="needs a group"):
        FewshotConfig(label_pattern="Pydoc: .*")
    with pytest.raises(StageInputError, match="does not exist"):
        fewshot(FewshotConfig(data_path=str(tmp_path / "none.jsonl")), None,
                copier / "model", None, tmp_path)
    with pytest.raises(ValueError, match="shot_pool"):
        FewshotConfig(shots=[8], shot_pool=4)
    pydoc_corpus(tmp_path)
    with pytest.raises(StageInputError, match="distinct document label"):
        fewshot(FewshotConfig(num_choices=20), tmp_path / "tokens", copier / "model",
                tmp_path / "corpus", tmp_path / "out")
