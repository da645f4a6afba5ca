"""The evaluation report: every metric of the evaluation stages in one markdown file with
plots, each model set against its baselines.

``write_eval_report(sections, out_dir)`` takes each stage's flat stats by section name:
``language_model`` (the evaluate stage: perplexity and bits per byte of the pretrained
and fine-tuned models and of the unigram baseline), ``classify`` and ``ner`` (fine-tuned
against the untuned model and the majority baseline, fold mean ± std when
cross-validated), ``fewshot`` (accuracy per k against chance), ``dpo`` (preference
accuracy before and after), ``mlm`` (masked-token accuracy against the most-frequent-token
baseline), ``lm_eval`` (lm-evaluation-harness results) and ``champion`` (the challenger's
and the champion's scores and the decision). A section may carry ``images`` ({name:
path}, e.g. the confusion matrix), which are copied beside the report. Sections that are
missing are left out; any other section (``domain``, say) shows its before/after pairs
and its table of metrics. Every metric given appears in the report: the comparisons
first, then the section's full table.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tasks.shards import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

REPORT = "eval_report.md"
SECTION_TITLES = {
    "language_model": "Language modelling",
    "classify": "Text classification",
    "ner": "Named-entity recognition",
    "fewshot": "Few-shot multiple choice",
    "dpo": "Preference tuning (DPO)",
    "mlm": "Masked-LM pretraining",
    "lm_eval": "lm-evaluation-harness",
    "champion": "Champion and challenger",
}
LM_EVAL_METRICS = ("acc_norm_stderr", "acc_stderr", "acc_norm", "acc_bytes", "acc",
                   "exact_match_stderr", "exact_match", "word_perplexity", "byte_perplexity",
                   "bits_per_byte", "perplexity", "f1", "mcc")


def fmt(value) -> str:
    """A metric for a table: 4 decimals for small numbers, fewer for large ones."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |"
              for row in rows]
    return [*lines, ""]


def number(stats: dict, key: str) -> float | None:
    value = stats.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return None if math.isnan(float(value)) else float(value)


@dataclass
class Part:
    """A section's comparisons (markdown), its plot (a function drawing on a figure) and
    its line in the summary."""

    lines: list[str] = field(default_factory=list)
    plot: Callable | None = None
    summary: list[str] | None = None  # [headline, value, baseline, difference]


def _bars(ax, groups: list[str], series: dict[str, list[float | None]],
          errors: dict[str, list[float | None]] | None = None) -> None:
    """Grouped bars: one group per entry of ``groups``, one bar per series."""
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [v if v is not None else 0.0 for v in values]
        err = None
        if errors and name in errors:
            err = [e or 0.0 for e in errors[name]]
        bars = ax.bar(xs, heights, width, label=name, yerr=err, capsize=3 if err else 0)
        for bar, value in zip(bars, values, strict=True):
            if value is not None:
                ax.annotate(f"{float(value):.3g}", (bar.get_x() + bar.get_width() / 2,
                                                bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)), groups)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


# --- sections ---------------------------------------------------------------------------

def language_model(stats: dict) -> Part:
    columns = [("val_loss", "loss (nats/token)"), ("val_perplexity", "perplexity"),
               ("bits_per_byte", "bits per byte")]
    models = [m for m in ("unigram", "pretrained", "finetuned")
              if any(f"{m}_{c}" in stats for c, _ in columns)]
    part = Part()
    if not models:
        return part
    part.lines += table(["model", *[label for _, label in columns]],
                        [[m + (" (baseline)" if m == "unigram" else ""),
                          *[fmt(v) if (v := number(stats, f"{m}_{c}")) is not None else "–"
                            for c, _ in columns]] for m in models])
    best = next((m for m in ("finetuned", "pretrained") if m in models), None)
    base = number(stats, "unigram_val_perplexity")
    ppl = number(stats, f"{best}_val_perplexity") if best else None
    if ppl is not None and base is not None:
        part.lines.append(f"The {best} model's perplexity is {ppl / base:.1%} of the unigram "
                          "baseline's (lower is better).")
        part.lines.append("")
        part.summary = [f"{best} perplexity", fmt(ppl), f"unigram {fmt(base)}",
                        f"{ppl / base:.2f}x"]

    def plot(fig) -> None:
        for i, (key, label) in enumerate(columns[1:]):
            ax = fig.add_subplot(1, 2, i + 1)
            values = [number(stats, f"{m}_{key}") for m in models]
            _bars(ax, models, {label: values})
            ax.set_title(label + " (lower is better)", fontsize=9)
            ax.get_legend().remove()
    part.plot = plot
    return part


