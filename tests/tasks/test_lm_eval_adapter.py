"""lm-evaluation-harness through the forgeline adapter, on local tasks, offline: its
numbers are the few-shot stage's, log-likelihood for log-likelihood."""

import json
import os
import random
import subprocess
import sys

import pytest

from tasks.fewshot import FewshotConfig, fewshot, torch_threads
from tasks.lm_eval_adapter import (
    FEWSHOT_TASK,
    LmEvalConfig,
    lm_eval_stage,
    run_lm_eval,
    write_local_task,
)
from tasks.pretrain import PretrainConfig, pretrain
from tasks.shards import write_records
from tasks.stage import StageInputError
from tasks.tokenize import TokenizeConfig, tokenize_corpus

NAMES = ["json", "socket", "pathlib", "csv", "zipfile", "random", "string", "struct"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No Hugging Face hub: the local tasks must not need it."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if "datasets" in sys.modules:  # read at import: patch the imported settings too
        import datasets.config

        monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny forward passes: one thread is fastest, and never fights other work for cores."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small model trained briefly on "The <name> module ..." pages, and a task file."""
    root = tmp_path_factory.mktemp("lm_eval")
    rng = random.Random(1)
    records = [{"id": f"d{i}", "url": f"http://x/{i}",
                "text": " ".join(f"The {rng.choice(NAMES)} module reads {rng.choice(NAMES)}."
                                 for _ in range(10))} for i in range(60)]
    write_records(records, root / "corpus")
    tokenize_corpus(TokenizeConfig(vocab_size=300), root / "corpus", root / "tokens")
    pretrain(PretrainConfig(d_model=32, n_layers=2, n_heads=4, context_length=48, batch_size=8,
                            max_steps=40, warmup_steps=3, val_every_steps=40, val_batches=1),
             root / "tokens", root / "model")
    questions = []
    for _ in range(30):
        choices = rng.sample(NAMES, 4)
        questions.append({"question": f"The {rng.choice(NAMES)} module reads",
                          "choices": choices, "answer": rng.randrange(4)})
    (root / "task.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return root, questions


def test_lm_eval_accuracy_equals_our_zero_shot_scoring(setup, tmp_path):
    root, questions = setup
    ours = fewshot(FewshotConfig(data_path=str(root / "task.jsonl"), shots=[0], shot_pool=0,
                                 question_template="{question}"),
                   root / "tokens", root / "model", None, tmp_path / "fewshot")["stats"]
    yaml_path = write_local_task(tmp_path / "tasks", "forgeline_local", questions)
    assert "dataset_path: json" in yaml_path.read_text()
    results = run_lm_eval(root / "model", ["forgeline_local"], tmp_path / "tasks",
                          batch_size=4, device="cpu")
    theirs = results["forgeline_local"]
    assert set(theirs) >= {"acc", "acc_norm", "acc_stderr"}
    assert 0 < theirs["acc"] < 1  # a number that could have come out otherwise
    assert theirs["acc"] == pytest.approx(ours["fewshot_accuracy_k0"], abs=1e-9)
    assert theirs["acc_norm"] == pytest.approx(ours["fewshot_accuracy_norm_k0"], abs=1e-9)


def test_the_registered_model_gives_our_log_likelihoods(setup, tmp_path):
    import sentencepiece as spm
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from models.checkpoint import load_model
    from models.scoring import loglikelihood
    from tasks.lm_eval_adapter import ForgelineLM

    root, questions = setup
    assert get_model("forgeline") is ForgelineLM
    write_local_task(tmp_path / "tasks", "forgeline_ll", questions[:8])
    output = simple_evaluate(
        model="forgeline", model_args=f"model_dir={root / 'model'},batch_size=3,device=cpu",
        tasks=["forgeline_ll"], log_samples=True, bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False))
    model = load_model(root / "model" / "model.pt")
    sp = spm.SentencePieceProcessor(model_file=str(root / "model" / "tokenizer.model"))
    samples = output["samples"]["forgeline_ll"]
    assert len(samples) == 8
    for sample in samples:
        doc = sample["doc"]
        ours = loglikelihood(model, sp, [(doc["question"], f" {c}") for c in doc["choices"]])
        theirs = [resp[0] for resp in sample["resps"]]
        assert [t[0] for t in theirs] == pytest.approx([o[0] for o in ours], abs=1e-5)
        assert [bool(t[1]) for t in theirs] == [o[1] for o in ours]


def test_rolling_and_generation_requests(setup):
    import sentencepiece as spm
    from lm_eval.api.instance import Instance

    from models.checkpoint import load_model
    from models.scoring import greedy_until, loglikelihood_rolling
    from tasks.lm_eval_adapter import ForgelineLM

    root, _ = setup
    lm = ForgelineLM.create_from_arg_string(f"model_dir={root / 'model'},batch_size=2,"
                                            "device=cpu")
    model = load_model(root / "model" / "model.pt")
    sp = spm.SentencePieceProcessor(model_file=str(root / "model" / "tokenizer.model"))
    text = " ".join(f"The {n} module reads {n}." for n in NAMES * 3)  # several windows
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert rolling == pytest.approx(loglikelihood_rolling(model, sp, [text]), abs=1e-4)
    requests = [Instance("generate_until", {}, ("The json", {"until": ["."],
                                                             "max_gen_toks": 12}), 0),
                Instance("generate_until", {}, ("The csv module", {"max_gen_toks": 4}), 1)]
    generated = lm.generate_until(requests)
    assert generated == greedy_until(model, sp, [("The json", ["."], 12),
                                                 ("The csv module", [], 4)])
    assert "." not in generated[0]


def test_the_stage_evaluates_the_fewshot_questions(setup, tmp_path):
    root, _ = setup
    shots = fewshot(FewshotConfig(data_path=str(root / "task.jsonl"), shots=[2], shot_pool=6,
                                  question_template="{question}"),
                    root / "tokens", root / "model", None, tmp_path / "fewshot")
    result = lm_eval_stage(LmEvalConfig(enabled=True, limit=10, num_fewshot=2), root / "model",
                           tmp_path / "out", tmp_path / "fewshot")
    stats = result["stats"]
    assert result["count"] == 1 and result["unit"] == "tasks"
    assert 0 <= stats[f"lm_eval_{FEWSHOT_TASK}_acc"] <= 1
    assert f"lm_eval_{FEWSHOT_TASK}_acc_norm" in stats
    task_yaml = (tmp_path / "out" / result["artifacts"]["task_yaml"]).read_text()
    assert "fewshot_split: train" in task_yaml  # examples come from the few-shot pool
    saved = json.loads((tmp_path / "out" / "lm_eval_results.json").read_text())
    assert saved[FEWSHOT_TASK]["acc"] == stats[f"lm_eval_{FEWSHOT_TASK}_acc"]
    assert shots["stats"]["fewshot_questions"] == 24
    with pytest.raises(StageInputError, match="fewshot_questions.jsonl"):
        lm_eval_stage(LmEvalConfig(enabled=True), root / "model", tmp_path / "out2", None)


def test_importing_the_configs_loads_no_heavy_library():
    code = ("import sys, tasks.lm_eval_adapter, tasks.fewshot, tasks.eval_report; "
            "print([m for m in ('torch', 'lightning', 'lm_eval', 'datasets', 'matplotlib') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=os.getcwd())
    assert out.stdout.strip() == "[]"
