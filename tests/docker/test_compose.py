"""The Docker stack cannot run here (no engine), so its structure is checked instead:
every service it needs, wired to each other, with build files that exist."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]


def test_the_stack_has_every_service():
    assert {"postgres", "redis", "minio", "mlflow", "prefect-server", "worker"} <= set(SERVICES)


def test_dependencies_name_existing_services():
    for name, service in SERVICES.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"


def test_worker_talks_to_prefect_and_mlflow_services():
    env = SERVICES["worker"]["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "prefect worker start --pool forgeline-process" in SERVICES["worker"]["command"]
    server = SERVICES["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "@postgres:5432/" in server
    assert "@postgres:5432/mlflow" in SERVICES["mlflow"]["command"]


def test_builds_point_at_dockerfiles_whose_copies_exist():
    for name, service in SERVICES.items():
        build = service.get("build")
        if not build:
            continue
        context = (DOCKER / build["context"]).resolve()
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        for line in dockerfile.read_text().splitlines():
            match = re.match(r"COPY\s+(.+)\s+\S+$", line)
            if match:
                for source in match.group(1).split():
                    assert (context / source).exists(), f"{dockerfile.name} copies missing {source}"


def test_named_volumes_are_declared():
    declared = set(COMPOSE.get("volumes", {}))
    for service in SERVICES.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared


def test_images_install_cpu_torch_and_the_project():
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (DOCKER / name).read_text()
        assert "torch>=2.5,<2.14" in text and "pip install -e ." in text


def test_dask_workers_share_the_work_directory_and_find_the_scheduler():
    """The optional Dask cluster: workers see the data volume where the flow's worker does,
    report to Prefect, and connect to the scheduler service."""
    worker, flow_worker = SERVICES["dask-worker"], SERVICES["worker"]
    assert "dask worker tcp://dask-scheduler:8786" in worker["command"]
    assert "--nthreads 1" in worker["command"]
    assert worker["volumes"] == flow_worker["volumes"]
    assert worker["working_dir"] == flow_worker["working_dir"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert "--port 8786" in SERVICES["dask-scheduler"]["command"]
    assert SERVICES["dask-scheduler"]["profiles"] == worker["profiles"] == ["dask"]
