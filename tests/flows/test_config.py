"""PipelineConfig: loading, overrides, error messages, and the shipped config files."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.config import (
    ConfigError,
    PipelineConfig,
    config_yaml,
    flatten,
    load_config,
    parse_override,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


def test_overrides_are_parsed_as_yaml():
    assert parse_override("pretrain.max_steps=200") == ("pretrain.max_steps", 200)
    assert parse_override("pii.enabled=false") == ("pii.enabled", False)
    assert parse_override("source.paths=[a, b/c]") == ("source.paths", ["a", "b/c"])
    assert parse_override("crawl.seeds=[http://127.0.0.1:8000/]") == (
        "crawl.seeds", ["http://127.0.0.1:8000/"])


def test_set_overrides_apply_in_order():
    config = load_config(None, ["pretrain.max_steps=7", "pretrain.max_steps=9",
                                "filter.enabled=false"])
    assert config.pretrain.max_steps == 9 and config.filter.enabled is False


@pytest.mark.parametrize("override, field", [
    ("pretrain.learning_rate=-1", "pretrain.learning_rate"),
    ("crawl.max_pages=many", "crawl.max_pages"),
    ("crawl.max_pagez=5", "crawl.max_pagez"),
    ("nonsense.key=1", "nonsense"),
    ("pretrain.n_heads=3", "divisible by n_heads"),  # a shape the model cannot build
    ("pretrain.precision=fp8", "pretrain.precision"),
    ("pretrain.strategy=foo", "pretrain.strategy"),
    ("evaluate.accelerator=tpu", "evaluate.accelerator"),
])
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert field in str(info.value)


def test_unknown_setting_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'max_pages'"):
        load_config(None, ["crawl.max_pagez=5"])


def test_malformed_override_and_missing_file_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["pretrain.max_steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_two_sources_or_none_are_refused():
    with pytest.raises(ConfigError, match="crawl.seeds are both set"):
        load_config(None, ["source.paths=[x]", "crawl.seeds=[http://127.0.0.1/]"])
    with pytest.raises(ConfigError, match="nothing to read"):
        load_config(None, ["crawl.enabled=false"])


def test_every_field_is_described():
    def walk(model, prefix=""):
        for name, field in type(model).model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            value = getattr(model, name)
            if hasattr(type(value), "model_fields"):
                walk(value, f"{prefix}{name}.")
    walk(PipelineConfig())


def test_config_yaml_round_trips_and_explains():
    config = load_config(None, ["pretrain.max_steps=11"])
    text = config_yaml(config)
    assert "# " in text and "max_steps: 11" in text
    assert PipelineConfig.model_validate(yaml.safe_load(text)) == config


def test_default_yaml_is_the_generated_defaults():
    """configs/default.yaml documents the defaults; regenerate with `forgeline config`."""
    assert (ROOT / "configs" / "default.yaml").read_text() == config_yaml(PipelineConfig())


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), PipelineConfig)


def test_flatten_gives_dotted_params():
    flat = flatten(PipelineConfig().model_dump(mode="json"))
    assert "pretrain.learning_rate" in flat and "crawl.max_pages" in flat


def test_credentials_in_seed_urls_never_reach_params_yaml_or_errors():
    config = load_config(None, ["crawl.seeds=[https://user:pw-SECRET@example.org/]"])
    flat = flatten(config.model_dump(mode="json"))
    assert "pw-SECRET" not in repr(flat) and "pw-SECRET" not in config_yaml(config)
    assert flat["crawl.seeds"] == ["https://***@example.org/"]
    # flatten and config_yaml mask by themselves too, whatever the model holds
    raw = {"tracking": {"uri": "postgresql://u:pw-SECRET@db/mlflow"}, "n": 1}
    assert flatten(raw) == {"tracking.uri": "postgresql://***@db/mlflow", "n": 1}
    assert flatten(raw, redacted=False)["tracking.uri"] == raw["tracking"]["uri"]
    unchecked = PipelineConfig().model_copy(update={"crawl": config.crawl.model_copy(
        update={"seeds": ["https://user:pw-SECRET@example.org/"]})})
    assert "pw-SECRET" not in config_yaml(unchecked)
    assert "https://***@example.org/" in config_yaml(unchecked)
    assert "pw-SECRET" in config_yaml(unchecked, redacted=False)
    with pytest.raises(ConfigError) as error:
        load_config(None, ["crawl.seeds=[ftp://user:pw-SECRET@example.org/]"])
    assert "pw-SECRET" not in str(error.value) and "ftp://***@example.org/" in str(error.value)


HEAVY = ("torch", "lightning", "trafilatura", "presidio_analyzer", "spacy", "mlflow", "prefect")


def test_loading_the_config_imports_no_heavy_library():
    """`forgeline config` and a bad --set answer at once: nothing trains or tracks there."""
    code = (f"import flows.config, sys; print(sorted(m for m in {HEAVY!r} "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", (
        f"importing flows.config loads {result.stdout.strip()}; find who with "
        "`python -X importtime -c 'import flows.config'`")
