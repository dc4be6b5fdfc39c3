#!/usr/bin/env bash
# Smoke-test a latentkv model behind vLLM's OpenAI-compatible API with curl.
#
#   examples/curl_completion.sh [BASE_URL] [PROMPT]
#   BASE_URL defaults to http://127.0.0.1:8000 (e.g. after
#   `kubectl port-forward svc/<release>-latentkv 8000:8000`). Set OPENAI_API_KEY if the server
#   was started with --api-key. MODEL overrides the served model name (default: first listed).
set -euo pipefail

base="${1:-${LATENTKV_BASE_URL:-http://127.0.0.1:8000}}"
base="${base%/}"; base="${base%/v1}"
prompt="${2:-The capital of France is}"
auth=()
[[ -n "${OPENAI_API_KEY:-}" ]] && auth=(-H "Authorization: Bearer ${OPENAI_API_KEY}")

# 1. Liveness: 200 once the engine is up (what the Kubernetes probes call).
curl -fsS --max-time 5 "$base/health" >/dev/null && echo "health: ok"

# 2. Served model name.
model="${MODEL:-$(curl -fsS --max-time 10 "${auth[@]}" "$base/v1/models" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')}"
echo "model: $model"

# 3. Greedy completion. python3 builds the JSON so any prompt is quoted correctly.
body="$(MODEL="$model" PROMPT="$prompt" python3 -c \
    'import json,os; print(json.dumps({"model": os.environ["MODEL"], "prompt": os.environ["PROMPT"], "max_tokens": 32, "temperature": 0}))')"
curl -fsS --max-time 120 "${auth[@]}" "$base/v1/completions" \
    -H "Content-Type: application/json" -d "$body" \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); print("completion:", repr(r["choices"][0]["text"])); print("usage:", r["usage"])'
