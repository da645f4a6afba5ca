"""Every deployment in deployments/prefect.yaml points at a flow that imports, with
parameters the flow accepts and schedules Prefect can parse."""

from pathlib import Path

import pytest
import yaml
from prefect import Flow
from prefect.client.schemas.schedules import CronSchedule
from prefect.flows import load_flow_from_entrypoint

ROOT = Path(__file__).resolve().parents[2]
SPEC = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
DEPLOYMENTS = SPEC["deployments"]


def test_names_are_unique_and_the_nightly_one_is_scheduled():
    names = [d["name"] for d in DEPLOYMENTS]
    assert len(names) == len(set(names))
    nightly = next(d for d in DEPLOYMENTS if d["name"] == "nightly")
    assert nightly["parameters"]["config"]["crawl"]["snapshot"] == "daily"
    assert nightly["schedules"]


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["name"])
def test_entrypoint_loads_a_flow_that_accepts_the_parameters(deployment):
    flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
    assert isinstance(flow, Flow) and flow.name == "forgeline-pipeline"
    validated = flow.validate_parameters(deployment.get("parameters") or {})
    if "config" in validated:
        assert validated["config"].model_dump()  # a PipelineConfig, validated like the UI form
    for schedule in deployment.get("schedules", []):
        CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))
    assert deployment["work_pool"]["name"] == "forgeline-process"


def test_pull_step_sets_the_working_directory_to_the_repository():
    step = SPEC["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert step["directory"] == "{{ $FORGELINE_HOME }}"


def test_the_ui_form_offers_every_section_with_defaults_and_the_stage_choice():
    from prefect.utilities.callables import parameter_schema

    from flows.config import STAGES
    from flows.pipeline import pipeline

    schema = parameter_schema(pipeline.fn).model_dump_for_openapi()
    props = schema["properties"]
    assert set(props) == {"config", "workdir", "until"}
    config = schema["definitions"]["PipelineConfig"]
    assert {"source", "crawl", "extract", "filter", "dedup", "pii", "tokenize", "pretrain",
            "finetune", "evaluate"} <= set(config["properties"])
    crawl = schema["definitions"]["CrawlConfig"]["properties"]
    assert crawl["max_pages"]["default"] == 250 and crawl["max_pages"]["description"]
    until = props["until"]
    choices = next(v for v in until.get("anyOf", [until]) if "enum" in v or "$ref" in v)
    if "$ref" in choices:
        choices = schema["definitions"][choices["$ref"].rsplit("/", 1)[-1]]
    assert choices["enum"] == list(STAGES)
