{{/* Names and labels ------------------------------------------------------- */}}

{{- define "bitserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped name; kept to 40 characters so that KubeRay's derived names
(<cluster>-head-svc, <cluster>-<group>-worker-xxxxx) stay within limits. */}}
{{- define "bitserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "bitserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bitserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "bitserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "bitserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Pods that serve gRPC: the Deployment's pods, or the Ray head. */}}
{{- define "bitserve.serverSelectorLabels" -}}
{{ include "bitserve.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end -}}

{{- define "bitserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "bitserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "bitserve.image" -}}
{{- $img := .Values.image -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) -}}
{{- end -}}
{{- end -}}

{{/* Model and serve flags ---------------------------------------------------- */}}

{{- define "bitserve.modelMountPath" -}}/models{{- end -}}

{{/* Folder the server loads (empty: the bundled demo model). A Hugging Face
download lands in /models/hf/<revision>/<org>/<name>, so the folder name (the
served model name by default) is the repo's name. */}}
{{- define "bitserve.modelPath" -}}
{{- $m := .Values.model -}}
{{- if eq $m.source "pvc" -}}
{{- trimSuffix "/" (printf "%s/%s" (include "bitserve.modelMountPath" .) (trimPrefix "/" $m.path)) -}}
{{- else if eq $m.source "huggingface" -}}
{{- printf "%s/hf/%s/%s" (include "bitserve.modelMountPath" .) $m.huggingface.revision $m.huggingface.repo -}}
{{- else if eq $m.source "image" -}}
{{- $m.path -}}
{{- end -}}
{{- end -}}

{{- define "bitserve.needsModelVolume" -}}
{{- if has .Values.model.source (list "pvc" "huggingface") -}}true{{- end -}}
{{- end -}}

{{- define "bitserve.grpcPort" -}}{{ .Values.config.port | default 50051 | int }}{{- end -}}
{{- define "bitserve.metricsPort" -}}{{ .Values.config.metrics_port | default 9400 | int }}{{- end -}}

{{/* Engine replicas in raycluster mode: config.replicas, else every worker GPU
used by one replica each (gpus_per_replica default 1). */}}
{{- define "bitserve.rayEngineReplicas" -}}
{{- if .Values.config.replicas -}}
{{- .Values.config.replicas | int -}}
{{- else -}}
{{- $per := include "bitserve.gpusPerReplica" . | float64 -}}
{{- if eq $per 0.0 -}}
{{- fail "config.gpus_per_replica 0 in mode raycluster: set config.replicas (the count cannot come from the GPUs)" -}}
{{- end -}}
{{- $total := mulf (.Values.ray.worker.replicas | float64) (.Values.gpu.count | float64) -}}
{{- divf $total $per | floor | int -}}
{{- end -}}
{{- end -}}

{{/* A config number that may be 0 (`default` would take 0 for unset): its value, else `fallback`. */}}
{{- define "bitserve.configNumber" -}}
{{- $v := index .cfg .key -}}
{{- if kindIs "invalid" $v }}{{ .fallback }}{{ else }}{{ $v }}{{ end -}}
{{- end -}}
{{- define "bitserve.gpusPerReplica" -}}
{{ include "bitserve.configNumber" (dict "cfg" .Values.config "key" "gpus_per_replica" "fallback" 1) }}
{{- end -}}
{{- define "bitserve.cpusPerReplica" -}}
{{ include "bitserve.configNumber" (dict "cfg" .Values.config "key" "cpus_per_replica" "fallback" 1) }}
{{- end -}}

{{/* Logical CPUs a Ray worker advertises (unless ray.worker.rayStartParams sets num-cpus): enough
for every engine replica's cpus_per_replica, however Ray places them. Without it a worker has as
many as its CPU request, and replicas that do not fit would keep the head from ever being ready. */}}
{{- define "bitserve.rayWorkerCpus" -}}
{{- $need := mulf (include "bitserve.rayEngineReplicas" . | float64) (include "bitserve.cpusPerReplica" . | float64) -}}
{{- max 1 (ceil $need | int) -}}
{{- end -}}

{{/* Cross-field checks that JSON schema cannot express; they fail lint and install. */}}
{{- define "bitserve.validate" -}}
{{- $v := .Values -}}
{{- if and $v.metrics.serviceMonitor.enabled $v.metrics.podMonitor.enabled -}}
{{- fail "metrics.serviceMonitor and metrics.podMonitor both scrape the same pods: enable one" -}}
{{- end -}}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) -}}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" -}}
{{- end -}}
{{- $per := include "bitserve.gpusPerReplica" . | float64 -}}
{{- if and (or (and $v.autoscaling.enabled (eq $v.autoscaling.kind "keda")) $v.metrics.prometheusRule.enabled)
      (not (or $v.metrics.serviceMonitor.enabled $v.metrics.podMonitor.enabled)) -}}
{{- fail (printf "autoscaling (keda) and metrics.prometheusRule query series by job=%q, the label metrics.serviceMonitor or metrics.podMonitor gives them: enable one" (include "bitserve.fullname" .)) -}}
{{- end -}}
{{- if eq $v.mode "raycluster" -}}
{{- if eq (int $v.gpu.count) 0 -}}
{{- fail "mode raycluster runs engine replicas on GPU workers: set gpu.count >= 1" -}}
{{- end -}}
{{- $userCpus := index ($v.ray.worker.rayStartParams | default dict) "num-cpus" -}}
{{- if not (kindIs "invalid" $userCpus) -}}
{{- $need := mulf (include "bitserve.rayEngineReplicas" . | float64) (include "bitserve.cpusPerReplica" . | float64) -}}
{{- if gt $need (mulf (float64 $v.ray.worker.replicas) (float64 $userCpus)) -}}
{{- fail (printf "%v engine replicas x cpus_per_replica need %v Ray CPUs; ray.worker.rayStartParams num-cpus (%v) x ray.worker.replicas (%v) has fewer" (include "bitserve.rayEngineReplicas" .) $need $userCpus $v.ray.worker.replicas) -}}
{{- end -}}
{{- end -}}
{{- $replicas := include "bitserve.rayEngineReplicas" . | int -}}
{{- if lt $replicas 1 -}}
{{- fail (printf "the worker group has %d GPU(s) in all, fewer than config.gpus_per_replica (%v)" (mul (int $v.ray.worker.replicas) (int $v.gpu.count)) $per) -}}
{{- end -}}
{{- if gt (mulf $replicas $per) (mulf (float64 $v.ray.worker.replicas) (float64 $v.gpu.count)) -}}
{{- fail (printf "config.replicas (%d) x gpus_per_replica (%v) needs more GPUs than ray.worker.replicas x gpu.count (%d)" $replicas $per (mul (int $v.ray.worker.replicas) (int $v.gpu.count))) -}}
{{- end -}}
{{- else if and $v.config.replicas (gt (int $v.gpu.count) 0) -}}
{{- if gt (mulf (float64 $v.config.replicas) $per) (float64 $v.gpu.count) -}}
{{- fail (printf "config.replicas (%v) x gpus_per_replica (%v) needs more GPUs than gpu.count (%v) of one pod" $v.config.replicas $per $v.gpu.count) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* `bitserve serve` flags, one YAML list item per argv word. Keys of
.Values.config in sorted order; booleans as --flag / --no-flag; whole numbers
without a decimal point (Helm reads every number as a float). */}}
{{- define "bitserve.serveArgs" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $model := include "bitserve.modelPath" . -}}
{{- if $model -}}
{{- $_ := set $cfg "model" $model -}}
{{- end -}}
{{- if eq .Values.mode "raycluster" -}}
{{- $_ := set $cfg "ray_address" (default "auto" $cfg.ray_address) -}}
{{- $_ := set $cfg "replicas" (include "bitserve.rayEngineReplicas" . | int) -}}
{{- end -}}
{{- range $key := keys $cfg | sortAlpha -}}
{{- $value := get $cfg $key -}}
{{- $flag := printf "--%s" (replace "_" "-" $key) -}}
{{- if kindIs "invalid" $value -}}
{{- else if kindIs "bool" $value }}
- {{ ternary $flag (printf "--no-%s" (replace "_" "-" $key)) $value | quote }}
{{- else }}
- {{ $flag | quote }}
{{- if and (kindIs "float64" $value) (eq (float64 (int64 $value)) $value) }}
- {{ int64 $value | toString | quote }}
{{- else }}
- {{ toString $value | quote }}
{{- end }}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Pod pieces ---------------------------------------------------------------- */}}

