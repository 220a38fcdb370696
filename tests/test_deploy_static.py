"""Deployment files checked without a Docker engine or a cluster.

Dockerfiles (hadolint, and the invariants that keep the prebuilt kernels loadable without a
compiler), .dockerignore, compose files (``docker-compose config``), the Prometheus
configurations (``promtool``), the Grafana dashboard (its queries parse and name only metrics the
server exports), the Kubernetes manifests, and the container health probe against a real gRPC
health service.

A check whose tool is missing is skipped with the reason, except under CI (``CI=true``), where
the tools are installed and a missing one is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
K8S = ROOT / "deploy" / "k8s"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cpu"]
COMPOSE_BASE = DOCKER / "docker-compose.yml"
COMPOSE_GPU = DOCKER / "docker-compose.gpu.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "roi-service.json"
HEALTH_SERVICE = "roi.v1.RoIService"
GRPC_PORT = 50051
METRICS_PORT = 9100

# The server's metric families as agreed before roi_server/metrics.py existed; used only while
# that module is absent (see exported_sample_names).
PLANNED_METRICS = {
    "roi_requests": "counter",
    "roi_request_duration_seconds": "histogram",
    "roi_queue_wait_seconds": "histogram",
    "roi_compute_seconds": "histogram",
    "roi_batch_requests": "histogram",
    "roi_batch_boxes": "histogram",
    "roi_batches": "counter",
    "roi_queue_depth": "gauge",
    "roi_requests_in_flight": "gauge",
    "roi_received_bytes": "counter",
    "roi_sent_bytes": "counter",
    "roi_device_memory_bytes": "gauge",
    "roi_server_info": "gauge",
}

# Environment variables that shape cpp_extension's compiler command lines: the runtime stage
# must see exactly what the build stage saw, or ninja finds the prebuilt objects stale and the
# compiler-less runtime image fails to start.
BUILD_SHAPING_ENV = (
    "ROI_KERNELS_BUILD_DIR",
    "ROI_KERNELS_CUDA",
    "ROI_KERNELS_MARCH",
    "TORCH_CUDA_ARCH_LIST",
    "CUDA_HOME",
    "TORCH_EXTENSION_SKIP_NVCC_GEN_DEPENDENCIES",
    "CC",
    "CXX",
    "CUDA_INC_PATH",
    "CUDNN_HOME",
)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def tool(name: str, *, ci_installs: bool = True) -> str:
    """Path of a command-line tool; skips (or, under CI, fails) when it is not installed."""
    beside_python = Path(sys.executable).parent / name  # pip-installed tools in an unactivated venv
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed"
    if ci_installs and in_ci():
        pytest.fail(f"{message}, and CI is expected to install it")
    pytest.skip(message)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


# --------------------------------------------------------------------------------------------
# Dockerfiles


class Stage:
    def __init__(self, base: str, name: str | None, global_args: dict[str, str]):
        self.base, self.name = base, name
        self.args: dict[str, str] = {}
        self.global_args = global_args
        self.env: dict[str, str] = {}
        self.instructions: list[tuple[str, str]] = []

    def expand(self, value: str) -> str:
        scope = {**self.global_args, **self.args, **self.env}
        return re.sub(
            r"\$\{(\w+)\}|\$(\w+)", lambda m: scope.get(m.group(1) or m.group(2), m.group(0)), value
        )

    def last(self, keyword: str) -> str | None:
        found = [rest for kw, rest in self.instructions if kw == keyword]
        return found[-1] if found else None


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not buf and not stripped):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        keyword, _, rest = buf.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        buf = ""
    return out


def parse_stages(path: Path) -> list[Stage]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, rest in dockerfile_instructions(path):
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            target = stages[-1].args if stages else global_args
            inherited = global_args.get(name, "")
            target[name] = default.strip('"') if default else inherited
        elif keyword == "FROM":
            words = rest.split()
            name = words[words.index("AS") + 1] if "AS" in words else None
            stage = Stage(words[0], name, global_args)
            stage.base = stage.expand(words[0])
            stages.append(stage)
        else:
            stage = stages[-1]
            stage.instructions.append((keyword, rest))
            if keyword == "ENV":
                for item in shlex.split(rest):
                    key, _, value = item.partition("=")
                    stage.env[key] = stage.expand(value)
    return stages


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    result = run([tool("hadolint"), "--no-color", str(dockerfile)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_stage_is_slim_non_root_and_health_checked(dockerfile):
    stages = parse_stages(dockerfile)
    runtime = stages[-1]  # the default target
    build = next(s for s in stages if s.name == "build")
    assert runtime.name == "runtime"

    user = runtime.last("USER")
    assert user, "the runtime stage must not run as root"
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: numeric and non-zero, for runAsNonRoot"

    healthcheck = runtime.last("HEALTHCHECK")
    assert healthcheck and "healthcheck.py" in healthcheck
    copies = [rest for kw, rest in runtime.instructions if kw == "COPY"]
    assert any("docker/healthcheck.py" in c for c in copies), "the probe script is not in the image"
    assert runtime.last("ENTRYPOINT") == '["roi-server"]'

    # The compiled kernels travel from the build stage into the folder the loader is told about.
    build_dir = runtime.env["ROI_KERNELS_BUILD_DIR"]
    assert any(c.startswith("--from=build") and c.endswith(f" {build_dir}") for c in
               (c.replace("--chown=10001:10001 ", "") for c in copies)), copies
    # The kernel build in the build stage, and a load check (which would need a compiler if
    # anything were stale) in the runtime stage.
    assert any(kw == "RUN" and "roi-kernels-build" in rest for kw, rest in build.instructions)
    assert any(kw == "RUN" and "roi-kernels-build" in rest for kw, rest in runtime.instructions)

    installs = " ".join(rest for kw, rest in runtime.instructions if kw == "RUN")
    for compiler in ("g++", "gcc", "build-essential", "-devel", "python3-dev"):
        assert compiler not in installs, f"{compiler} installed in the runtime stage"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_sees_the_build_stage_settings(dockerfile):
    stages = parse_stages(dockerfile)
    build = next(s for s in stages if s.name == "build")
    runtime = stages[-1]
    for key in BUILD_SHAPING_ENV:
        assert build.env.get(key) == runtime.env.get(key), (
            f"{key}: build stage {build.env.get(key)!r}, runtime {runtime.env.get(key)!r}"
        )
    assert build.env["ROI_KERNELS_MARCH"] not in ("", "native"), "-march=native ties the image to the builder"


def test_gpu_image_pins_cuda_torch_and_arch_list():
    stages = parse_stages(DOCKER / "Dockerfile")
    build, runtime = stages[0], stages[-1]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-devel-ubuntu[\d.]+", build.base), build.base
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(base|runtime)-ubuntu[\d.]+", runtime.base), runtime.base
    cuda = build.base.split(":")[1].split("-")[0]
    assert runtime.base.split(":")[1].split("-")[0] == cuda, "build and runtime CUDA versions differ"
    assert build.env["ROI_KERNELS_CUDA"] == "1", "the GPU image must fail, not fall back to CPU-only"

    index = build.args["TORCH_INDEX_URL"]
    assert index.endswith("/cu" + "".join(cuda.split(".")[:2])), f"torch wheels {index} vs CUDA {cuda}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", build.args["TORCH_VERSION"]), "torch must be pinned"

    arches = [a.removesuffix("+PTX") for a in build.env["TORCH_CUDA_ARCH_LIST"].split(";")]
    versions = sorted(float(a) for a in arches)
    assert versions[0] == 7.5 and versions[-1] == 9.0, f"want Turing (7.5) to Hopper (9.0): {arches}"
    assert {7.5, 8.0, 8.6, 8.9, 9.0} <= set(versions)


def test_cpu_image_has_a_loadtest_target_without_torch():
    stages = parse_stages(DOCKER / "Dockerfile.cpu")
    loadtest = next(s for s in stages if s.name == "loadtest")
    runs = " ".join(rest for kw, rest in loadtest.instructions if kw == "RUN")
    assert "[loadtest]" in runs and "torch" not in runs and "[server]" not in runs
    assert loadtest.last("ENTRYPOINT") == '["roi-loadtest"]'
    assert loadtest.last("USER") and not loadtest.last("USER").startswith("0")


def _glob_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_excludes(path: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, regex in patterns:
        if any(regex.match(p) for p in prefixes):
            excluded = not negated
    return excluded


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        patterns.append((negated, _glob_regex(line.lstrip("!").strip("/"))))
    return patterns


def test_dockerignore_admits_what_the_images_copy_and_nothing_heavy():
    patterns = dockerignore_patterns()
    sources: set[str] = set()
    for dockerfile in DOCKERFILES:
        for keyword, rest in dockerfile_instructions(dockerfile):
            if keyword == "COPY" and "--from=" not in rest:
                words = [w for w in rest.split() if not w.startswith("--")]
                sources.update(words[:-1])
    assert sources
    tracked = run(["git", "ls-files"], cwd=ROOT).stdout.split()
    for source in sorted(sources):
        files = [f for f in tracked if f == source or f.startswith(source + "/")]
        assert files or (ROOT / source).exists(), f"COPY {source}: not in the repository"
        for f in files or [source]:
            assert not dockerignore_excludes(f, patterns), f".dockerignore keeps out {f}, which COPY needs"
    for heavy in (".git/HEAD", ".venv/bin/python", "tests/test_deploy_static.py", "benchmarks/out/x",
                  "server/roi_server/__pycache__/a.pyc", "roi_kernels/build/x.o"):
        assert dockerignore_excludes(heavy, patterns), f"{heavy} would be sent to the builder"


# --------------------------------------------------------------------------------------------
# Compose


def compose_config(*files: Path, profiles: tuple[str, ...] = ()) -> dict:
    cmd = [tool("docker-compose")]
    for f in files:
        cmd += ["-f", str(f)]
    for p in profiles:
        cmd += ["--profile", p]
    result = run(cmd + ["config"], cwd=DOCKER)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def compose_cpu():
    return compose_config(COMPOSE_BASE, profiles=("loadtest",))


@pytest.fixture(scope="module")
def compose_gpu():
    return compose_config(COMPOSE_BASE, COMPOSE_GPU, profiles=("loadtest",))


def test_every_compose_file_is_valid():
    for f in sorted(DOCKER.glob("*compose*.y*ml")):
        files = (COMPOSE_BASE,) if f == COMPOSE_BASE else (COMPOSE_BASE, f)
        compose_config(*files)


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_compose_stack(variant, compose_cpu, compose_gpu):
    services = (compose_cpu if variant == "cpu" else compose_gpu)["services"]
    assert {"roi-server", "prometheus", "grafana", "loadtest"} <= set(services)

    for name in ("roi-server", "prometheus", "grafana"):
        service = services[name]
        assert "profiles" not in service, f"{name} must start with a plain `up`"
        assert service.get("restart") in ("unless-stopped", "always", "on-failure"), name
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"

    server = services["roi-server"]
    assert "healthcheck.py" in " ".join(server["healthcheck"]["test"])
    assert server["build"]["dockerfile"] == ("docker/Dockerfile.cpu" if variant == "cpu" else "docker/Dockerfile")
    assert Path(server["build"]["context"]).resolve() == ROOT
    assert server["environment"]["ROI_DEVICE"] == ("cpu" if variant == "cpu" else "cuda")
    assert any(str(p.get("target")) == str(GRPC_PORT) for p in server["ports"])
    devices = server.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if variant == "gpu":
        assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    else:
        assert not devices, "the CPU variant must run on machines without a GPU"

    loadtest = services["loadtest"]
    assert loadtest["profiles"] == ["loadtest"]
    assert loadtest["build"]["target"] == "loadtest"
    assert f"roi-server:{GRPC_PORT}" in loadtest["command"]
    assert loadtest["depends_on"]["roi-server"]["condition"] == "service_healthy"

    for name in ("prometheus", "grafana"):
        for volume in services[name].get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source")
            if source.startswith("/"):
                assert Path(source).exists(), f"{name} mounts {source}, which does not exist"


def test_compose_loadtest_command_is_accepted_by_the_load_tester(compose_cpu):
    if not (ROOT / "client" / "roi_client" / "loadtest" / "cli.py").exists():
        pytest.skip("roi_client.loadtest.cli does not exist yet")
    from roi_client.loadtest.cli import build_parser

    command = compose_cpu["services"]["loadtest"]["command"]
    args = build_parser().parse_args(command)
    assert args.targets == [f"roi-server:{GRPC_PORT}"]


def test_compose_prometheus_scrapes_the_server_metrics_port(compose_cpu):
    volumes = compose_cpu["services"]["prometheus"]["volumes"]
    mount = next(v for v in volumes if v.split(":")[1] == "/etc/prometheus/prometheus.yml")
    config = yaml.safe_load(Path(mount.split(":")[0]).read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "roi-server")
    targets = [f"{n}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for n in sd["names"]]
    targets += [t for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert targets == [f"roi-server:{METRICS_PORT}"], targets


# --------------------------------------------------------------------------------------------
# Prometheus configurations and dashboard queries (promtool parses PromQL for real)


def k8s_scrape_config() -> str:
    docs = [d for d in yaml.safe_load_all((K8S / "gpu" / "prometheus-scrape.yaml").read_text()) if d]
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    return config_map["data"]["roi-server.yml"]


def test_prometheus_configs_are_valid(tmp_path):
    promtool = tool("promtool")
    k8s_config = yaml.safe_load(k8s_scrape_config())
    probe = tmp_path / "probe.yml"
    probe.write_text("scrape_configs:\n  - job_name: x\n    kubernetes_sd_configs: [{role: pod}]\n")
    answer = run([promtool, "check", "config", "--syntax-only", str(probe)])
    if "kubernetes_sd_configs" in answer.stdout + answer.stderr:
        # Debian builds Prometheus without Kubernetes discovery; the rest of the job (relabelling,
        # intervals) is still checked, with a static target standing in for discovery.
        for job in k8s_config["scrape_configs"]:
            job.pop("kubernetes_sd_configs")
            job["static_configs"] = [{"targets": [f"pod:{METRICS_PORT}"]}]
    k8s = tmp_path / "k8s-scrape.yml"
    k8s.write_text(yaml.safe_dump(k8s_config))
    for config in (DOCKER / "prometheus" / "prometheus.yml", k8s):
        result = run([promtool, "check", "config", "--syntax-only", str(config)])
        assert result.returncode == 0, result.stdout + result.stderr


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every query, template variables included."""
    out = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((panel.get("title", "?"), target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            inner = re.fullmatch(r"label_values\((.+?)(?:,\s*\w+)?\)", query)
            out.append((f"variable {var['name']}", inner.group(1) if inner else query))
    return out


def queried_metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\broi_[a-z0-9_]+\b", re.sub(r"\{[^}]*\}", "", expr)))


def family_sample_names(name: str, kind: str) -> set[str]:
    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_sum", "_count", "_created"],
        "summary": ["", "_sum", "_count", "_created"],
        "gauge": [""],
        "info": ["_info"],
        "stateset": [""],
        "unknown": [""],
    }[kind]
    return {name + s for s in suffixes}


