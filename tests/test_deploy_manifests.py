"""Offline checks of the deployment files: Kubernetes manifests, Dockerfile, compose.

kubernetes-validate (schemas of several Kubernetes versions, strict) runs over
every manifest in deploy/k8s, hadolint over the Dockerfile; then the things a
schema cannot see: probes on /live and /ready, pinned images and pull policies,
non-root read-only containers, the SSE annotations of the Ingress, Redis's
pub/sub buffer limit, the compose start order. Each tool is also shown a
broken input, so a tool that silently passes everything fails here.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import free_port, wait_until

yaml: Any = importlib.import_module("yaml")  # PyYAML, untyped

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
NAMESPACE = "redis-first-chain"
K8S_VERSIONS = ["1.28.0", "1.33.0", None]  # None: the tool's newest
CHAIN = {"kv-updater", "api-server", "demo-publisher"}
OPTIONAL = {"demo-publisher.yaml", "api-server-hpa.yaml"}  # applied by hand, not kustomized


def tool(name: str) -> str:
    """A console script of the test environment (beside this Python) or on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return found


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def load_all(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert all(isinstance(d, dict) for d in docs), path
    return docs


def resources() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in manifest_files():
        for doc in load_all(path):
            yield path, doc


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in resources() if d["kind"] == kind}


def workloads() -> dict[str, dict[str, Any]]:
    return {**by_kind("Deployment"), **by_kind("StatefulSet")}


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = workload["spec"]["template"]["spec"]["containers"]
    return found


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


# ---------------------------------------------------------------- schemas


def test_manifests_exist() -> None:
    names = {p.name for p in manifest_files()}
    for needed in (
        "namespace.yaml",
        "configmap.yaml",
        "secret.yaml",
        "redis.yaml",
        "kv-updater.yaml",
        "api-server.yaml",
        "ingress.yaml",
        "demo-publisher.yaml",
    ):
        assert needed in names


@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "newest")
def test_kubernetes_validate_strict(version: str | None) -> None:
    files = manifest_files()
    args = [tool("kubernetes-validate"), "--strict"]
    if version:
        args += ["-k", version]
    run = subprocess.run(
        [*args, *map(str, files)], capture_output=True, text=True, timeout=120, check=False
    )
    out = run.stdout + run.stderr
    problems = "\n".join(line for line in out.splitlines() if not line.startswith("INFO"))
    assert run.returncode == 0, problems
    assert "ERROR" not in out, problems
    assert "WARN" not in out, problems
    passed = len(re.findall(r"\bpassed for resource\b", out))
    assert passed == sum(1 for _ in resources()), out