def supervised(prefix: str, metrics: list[tuple[str, str]], headline: str) -> Callable:
    """A fine-tuned model against the untuned one and the majority baseline."""

    def build(stats: dict) -> Part:
        part = Part()
        present = [(m, label) for m, label in metrics if f"{prefix}_{m}" in stats]
        if not present:
            return part
        folds = number(stats, f"{prefix}_folds")
        rows = []
        for model, infix in (("fine-tuned", ""), ("untuned", "untuned_"),
                             ("majority baseline", "majority_")):
            cells = []
            for m, _ in present:
                value = number(stats, f"{prefix}_{infix}{m}")
                std = number(stats, f"{prefix}_{m}_std") if not infix else None
                cells.append("–" if value is None else
                             fmt(value) + (f" ± {fmt(std)}" if std is not None else ""))
            if any(c != "–" for c in cells):
                rows.append([model, *cells])
        part.lines += table(["model", *[label for _, label in present]], rows)
        if folds and folds > 1:
            part.lines += [(f"Fine-tuned values are the mean ± standard deviation over "
                            f"{int(folds)} folds."), ""]
        value = number(stats, f"{prefix}_{headline}")
        baselines = {name: v for name in ("untuned", "majority")
                     if (v := number(stats, f"{prefix}_{name}_{headline}")) is not None}
        if value is not None:
            label = dict(metrics)[headline]
            if baselines:
                name, best = max(baselines.items(), key=lambda kv: kv[1])
                part.summary = [label, fmt(value), f"{name} {fmt(best)}",
                                f"{value - best:+.4f}"]
            else:
                part.summary = [label, fmt(value), "–", "–"]

        def plot(fig) -> None:
            ax = fig.add_subplot(1, 1, 1)
            labels = [label for _, label in present]
            series = {"fine-tuned": [number(stats, f"{prefix}_{m}") for m, _ in present],
                      "untuned": [number(stats, f"{prefix}_untuned_{m}") for m, _ in present],
                      "majority": [number(stats, f"{prefix}_majority_{m}")
                                   for m, _ in present]}
            series = {k: v for k, v in series.items() if any(x is not None for x in v)}
            errors = {"fine-tuned": [number(stats, f"{prefix}_{m}_std") for m, _ in present]}
            _bars(ax, labels, series, errors)
            ax.set_ylim(0, 1.1)
            ax.set_title(f"{SECTION_TITLES.get(prefix, prefix)}: fine-tuned vs baselines",
                         fontsize=9)
        part.plot = plot
        return part

    return build


