"""deploy/k8s, validated offline: every kustomization renders (kubectl's built-in kustomize), every core
object passes kubernetes-validate in strict mode for the Kubernetes version we support, the KubeRay
resources carry their required fields, and the manifests cannot drift from the code (ports, health
service names, CLI options, drain times)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest
import typer
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33.0"  # the oldest version we support; deploy/README.md says so
OVERLAYS = ["overlays/gpu", "overlays/cpu-dev", "overlays/gpu-kuberay", "overlays/gpu-router"]
KUSTOMIZATIONS = ["base", *OVERLAYS, "kuberay", "jobs/recover-wombat-7b"]
PLAIN_FILES = ["kuberay/rayjob-train.yaml"]  # applied with `kubectl create -f`
SERVICES = ("materializer", "inference", "rrhf")  # the gRPC services
ALL_SERVICES = (*SERVICES, "gateway")  # and the HTTP gateway
PRESTOP_AND_MARGIN_SECONDS = 10 + 5


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; it comes with the dev extra")
    return path


@cache
def render(kustomization: str) -> tuple[dict, ...]:
    result = subprocess.run([_tool("kubectl"), "kustomize", str(K8S / kustomization)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def _objects(source: str) -> tuple[dict, ...]:
    if source.endswith(".yaml"):
        return tuple(d for d in yaml.safe_load_all((K8S / source).read_text()) if d)
    return render(source)


def _by_kind(objects, kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _cli():
    from services.cli.app import app

    return typer.main.get_command(app)


def _serve_command(service: str):
    return _cli().commands["serve"].commands[service]


def _validate(obj: dict) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{obj['kind']}/{obj['metadata'].get('name')}: {exc.message} at {list(exc.path)}")


# --- schema validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("source", KUSTOMIZATIONS + PLAIN_FILES)
def test_core_objects_pass_strict_schema_validation(source):
    objects = _objects(source)
    assert objects
    for obj in objects:
        if obj["apiVersion"].startswith(("ray.io/", "inference.networking.k8s.io/")):
            continue  # custom resources: checked against their required fields below
        _validate(obj)


def test_strict_validation_catches_a_misspelt_field():
    import kubernetes_validate

    deployment = dict(_by_kind(render("overlays/gpu"), "Deployment")["wombat-inference"])
    spec = {**deployment["spec"], "replica": 2}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**deployment, "spec": spec}, KUBERNETES_VERSION, strict=True)


def _ray_cluster_specs() -> list[tuple[str, dict]]:
    specs = [(f"RayCluster/{n}", o["spec"]) for n, o in _by_kind(render("kuberay"), "RayCluster").items()]
    for name, job in _by_kind(_objects("kuberay/rayjob-train.yaml"), "RayJob").items():
        specs.append((f"RayJob/{name}", job["spec"]["rayClusterSpec"]))
    return specs


def _require(obj: dict, fields: list[str], where: str) -> None:
    missing = [f for f in fields if f not in obj]
    assert not missing, f"{where} lacks required field(s) {missing}"


def test_kuberay_resources_carry_the_required_fields_and_valid_pod_templates():
    """The KubeRay v1 CRDs (ray.io/v1) require these fields; the pod templates inside are core
    PodTemplateSpecs, so they are validated as such."""
    specs = _ray_cluster_specs()
    assert len(specs) == 2
    for where, spec in specs:
        _require(spec, ["headGroupSpec"], where)
        groups = [("head", spec["headGroupSpec"])]
        _require(spec["headGroupSpec"], ["rayStartParams", "template"], f"{where} headGroupSpec")
        for group in spec.get("workerGroupSpecs", []):
            fields = ["groupName", "rayStartParams", "template", "minReplicas", "maxReplicas"]
            _require(group, fields, f"{where} workerGroupSpecs")
            assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], where
            groups.append((group["groupName"], group))
        for name, group in groups:
            assert all(isinstance(v, str) for v in group["rayStartParams"].values()), (where, name)
            _validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
                       "template": group["template"]})  # fmt: skip
    for name, job in _by_kind(_objects("kuberay/rayjob-train.yaml"), "RayJob").items():
        _require(job["spec"], ["entrypoint", "rayClusterSpec"], f"RayJob/{name}")
        assert job["spec"]["submissionMode"] in {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
        submitter = job["spec"]["submitterPodTemplate"]  # hardened: KubeRay's default one is not
        _validate(
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": "submitter"},
                "template": submitter,
            }
        )


def test_kuberay_ray_version_is_the_one_the_images_install():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pinned = next(re.search(r"==([\d.]+)", d).group(1) for d in extras["cluster"] if d.startswith("ray["))
    import ray

    assert ray.__version__ == pinned, "the dev environment runs a different Ray than the images"
    for where, spec in _ray_cluster_specs():
        assert spec["rayVersion"] == pinned, where


# --- no drift between manifests and code ----------------------------------------------------------------


def _config(objects, service: str) -> dict[str, str]:
    maps = [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(f"wombat-{service}")
    ]
    assert len(maps) == 1, service
    return maps[0]["data"]


def _option_names(command) -> dict[str, object]:
    return {p.name: p for p in command.params}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_keys_are_real_serve_options_and_parse(overlay, monkeypatch):
    """Each key is WOMBAT_SERVE_<SERVICE>_<OPTION>; click reads it as that option. Parsing the whole
    ConfigMap with the real CLI proves the values are accepted too."""
    objects = render(overlay)
    for service in ALL_SERVICES:
        command = _serve_command(service)
        prefix = f"WOMBAT_SERVE_{service.upper()}_"
        data = _config(objects, service)
        options = _option_names(command)
        for key in data:
            assert key.startswith(prefix), key
            assert key.removeprefix(prefix).lower() in options, f"{key}: no such option of serve {service}"
        for key, value in data.items():
            monkeypatch.setenv(key, value)
        context = command.make_context(service, [], auto_envvar_prefix=prefix.rstrip("_"))
        assert context.params["port"] == int(data[f"{prefix}PORT"])
        monkeypatch.delenv(f"{prefix}PORT")


def _deployment(objects, service: str) -> dict:
    return _by_kind(objects, "Deployment")[f"wombat-{service}"]


def _health_names() -> dict[str, str]:
    from services.inference.server import SERVICE_NAME as INFERENCE
    from services.materializer.server import SERVICE_NAME as MATERIALIZER
    from services.rrhf.server import SERVICE_NAME as RRHF

    return {"materializer": MATERIALIZER, "inference": INFERENCE, "rrhf": RRHF}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_probes_and_drain_match_the_servers(overlay):
    from services.scaffold.server import LIVENESS_SERVICE

    objects = render(overlay)
    for service in SERVICES:
        data = _config(objects, service)
        prefix = f"WOMBAT_SERVE_{service.upper()}_"
        pod = _deployment(objects, service)["spec"]["template"]["spec"]
        container = pod["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {
            "grpc": int(data[f"{prefix}PORT"]),
            "metrics": int(data[f"{prefix}METRICS_PORT"]),
            "health": int(data[f"{prefix}HEALTH_PORT"]),
        }, service
        for probe in ("startupProbe", "readinessProbe"):
            assert container[probe]["grpc"] == {"port": ports["health"], "service": _health_names()[service]}
        assert container["livenessProbe"]["grpc"] == {"port": ports["health"], "service": LIVENESS_SERVICE}
        # The kubelet must not kill a pod that is still draining.
        drain = float(data[f"{prefix}DRAIN_SECONDS"])
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + PRESTOP_AND_MARGIN_SECONDS - 10
        service_ports = {
            p["name"]: p for p in _by_kind(objects, "Service")[f"wombat-{service}"]["spec"]["ports"]
        }
        assert (
            service_ports["grpc"]["port"] == ports["grpc"] and service_ports["grpc"]["targetPort"] == "grpc"
        )
        assert service_ports["metrics"]["targetPort"] == "metrics"
        assert container["image"].split("/")[-1].split(":")[0] in {f"wombat-{service}", service}


def _mounted_dirs(pod: dict, container: dict) -> dict[str, dict]:
    volumes = {v["name"]: v for v in pod["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_and_files_named_in_the_config_are_mounted(overlay):
    objects = render(overlay)
    for service in ALL_SERVICES:
        data = _config(objects, service)
        pod = _deployment(objects, service)["spec"]["template"]["spec"]
        mounts = _mounted_dirs(pod, pod["containers"][0])
        for key, value in data.items():
            if key.endswith(("_FILE", "_TLS_CERT", "_TLS_KEY", "_TLS_CLIENT_CA")):
                volume = mounts[str(Path(value).parent)]
                assert "secret" in volume, f"{key} must come from a Secret"
        for option in ("MODEL_ROOT", "DATA_ROOT", "MODEL"):
            path = data.get(f"WOMBAT_SERVE_{service.upper()}_{option}")
            if path:
                store = next(m for m in mounts if path == m or path.startswith(m + "/"))
                assert "persistentVolumeClaim" in mounts[store], (service, option)


def test_inference_mounts_the_store_read_only_and_verifies_the_model_first():
    for overlay in OVERLAYS:
        objects = render(overlay)
        pod = _deployment(objects, "inference")["spec"]["template"]["spec"]
        for container in [*pod["initContainers"], *pod["containers"]]:
            if container["name"] == "gateway":  # the router overlay's sidecar holds no model
                assert all(m["mountPath"] != "/models" for m in container["volumeMounts"])
                continue
            model_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/models")
            assert model_mount.get("readOnly") is True
        verify = pod["initContainers"][0]
        args = _expand(verify["args"], _config(objects, "inference"))
        assert verify["command"] == ["wombat", "verify"]
        assert args == [_config(objects, "inference")["WOMBAT_SERVE_INFERENCE_MODEL"]]


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


def _parse_wombat(argv: list[str]) -> None:
    """Parses a `wombat ...` command line with the real CLI, without running it."""
    assert argv[0] == "wombat", argv
    command, rest = _cli(), argv[1:]
    while hasattr(command, "commands"):
        command, rest = command.commands[rest[0]], rest[1:]
    command.make_context(argv[-1], list(rest))


def test_every_wombat_command_in_the_manifests_parses():
    commands = []
    for source in [*KUSTOMIZATIONS, *PLAIN_FILES]:
        for obj in _objects(source):
            if obj["kind"] == "RayJob":
                commands.append(shlex.split(obj["spec"]["entrypoint"]))
            pod = (obj.get("spec") or {}).get("template", {}).get("spec", {})
            for container in [*pod.get("initContainers", []), *pod.get("containers", [])]:
                if container.get("command", [""])[0] == "wombat":
                    env = _config(_objects(source), "inference") if "args" in container else {}
                    commands.append(container["command"] + _expand(container.get("args", []), env))
    assert len(commands) >= 6
    for argv in commands:
        _parse_wombat(argv)


def test_rrhf_joins_the_ray_cluster_the_kuberay_overlay_creates():
    objects = render("overlays/gpu-kuberay")
    address = _config(objects, "rrhf")["WOMBAT_SERVE_RRHF_RAY_ADDRESS"]
    match = re.fullmatch(r"ray://([\w-]+)-head-svc:(\d+)", address)
    assert match, address
    cluster = _by_kind(objects, "RayCluster")[match.group(1)]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "client", "containerPort": int(match.group(2))} in head["ports"]
    rrhf = _deployment(objects, "rrhf")["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in rrhf["resources"].get("limits", {})


def test_gpu_overlay_gives_inference_and_rrhf_a_gpu_and_hardens_every_pod():
    objects = render("overlays/gpu")
    for service in ALL_SERVICES:
        pod = _deployment(objects, service)["spec"]["template"]["spec"]
        gpus = pod["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
        assert gpus == (None if service in ("materializer", "gateway") else 1), service
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
    for kind in ("ServiceAccount", "NetworkPolicy", "PodDisruptionBudget", "Service"):
        assert set(_by_kind(objects, kind)) >= {f"wombat-{s}" for s in ALL_SERVICES}, kind
    assert set(_by_kind(objects, "HorizontalPodAutoscaler")) == {"wombat-inference", "wombat-gateway"}
    hpa = _by_kind(objects, "HorizontalPodAutoscaler")["wombat-inference"]
    names = [
        m.get("pods", m.get("resource", {})).get("metric", {}).get("name") for m in hpa["spec"]["metrics"]
    ]
    assert "wombat_inference_queue_depth" in names
    assert any(m["type"] == "Resource" for m in hpa["spec"]["metrics"])  # the CPU fallback


def test_gpu_inference_runs_vllm_with_a_memory_backed_shm():
    """The gpu overlay serves with vLLM (the image's vllm variant): --engine vllm, its memory budget, and a
    memory-backed /dev/shm (the runtime's default 64 MiB starves vLLM's inter-process tensors)."""
    objects = render("overlays/gpu")
    config = _config(objects, "inference")
    assert config["WOMBAT_SERVE_INFERENCE_ENGINE"] == "vllm"
    assert 0 < float(config["WOMBAT_SERVE_INFERENCE_GPU_MEMORY_UTILIZATION"]) <= 1
    pod = _deployment(objects, "inference")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"].endswith("-vllm")
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert len(shm) == 1 and volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory"
    base = _deployment(render("base"), "inference")["spec"]["template"]["spec"]["containers"][0]
    assert not any(
        m["mountPath"] == "/dev/shm" for m in base["volumeMounts"]
    )  # CPU pods: the engine needs none


def test_hpa_scales_on_a_metric_the_inference_server_exports():
    from prometheus_client import CollectorRegistry

    from services.inference.metrics import InferenceMetrics

    registry = CollectorRegistry()
    InferenceMetrics(registry, "model")
    exported = {m.name for m in registry.collect()}
    hpa = _by_kind(render("base"), "HorizontalPodAutoscaler")["wombat-inference"]
    pods_metric = next(m for m in hpa["spec"]["metrics"] if m["type"] == "Pods")
    assert pods_metric["pods"]["metric"]["name"] in exported


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_port_probes_drain_and_route_to_the_inference_pods(overlay):
    objects = render(overlay)
    data = _config(objects, "gateway")
    pod = _deployment(objects, "gateway")["spec"]["template"]
    container = pod["spec"]["containers"][0]
    port = int(data["WOMBAT_SERVE_GATEWAY_PORT"])
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": port}
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)  # /metrics on the same port
    drain = float(data["WOMBAT_SERVE_GATEWAY_DRAIN_SECONDS"])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["spec"]["terminationGracePeriodSeconds"] >= pre_stop + drain + 10
    # The upstream is the headless Service over the inference pods, on the inference gRPC port.
    upstream = data["WOMBAT_SERVE_GATEWAY_UPSTREAM"]
    match = re.fullmatch(r"dns:///([\w-]+):(\d+)", upstream)
    assert match, upstream
    headless = _by_kind(objects, "Service")[match.group(1)]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == {"app.kubernetes.io/name": "wombat-inference"}
    assert int(match.group(2)) == int(_config(objects, "inference")["WOMBAT_SERVE_INFERENCE_PORT"])
    # The inference NetworkPolicy admits the gateway's pods; the gateway may reach inference and DNS.
    inference_policy = _by_kind(objects, "NetworkPolicy")["wombat-inference"]
    admitted = [
        rule["from"][0].get("podSelector", {}).get("matchLabels", {})
        for rule in inference_policy["spec"]["ingress"]
    ]
    assert any(labels.items() <= pod["metadata"]["labels"].items() for labels in admitted if labels)
    egress = _by_kind(objects, "NetworkPolicy")["wombat-gateway"]["spec"]["egress"]
    assert {"port": int(match.group(2))} in egress[0]["ports"]
    # The token the inference pods check comes from the same Secret they read it from.
    token = next(e for e in container["env"] if e["name"] == "WOMBAT_AUTH_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "wombat-auth", "key": "token"}


def _pod_specs(node, where: str = ""):
    """Every pod spec inside an object, however deep: Deployments, Jobs, and the templates embedded in
    KubeRay's RayCluster and RayJob (head, worker groups, the submitter pod)."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield where, node
        for key, value in node.items():
            yield from _pod_specs(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _pod_specs(value, f"{where}[{index}]")


# The Pod Security Standard "restricted" (Kubernetes 1.33), plus what deploy/README promises on top:
# a read-only root filesystem, with /tmp writable from an emptyDir.
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}  # fmt: skip


def _restricted_violations(pod: dict) -> list[str]:
    found = []
    pod_context = pod.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            found.append(flag)
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            found.append(f"volume {volume['name']}: {kinds - RESTRICTED_VOLUME_TYPES}")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        name, context = container["name"], container.get("securityContext", {})

        def effective(key: str, context=context):
            return context.get(key, pod_context.get(key))

        if context.get("privileged"):
            found.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation must be false")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{name}: capabilities.drop must include ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: adds capabilities {capabilities['add']}")
        if effective("runAsNonRoot") is not True:
            found.append(f"{name}: runAsNonRoot must be true")
        if effective("runAsUser") == 0:
            found.append(f"{name}: runs as uid 0")
        if (effective("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            found.append(f"{name}: hostPort")
        if context.get("readOnlyRootFilesystem") is not True:
            found.append(f"{name}: readOnlyRootFilesystem must be true")
        elif not any(m["mountPath"] == "/tmp" and "emptyDir" in volumes.get(m["name"], {})
                     for m in container.get("volumeMounts", [])):  # fmt: skip
            found.append(f"{name}: a read-only root needs an emptyDir at /tmp")
    return found


def test_every_pod_in_every_object_meets_the_restricted_profile():
    checked = 0
    for source in [*KUSTOMIZATIONS, *PLAIN_FILES]:
        for obj in _objects(source):
            for where, pod in _pod_specs(obj.get("spec", {}), f"{obj['kind']}/{obj['metadata']['name']}"):
                assert _restricted_violations(pod) == [], f"{source}: {where}"
                checked += 1
    # Deployments, init-containered pods, the recover Job, RayCluster head and workers, RayJob head,
    # workers and submitter: all of them were found.
    assert checked >= 12


def test_the_restricted_check_catches_a_violation():
    pod = next(p for _, p in _pod_specs(_objects("kuberay/rayjob-train.yaml")[0]["spec"]))
    broken = yaml.safe_load(yaml.safe_dump(pod))
    broken["containers"][0]["securityContext"].pop("readOnlyRootFilesystem")
    broken["securityContext"].pop("seccompProfile")
    broken["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    found = _restricted_violations(broken)
    assert any("readOnlyRootFilesystem" in f for f in found) and any("seccompProfile" in f for f in found)
    assert any("hostPath" in f for f in found)


def test_the_emptydirs_are_where_the_image_test_lets_the_containers_write():
    """`make image-test` runs each image with a read-only root and tmpfs only at these paths; the pods'
    emptyDirs must be the same (Ray's shared memory aside), or an image passes there and fails in a pod."""
    from tests.images.conftest import WRITABLE

    for source in [*KUSTOMIZATIONS, *PLAIN_FILES]:
        for obj in _objects(source):
            for where, pod in _pod_specs(obj.get("spec", {}), f"{obj['kind']}/{obj['metadata']['name']}"):
                volumes = {v["name"]: v for v in pod.get("volumes", [])}
                for container in [*pod.get("initContainers", []), *pod["containers"]]:
                    scratch = {m["mountPath"] for m in container.get("volumeMounts", [])
                               if "emptyDir" in volumes[m["name"]] and m["mountPath"] != "/dev/shm"}  # fmt: skip
                    assert scratch == set(WRITABLE), f"{source}: {where} {container['name']}"


def test_router_overlay_gives_each_inference_pod_an_openai_sidecar_and_an_inference_pool():
    """overlays/gpu-router: each inference pod also speaks OpenAI HTTP (a gateway sidecar on its own pod)
    beside its vLLM-named metrics, and an InferencePool (Gateway API Inference Extension, v1) selects those
    pods at that port: what an endpoint picker or llm-d routes over."""
    objects = render("overlays/gpu-router")
    pod = _deployment(objects, "inference")["spec"]["template"]["spec"]
    inference, sidecar = pod["containers"]
    assert inference["name"] == "inference" and sidecar["name"] == "gateway"
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["WOMBAT_SERVE_GATEWAY_UPSTREAM"] == "localhost:50052"  # its own pod only
    port = {p["name"]: p["containerPort"] for p in sidecar["ports"]}["openai"]
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/health"
    volumes = {v["name"] for v in pod["volumes"]}
    assert {m["name"] for m in sidecar["volumeMounts"]} <= volumes
    # Every WOMBAT_SERVE_GATEWAY_* variable is an option of `wombat serve gateway`.
    options = {f"WOMBAT_SERVE_GATEWAY_{p.name.upper()}" for p in _serve_command("gateway").params}
    assert {k for k in env if k.startswith("WOMBAT_SERVE_GATEWAY_")} <= options
    (pool,) = _by_kind(objects, "InferencePool").values()
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    _require(pool["spec"], ["selector", "targetPorts", "endpointPickerRef"], "InferencePool.spec")
    labels = _deployment(objects, "inference")["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [port]
    _require(pool["spec"]["endpointPickerRef"], ["name", "port"], "InferencePool.spec.endpointPickerRef")
    # The pod lets the router reach that port, and drains long enough for the sidecar's own drain.
    assert pod["terminationGracePeriodSeconds"] >= 60 + 5


def test_router_overlay_lets_the_router_reach_the_openai_port_and_the_metrics():
    policy = _by_kind(render("overlays/gpu-router"), "NetworkPolicy")["wombat-inference"]
    rules = [r for r in policy["spec"]["ingress"] if any("wombat.ai/router" in str(f) for f in r["from"])]
    assert rules and {p["port"] for p in rules[0]["ports"]} == {8000, "metrics"}