def exported_sample_names() -> tuple[set[str], str]:
    """Sample names the server exports, and where the list came from.

    Read from the metrics module's registry once server/roi_server/metrics.py exists (an import
    error is then a failure, not a fallback); the agreed list until then.
    """
    if not (ROOT / "server" / "roi_server" / "metrics.py").exists():
        names = set().union(*(family_sample_names(n, k) for n, k in PLANNED_METRICS.items()))
        return names, "the agreed metric list (server/roi_server/metrics.py does not exist yet)"
    import importlib
    import inspect

    import prometheus_client
    from prometheus_client.registry import CollectorRegistry

    module = importlib.import_module("roi_server.metrics")
    registries = [v for v in vars(module).values() if isinstance(v, CollectorRegistry)]
    for value in vars(module).values():
        # A class that builds every metric on a registry given to it (one per server); only one
        # that needs nothing else, so that nothing with side effects (an HTTP server) is started.
        if isinstance(value, type) and value.__module__ == module.__name__:
            params = list(inspect.signature(value).parameters.values())
            if "registry" not in [p.name for p in params] or any(
                p.name != "registry" and p.default is p.empty for p in params
            ):
                continue
            instance = value(registry=CollectorRegistry())
            registries += [r for r in vars(instance).values() if isinstance(r, CollectorRegistry)]
    registries.append(prometheus_client.REGISTRY)
    names = set()
    for registry in registries:
        for family in registry.collect():
            if family.name.startswith("roi_"):
                names |= family_sample_names(family.name, family.type)
    assert names, "roi_server.metrics exports no roi_* metric on any registry it exposes"
    return names, "roi_server.metrics"


