{{/*
Chart name, truncated to the 63 characters DNS names allow.
*/}}
{{- define "latentkv.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: release name + chart name unless the release name contains it.
*/}}
{{- define "latentkv.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "latentkv.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Standard labels (https://helm.sh/docs/chart_best_practices/labels/).
*/}}
{{- define "latentkv.labels" -}}
helm.sh/chart: {{ include "latentkv.chart" . }}
{{ include "latentkv.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: inference-server
app.kubernetes.io/part-of: latentkv
{{- end }}

{{/*
Selector labels: must stay stable across upgrades (Deployment selectors are immutable).
*/}}
{{- define "latentkv.selectorLabels" -}}
app.kubernetes.io/name: {{ include "latentkv.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "latentkv.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "latentkv.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "latentkv.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{- define "latentkv.servedModelName" -}}
{{- default (include "latentkv.fullname" .) .Values.model.servedModelName }}
{{- end }}

{{/*
GPUs per pod: resources.gpus, or the tensor-parallel size (one GPU per TP rank).
*/}}
{{- define "latentkv.gpus" -}}
{{- if kindIs "invalid" .Values.resources.gpus }}
{{- .Values.vllm.tensorParallelSize | int }}
{{- else }}
{{- .Values.resources.gpus | int }}
{{- end }}
{{- end }}

{{/*
The model-config key through which the latentkv plugin selects the INT4 latent cache.
This is the ONLY place the key is spelled; change it here if the plugin renames it.
*/}}
{{- define "latentkv.int4CacheOverrideKey" -}}
latent_kv_cache_dtype
{{- end }}

{{/*
The --hf-overrides JSON object: vllm.hfOverrides plus the INT4 cache switch.
Renders nothing when there is nothing to override.
*/}}
{{- define "latentkv.hfOverridesJson" -}}
{{- $overrides := deepCopy .Values.vllm.hfOverrides }}
{{- if .Values.vllm.int4Cache }}
{{- $_ := set $overrides (include "latentkv.int4CacheOverrideKey" .) "int4" }}
{{- end }}
{{- if $overrides }}
{{- toJson $overrides }}
{{- end }}
{{- end }}

{{/*
Arguments of `vllm serve` (the container command is ["vllm", "serve"]), one per line as a YAML list.
*/}}
{{- define "latentkv.vllmArgs" -}}
- {{ .Values.model.mountPath | quote }}
- "--host"
- "0.0.0.0"
- "--port"
- {{ .Values.vllm.port | toString | quote }}
- "--served-model-name"
- {{ include "latentkv.servedModelName" . | quote }}
- "--tensor-parallel-size"
- {{ .Values.vllm.tensorParallelSize | toString | quote }}
- "--gpu-memory-utilization"
- {{ .Values.vllm.gpuMemoryUtilization | toString | quote }}
{{- if not (kindIs "invalid" .Values.vllm.maxModelLen) }}
- "--max-model-len"
- {{ .Values.vllm.maxModelLen | int | toString | quote }}
{{- end }}
{{- with (include "latentkv.hfOverridesJson" .) }}
- "--hf-overrides"
- {{ . | quote }}
{{- end }}
{{- range .Values.vllm.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}