{{- define "bitserve.terminationGracePeriodSeconds" -}}
{{- $grace := include "bitserve.configNumber" (dict "cfg" .Values.config "key" "grace_period_s" "fallback" 30) | float64 | ceil | int -}}
{{- add .Values.drain.preStopSleepSeconds $grace .Values.drain.shutdownSeconds -}}
{{- end -}}

{{/* resources + the GPU limit (requests default to limits for extended resources). */}}
{{- define "bitserve.gpuResources" -}}
{{- $res := deepCopy (.Values.resources | default dict) -}}
{{- if gt (int .Values.gpu.count) 0 -}}
{{- $limits := get $res "limits" | default dict -}}
{{- $_ := set $limits .Values.gpu.resource (int .Values.gpu.count) -}}
{{- $_ := set $res "limits" $limits -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{- define "bitserve.gpuTolerations" -}}
{{- $tol := .Values.tolerations | default list -}}
{{- if and (gt (int .Values.gpu.count) 0) .Values.gpu.tolerateTaint -}}
{{- $tol = append $tol (dict "key" .Values.gpu.resource "operator" "Exists" "effect" "NoSchedule") -}}
{{- if and (hasPrefix "nvidia.com/" .Values.gpu.resource) (ne .Values.gpu.resource "nvidia.com/gpu") -}}
{{- /* MIG and other NVIDIA resources: GPU node pools taint nvidia.com/gpu whatever they advertise */ -}}
{{- $tol = append $tol (dict "key" "nvidia.com/gpu" "operator" "Exists" "effect" "NoSchedule") -}}
{{- end -}}
{{- end -}}
{{- if $tol -}}
{{- toYaml $tol -}}
{{- end -}}
{{- end -}}

{{/* Topology spread entries without a labelSelector get this release's pods of `component`. */}}
{{- define "bitserve.topologySpread" -}}
{{- $ctx := index . 0 -}}
{{- $component := index . 1 -}}
{{- $out := list -}}
{{- range $ctx.Values.topologySpreadConstraints -}}
{{- $c := deepCopy . -}}
{{- if not (hasKey $c "labelSelector") -}}
{{- $sel := fromYaml (include "bitserve.selectorLabels" $ctx) -}}
{{- $_ := set $sel "app.kubernetes.io/component" $component -}}
{{- $_ := set $c "labelSelector" (dict "matchLabels" $sel) -}}
{{- end -}}
{{- $out = append $out $c -}}
{{- end -}}
{{- if $out -}}
{{- toYaml $out -}}
{{- end -}}
{{- end -}}

{{- define "bitserve.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmp.sizeLimit }}
- name: cache
  emptyDir:
    sizeLimit: {{ .Values.cache.sizeLimit }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shm.sizeLimit }}
{{- if eq .Values.model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName }}
    readOnly: {{ .Values.model.pvc.readOnly }}
{{- else if eq .Values.model.source "huggingface" }}
- name: model
  {{- if .Values.model.huggingface.storage.claimName }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.huggingface.storage.claimName }}
  {{- else }}
  emptyDir:
    sizeLimit: {{ .Values.model.huggingface.storage.sizeLimit }}
  {{- end }}
{{- end }}
{{- end -}}

{{- define "bitserve.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /var/cache/bitserve
- name: dshm
  mountPath: /dev/shm
{{- if include "bitserve.needsModelVolume" . }}
- name: model
  mountPath: {{ include "bitserve.modelMountPath" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Init container that downloads the Hugging Face snapshot (same image: it
ships huggingface-hub). Re-running it resumes / verifies an existing download. */}}
{{- define "bitserve.downloadInitContainer" -}}
{{- if eq .Values.model.source "huggingface" -}}
{{- $hf := .Values.model.huggingface -}}
- name: model-download
  image: {{ include "bitserve.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command:
    - python
    - -c
    - |
      import json, os
      from huggingface_hub import snapshot_download
      target = os.environ["BITSERVE_MODEL_DIR"]
      patterns = json.loads(os.environ["BITSERVE_HF_ALLOW_PATTERNS"]) or None
      snapshot_download(repo_id=os.environ["BITSERVE_HF_REPO"], revision=os.environ["BITSERVE_HF_REVISION"],
                        local_dir=target, allow_patterns=patterns)
      print("model ready in", target, flush=True)
  env:
    - name: BITSERVE_HF_REPO
      value: {{ $hf.repo | quote }}
    - name: BITSERVE_HF_REVISION
      value: {{ $hf.revision | quote }}
    - name: BITSERVE_HF_ALLOW_PATTERNS
      value: {{ toJson ($hf.allowPatterns | default list) | quote }}
    - name: BITSERVE_MODEL_DIR
      value: {{ include "bitserve.modelPath" . | quote }}
    - name: HF_HUB_DISABLE_TELEMETRY
      value: "1"
    {{- if $hf.tokenSecret.name }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ $hf.tokenSecret.name }}
          key: {{ $hf.tokenSecret.key }}
    {{- end }}
  resources:
    {{- toYaml $hf.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    - name: cache
      mountPath: /var/cache/bitserve
    - name: model
      mountPath: {{ include "bitserve.modelMountPath" . }}
{{- end -}}
{{- end -}}

{{- define "bitserve.serverEnv" -}}
{{- include "bitserve.modelEnv" . }}
{{- if .Values.apiTokenSecret.name }}
- name: BITSERVE_API_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.apiTokenSecret.name }}
      key: {{ .Values.apiTokenSecret.key }}
{{- end }}
{{- end -}}

{{/* The gRPC server container's ports (list items). */}}
{{- define "bitserve.serverPorts" -}}
- name: grpc
  containerPort: {{ include "bitserve.grpcPort" . }}
  protocol: TCP
- name: metrics
  containerPort: {{ include "bitserve.metricsPort" . }}
  protocol: TCP
{{- end -}}

{{/* Native gRPC probes and the drain hook of the server container. */}}
{{- define "bitserve.serverProbes" -}}
{{- $p := .Values.probes -}}
startupProbe:
  grpc:
    port: {{ include "bitserve.grpcPort" . }}
    service: bitserve.v1.ChatService
  {{- toYaml $p.startup | nindent 2 }}
readinessProbe:
  grpc:
    port: {{ include "bitserve.grpcPort" . }}
    service: bitserve.v1.ChatService
  {{- toYaml $p.readiness | nindent 2 }}
livenessProbe:
  grpc:
    port: {{ include "bitserve.grpcPort" . }}
    service: ""
  {{- toYaml $p.liveness | nindent 2 }}
lifecycle:
  preStop:
    exec:
      command: ["sleep", {{ .Values.drain.preStopSleepSeconds | int | toString | quote }}]
{{- end -}}

{{/* Environment shared by every container that loads the model. */}}
{{- define "bitserve.modelEnv" -}}
{{- if has .Values.model.source (list "pvc" "huggingface" "image") }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "bitserve.podSecurity" -}}
automountServiceAccountToken: false
enableServiceLinks: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- end -}}

{{/* PromQL label matchers for this release's series: the ServiceMonitor /
PodMonitor rewrite `job` to the fullname. */}}
{{- define "bitserve.promSelector" -}}
namespace="{{ .Release.Namespace }}",job="{{ include "bitserve.fullname" . }}"
{{- end -}}

{{- define "bitserve.scrapeEndpoint" -}}
path: /metrics
interval: {{ .monitor.interval }}
scrapeTimeout: {{ .monitor.scrapeTimeout }}
relabelings:
  - action: replace
    targetLabel: job
    replacement: {{ include "bitserve.fullname" .ctx }}
{{- end -}}
