{{/* Chart name, truncated to a DNS label. */}}
{{- define "qshard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name. Profile Deployments append "-<profile>", so leave room for it:
the base is truncated to 48 characters.
*/}}
{{- define "qshard.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "qshard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "qshard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qshard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "qshard.labels" -}}
helm.sh/chart: {{ include "qshard.chart" . }}
{{ include "qshard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: qshard
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one profile's pods. Call with (dict "root" $ "profile" $p). */}}
{{- define "qshard.profileSelectorLabels" -}}
{{ include "qshard.selectorLabels" .root }}
qshard.io/profile: {{ .profile.name }}
{{- end }}

{{- define "qshard.profileLabels" -}}
{{ include "qshard.labels" .root }}
app.kubernetes.io/component: server
qshard.io/profile: {{ .profile.name }}
{{- end }}

{{/* Name of a profile's Deployment (also its HPA / ScaledObject / PDB). */}}
{{- define "qshard.profileFullname" -}}
{{- printf "%s-%s" (include "qshard.fullname" .root) .profile.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "qshard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "qshard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* A profile is enabled unless it says enabled: false. */}}
{{- define "qshard.profileEnabled" -}}
{{- if or (not (hasKey . "enabled")) .enabled }}true{{ end }}
{{- end }}

{{/*
The enabled profiles as a JSON list (use: include ... | fromJsonArray). Fails on duplicate
names, on no enabled profile, and on settings that contradict each other.
*/}}
{{- define "qshard.enabledProfiles" -}}
{{- $seen := dict }}
{{- $out := list }}
{{- range .Values.gpuProfiles }}
{{- if hasKey $seen .name }}
{{- fail (printf "gpuProfiles: the name %q is used twice" .name) }}
{{- end }}
{{- $_ := set $seen .name true }}
{{- if include "qshard.profileEnabled" . }}
{{- $out = append $out . }}
{{- end }}
{{- end }}
{{- if not $out }}
{{- fail "gpuProfiles: enable at least one profile" }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* The model source of a profile: its own `model.source`, else the top-level one. */}}
{{- define "qshard.modelSource" -}}
{{- $m := .profile.model | default dict }}
{{- default .root.Values.model.source $m.source }}
{{- end }}

{{/* Name of the model PVC. */}}
{{- define "qshard.modelClaimName" -}}
{{- default (printf "%s-models" (include "qshard.fullname" .)) .Values.model.pvc.existingClaim }}
{{- end }}

{{/* "true" when an enabled profile reads the model from a PVC. */}}
{{- define "qshard.usesPvc" -}}
{{- $root := . }}
{{- range (include "qshard.enabledProfiles" . | fromJsonArray) }}
{{- if eq (include "qshard.modelSource" (dict "root" $root "profile" .)) "pvc" }}true{{ end }}
{{- end }}
{{- end }}

{{/* The image of a profile: repository:tag, tag defaulting to <appVersion>-<variant>. */}}
{{- define "qshard.image" -}}
{{- $img := .profile.image | default dict }}
{{- $tag := $img.tag }}
{{- if not $tag }}
{{- $tag = printf "%s-%s" .root.Chart.AppVersion (default "fp8" $img.variant) }}
{{- end }}
{{- printf "%s:%s" (required (printf "gpuProfiles[%s].image.repository is required" .profile.name) $img.repository) $tag }}
{{- end }}

{{/* Server settings of a profile: the top-level `server` with the profile's keys over it. */}}
{{- define "qshard.serverSettings" -}}
{{- $s := deepCopy .root.Values.server }}
{{- range $k, $v := (.profile.server | default dict) }}
{{- $_ := set $s $k $v }}
{{- end }}
{{- toJson $s }}
{{- end }}

{{/* Number of GPUs a profile requests (default 1). */}}
{{- define "qshard.gpus" -}}
{{- if hasKey .profile "gpus" }}{{ int .profile.gpus }}{{ else }}1{{ end }}
{{- end }}

{{/*
qshard serve arguments of a profile, one YAML list item per flag.
*/}}
{{- define "qshard.serverArgs" -}}
{{- $root := .root }}
{{- $p := .profile }}
{{- $s := include "qshard.serverSettings" . | fromJson }}
{{- $flags := list
  (list "max-num-seqs" $s.maxNumSeqs)
  (list "max-num-batched-tokens" $s.maxNumBatchedTokens)
  (list "max-model-len" $s.maxModelLen)
  (list "max-queue" $s.maxQueue)
  (list "shutdown-timeout" $s.shutdownTimeoutSeconds)
  (list "log-format" $s.logFormat)
  (list "grpc-max-connection-age" $s.grpcMaxConnectionAgeSeconds)
  (list "metrics-compat" $s.metricsCompat)
  (list "device" $s.device)
  (list "quantization" $s.quantization)
  (list "kv-cache-dtype" $s.kvCacheDtype)
  (list "kv-cache-memory-bytes" $s.kvCacheMemoryBytes)
  (list "gpu-memory-utilization" $s.gpuMemoryUtilization) }}
- serve
- {{ printf "--model=%s" (required (printf "gpuProfiles[%s].model.path is required" $p.name) ($p.model | default dict).path) | quote }}
- "--host=0.0.0.0"
- {{ printf "--port=%d" (int $root.Values.ports.grpc) | quote }}
- {{ printf "--metrics-port=%d" (int $root.Values.ports.metrics) | quote }}
{{- range $flags }}
{{- $v := index . 1 }}
{{- if not (kindIs "invalid" $v) }}
{{- if not (and (kindIs "string" $v) (eq $v "")) }}
{{- if kindIs "float64" $v }}
{{- if eq $v (floor $v) }}{{ $v = int64 $v }}{{ end }}
{{- end }}
- {{ printf "--%s=%v" (index . 0) $v | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- range $root.Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- range $p.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* One NodeSelectorRequirement list for a numeric label from {min,max,in}. */}}
{{- define "qshard.numericMatch" -}}
{{- $key := .key }}
{{- $m := .match }}
{{- if hasKey $m "min" }}
- key: {{ $key }}
  operator: Gt
  values: [{{ sub (int $m.min) 1 | toString | quote }}]
{{- end }}
{{- if hasKey $m "max" }}
- key: {{ $key }}
  operator: Lt
  values: [{{ add (int $m.max) 1 | toString | quote }}]
{{- end }}
{{- with $m.in }}
- key: {{ $key }}
  operator: In
  values:
  {{- range . }}
  - {{ int . | toString | quote }}
  {{- end }}
{{- end }}
{{- end }}

{{/* The required node match of a profile as NodeSelectorRequirements. */}}
{{- define "qshard.matchExpressions" -}}
{{- $m := .profile.match | default dict }}
{{- if $m.noGpu }}
- key: nvidia.com/gpu.compute.major
  operator: DoesNotExist
{{- end }}
{{- with $m.computeMajor }}
{{- include "qshard.numericMatch" (dict "key" "nvidia.com/gpu.compute.major" "match" .) }}
{{- end }}
{{- with $m.computeMinor }}
{{- include "qshard.numericMatch" (dict "key" "nvidia.com/gpu.compute.minor" "match" .) }}
{{- end }}
{{- with $m.products }}
- key: nvidia.com/gpu.product
  operator: In
  values:
  {{- range . }}
  - {{ . | quote }}
  {{- end }}
{{- end }}
{{- with $m.expressions }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Relabelings shared by the ServiceMonitor and the PodMonitor: every series gets
job="<fullname>" (what the alerts and the dashboard select on, whichever monitor scrapes)
and profile="<gpu profile>".
*/}}
{{- define "qshard.scrapeRelabelings" -}}
- action: replace
  targetLabel: job
  replacement: {{ include "qshard.fullname" . }}
- action: replace
  sourceLabels: [__meta_kubernetes_pod_label_qshard_io_profile]
  targetLabel: profile
- action: replace
  sourceLabels: [__meta_kubernetes_pod_node_name]
  targetLabel: node
{{- end }}

{{/* The job/namespace matcher that scopes files/qshard-rules.yaml to this release. */}}
{{- define "qshard.rulesSelector" -}}
{{- printf "job=%q, namespace=%q" (include "qshard.fullname" .) .Release.Namespace }}
{{- end }}
