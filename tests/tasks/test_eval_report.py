"""The evaluation report: every metric given appears, models beside their baselines, plots
and images inside the output directory behind relative links, absent sections left out."""

import re
from pathlib import Path

import pytest

from tasks.eval_report import lm_eval_results, write_eval_report


def png(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.imshow([[3, 1], [0, 4]])
    fig.savefig(path)
    plt.close(fig)
    return path


def sections(tmp_path: Path) -> dict:
    """What the stages return, as the pipeline would pass it."""
    return {
        "champion": {"champion_decision": "promoted", "champion_score": 1.5213,
                     "challenger_score": 1.4702, "champion_margin": 0.01,
                     "champion_metric": "bits_per_byte"},
        "language_model": {
            "evaluated_tokens": 44032, "unigram_val_loss": 6.0987,
            "unigram_val_perplexity": 445.2, "unigram_bits_per_byte": 2.9012,
            "pretrained_val_loss": 3.1987, "pretrained_val_perplexity": 24.5036,
            "pretrained_bits_per_byte": 1.4021, "finetuned_val_loss": 3.2412,
            "finetuned_val_perplexity": 25.567, "finetuned_bits_per_byte": 1.4211,
            "ppl_ratio_vs_unigram": 0.05504},
        "classify": {
            "classify_accuracy": 0.8211, "classify_macro_f1": 0.7803,
            "classify_untuned_accuracy": 0.4103, "classify_untuned_macro_f1": 0.2977,
            "classify_majority_accuracy": 0.3512, "classify_majority_macro_f1": 0.1209,
            "classify_accuracy_std": 0.0312, "classify_macro_f1_std": 0.0421,
            "classify_folds": 3, "classify_labels": 5,
            "images": {"confusion_matrix": str(png(tmp_path / "confusion.png"))}},
        "ner": {"ner_f1": 0.7012, "ner_precision": 0.7234, "ner_recall": 0.6803,
                "ner_untuned_f1": 0.0523, "ner_majority_f1": 0.0, "ner_folds": 1},
        "fewshot": {"fewshot_accuracy_k0": 0.29, "fewshot_accuracy_k3": 0.35,
                    "fewshot_accuracy_norm_k0": 0.24, "fewshot_accuracy_norm_k3": 0.31,
                    "fewshot_chance_accuracy": 0.25, "fewshot_questions": 100},
        "dpo": {"dpo_preference_accuracy": 0.9062, "dpo_preference_accuracy_before": 0.5469,
                "dpo_reward_accuracy": 0.9062, "dpo_reward_margin": 1.2345,
                "dpo_val_loss_before": 0.6931, "dpo_val_loss_after": 0.3012},
        "mlm": {"mlm_accuracy": 0.3121, "mlm_baseline_accuracy": 0.0834,
                "mlm_accuracy_initial": 0.0012, "mlm_loss": 3.9123, "mlm_baseline_loss": 5.5012},
        "lm_eval": {"lm_eval_forgeline_fewshot_acc": 0.29,
                    "lm_eval_forgeline_fewshot_acc_stderr": 0.0456,
                    "lm_eval_forgeline_fewshot_acc_norm": 0.24,
                    "lm_eval_forgeline_fewshot_acc_norm_stderr": 0.0429},
    }


def test_every_metric_is_in_the_report_with_its_baselines(tmp_path):
    given = sections(tmp_path)
    out = tmp_path / "report"
    written = write_eval_report(given, out, title="run 42")
    text = written["report"].read_text()
    assert text.startswith("# run 42\n")
    headings = re.findall(r"^## (.+)$", text, flags=re.MULTILINE)
    assert headings == ["Summary", "Language modelling", "Text classification",
                        "Named-entity recognition", "Few-shot multiple choice",
                        "Preference tuning (DPO)", "Masked-LM pretraining",
                        "lm-evaluation-harness", "Champion and challenger"]
    for stats in given.values():
        for key in stats:
            if key != "images":
                assert f"| {key} |" in text, key
    # the comparisons: each model beside its baselines, with the differences
    assert "| fine-tuned | 0.8211 ± 0.0312 | 0.7803 ± 0.0421 |" in text
    assert "| majority baseline | 0.3512 | 0.1209 |" in text
    assert "over 3 folds" in text
    assert "| Text classification | accuracy | 0.8211 | untuned 0.4103 | +0.4108 |" in text
    assert "| Named-entity recognition | F1 | 0.7012 | untuned 0.0523 | +0.6489 |" in text
    assert "| Few-shot multiple choice | accuracy, k=3 | 0.3500 | chance 0.2500 | +0.1000 |" \
        in text
    assert "| 3 | 0.3500 | 0.3100 | 0.2500 |" in text
    assert "| preference accuracy (held-out pairs) | 0.5469 | 0.9062 | +0.3593 |" in text
    assert "| masked-token accuracy | 0.3121 | 0.0012 | 0.0834 |" in text
    assert "| forgeline_fewshot | 0.2900 ± 0.0456 | 0.2400 ± 0.0429 |" in text
    assert "| unigram (baseline) | 6.0987 | 445.2 | 2.9012 |" in text
    assert "Decision: **promoted**" in text and "1.4702" in text and "1.5213" in text
    # files: all inside the output directory, linked relatively
    assert set(written) == {"report", "language_model_plot", "classify_plot",
                            "classify_confusion_matrix", "ner_plot", "fewshot_plot",
                            "dpo_plot", "mlm_plot", "lm_eval_plot", "champion_plot"}
    for path in written.values():
        assert path.is_file() and path.resolve().is_relative_to(out.resolve())
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == len(written) - 1
    for link in links:
        assert not link.startswith("/") and (out / link).is_file()
    assert (out / "classify_confusion_matrix.png").read_bytes() == \
        (tmp_path / "confusion.png").read_bytes()


def test_missing_sections_are_left_out(tmp_path):
    given = sections(tmp_path)
    written = write_eval_report({"fewshot": given["fewshot"], "champion": given["champion"],
                                 "ner": {}}, tmp_path / "out")
    assert set(written) == {"report", "fewshot_plot", "champion_plot"}
    text = written["report"].read_text()
    assert "Text classification" not in text and "Named-entity" not in text
    assert not (tmp_path / "out" / "classify.png").exists()


def test_other_sections_missing_images_and_nothing_at_all(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        written = write_eval_report(
            {"domain": {"domain_val_loss_before": 3.1, "domain_val_loss_after": 2.7,
                        "images": {"curve": str(tmp_path / "missing.png")}},
             "champion": {"champion_decision": "first", "challenger_score": 1.2}},
            tmp_path / "out")
    text = written["report"].read_text()
    assert "## Domain" in text and "| domain_val_loss_after | 2.7000 |" in text
    assert "| domain_val_loss | 3.1000 | 2.7000 | -0.4000 |" in text
    assert "missing.png" in caplog.text and "domain_curve" not in written
    assert "Decision: **first** — the challenger scored 1.2000" in text
    empty = write_eval_report({}, tmp_path / "empty")
    assert set(empty) == {"report"}
    assert "No evaluation results" in empty["report"].read_text()


def test_lm_eval_results_are_read_back_per_task():
    stats = {"lm_eval_my_task_2_acc_norm": 0.5, "lm_eval_my_task_2_acc": 0.6,
             "lm_eval_my_task_2_acc_stderr": 0.05, "lm_eval_wiki_bits_per_byte": 1.3,
             "seconds": 4.0, "hellaswag": {"acc": 0.31, "acc_norm": 0.33}}
    assert lm_eval_results(stats) == {
        "my_task_2": {"acc_norm": 0.5, "acc": 0.6, "acc_stderr": 0.05},
        "wiki": {"bits_per_byte": 1.3}, "hellaswag": {"acc": 0.31, "acc_norm": 0.33}}


@pytest.mark.parametrize("value, shown", [(0.123456, "0.1235"), (445.23, "445.2"),
                                          (44032, "44032"), (12345.6, "12,346"),
                                          (float("nan"), "n/a"), ("a|b", "a\\|b")])
def test_values_are_formatted_for_tables(value, shown):
    from tasks.eval_report import fmt

    assert fmt(value) == shown