def test_kubernetes_validate_rejects_a_broken_manifest(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    deployment = by_kind("Deployment")["api-server"]
    deployment["spec"]["replicas"] = "three"
    containers(deployment)[0]["readinessProbe"]["httpGet"]["bogus"] = True
    bad.write_text(yaml.safe_dump(deployment))
    run = subprocess.run(
        [tool("kubernetes-validate"), "--strict", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode != 0, run.stdout + run.stderr


def test_every_resource_is_namespaced_and_labelled() -> None:
    for path, doc in resources():
        meta = doc["metadata"]
        if doc["kind"] == "Namespace":
            assert meta["name"] == NAMESPACE
            continue
        assert meta.get("namespace") == NAMESPACE, f"{path.name}: {doc['kind']} {meta['name']}"
        assert meta.get("labels", {}).get("app.kubernetes.io/part-of") == NAMESPACE, path.name


def test_kustomization_lists_the_core_manifests() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kust["resources"]
    for name in listed:
        assert (K8S / name).exists(), name
    expected = {p.name for p in manifest_files()} - OPTIONAL
    assert set(listed) == expected
    assert kust["namespace"] == NAMESPACE
    assert any(i["name"] == "redis-first-chain" for i in kust["images"])


# ---------------------------------------------------------------- workloads


def test_chain_deployments_and_replicas() -> None:
    deps = by_kind("Deployment")
    assert {"kv-updater", "api-server"} <= set(deps)
    assert deps["api-server"]["spec"]["replicas"] >= 3
    assert deps["kv-updater"]["spec"]["replicas"] in (1, 2)
    # rolling an updater never leaves the channel without a subscriber
    assert deps["kv-updater"]["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    for name in ("kv-updater", "api-server", "demo-publisher"):
        (container,) = containers(deps[name])
        assert container["command"][0] == name


@pytest.mark.parametrize(("name", "port"), [("kv-updater", 9100), ("api-server", 8000)])
def test_probes_on_live_and_ready(name: str, port: int) -> None:
    (container,) = containers(by_kind("Deployment")[name])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (
        ("livenessProbe", "/live"),
        ("readinessProbe", "/ready"),
        ("startupProbe", "/live"),
    ):
        http = container[probe]["httpGet"]
        assert http["path"] == path, (name, probe)
        assert ports.get(http["port"], http["port"]) == port, (name, probe)
    env = env_of(container)
    if name == "kv-updater":  # off by default: the probes need it on
        assert env["METRICS_PORT"]["value"] == str(port)
    else:
        assert env["PORT"]["value"] == str(port)


def test_every_workload_has_probes_resources_and_a_pinned_image() -> None:
    for name, workload in workloads().items():
        for container in containers(workload):
            image = container["image"]
            assert ":" in image, (name, image)
            assert not image.endswith(":latest"), (name, image)
            assert container.get("imagePullPolicy") == "IfNotPresent", name
            res = container["resources"]
            assert res["requests"]["cpu"], name
            assert res["requests"]["memory"], name
            assert res["limits"]["memory"], name
            if name != "demo-publisher":  # no HTTP: nothing to probe
                assert "livenessProbe" in container, name
                assert "readinessProbe" in container, name


def test_every_workload_is_non_root_with_a_read_only_root() -> None:
    for name, workload in workloads().items():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod.get("automountServiceAccountToken") is False, name
        for container in containers(workload):
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
        if name in CHAIN:
            assert pod["securityContext"]["runAsUser"] == 10001, name  # the image's user
            mounts = {m["mountPath"] for c in containers(workload) for m in c["volumeMounts"]}
            assert "/tmp" in mounts, name


def test_settings_and_secret_wiring() -> None:
    config = by_kind("ConfigMap")["chain-settings"]["data"]
    assert config["CHANNEL"] == "update"
    assert "API_TOKEN" not in config  # secrets stay secret
    assert "REDIS_URL" not in config
    secret = by_kind("Secret")["chain-secrets"]
    assert {"API_TOKEN", "REDIS_URL"} <= set(secret["stringData"])
    for name in CHAIN:
        (container,) = containers(by_kind("Deployment")[name])
        assert {"configMapRef": {"name": "chain-settings"}} in container["envFrom"], name
        redis_url = env_of(container)["REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert redis_url == {"name": "chain-secrets", "key": "REDIS_URL"}, name
    (api,) = containers(by_kind("Deployment")["api-server"])
    token = env_of(api)["API_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token == {"name": "chain-secrets", "key": "API_TOKEN"}


def test_services_point_at_named_container_ports() -> None:
    deps = workloads()
    for name, svc in by_kind("Service").items():
        selector = svc["spec"]["selector"]
        targets = [
            w
            for w in deps.values()
            if all(
                w["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in selector.items()
            )
        ]
        assert targets, f"service {name} selects no workload"
        ports = {p["name"] for w in targets for c in containers(w) for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, (name, port)


def test_autoscaler_targets_the_api_server() -> None:
    (hpa,) = by_kind("HorizontalPodAutoscaler").values()
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "api-server")
    assert hpa["spec"]["minReplicas"] >= by_kind("Deployment")["api-server"]["spec"]["replicas"]


def test_selectors_match_their_pods() -> None:
    for name, workload in workloads().items():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        for key, value in workload["spec"]["selector"]["matchLabels"].items():
            assert labels.get(key) == value, name
    pods = [w["spec"]["template"]["metadata"]["labels"] for w in workloads().values()]
    for name, pdb in by_kind("PodDisruptionBudget").items():
        wanted = pdb["spec"]["selector"]["matchLabels"]
        assert any(all(p.get(k) == v for k, v in wanted.items()) for p in pods), name
    (ingress,) = by_kind("Ingress").values()
    services = by_kind("Service")
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            ports = {p["name"] for p in services[backend["name"]]["spec"]["ports"]}
            assert backend["port"]["name"] in ports


# ---------------------------------------------------------------- redis, ingress


def test_redis_statefulset_config() -> None:
    sts = by_kind("StatefulSet")["redis"]
    conf = by_kind("ConfigMap")["redis-config"]["data"]["redis.conf"]
    assert re.search(r"^client-output-buffer-limit pubsub \d+mb \d+mb \d+$", conf, re.M)
    assert re.search(r"^maxmemory-policy noeviction$", conf, re.M)  # never drop KV keys
    assert sts["spec"]["volumeClaimTemplates"], "redis needs a volume for its data"
    assert sts["spec"]["serviceName"] in by_kind("Service")
    secret = by_kind("Secret")["chain-secrets"]["stringData"]
    assert secret["REDIS_URL"].startswith("redis://redis:6379")
    assert "redis" in by_kind("Service")


def test_redis_conf_loads_in_a_real_redis(tmp_path: Path) -> None:
    """The StatefulSet's redis.conf, as Redis itself reads it (a typo would stop the pod)."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    import redis

    text = by_kind("ConfigMap")["redis-config"]["data"]["redis.conf"]
    assert re.search(r"^dir /data$", text, re.M)  # the StatefulSet's volume
    conf = tmp_path / "redis.conf"
    conf.write_text(re.sub(r"^dir .*$", f"dir {tmp_path}", text, flags=re.M))
    port = free_port()
    overrides = ["--port", str(port), "--bind", "127.0.0.1"]
    proc = subprocess.Popen(
        [server, str(conf), *overrides, "--daemonize", "no"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    client = redis.Redis(port=port, socket_timeout=2)

    def answers() -> bool:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"redis-server refused the config:\n{out}")
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    try:
        wait_until(answers, 10, 0.05, message="redis-server on the ConfigMap's redis.conf")
        config = {str(k): str(v) for k, v in client.config_get("*").items()}
        assert "pubsub 268435456 134217728 60" in config["client-output-buffer-limit"]
        assert config["maxmemory-policy"] == "noeviction"
        assert config["appendonly"] == "yes"
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()


def test_ingress_keeps_sse_unbuffered_with_long_timeouts() -> None:
    (ingress,) = by_kind("Ingress").values()
    notes = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert notes[prefix + "proxy-buffering"] == "off"
    assert int(notes[prefix + "proxy-read-timeout"]) >= 3600
    assert int(notes[prefix + "proxy-send-timeout"]) >= 3600
    assert notes[prefix + "proxy-http-version"] == "1.1"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "api-server"
    assert ingress["spec"]["ingressClassName"] == "nginx"


# ---------------------------------------------------------------- Dockerfile


def test_hadolint_passes_on_the_dockerfile() -> None:
    run = subprocess.run(
        [tool("hadolint"), str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_hadolint_rejects_a_careless_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install redis\nCMD python -m api_server\n")
    run = subprocess.run(
        [tool("hadolint"), str(bad)], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode != 0
    assert "DL3007" in run.stdout  # `latest`


def test_dockerfile_shape() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.12-slim$", text, re.M)
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\} AS runtime$", text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users
    assert users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*HEALTH_URL", text, re.M)
    assert re.search(r'^CMD \["api-server"\]$', text, re.M)
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for entry in (".git", "tests", "**/__pycache__", "build/*", "!build/docker-wheels"):
        assert entry in ignore
    assert "README.md" not in ignore  # pyproject's readme: the build needs it


# ---------------------------------------------------------------- compose


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_services_and_start_order() -> None:
    spec = compose()
    assert "version" not in spec  # the compose specification: no version key
    services = spec["services"]
    assert set(services) == {"redis", "kv-updater", "api-server", "demo"}
    for name, svc in services.items():  # never pulled, unless asked (REDIS_PULL_POLICY)
        assert re.fullmatch(r"never|\$\{[A-Z_]+:-never\}", svc["pull_policy"]), name
    for name in ("kv-updater", "api-server", "demo"):
        assert services[name]["image"] == services["api-server"]["image"], name
        assert services[name]["read_only"] is True, name
        assert services[name]["cap_drop"] == ["ALL"], name
        assert services[name]["build"]["context"] == "."
    assert services["kv-updater"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["api-server"]["depends_on"]["redis"]["condition"] == "service_healthy"
    for dep in ("kv-updater", "api-server"):
        assert services["demo"]["depends_on"][dep]["condition"] == "service_healthy"
    for name in ("redis", "kv-updater", "api-server"):
        assert services[name]["healthcheck"]["test"], name
    assert "redis-cli ping" in " ".join(services["redis"]["healthcheck"]["test"])
    command = " ".join(services["redis"]["command"])
    assert re.search(r"--client-output-buffer-limit pubsub \d+mb \d+mb \d+", command)
    assert services["kv-updater"]["environment"]["METRICS_PORT"] == "9100"
    assert any(":8000" in p for p in services["api-server"]["ports"])


def test_compose_file_is_accepted_by_docker_compose() -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed")
    run = subprocess.run(
        [exe, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout + run.stderr
