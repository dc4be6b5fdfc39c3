"""Render the Helm chart with the CI value sets and validate the manifests offline.

Renderer: helm 3.10.1 (scripts/install_chart_tools.sh); `helm template` enforces
values.schema.json. Validator: kubernetes-validate (bundled Kubernetes OpenAPI schemas, strict:
unknown fields are errors) for the chart's oldest supported and the newest bundled Kubernetes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "latentkv"
CI_VALUES = REPO / "deploy" / "helm" / "ci-values"
K8S_VERSIONS = ("1.25.0", "1.37.0")  # Chart.yaml kubeVersion floor, newest bundled schemas
INT4_KEY = "latent_kv_cache_dtype"

VALUE_SETS = sorted(p.stem for p in CI_VALUES.glob("*.yaml"))


def helm(helm_bin: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([helm_bin, *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def render(helm_bin: str, *values_files: Path, sets: tuple[str, ...] = ()) -> list[dict]:
    args = ["template", "ci", str(CHART), "--namespace", "latentkv"]
    for f in values_files:
        args += ["-f", str(f)]
    for s in sets:
        args += ["--set", s]
    out = helm(helm_bin, *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[d['kind'] for d in docs]}"
    return found[0]


def server_container(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def arg_value(args: list[str], flag: str) -> str | None:
    """Value following `flag` in an argv list, or None if the flag is absent."""
    if flag not in args:
        return None
    return args[args.index(flag) + 1]


@pytest.fixture(scope="module")
def rendered(helm_bin) -> dict[str, list[dict]]:
    return {name: render(helm_bin, CI_VALUES / f"{name}.yaml") for name in VALUE_SETS}


def test_ci_value_sets_present():
    assert {"default", "tp2", "int4", "hpa"} <= set(VALUE_SETS)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_strict(helm_bin, name):
    helm(helm_bin, "lint", "--strict", str(CHART), "-f", str(CI_VALUES / f"{name}.yaml"))


@pytest.mark.parametrize("k8s", K8S_VERSIONS)
@pytest.mark.parametrize("name", VALUE_SETS)
def test_manifests_validate_against_kubernetes_schemas(rendered, kubernetes_validate, name, k8s):
    docs = rendered[name]
    assert {"Deployment", "Service"} <= {d["kind"] for d in docs}
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, k8s, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(
                f"{name}: {doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {k8s}: {exc.message} at {list(exc.path)}"
            ) from None


def test_validator_catches_broken_manifest(rendered, kubernetes_validate):
    # Guard against a validator that accepts anything.
    dep = json.loads(json.dumps(one(rendered["default"], "Deployment")))
    dep["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[-1], strict=True)
    dep = json.loads(json.dumps(one(rendered["default"], "Deployment")))
    dep["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True  # typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[-1], strict=True)


def test_default_values(rendered):
    docs = rendered["default"]
    dep = one(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = server_container(docs)
    args = c["args"]

    assert dep["spec"]["replicas"] == 1
    assert "HorizontalPodAutoscaler" not in {d["kind"] for d in docs}
    assert c["command"] == ["vllm", "serve"]
    assert args[0] == "/models/converted"
    assert arg_value(args, "--tensor-parallel-size") == "1"
    assert arg_value(args, "--max-model-len") == "4096"
    assert arg_value(args, "--gpu-memory-utilization") == "0.9"
    assert arg_value(args, "--port") == "8000"
    assert arg_value(args, "--served-model-name") == "ci-latentkv"
    assert "--hf-overrides" not in args
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1

    # Security: non-root, read-only root filesystem, no capabilities, no token.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]

    # Probes: all on /health of the named http port.
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert c["ports"][0] == {"name": "http", "containerPort": 8000, "protocol": "TCP"}

    # Volumes: model read-only from the PVC; writable emptyDirs where vLLM writes caches.
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert mounts["/models/converted"]["readOnly"] is True
    assert vols["model"]["persistentVolumeClaim"] == {"claimName": "latentkv-models", "readOnly": True}
    assert "emptyDir" in vols[mounts["/tmp"]["name"]]
    assert "emptyDir" in vols[mounts["/home/vllm"]["name"]]
    assert vols[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["HF_HUB_OFFLINE"] == "1"
    for var in ("HF_HOME", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "XDG_CACHE_HOME"):
        assert env[var].startswith("/home/vllm/"), var

    svc = one(docs, "Service")
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    # Standard labels and a selector that matches the pods.
    labels = dep["metadata"]["labels"]
    for key in ("helm.sh/chart", "app.kubernetes.io/name", "app.kubernetes.io/instance",
                "app.kubernetes.io/version", "app.kubernetes.io/managed-by"):
        assert key in labels, key
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_tp2_requests_two_gpus(rendered):
    docs = rendered["tp2"]
    c = server_container(docs)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert arg_value(c["args"], "--tensor-parallel-size") == "2"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert arg_value(c["args"], "--max-model-len") == "32768"
    assert arg_value(c["args"], "--served-model-name") == "llama-3-8b-latentkv"
    assert c["args"][-1] == "--enable-prefix-caching"  # extraArgs go last
    model = next(v for v in pod["volumes"] if v["name"] == "model")
    assert model["hostPath"] == {"path": "/mnt/models/llama-3-8b-latentkv", "type": "Directory"}
    assert next(m for m in c["volumeMounts"] if m["name"] == "model")["readOnly"] is True
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert "podAntiAffinity" in pod["affinity"]
    assert {"name": "NCCL_DEBUG", "value": "WARN"} in c["env"]


def test_int4_cache_passes_hf_overrides(rendered):
    c = server_container(rendered["int4"])
    assert json.loads(arg_value(c["args"], "--hf-overrides")) == {INT4_KEY: "int4"}
    assert "--max-model-len" not in c["args"]  # maxModelLen: null -> from the checkpoint
    assert c["image"] == (
        "registry.example.com/ml/latentkv-vllm@sha256:"
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    )


def test_int4_merges_with_user_hf_overrides(helm_bin, tmp_path):
    values = tmp_path / "v.yaml"
    values.write_text(yaml.safe_dump({"vllm": {"int4Cache": True, "hfOverrides": {"max_position_embeddings": 8192}}}))
    c = server_container(render(helm_bin, values))
    assert json.loads(arg_value(c["args"], "--hf-overrides")) == {
        INT4_KEY: "int4",
        "max_position_embeddings": 8192,
    }
    # Without int4Cache the user's overrides still go through, without the cache key.
    values.write_text(yaml.safe_dump({"vllm": {"hfOverrides": {"max_position_embeddings": 8192}}}))
    c = server_container(render(helm_bin, values))
    assert json.loads(arg_value(c["args"], "--hf-overrides")) == {"max_position_embeddings": 8192}


def test_int4_override_key_spelled_once_in_templates():
    hits = [
        (p.name, line)
        for p in (CHART / "templates").rglob("*")
        if p.is_file()
        for line in p.read_text().splitlines()
        if INT4_KEY in line
    ]
    assert len(hits) == 1 and hits[0][0] == "_helpers.tpl", hits


def test_hpa(rendered):
    docs = rendered["hpa"]
    hpa = one(docs, "HorizontalPodAutoscaler")
    dep = one(docs, "Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Pods"]
    assert "replicas" not in dep["spec"]  # the HPA owns the replica count
    assert one(docs, "Service")["spec"]["type"] == "LoadBalancer"


def test_hpa_default_cpu_metric(helm_bin):
    hpa = one(render(helm_bin, sets=("autoscaling.enabled=true",)), "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_gpu_count_override_and_zero(helm_bin):
    c = server_container(render(helm_bin, sets=("vllm.tensorParallelSize=4", "resources.gpus=8")))
    assert arg_value(c["args"], "--tensor-parallel-size") == "4"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    c = server_container(render(helm_bin, sets=("resources.gpus=0",)))
    assert "nvidia.com/gpu" not in c["resources"]["limits"]


def test_gpu_memory_utilization_from_set_flag(helm_bin):
    # `helm --set` passes decimals as strings; the schema accepts them in (0, 1].
    c = server_container(render(helm_bin, sets=("vllm.gpuMemoryUtilization=0.85",)))
    assert arg_value(c["args"], "--gpu-memory-utilization") == "0.85"


@pytest.mark.parametrize(
    "flag, expected",
    [
        (("--set", "vllm.tensorParallelSize=two"), "vllm.tensorParallelSize"),
        (("--set-string", "vllm.int4Cache=true"), "vllm.int4Cache"),
        (("--set", "vllm.int4cache=true"), "int4cache"),  # typo'd key: additionalProperties
        (("--set", "vllm.gpuMemoryUtilization=1.5"), "vllm.gpuMemoryUtilization"),
        (("--set", "model.source=s3"), "model.source"),
        (("--set", "replicaCount=-1"), "replicaCount"),
        (("--set", "service.port=http"), "service.port"),
    ],
)
def test_schema_rejects_bad_values(helm_bin, flag, expected):
    proc = helm(helm_bin, "template", "bad", str(CHART), *flag, check=False)
    assert proc.returncode != 0, f"{flag} was accepted"
    assert "schema" in proc.stderr and expected in proc.stderr, proc.stderr


def test_hpa_without_metrics_fails(helm_bin):
    proc = helm(
        helm_bin, "template", "bad", str(CHART),
        "--set", "autoscaling.enabled=true", "--set", "autoscaling.targetCPUUtilizationPercentage=null",
        check=False,
    )
    assert proc.returncode != 0 and "autoscaling" in proc.stderr


def test_notes_render(helm_bin, tmp_path):
    # `helm template` does not print NOTES.txt and `helm install --dry-run` needs a cluster in
    # helm 3.10, so render it through `tpl` from a scratch copy of the chart.
    chart = tmp_path / "latentkv"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes.txt")
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n"
        "data:\n  notes: {{ tpl (.Files.Get \"notes.txt\") . | quote }}\n"
    )
    args = ["template", "ci", str(chart), "-f", str(CI_VALUES / "int4.yaml"), "--show-only", "templates/zz-notes.yaml"]
    notes = yaml.safe_load(helm(helm_bin, *args).stdout)["data"]["notes"]
    assert "/health" in notes and "port-forward svc/ci-latentkv" in notes
    assert INT4_KEY in notes and "INT4 cache:   true" in notes


def test_default_values_satisfy_schema_jsonschema():
    # Also check with Python's jsonschema so a schema edit is caught even without helm.
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text()), schema)
    for f in CI_VALUES.glob("*.yaml"):
        # CI files are partial overlays: validate each merged onto the defaults.
        merged = _deep_merge(yaml.safe_load((CHART / "values.yaml").read_text()), yaml.safe_load(f.read_text()) or {})
        jsonschema.validate(merged, schema)


def _deep_merge(base: dict, over: dict) -> dict:
    """Helm's coalescing: an overlay null deletes the key, maps merge, anything else replaces."""
    for k, v in over.items():
        if v is None:
            base.pop(k, None)
        elif isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v
    return base
