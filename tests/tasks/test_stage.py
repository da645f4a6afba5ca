"""The keyed stage runner: finished output is reused, failures leave nothing behind."""

import json

import pytest

import tasks.shards
from tasks.shards import count_records, write_records
from tasks.stage import StageInputError, run_stage


def _writer(calls: list, fail: bool = False):
    def build(out_dir):
        calls.append(out_dir)
        write_records([{"id": "a", "text": "x", "url": ""}], out_dir / "data")
        if fail:
            raise RuntimeError("boom")
        return {"count": 1, "stats": {"input_documents": 1}, "nlp_engine": "blank"}
    return build


def test_second_run_reuses_finished_output(tmp_path):
    calls = []
    first = run_stage("demo", _writer(calls), workdir=tmp_path, config={"a": 1}, log=lambda m: None)
    second = run_stage("demo", _writer(calls), workdir=tmp_path, config={"a": 1}, log=lambda m: None)
    assert len(calls) == 1
    assert first["reused"] is False and second["reused"] is True
    assert second["output"] == first["output"] and first["output"].endswith("/data")
    assert count_records(second["output"]) == 1
    assert first["info"] == {"nlp_engine": "blank"}
    on_disk = json.loads((tmp_path / "stages" / f"demo-{first['key']}" / "manifest.json").read_text())
    assert on_disk["content_hash"] == first["content_hash"]


def test_config_input_or_code_change_makes_a_new_directory(tmp_path, ):
    calls = []
    base = run_stage("demo", _writer(calls), workdir=tmp_path, config={"a": 1}, log=lambda m: None)
    other_config = run_stage("demo", _writer(calls), workdir=tmp_path, config={"a": 2},
                             log=lambda m: None)
    other_input = run_stage("demo", _writer(calls), workdir=tmp_path, config={"a": 1},
                            inputs=[{"stage": "up", "key": "k", "content_hash": "h"}],
                            log=lambda m: None)
    other_code = run_stage("demo", _writer(calls), workdir=tmp_path, config={"a": 1},
                           code=[tasks.shards], log=lambda m: None)
    keys = {m["key"] for m in (base, other_config, other_input, other_code)}
    assert len(keys) == 4 and len(calls) == 4


def test_failed_build_leaves_no_directory_and_is_redone(tmp_path):
    calls = []
    with pytest.raises(RuntimeError):
        run_stage("demo", _writer(calls, fail=True), workdir=tmp_path, log=lambda m: None)
    assert list((tmp_path / "stages").iterdir()) == []
    manifest = run_stage("demo", _writer(calls), workdir=tmp_path, log=lambda m: None)
    assert manifest["reused"] is False and len(calls) == 2


def test_directory_without_manifest_is_not_trusted(tmp_path):
    calls = []
    manifest = run_stage("demo", _writer(calls), workdir=tmp_path, log=lambda m: None)
    stage_dir = tmp_path / "stages" / f"demo-{manifest['key']}"
    (stage_dir / "manifest.json").unlink()  # as if killed before the rename
    again = run_stage("demo", _writer(calls), workdir=tmp_path, log=lambda m: None)
    assert again["reused"] is False and len(calls) == 2


def test_stage_input_error_names_the_stage():
    error = StageInputError("filter", "no documents left")
    assert str(error) == "filter: no documents left" and error.stage == "filter"


def test_stage_input_error_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(StageInputError("filter", "no document kept")))
    assert isinstance(error, StageInputError)
    assert (error.stage, str(error)) == ("filter", "filter: no document kept")


def test_a_moved_work_directory_is_reused_at_its_new_place(tmp_path):
    calls = []
    run_stage("demo", _writer(calls), workdir=tmp_path / "w1", config={"a": 1},
              log=lambda m: None)
    (tmp_path / "w1").rename(tmp_path / "w2")
    moved = run_stage("demo", _writer(calls), workdir=tmp_path / "w2", config={"a": 1},
                      log=lambda m: None)
    assert len(calls) == 1 and moved["reused"]
    assert moved["output"].startswith(str((tmp_path / "w2").resolve()))
    assert count_records(moved["output"]) == 1


def test_leftovers_of_dead_attempts_go_but_a_live_one_is_left_alone(tmp_path):
    import subprocess
    import sys

    from tasks.stage import stage_dir

    key = stage_dir("demo", workdir=tmp_path, config={"a": 1}).name.removeprefix("demo-")
    stages = tmp_path / "stages"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = stages / f".tmp-demo-{key}-999999999"
        busy = stages / f".tmp-demo-{key}-{live.pid}"
        dead.mkdir(parents=True)
        busy.mkdir()
        run_stage("demo", _writer([]), workdir=tmp_path, config={"a": 1}, log=lambda m: None)
        assert not dead.exists() and busy.exists()
    finally:
        live.kill()
        live.wait()