def test_dashboard_loads_and_covers_the_service():
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"]
    exprs = " ".join(e for _, e in dashboard_queries(dashboard))
    wanted = {
        "request rate by op and status": r"sum by \(op, code\) \(rate\(roi_requests_total",
        "latency percentiles": r"histogram_quantile\(0\.99, sum by \(le\) \(rate\(roi_request_duration_seconds_bucket",
        "queue wait": r"roi_queue_wait_seconds_bucket",
        "compute": r"roi_compute_seconds_bucket",
        "batch sizes (requests)": r"roi_batch_requests_(sum|bucket)",
        "batch sizes (boxes)": r"roi_batch_boxes_(sum|bucket)",
        "queue depth": r"roi_queue_depth",
        "device memory": r"roi_device_memory_bytes",
    }
    for what, pattern in wanted.items():
        assert re.search(pattern, exprs), f"no panel shows {what}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_dashboard_queries_only_exported_metrics():
    names, source = exported_sample_names()
    unknown = {
        (title, metric)
        for title, expr in dashboard_queries(load_dashboard())
        for metric in queried_metric_names(expr)
        if metric not in names
    }
    assert not unknown, f"the dashboard queries metrics missing from {source}: {sorted(unknown)}"


def test_dashboard_queries_parse(tmp_path):
    promtool = tool("promtool")
    rules = []
    for i, (title, expr) in enumerate(dashboard_queries(load_dashboard())):
        concrete = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
        concrete = re.sub(r"\$\{?(\w+)\}?", ".*", concrete)  # template variables, as "All" sends them
        rules.append({"record": f"dashboard:query_{i}", "expr": concrete, "labels": {"panel": title}})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_matches_the_stack(compose_cpu):
    provisioning = DOCKER / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    source = datasources["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    dashboard = load_dashboard()
    default = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    assert default["current"]["value"] == source["uid"], "the dashboard's default data source is not provisioned"

    providers = yaml.safe_load((provisioning / "dashboards" / "roi-service.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    mounts = {v.split(":")[1]: Path(v.split(":")[0]) for v in compose_cpu["services"]["grafana"]["volumes"]
              if v.split(":")[0].startswith("/")}
    assert mounts.get(path) == DASHBOARD.parent, f"Grafana reads dashboards from {path}, not mounted"
    home = compose_cpu["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/{DASHBOARD.name}"


# --------------------------------------------------------------------------------------------
# Kubernetes


def k8s_documents(folder: Path) -> dict[str, dict]:
    docs = {}
    for path in sorted(folder.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def test_k8s_manifests_parse_and_kustomization_lists_them():
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc is None or {"apiVersion", "kind"} <= set(doc), path
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        for resource in spec["resources"]:
            assert (kustomization.parent / resource).exists(), f"{kustomization}: {resource} is missing"
    listed = set(yaml.safe_load((K8S / "gpu" / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in (K8S / "gpu").glob("*.yaml")} - {"kustomization.yaml"}


def test_k8s_deployment_probes_gpu_and_ports():
    docs = k8s_documents(K8S / "gpu")
    deployment = docs["Deployment/roi-server"]
    pod = deployment["spec"]["template"]
    container = next(c for c in pod["spec"]["containers"] if c["name"] == "roi-server")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}

    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        grpc = container[probe]["grpc"]
        assert grpc["port"] == GRPC_PORT, probe
        assert grpc.get("service") == HEALTH_SERVICE, f"{probe} must ask about {HEALTH_SERVICE}"

    resources = container["resources"]
    assert int(resources["requests"]["nvidia.com/gpu"]) == 1
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ROI_DEVICE"] == "cuda"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


def server_grace_default() -> float:
    """The server's drain time after SIGTERM when ROI_GRACE_S is not set."""
    if not (ROOT / "server" / "roi_server" / "settings.py").exists():
        return 20.0
    from roi_server.settings import Settings

    return Settings().grace_s


def test_k8s_gives_the_drain_time_to_finish():
    docs = k8s_documents(K8S / "gpu")
    pod = docs["Deployment/roi-server"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    grace = float(env.get("ROI_GRACE_S", server_grace_default()))
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    pause = float(pre_stop[1]) if pre_stop[0] == "sleep" else 0.0
    assert pod["terminationGracePeriodSeconds"] > pause + grace, "Kubernetes would kill a draining server"
    assert float(env["ROI_MAX_CONNECTION_AGE_S"]) > 0, "clients would never re-resolve the headless Service"


def test_compose_gives_the_drain_time_to_finish(compose_cpu):
    server = compose_cpu["services"]["roi-server"]
    grace = float(server["environment"].get("ROI_GRACE_S", server_grace_default()))
    stop = server["stop_grace_period"]
    seconds = float(stop[:-1]) * {"s": 1, "m": 60}[stop[-1]]
    assert seconds > grace, f"compose kills the server after {stop}, before its {grace} s drain"


def test_k8s_headless_service_selects_the_pods():
    docs = k8s_documents(K8S / "gpu")
    service = docs["Service/roi-server"]
    pod_labels = docs["Deployment/roi-server"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["clusterIP"] == "None", "a ClusterIP Service pins each HTTP/2 connection to one pod"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc["port"] == GRPC_PORT and grpc["targetPort"] == "grpc"


def test_k8s_scrape_configuration_targets_the_metrics_port():
    docs = k8s_documents(K8S / "gpu")
    annotations = docs["Deployment/roi-server"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    job = yaml.safe_load(k8s_scrape_config())["scrape_configs"][0]
    assert job["kubernetes_sd_configs"][0]["role"] == "pod"
    keep = next(r for r in job["relabel_configs"] if r.get("action") == "keep")
    assert keep["source_labels"] == ["__meta_kubernetes_pod_container_port_name"] and keep["regex"] == "metrics"
    monitor = next(yaml.safe_load_all((K8S / "podmonitor.yaml").read_text()))
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_k8s_kustomize_renders_gpu_and_cpu_variants():
    kubectl = tool("kubectl", ci_installs=False)
    rendered = {}
    for variant in ("gpu", "cpu"):
        result = run([kubectl, "kustomize", str(K8S / variant)])
        assert result.returncode == 0, result.stderr
        docs = [d for d in yaml.safe_load_all(result.stdout) if d]
        rendered[variant] = next(d for d in docs if d["kind"] == "Deployment")
        assert all(d["metadata"].get("namespace") == "roi" for d in docs if d["kind"] != "Namespace")
    cpu = rendered["cpu"]["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in json.dumps(cpu["resources"])
    assert {e["name"]: e.get("value") for e in cpu["env"]}["ROI_DEVICE"] == "cpu"
    assert cpu["image"].endswith(":cpu")
    assert rendered["gpu"]["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":gpu")


# --------------------------------------------------------------------------------------------
# The container health probe, against a real gRPC health service


def test_health_probe_reports_the_serving_status():
    grpc = pytest.importorskip("grpc")
    health = pytest.importorskip("grpc_health.v1.health")
    from concurrent import futures

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    probe = [sys.executable, str(DOCKER / "healthcheck.py"), "--target", f"127.0.0.1:{port}"]
    try:
        servicer.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert run(probe).returncode == 1, "NOT_SERVING (warming up, draining) must be unhealthy"
        servicer.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        result = run(probe)
        assert result.returncode == 0, result.stderr
        assert "SERVING" in result.stdout
        assert run(probe + ["--service", "no.such.Service"]).returncode == 1
        # The default target follows ROI_PORT, as the server's own setting does.
        env = {**os.environ, "ROI_PORT": str(port)}
        assert run(probe[:2], env=env).returncode == 0
    finally:
        server.stop(None)
    assert run(probe + ["--timeout", "1"]).returncode == 1, "no server must be unhealthy"


KSERVE = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"


def test_kserve_inferenceservice_is_a_grpc_custom_predictor():
    """deploy/kserve: an InferenceService whose custom predictor runs roi-server, gRPC on the
    container port KServe routes HTTP/2 to (named h2c, the only port), probes on the health
    service, the GPU image with the settings of the Deployment, and a grace period that covers
    the drain. No validator for KServe's CRD could be installed (its schema ships with KServe's
    release manifests, not in a PyPI package), so the structure is checked here field by field
    against the v1beta1 API."""
    docs = [d for d in yaml.safe_load_all(KSERVE.read_text()) if d]
    assert len(docs) == 1
    isvc = docs[0]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", isvc["metadata"]["name"])
    assert set(isvc["spec"]) == {"predictor"}
    predictor = isvc["spec"]["predictor"]
    # A custom predictor: containers, and none of the model-format fields.
    assert not {"model", "sklearn", "triton", "pytorch", "tensorflow", "onnx"} & set(predictor)
    # v1beta1 PredictorSpec fields: the pod spec's, and KServe's component extension.
    allowed = {
        "containers", "minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "terminationGracePeriodSeconds",
        "securityContext", "tolerations", "nodeSelector", "affinity", "serviceAccountName", "containerConcurrency",
        "timeout", "canaryTrafficPercent", "volumes", "imagePullSecrets",
    }  # fmt: skip
    assert set(predictor) <= allowed, set(predictor) - allowed
    assert predictor["scaleMetric"] in ("cpu", "memory", "concurrency", "rps")
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    [container] = predictor["containers"]
    assert container["name"] == "kserve-container"
    assert container["image"] == "roi-server:gpu"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["ROI_DEVICE"] == "cuda" and env["ROI_PORT"] == str(GRPC_PORT) and env["ROI_METRICS_PORT"] == str(METRICS_PORT)
    assert [p["name"] for p in container["ports"]] == ["h2c"]
    assert container["ports"][0]["containerPort"] == GRPC_PORT
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": GRPC_PORT, "service": HEALTH_SERVICE}, probe
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
    assert predictor["terminationGracePeriodSeconds"] > float(env["ROI_GRACE_S"])
    assert predictor["securityContext"]["runAsNonRoot"] is True
    # The same image, port and device settings as the Kubernetes Deployment.
    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "gpu" / "deployment.yaml").read_text())
    [k8s] = deployment["spec"]["template"]["spec"]["containers"]
    k8s_env = {e["name"]: e.get("value") for e in k8s["env"]}
    for name in ("ROI_DEVICE", "ROI_PORT", "ROI_METRICS_PORT", "ROI_GRACE_S"):
        assert env[name] == k8s_env[name], name
    assert container["image"] == k8s["image"]
