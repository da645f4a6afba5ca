"""The data report: what each data stage kept and removed, and why, as Markdown and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.shards import atomic_path, write_text_atomic


def _removed_reasons(stats: dict[str, Any]) -> dict[str, int]:
    return {k.removeprefix("removed_"): int(v) for k, v in stats.items()
            if k.startswith("removed_") and isinstance(v, (int, float)) and v}


def _filter_details(stats: dict[str, Any]) -> list[str]:
    """The languages the filter identified, and the lines C4's line rules dropped."""
    languages = {k.removeprefix("language_"): int(v) for k, v in stats.items()
                 if k.startswith("language_") and v}
    dropped = {k.removeprefix("c4_lines_dropped_"): int(v) for k, v in stats.items()
               if k.startswith("c4_lines_dropped_") and v}
    lines: list[str] = []
    if languages:
        lines += ["", "## filter: documents by identified language", "",
                  "| language | documents |", "|---|---:|"]
        lines += [f"| {code} | {n} |" for code, n in
                  sorted(languages.items(), key=lambda x: -x[1])]
    if dropped:
        lines += ["", "## filter: lines dropped by C4's line rules", "",
                  (f"{stats.get('c4_chars_dropped', 0):,} characters from "
                   f"{stats.get('c4_documents_changed', 0)} kept documents."), "",
                  "| rule | lines |", "|---|---:|"]
        lines += [f"| {rule} | {n} |" for rule, n in sorted(dropped.items(), key=lambda x: -x[1])]
    return lines


def _source_mix(stages: dict[str, dict]) -> list[str]:
    """Documents (and words, once the text is extracted) of each source after each stage."""
    shown = {n: m.get("stats", {}) for n, m in stages.items() if not m.get("skipped")}
    sources = sorted({key[len("source."):-len(".documents")] for st in shown.values()
                      for key in st if key.startswith("source.") and key.endswith(".documents")})
    if not sources:
        return []
    read = shown.get("crawl", {})
    lines = ["", "## documents per source after each stage", "",
             ("Documents read, then kept after each stage (and words, counted on "
              "whitespace, from extract on). Tokens per source are the tokenize stage's "
              "MLflow metrics source.<name>.tokens."), "",
             "| source | read | " + " | ".join(shown) + " |", "|---|---:|" + "---:|" * len(shown)]
    for source in sources:
        documents_read = read.get(f"source.{source}.read")
        cells = ["" if documents_read is None else f"{documents_read:,}"]
        for stats in shown.values():
            documents = stats.get(f"source.{source}.documents")
            words = stats.get(f"source.{source}.words", stats.get(f"source.{source}.tokens"))
            cells.append("" if documents is None else
                         f"{documents:,}" + (f" ({words:,})" if words is not None else ""))
        lines.append(f"| {source} | " + " | ".join(cells) + " |")
    return lines


def funnel_plot(stages: dict[str, dict], path: Path) -> Path:
    """Documents left after each data stage, as a horizontal bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, m in stages.items() if not m.get("skipped")]
    counts = [stages[n]["count"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(names) + 1.2))
    bars = ax.barh(names[::-1], counts[::-1], color="#4C72B0")
    ax.bar_label(bars, padding=3)
    ax.set_xlabel("documents after stage")
    ax.set_title("forgeline data funnel")
    ax.margins(x=0.15)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def data_report(stages: dict[str, dict], out_dir: Path) -> dict[str, Path]:
    """Write ``data_report.md`` and ``data_funnel.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# forgeline data report", "",
             "| stage | documents in | kept | removed | seconds | reused |",
             "|---|---:|---:|---:|---:|---|"]
    previous = None
    for name, manifest in stages.items():
        if manifest.get("skipped"):
            lines.append(f"| {name} | | | | | skipped (disabled) |")
            continue
        stats = manifest.get("stats", {})
        count = manifest["count"]
        docs_in = stats.get("input_documents", previous if previous is not None else count)
        removed = docs_in - count if isinstance(docs_in, (int, float)) else ""
        lines.append(f"| {name} | {docs_in} | {count} | {removed} | "
                     f"{manifest.get('seconds', 0):.1f} | {'yes' if manifest.get('reused') else 'no'} |")
        previous = count
    lines += _source_mix(stages)
    for name, manifest in stages.items():
        reasons = _removed_reasons(manifest.get("stats", {}))
        if reasons:
            lines += ["", f"## {name}: removed documents by reason", "",
                      "| reason | documents |", "|---|---:|"]
            lines += [f"| {r} | {n} |" for r, n in sorted(reasons.items(), key=lambda x: -x[1])]
        errors = {k.removeprefix("errors_"): v for k, v in manifest.get("stats", {}).items()
                  if k.startswith("errors_") and v}
        if errors:
            lines += ["", f"{name}: {sum(errors.values())} documents raised an error and were "
                          f"removed as `{name}_error` (by error class: "
                          + ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) + ")."]
    lines += _filter_details(stages.get("filter", {}).get("stats", {}))
    dedup = stages.get("dedup", {}).get("stats", {})
    if "duplicate_clusters" in dedup:
        lines += ["", "## dedup: clusters", "",
                  (f"{dedup['duplicate_clusters']} clusters of duplicates (largest: "
                  f"{dedup['largest_cluster']} documents), each keeping its first document. "
                  f"LSH with {dedup['lsh_bands']} bands x {dedup['lsh_rows']} rows gave "
                  f"{dedup['candidate_pairs']} candidate pairs, {dedup['confirmed_pairs']} "
                  f"confirmed by estimated Jaccard similarity; {dedup['exact_pairs']} exact "
                   "pairs.")]
    pii = stages.get("pii", {})
    if pii and not pii.get("skipped"):
        found = {k.removeprefix("pii_"): v for k, v in pii.get("stats", {}).items()
                 if k.startswith("pii_") and v}
        lines += ["", "## pii", "",
                  f"Detector: {pii.get('info', {}).get('nlp_engine', 'unknown')}", "",
                  "| entity | replaced |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(found.items())] or ["| (none) | 0 |"]
    lines += ["", ("Removed documents are kept with their reason in each stage's `removed/` "
                   "folder:"), ""]
    lines += [f"- {n}: `{Path(m['dir']) / 'removed'}`" for n, m in stages.items()
              if not m.get("skipped") and (Path(m["dir"]) / "removed").is_dir()]
    report = out_dir / "data_report.md"
    write_text_atomic(report, "\n".join(lines) + "\n")
    return {"report": report, "plot": funnel_plot(stages, out_dir / "data_funnel.png")}
