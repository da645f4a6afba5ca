"""``forgeline``: run the pipeline, show its configuration, export or sample the model.

Exit codes: 0 success; 2 invalid configuration or input (the reason on standard error);
1 any other failure.

Nothing printed here shows credentials of a URL (a tracking URI or a seed with
``user:password@``): they are masked as ``***``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from typing import Any

from tasks.redact import install_log_redaction, redact_secrets

EPILOG = """\
configuration:
  Settings come from the defaults (see configs/default.yaml, or `forgeline config`),
  then --config FILE, then each --set in order. Values are YAML:
    --set pretrain.max_steps=200 --set crawl.seeds='[https://example.org/]'
    --set source.paths='[data/my_docs/]' --set pii.enabled=false

environment:
  MLFLOW_TRACKING_URI  MLflow store (default: SQLite in the work directory)
  PREFECT_API_URL      Prefect server (default: Prefect's temporary local server)

examples:
  forgeline run                                  the embedded default, end to end
  forgeline run --until dedup --json             the data stages only, JSON summary
  forgeline run --set source.paths='[corpus/]'   your own .txt/.jsonl/.parquet files
  forgeline run --set source.paths='[cc/*.warc.gz]'
                                                 Common Crawl WARC (or .wet) archives
  forgeline run --set execution.workers=1        data stages in one worker process
  forgeline run --set execution.engine=dask --set execution.dask_address=tcp://host:8786
                                                 data stages' shards on a Dask cluster
  forgeline export --out hf-model                the latest run's model for transformers
  forgeline generate --model models:/forgeline/latest --prompt 'import json'
  forgeline sweep --param finetune.learning_rate=1e-4,5e-4 --param finetune.weight_decay=0,0.1
                                                 a 2x2 grid of fine-tuning trials
"""

EXPORT_SOURCES = """sources:
  (default)                          the newest pipeline run in --workdir that trained
  --run <run id> | runs:/<run id>    an MLflow pipeline or training-stage run
  --run models:/forgeline/3 | models:/forgeline/latest | models:/forgeline@champion
                                     a registered model version
  --run work/stages/pretrain-<key>/  a training stage's output
  Run ids and URIs are looked up in $MLFLOW_TRACKING_URI, else in the store of --workdir.
"""

MODEL_FORMS = """models (--model):
  work/stages/pretrain-<key>/        a training stage's output (model.pt, tokenizer.model)
  work/stages/.../checkpoints/best.ckpt
                                     a training checkpoint, also of an interrupted run
  hf-model/                          a `forgeline export` (sampled with transformers)
  <run id> | runs:/<run id>          an MLflow pipeline or training-stage run
  models:/forgeline/3 | models:/forgeline/latest | models:/forgeline@champion
                                     a registered model version
  MLflow URIs and run ids are looked up in $MLFLOW_TRACKING_URI, else in the store of
  --workdir.
"""

SWEEP_EPILOG = """\
parameters:
  --param KEY=V1,V2,...   candidate values of one setting (YAML values, as for --set); a grid
                          runs every combination, Optuna picks among them
  --range KEY=LOW:HIGH[:log]
                          a range for --sampler optuna (integers for integer settings)
  Settings of tokenize, pretrain, domain, finetune, dpo, classify, ner, evaluate and
  fewshot can be swept. The data stages and the training stages before the first swept
  one run once, shared by all trials.

metric (--metric):
  <stage>.<stat>          a stage's stat, e.g. finetune.val_loss_after (the default),
                          finetune.val_perplexity_after, classify.classify_accuracy
                          (with --direction maximize), evaluate.finetuned_val_perplexity
  a headline metric       val_perplexity, val_bits_per_byte, finetune_val_loss_after, ...

recorded:
  one MLflow run for the sweep (tags best_trial_run_id, best.<key>; metric best_objective),
  one nested run per trial (params: its settings; metric: the objective; tag best_trial),
  its stage runs nested under it; the trials table and plot under sweep/ and as the
  Prefect artifact forgeline-sweep.

examples:
  forgeline sweep --config configs/tiny.yaml --param finetune.learning_rate=1e-4,5e-4 \\
      --param finetune.weight_decay=0,0.1
  forgeline sweep --sampler optuna --trials 12 --range finetune.learning_rate=1e-5:1e-3:log \\
      --param finetune.max_steps=30,60 --metric finetuned_val_perplexity
"""

STAGE_NAMES = ("crawl", "extract", "filter", "dedup", "pii",
               "tokenize", "pretrain", "finetune", "evaluate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forgeline",
        description="Raw web text to a trained, evaluated small language model: crawl, "
                    "clean, tokenize, pretrain, fine-tune and evaluate, run by Prefect and "
                    "recorded in MLflow.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def config_args(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--config", metavar="FILE",
                         help="YAML file of settings (sections as in configs/default.yaml)")
        sub.add_argument("--set", dest="overrides", action="append", default=[],
                         metavar="KEY=VALUE",
                         help="override one setting by its dotted name; repeatable")

    run = commands.add_parser(
        "run", help="run the pipeline", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the pipeline. Finished stages with the same settings and inputs "
                    "are reused, so rerunning after a failure redoes only what failed.")
    config_args(run)
    run.add_argument("--until", choices=STAGE_NAMES, metavar="STAGE",
                     help=f"stop after this stage ({', '.join(STAGE_NAMES)})")
    run.add_argument("--workdir", default=os.environ.get("FORGELINE_WORKDIR", "work"),
                     metavar="DIR", help="stage outputs, reports and the default MLflow store "
                                         "(default: ./work, or $FORGELINE_WORKDIR)")
    run.add_argument("--json", action="store_true",
                     help="end standard output with one JSON line: the MLflow run id and "
                          "each stage's output directory and count")

    export = commands.add_parser(
        "export", help="write the final model in Hugging Face transformers format",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXPORT_SOURCES,
        description="Write a trained model as a transformers LlamaForCausalLM (config.json, "
                    "model.safetensors) with its sentencepiece tokenizer as a transformers "
                    "tokenizer (tokenizer.json): AutoModelForCausalLM.from_pretrained(DIR) "
                    "loads it offline. By default the final model (fine-tuned when "
                    "fine-tuning ran, else pretrained) of the newest pipeline run in the "
                    "work directory.")
    export.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    export.add_argument("--workdir", default=os.environ.get("FORGELINE_WORKDIR", "work"),
                        metavar="W", help="the work directory whose newest run to export, "
                                          "and whose MLflow store resolves --run (default: "
                                          "./work, or $FORGELINE_WORKDIR)")
    export.add_argument("--run", metavar="ID", help="an MLflow run id (pipeline or training "
                                                    "stage), a model URI or a stage output "
                                                    "directory instead (below)")

    generate = commands.add_parser(
        "generate", help="continue a prompt with a trained model",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=MODEL_FORMS,
        description="Print the model's continuation of --prompt. Each new token costs one "
                    "position's forward pass (a KV cache).")
    generate.add_argument("--model", required=True, metavar="PATH_OR_MODEL_URI",
                          help="the model: a path, an MLflow run id or a model URI (below)")
    generate.add_argument("--prompt", required=True, metavar="TEXT", help="text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                          help="tokens to generate at most; stops early at end of text "
                               "(default 64)")
    generate.add_argument("--temperature", type=float, default=0.8, metavar="T",
                          help="sampling temperature; 0 = greedy (default 0.8)")
    generate.add_argument("--top-k", type=int, default=None, metavar="K",
                          help="sample from the K most likely tokens only")
    generate.add_argument("--top-p", type=float, default=None, metavar="P",
                          help="sample from the smallest set of tokens whose probability "
                               "reaches P (nucleus sampling)")
    generate.add_argument("--seed", type=int, default=None, help="make sampling repeatable")
    generate.add_argument("--device", default=None,
                          help="cpu, cuda, cuda:1, ... (default: a GPU when there is one)")
    generate.add_argument("--workdir", default=os.environ.get("FORGELINE_WORKDIR", "work"),
                          metavar="W", help="whose MLflow store resolves run ids and URIs "
                                            "when $MLFLOW_TRACKING_URI is unset (default: "
                                            "./work)")

    sweep = commands.add_parser(
        "sweep", help="run a hyperparameter sweep of the training stages",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SWEEP_EPILOG,
        description="Run trials of the training stages with settings varied by --param "
                    "(and --range), each a Prefect task run and a nested MLflow run under "
                    "the sweep's run, at most --max-parallel at a time, and report the "
                    "best trial by --metric. Every trial's settings are validated before "
                    "any work starts.")
    config_args(sweep)
    sweep.add_argument("--param", dest="params", action="append", default=[],
                       metavar="KEY=V1,V2", help="a setting and its candidate values; "
                                                 "repeatable")
    sweep.add_argument("--range", dest="ranges", action="append", default=[],
                       metavar="KEY=LOW:HIGH[:log]",
                       help="a setting and its range (--sampler optuna); repeatable")
    sweep.add_argument("--sweep-config", metavar="FILE",
                       help="YAML file of sweep settings (parameters, sampler, trials, metric, "
                            "direction, max_parallel, seed); the flags here override it")
    sweep.add_argument("--sampler", choices=("grid", "optuna"), default=None,
                       help="grid: every combination (default); optuna: --trials trials "
                            "proposed by Optuna's TPE sampler")
    sweep.add_argument("--trials", type=int, default=None, metavar="N",
                       help="trials for --sampler optuna (default 8)")
    sweep.add_argument("--metric", default=None, metavar="M",
                       help="what to optimize (default finetune.val_loss_after; see below)")
    sweep.add_argument("--direction", choices=("minimize", "maximize"), default=None,
                       help="minimize (default) or maximize the metric")
    sweep.add_argument("--max-parallel", type=int, default=None, metavar="N",
                       help="trials running at the same time at most (default 2)")
    sweep.add_argument("--seed", type=int, default=None, help="seed of Optuna's sampler")
    sweep.add_argument("--workdir", default=os.environ.get("FORGELINE_WORKDIR", "work"),
                       metavar="DIR", help="stage outputs, reports and the default MLflow "
                                           "store (default: ./work, or $FORGELINE_WORKDIR)")
    sweep.add_argument("--json", action="store_true",
                       help="end standard output with one JSON line: the sweep's MLflow run "
                            "id, the best trial and every trial's settings and metric")

    show = commands.add_parser(
        "config", help="print the resolved configuration with every setting explained",
        description="Print the resolved configuration as YAML, each setting with its "
                    "description. Usable as a --config file.")
    config_args(show)
    return parser


def _fail(message: str, code: int) -> int:
    print(f"forgeline: error: {redact_secrets(message)}", file=sys.stderr)
    return code


def print_summary(result: dict[str, Any], seconds: float, stream=None) -> None:
    from rich.console import Console
    from rich.table import Table

    from flows.tracking import display_uri, ui_command

    console = Console(file=stream or sys.stdout, width=110)
    table = Table(title="forgeline run summary", title_justify="left")
    for column, justify in (("stage", "left"), ("result", "right"), ("built in (s)", "right"),
                            ("this run", "left")):
        table.add_column(column, justify=justify)
    for name, stage in result["stages"].items():
        if stage.get("skipped"):
            table.add_row(name, "-", "-", "skipped (disabled)")
            continue
        table.add_row(name, f"{stage['count']:,} {stage.get('unit', '')}",
                      f"{stage.get('seconds', 0):.1f}", "reused" if stage.get("reused") else "built")
    console.print(table)
    labels = {"tokens": "tokens",
              "pretrain_val_loss": "pretrain validation loss",
              "val_perplexity": "validation perplexity",
              "unigram_perplexity": "unigram baseline perplexity",
              "val_bits_per_byte": "validation bits per byte",
              "unigram_bits_per_byte": "unigram bits per byte",
              "finetune_train_loss_first": "fine-tune train loss, first",
              "finetune_train_loss_final": "fine-tune train loss, final",
              "finetune_val_loss_before": "fine-tune held-out loss, before",
              "finetune_val_loss_after": "fine-tune held-out loss, after",
              "mlm_accuracy": "masked-token accuracy",
              "mlm_baseline_accuracy": "most-frequent-token accuracy",
              "dpo_preference_accuracy_before": "preference accuracy, before DPO",
              "dpo_preference_accuracy": "preference accuracy, after DPO",
              "classify_accuracy": "classification accuracy",
              "classify_macro_f1": "classification macro-F1",
              "classify_majority_accuracy": "majority-class accuracy",
              "ner_f1": "NER entity F1",
              "ner_untuned_f1": "NER entity F1, untuned"}
    labels.update({key: f"few-shot accuracy, k={key.rsplit('k', 1)[1]}"
                   for key in sorted(result["metrics"], key=lambda k: (len(k), k))
                   if key.startswith("fewshot_accuracy_k")})
    for key, label in labels.items():
        if key in result["metrics"]:
            value = result["metrics"][key]
            console.print(f"{label:>32}: " + (f"{value:,.0f}" if key == "tokens" else f"{value:.4f}"))
    champion = result.get("champion")
    if champion:
        scores = f"challenger {champion['challenger_score']:.4f}" + (
            f" vs champion {champion['champion_score']:.4f}"
            if champion.get("champion_score") is not None else "")
        console.print(f"{'champion decision':>32}: {champion['decision']} "
                      f"({champion['metric']}: {scores})")
    console.print(f"{'data report':>32}: {result['data_report']}")
    console.print(f"{'MLflow run':>32}: {result['mlflow_run_id']}")
    if result.get("registered_model"):
        console.print(f"{'registered model':>32}: {result['registered_model']['model_uri']}")
    console.print(f"{'MLflow store':>32}: {display_uri(result['tracking_uri'])}")
    console.print(f"{'open the MLflow UI':>32}: {ui_command(result['tracking_uri'], '')}",
                  soft_wrap=True)
    console.print(f"{'total time':>32}: {seconds:.1f}s")


def _stop_temporary_prefect_server() -> None:
    """With no PREFECT_API_URL, Prefect runs the flow against a temporary local server and
    stops it at exit, logging as it goes. Send the pending logs and events, then stop it
    now, so that the summary or the error is the last thing printed."""
    try:
        from prefect._internal.concurrency.services import QueueService
        from prefect.server.api.server import SubprocessASGIServer

        if not SubprocessASGIServer._instances:
            return
        QueueService.drain_all(timeout=30)
        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()
    except Exception:  # noqa: BLE001 - internals of another Prefect: it stops at exit instead
        return


def cmd_config(args) -> int:
    from flows.config import ConfigError, config_yaml, load_config

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    sys.stdout.write(config_yaml(config))
    return 0


def cmd_run(args) -> int:
    from flows.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        return _fail(str(exc), 2)

    from flows.pipeline import pipeline
    from tasks.stage import StageInputError
    from tasks.training import TrainingInterrupted

    install_log_redaction()  # logs of Prefect, MLflow and the stages show no credentials
    started = time.perf_counter()
    try:
        result = pipeline(config=config, workdir=args.workdir, until=args.until)
    except StageInputError as exc:
        _stop_temporary_prefect_server()
        return _fail(str(exc), 2)
    except KeyboardInterrupt:
        return _fail("interrupted; finished stages are kept and will be reused", 130)
    except TrainingInterrupted as exc:  # SIGTERM/SIGINT while training: checkpoint written
        _stop_temporary_prefect_server()
        return _fail(f"{exc}; finished stages are kept and will be reused", 130)
    except Exception as exc:  # noqa: BLE001 - shown as Python would (exit code 1), masked
        _stop_temporary_prefect_server()  # so that the traceback comes last
        sys.stderr.write(redact_secrets("".join(traceback.format_exception(exc))))
        return 1
    _stop_temporary_prefect_server()
    print_summary(result, time.perf_counter() - started,
                  stream=sys.stderr if args.json else sys.stdout)
    if args.json:
        summary = {"mlflow_run_id": result["mlflow_run_id"],
                   "stages": {n: {k: v for k, v in s.items() if k != "stats"}
                              for n, s in result["stages"].items()},
                   "metrics": result["metrics"],
                   "registered_model": result.get("registered_model"),
                   "champion": result.get("champion")}
        sys.stdout.flush()
        print(json.dumps(redact_secrets(summary)))
    return 0


def sweep_settings(args) -> Any:
    """The SweepConfig of ``forgeline sweep``'s flags (over --sweep-config); raises
    ConfigError naming the flag or field."""
    import yaml
    from pydantic import ValidationError

    from flows.config import ConfigError
    from flows.sweep import SweepConfig

    data: dict[str, Any] = {}
    if args.sweep_config:
        try:
            with open(args.sweep_config, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except OSError as exc:
            raise ConfigError(f"--sweep-config {args.sweep_config}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--sweep-config {args.sweep_config} is not valid YAML: "
                              f"{exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--sweep-config {args.sweep_config} must hold a mapping")
    parameters = dict(data.get("parameters") or {})
    for item in args.params:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or not raw.strip():
            raise ConfigError(f"--param {item!r}: expected KEY=V1,V2,... e.g. "
                              "finetune.learning_rate=1e-4,5e-4")
        try:
            values = yaml.safe_load(f"[{raw}]")
        except yaml.YAMLError as exc:
            raise ConfigError(f"--param {key}: {raw!r} is not a YAML list of values "
                              f"({exc})") from None
        parameters[key.strip()] = values
    for item in args.ranges:
        key, sep, raw = item.partition("=")
        parts = raw.split(":")
        try:
            if not sep or len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
                raise ValueError
            ends = [int(p) if p.strip().lstrip("+-").isdigit() else float(p)
                    for p in parts[:2]]
        except ValueError:
            raise ConfigError(f"--range {item!r}: expected KEY=LOW:HIGH or KEY=LOW:HIGH:log, "
                              "e.g. finetune.learning_rate=1e-5:1e-3:log") from None
        parameters[key.strip()] = {"low": ends[0], "high": ends[1], "log": len(parts) == 3}
    data["parameters"] = parameters
    for name in ("sampler", "trials", "metric", "direction", "max_parallel", "seed"):
        if getattr(args, name) is not None:
            data[name] = getattr(args, name)
    try:
        return SweepConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "sweep"
            problems.append(f"  {where}: {error['msg'].removeprefix('Value error, ')}")
        raise ConfigError("invalid sweep settings:\n" + "\n".join(problems)) from None


def cmd_sweep(args) -> int:
    from flows.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
        settings = sweep_settings(args)
        from flows.sweep import plan_sweep

        plan_sweep(config, settings)  # every trial's settings, before any work
    except ConfigError as exc:
        return _fail(str(exc), 2)

    from flows.sweep import sweep_flow
    from tasks.stage import StageInputError
    from tasks.training import TrainingInterrupted

    install_log_redaction()
    started = time.perf_counter()
    try:
        result = sweep_flow(config=config, sweep=settings, workdir=args.workdir)
    except (StageInputError, ConfigError) as exc:
        _stop_temporary_prefect_server()
        return _fail(str(exc), 2)
    except KeyboardInterrupt:
        return _fail("interrupted; finished stages are kept and will be reused", 130)
    except TrainingInterrupted as exc:
        _stop_temporary_prefect_server()
        return _fail(f"{exc}; finished stages are kept and will be reused", 130)
    except Exception as exc:  # noqa: BLE001 - shown as Python would (exit code 1), masked
        _stop_temporary_prefect_server()
        sys.stderr.write(redact_secrets("".join(traceback.format_exception(exc))))
        return 1
    _stop_temporary_prefect_server()
    out = sys.stderr if args.json else sys.stdout
    keys = list(settings.parameters)
    print(f"sweep of {len(result['trials'])} trials, {result['metric']} "
          f"({result['direction']}):", file=out)
    for trial in result["trials"]:
        value = "failed" if trial["value"] is None else f"{trial['value']:.5g}"
        mark = "  <- best" if trial["number"] == result["best"]["number"] else ""
        shown = ", ".join(f"{k}={trial['overrides'][k]}" for k in keys)
        print(f"  trial {trial['number']:>3}: {shown}: {value}{mark}", file=out)
    print(f"best trial MLflow run: {result['best']['run_id']}", file=out)
    print(f"sweep MLflow run: {result['mlflow_run_id']} in {result['tracking_uri']}", file=out)
    print(f"report: {result['report']}", file=out)
    print(f"total time: {time.perf_counter() - started:.1f}s", file=out)
    if args.json:
        sys.stdout.flush()
        print(json.dumps(redact_secrets({k: result[k] for k in (
            "mlflow_run_id", "metric", "direction", "best", "trials", "report")}),
            default=str))
    return 0


def cmd_export(args) -> int:
    from flows.model_registry import ModelReferenceError
    from flows.model_tools import export

    install_log_redaction()
    try:
        out, source = export(args.out, workdir=args.workdir, run=args.run)
    except (ModelReferenceError, FileNotFoundError, ValueError) as exc:
        return _fail(str(exc), 2)
    print(f"exported the model of {redact_secrets(source)} to {out} (transformers "
          "LlamaForCausalLM and tokenizer)")
    return 0


def cmd_generate(args) -> int:
    from contextlib import ExitStack

    from flows.model_registry import ModelReferenceError
    from flows.model_tools import load_any_generator

    if args.max_new_tokens < 0 or args.temperature < 0:
        return _fail("--max-new-tokens and --temperature must be at least 0", 2)
    if args.top_p is not None and not 0 < args.top_p <= 1:
        return _fail(f"--top-p must be in (0, 1], got {args.top_p}", 2)
    if args.top_k is not None and args.top_k < 1:
        return _fail(f"--top-k must be at least 1, got {args.top_k}", 2)
    if args.device is not None:
        import torch

        try:
            device = torch.device(args.device)
        except RuntimeError:
            return _fail(f"--device {args.device!r} is not a torch device (cpu, cuda, "
                         "cuda:1, mps)", 2)
        if device.type == "cuda" and not torch.cuda.is_available():
            return _fail(f"--device {args.device}: no CUDA GPU here; use --device cpu", 2)
    install_log_redaction()
    with ExitStack() as stack:
        try:
            generator = load_any_generator(args.model, workdir=args.workdir,
                                           device=args.device, stack=stack)
        except (ModelReferenceError, FileNotFoundError, ValueError) as exc:
            return _fail(str(exc), 2)
        text = generator.generate(args.prompt, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, seed=args.seed)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"run": cmd_run, "config": cmd_config, "export": cmd_export,
                "generate": cmd_generate, "sweep": cmd_sweep}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