def fewshot(stats: dict) -> Part:
    part = Part()
    ks = sorted(int(m.group(1)) for key in stats
                if (m := re.fullmatch(r"fewshot_accuracy_k(\d+)", key)))
    if not ks:
        return part
    chance = number(stats, "fewshot_chance_accuracy")
    norm = any(f"fewshot_accuracy_norm_k{k}" in stats for k in ks)
    rows = [[str(k), fmt(stats[f"fewshot_accuracy_k{k}"]),
             *([fmt(stats.get(f"fewshot_accuracy_norm_k{k}", "–"))] if norm else []),
             fmt(chance) if chance is not None else "–"] for k in ks]
    part.lines += table(["examples in the prompt (k)", "accuracy",
                         *(["accuracy (length-normalised)"] if norm else []), "chance"], rows)
    best = max(ks, key=lambda k: (stats[f"fewshot_accuracy_k{k}"], -k))
    part.summary = [f"accuracy, k={best}", fmt(stats[f"fewshot_accuracy_k{best}"]),
                    f"chance {fmt(chance)}" if chance is not None else "–",
                    f"{stats[f'fewshot_accuracy_k{best}'] - chance:+.4f}"
                    if chance is not None else "–"]

    def plot(fig) -> None:
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(ks, [stats[f"fewshot_accuracy_k{k}"] for k in ks], "o-", label="accuracy")
        if norm:
            ax.plot(ks, [stats.get(f"fewshot_accuracy_norm_k{k}") for k in ks], "s--",
                    alpha=0.7, label="length-normalised")
        if chance is not None:
            ax.axhline(chance, linestyle=":", color="gray", label="chance")
        ax.set_xticks(ks)
        ax.set_ylim(0, 1)
        ax.set_xlabel("examples in the prompt (k)")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    part.plot = plot
    return part


def dpo(stats: dict) -> Part:
    part = Part()
    pairs = [("preference accuracy (held-out pairs)", "dpo_preference_accuracy_before",
              "dpo_preference_accuracy"),
             ("loss on held-out pairs", "dpo_val_loss_before", "dpo_val_loss_after"),
             ("language-model loss on general text", "dpo_general_val_loss_before",
              "dpo_general_val_loss_after")]
    rows = []
    for label, before, after in pairs:
        b, a = number(stats, before), number(stats, after)
        if a is not None or b is not None:
            rows.append([label, fmt(b) if b is not None else "–", fmt(a) if a is not None
                         else "–", f"{a - b:+.4f}" if a is not None and b is not None else "–"])
    if rows:
        part.lines += table(["metric", "before", "after", "change"], rows)
    a, b = number(stats, "dpo_preference_accuracy"), number(stats, "dpo_preference_accuracy_before")
    if a is not None:
        part.summary = ["preference accuracy", fmt(a),
                        f"before {fmt(b)}" if b is not None else "–",
                        f"{a - b:+.4f}" if b is not None else "–"]
        if b is not None:
            def plot(fig) -> None:
                ax = fig.add_subplot(1, 1, 1)
                _bars(ax, ["preference accuracy"], {"before": [b], "after": [a]})
                ax.axhline(0.5, linestyle=":", color="gray")
                ax.set_ylim(0, 1.1)
                ax.set_title("DPO: chosen preferred over rejected (chance 0.5)", fontsize=9)
            part.plot = plot
    return part


def mlm(stats: dict) -> Part:
    part = Part()
    rows = []
    for label, keys in (("masked-token accuracy", ("mlm_accuracy", "mlm_accuracy_initial",
                                                   "mlm_baseline_accuracy")),
                        ("masked-token loss", ("mlm_loss", "mlm_loss_initial",
                                               "mlm_baseline_loss"))):
        values = [number(stats, k) for k in keys]
        if any(v is not None for v in values):
            rows.append([label, *[fmt(v) if v is not None else "–" for v in values]])
    if rows:
        part.lines += table(["metric", "trained", "before training",
                             "most-frequent-token baseline"], rows)
    acc, base = number(stats, "mlm_accuracy"), number(stats, "mlm_baseline_accuracy")
    if acc is not None:
        part.summary = ["masked-token accuracy", fmt(acc),
                        f"baseline {fmt(base)}" if base is not None else "–",
                        f"{acc - base:+.4f}" if base is not None else "–"]

        def plot(fig) -> None:
            ax = fig.add_subplot(1, 1, 1)
            names = ["trained", "before training", "baseline"]
            values = [acc, number(stats, "mlm_accuracy_initial"), base]
            keep = [(n, v) for n, v in zip(names, values, strict=True) if v is not None]
            _bars(ax, [n for n, _ in keep], {"accuracy": [v for _, v in keep]})
            ax.get_legend().remove()
            ax.set_ylim(0, 1.1)
            ax.set_title("masked-token accuracy", fontsize=9)
        part.plot = plot
    return part


