#!/usr/bin/env bash
# Render the latentkv Helm chart with every CI value set and validate the manifests offline.
#
#   scripts/render_chart.sh [OUT_DIR]      (default OUT_DIR: a temp dir, printed at the end)
#
# For each deploy/helm/ci-values/*.yaml: `helm lint --strict`, `helm template` (which enforces
# values.schema.json), then kubernetes-validate --strict against the Kubernetes JSON schemas of
# the oldest (1.25, the chart's kubeVersion floor) and newest bundled Kubernetes versions.
# Tools: scripts/install_chart_tools.sh.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
chart="$here/deploy/helm/latentkv"
tools_dir="${LATENTKV_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/latentkv-tools}"
export PATH="$tools_dir/bin:$PATH"
k8s_versions=(${LATENTKV_K8S_VERSIONS:-1.25.0 1.37.0})
out="${1:-$(mktemp -d)}"
mkdir -p "$out"

command -v helm >/dev/null || { echo "helm not found: run scripts/install_chart_tools.sh" >&2; exit 2; }
command -v kubernetes-validate >/dev/null || { echo "kubernetes-validate not found: run scripts/install_chart_tools.sh" >&2; exit 2; }

for values in "$here"/deploy/helm/ci-values/*.yaml; do
    name="$(basename "$values" .yaml)"
    helm lint --strict --quiet "$chart" -f "$values"
    helm template "ci-$name" "$chart" --namespace latentkv -f "$values" > "$out/$name.yaml"
    for v in "${k8s_versions[@]}"; do
        kubernetes-validate --strict --quiet -k "$v" "$out/$name.yaml"
    done
    echo "ok  $name -> $out/$name.yaml (validated against Kubernetes ${k8s_versions[*]})"
done

# The schema must reject a value of the wrong type before anything is rendered.
if helm template bad "$chart" --set vllm.tensorParallelSize=two >/dev/null 2>&1; then
    echo "values.schema.json accepted vllm.tensorParallelSize=two" >&2; exit 1
fi
echo "ok  values.schema.json rejects a wrong value type"