def lm_eval_results(stats: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from flat ``lm_eval_<task>_<metric>`` stats (or nested
    {task: {metric: value}} entries)."""
    results: dict[str, dict[str, float]] = {}
    for key, value in stats.items():
        if isinstance(value, dict):
            results.setdefault(key, {}).update(
                {m: v for m, v in value.items() if isinstance(v, int | float)})
            continue
        if not key.startswith("lm_eval_") or not isinstance(value, int | float):
            continue
        rest = key[len("lm_eval_"):]
        metric = next((m for m in LM_EVAL_METRICS if rest.endswith("_" + m)), None)
        if metric:
            results.setdefault(rest[:-len(metric) - 1], {})[metric] = value
    return results


def lm_eval(stats: dict) -> Part:
    part = Part()
    results = lm_eval_results(stats)
    if not results:
        return part
    metrics = [m for m in LM_EVAL_METRICS[::-1] if any(m in r for r in results.values())]
    shown = [m for m in metrics if not m.endswith("_stderr")]
    rows = []
    for task, values in results.items():
        cells = []
        for m in shown:
            if m not in values:
                cells.append("–")
                continue
            err = values.get(f"{m}_stderr")
            cells.append(fmt(values[m]) + (f" ± {fmt(err)}" if err is not None else ""))
        rows.append([task, *cells])
    part.lines += table(["task", *shown], rows)
    if len(results) == 1:
        task, values = next(iter(results.items()))
        m = next((m for m in ("acc", "acc_norm", "exact_match") if m in values), None)
        if m:
            part.summary = [f"{task} {m}", fmt(values[m]), "–", "–"]
    headline = next((m for m in ("acc", "acc_norm", "exact_match")
                     if any(m in r for r in results.values())), None)
    if headline:
        def plot(fig) -> None:
            ax = fig.add_subplot(1, 1, 1)
            tasks = list(results)
            _bars(ax, tasks, {headline: [results[t].get(headline) for t in tasks]},
                  {headline: [results[t].get(f"{headline}_stderr") for t in tasks]})
            ax.set_ylim(0, 1.1)
            ax.set_title(f"lm-evaluation-harness: {headline}", fontsize=9)
        part.plot = plot
    return part


def champion(stats: dict) -> Part:
    part = Part()
    decision = stats.get("champion_decision")
    challenger, holder = number(stats, "challenger_score"), number(stats, "champion_score")
    metric = stats.get("champion_metric") or "score"
    if decision is not None:
        text = f"Decision: **{fmt(decision)}**"
        if challenger is not None and holder is not None:
            text += (f" — the challenger scored {fmt(challenger)} against the champion's "
                     f"{fmt(holder)} on {fmt(metric)}")
        elif challenger is not None:
            text += f" — the challenger scored {fmt(challenger)} on {fmt(metric)}"
        margin = number(stats, "champion_margin")
        if margin is not None:
            text += f" (required margin {fmt(margin)})"
        part.lines += [text + ".", ""]
        part.summary = ["decision", fmt(decision),
                        f"champion {fmt(holder)}" if holder is not None else "–",
                        f"challenger {fmt(challenger)}" if challenger is not None else "–"]
    rows = [[name, fmt(v)] for name, v in (("challenger", challenger), ("champion", holder))
            if v is not None]
    if rows:
        part.lines += table(["model", fmt(metric)], rows)

        def plot(fig) -> None:
            ax = fig.add_subplot(1, 1, 1)
            names = [r[0] for r in rows]
            _bars(ax, names, {str(metric): [challenger if n == "challenger" else holder
                                            for n in names]})
            ax.get_legend().remove()
            ax.set_title(f"{metric}: challenger vs champion"
                         + (f" ({decision})" if decision else ""), fontsize=9)
        part.plot = plot
    return part


def before_after(stats: dict) -> Part:
    """Any other section: its ``<metric>_before`` / ``<metric>_after`` (or ``<metric>``)
    pairs side by side, e.g. domain fine-tuning's losses on domain and general text."""
    part = Part()
    rows = []
    for key in stats:
        if not key.endswith("_before") or number(stats, key) is None:
            continue
        base = key[:-len("_before")]
        after_key = next((k for k in (f"{base}_after", base) if number(stats, k) is not None),
                         None)
        if after_key is not None:
            b, a = number(stats, key), number(stats, after_key)
            rows.append([base, fmt(b), fmt(a), f"{a - b:+.4f}"])
    if rows:
        part.lines += table(["metric", "before", "after", "change"], rows)
    return part


BUILDERS: dict[str, Callable[[dict], Part]] = {
    "language_model": language_model,
    "classify": supervised("classify", [("accuracy", "accuracy"),
                                        ("macro_f1", "macro-F1")], "accuracy"),
    "ner": supervised("ner", [("precision", "precision"), ("recall", "recall"),
                              ("f1", "F1")], "f1"),
    "fewshot": fewshot,
    "dpo": dpo,
    "mlm": mlm,
    "lm_eval": lm_eval,
    "champion": champion,
}


# --- the report -----------------------------------------------------------------------

def _save_plot(draw: Callable, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(6.4, 3.4), dpi=100)
    try:
        draw(fig)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def _image(section: str, name: str, source: Path, out_dir: Path) -> Path | None:
    """The image inside out_dir: itself when it already is, else a copy."""
    source = Path(source)
    if not source.is_file():
        log.warning("eval report: %s image %s: no file at %s; left out", section, name, source)
        return None
    try:
        source.resolve().relative_to(out_dir.resolve())
        return source.resolve()
    except ValueError:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{section}_{name}")
        target = out_dir / f"{safe}{source.suffix or '.png'}"
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        return target


def write_eval_report(sections: dict[str, dict], out_dir: Path,
                      title: str = "forgeline evaluation") -> dict[str, Path]:
    """Write ``eval_report.md`` and its plots into ``out_dir``; returns {name: path} of
    every file written ("report", "<section>_plot", "<section>_<image>")."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    names = [n for n in SECTION_TITLES if sections.get(n)] + \
        [n for n in sections if n not in SECTION_TITLES and sections.get(n)]
    summary, body = [], []
    for name in names:
        stats = dict(sections[name])
        images = stats.pop("images", None) or {}
        heading = SECTION_TITLES.get(name, name.replace("_", " ").capitalize())
        part = BUILDERS.get(name, before_after)(stats)
        body += [f"## {heading}", "", *part.lines]
        if part.plot is not None:
            path = out_dir / f"{name}.png"
            _save_plot(part.plot, path)
            written[f"{name}_plot"] = path
            body += [f"![{heading}]({path.name})", ""]
        for image_name, source in images.items():
            path = _image(name, image_name, Path(source), out_dir)
            if path is not None:
                link = path.relative_to(out_dir).as_posix()
                written[f"{name}_{image_name}"] = path
                body += [f"![{image_name.replace('_', ' ')}]({link})", ""]
        metrics = [[key, fmt(value)] for key, value in stats.items()
                   if not isinstance(value, dict | list)]
        metrics += [[f"{key}.{m}", fmt(v)] for key, value in stats.items()
                    if isinstance(value, dict) for m, v in value.items()]
        if metrics:
            body += ["All metrics of this section:", "", *table(["metric", "value"], metrics)]
        if part.summary:
            summary.append([heading, *part.summary])
    lines = [f"# {title}", ""]
    if summary:
        lines += ["## Summary", "", *table(["section", "headline", "value", "baseline",
                                            "difference"], summary)]
    if not names:
        lines += ["No evaluation results were given.", ""]
    path = out_dir / REPORT
    write_text_atomic(path, "\n".join(lines + body))
    written = {"report": path, **written}
    log.info("eval report: %d section(s), %d plot(s) and image(s) in %s", len(names),
             len(written) - 1, path)
    return written
