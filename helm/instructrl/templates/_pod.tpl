{{/* The pod template of the four instructrl roles (environment and hooks: _env.tpl). */}}

{{/*
`key=value` overrides for the settings the chart owns in a role's config: server.* (every
role's ServerConfig), device/torch_threads (reward, reference), replica_id and
engine.tensor_parallel_size (rollout), sync.master_port, deepspeed.torch_threads,
checkpoint.dir, register_allow, on_finish=idle (learner); then the role's configOverrides. Call with (dict "ctx" $ "role" "reward").
*/}}
{{- define "instructrl.serverOverrides" -}}
{{- $ctx := .ctx }}
{{- $v := index $ctx.Values .role }}
- server.host=0.0.0.0
- server.port={{ $ctx.Values.ports.grpc }}
- server.metrics_port={{ $ctx.Values.ports.metrics }}
{{- if $ctx.Values.tls.enabled }}
- server.health_port={{ $ctx.Values.ports.health }}
- server.tls.cert_file=/etc/instructrl/tls/tls.crt
- server.tls.key_file=/etc/instructrl/tls/tls.key
- server.tls.ca_file=/etc/instructrl/tls/ca.crt
- server.tls.require_client_auth={{ $ctx.Values.tls.mtls }}
{{- end }}
{{- if has .role (list "reward" "reference") }}
- device={{ ternary "cuda" "cpu" (gt (int $v.gpus) 0) }}
- torch_threads={{ $v.ompNumThreads }}
{{- end }}
{{- if eq .role "rollout" }}
{{- /* The replica's name in the learner's membership, metrics and status: one per pod. */}}
- replica_id=$(POD_NAME)
{{- if gt (int $v.gpus) 0 }}
- engine.tensor_parallel_size={{ $v.gpus }}
{{- end }}
{{- end }}
{{- if eq .role "learner" }}
- sync.master_port={{ $ctx.Values.ports.weightSync }}
- deepspeed.torch_threads={{ $v.ompNumThreads }}
- checkpoint.dir={{ $v.checkpoints.mountPath }}
- {{ printf "register_allow=%s" (toJson $v.registerAllow) | quote }}
{{- /* A finished learner stays up, reporting finished: a pod restart must not train again. */}}
- on_finish=idle
{{- end }}
{{- range $v.configOverrides }}
- {{ . }}
{{- end }}
{{- end }}

{{/* HOME in the images (deploy/docker/Dockerfile.*); the `home` emptyDir is mounted there. */}}
{{- define "instructrl.homeDir" -}}
/home/instructrl
{{- end }}

{{/* Volume mounts of an instructrl container. Call with (dict "ctx" $ "file" "reward.yaml"). */}}
{{- define "instructrl.commonMounts" -}}
- name: config
  mountPath: /etc/instructrl/config.yaml
  subPath: {{ .file }}
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: {{ include "instructrl.homeDir" . }}
{{- if .ctx.Values.tls.enabled }}
- name: tls
  mountPath: /etc/instructrl/tls
  readOnly: true
{{- end }}
{{- if include "instructrl.modelsVolume" .ctx }}
- name: models
  mountPath: {{ .ctx.Values.models.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
The pod template shared by the four roles: the role's gRPC server container and, in rollout
pods, the rollout worker.
Call with (dict "ctx" $ "role" "rollout" "env" (list ...) "ports" (list ...)
                "volumes" (list ...) "volumeMounts" (list ...) "grpcProbes" true).
`env`, `ports`, `volumes` and `volumeMounts` are additions for the server container;
`grpcProbes` false leaves out the startup, liveness and readiness probes; `scrapeAnnotations`
false leaves out the prometheus.io/* pod annotations (a multi-rank learner: only rank 0 serves
/metrics, and a StatefulSet's pods share one template).
*/}}
{{- define "instructrl.podTemplate" -}}
{{- $ctx := .ctx }}
{{- $v := index $ctx.Values .role }}
{{- $gpus := int (ternary $v.gpusPerPod $v.gpus (eq .role "learner")) }}
{{- $resources := deepCopy (default dict $v.resources) }}
{{- if gt $gpus 0 }}
{{- $limits := deepCopy (default dict (get $resources "limits")) }}
{{- $_ := set $limits "nvidia.com/gpu" $gpus }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- $image := include "instructrl.image" (dict "ctx" $ctx "gpus" $gpus) }}
{{- $probePort := include "instructrl.probePort" $ctx }}
{{- $worker := and (eq .role "rollout") $v.worker.enabled }}
{{- $probes := ternary true .grpcProbes (not (hasKey . "grpcProbes")) }}
{{- $scrape := and $ctx.Values.metrics.podAnnotations (ternary true .scrapeAnnotations (not (hasKey . "scrapeAnnotations"))) }}
metadata:
  labels:
    {{- include "instructrl.labels" (dict "ctx" $ctx "component" .role) | nindent 4 }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include (print $ctx.Template.BasePath "/configmap.yaml") $ctx | sha256sum }}
    {{- if $scrape }}
    prometheus.io/scrape: "true"
    prometheus.io/port: {{ $ctx.Values.ports.metrics | quote }}
    prometheus.io/path: /metrics
    {{- end }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "instructrl.serviceAccountName" $ctx }}
  automountServiceAccountToken: false
  {{- with $ctx.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $ctx.Values.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
  {{- with $v.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- with $v.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $v.schedulerName }}
  schedulerName: {{ . }}
  {{- end }}
  {{- with $v.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- $fetch := include "instructrl.fetchModelsContainer" (dict "ctx" $ctx "role" .role "image" $image) }}
  {{- if or $fetch $v.extraInitContainers }}
  initContainers:
    {{- with $fetch }}
    {{- . | nindent 4 }}
    {{- end }}
    {{- with $v.extraInitContainers }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  containers:
    - name: {{ .role }}
      image: {{ $image | quote }}
      imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
      args:
        - serve
        - {{ .role }}
        - --config
        - /etc/instructrl/config.yaml
        {{- include "instructrl.serverOverrides" (dict "ctx" $ctx "role" .role) | trim | nindent 8 }}
      ports:
        - name: grpc
          containerPort: {{ $ctx.Values.ports.grpc }}
          protocol: TCP
        {{- if $ctx.Values.tls.enabled }}
        - name: health
          containerPort: {{ $ctx.Values.ports.health }}
          protocol: TCP
        {{- end }}
        - name: metrics
          containerPort: {{ $ctx.Values.ports.metrics }}
          protocol: TCP
        {{- with .ports }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      env:
        {{- include "instructrl.commonEnv" (dict "ctx" $ctx "threads" $v.ompNumThreads "metricsPort" $ctx.Values.ports.metrics "gpus" $gpus) | trim | nindent 8 }}
        {{- with .env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with $v.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $v.extraEnvFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $ctx.Values.securityContext | nindent 8 }}
      {{- if $worker }}
      lifecycle:
        preStop:
          exec:
            command:
              {{- include "instructrl.drainWorkerCommand" $ctx | nindent 14 }}
      {{- end }}
      {{- if $probes }}
      # Native gRPC probes (grpc.health.v1). The kubelet speaks plaintext only, so with TLS
      # they use the plaintext health port (server.health_port).
      startupProbe:
        grpc:
          port: {{ $probePort }}
        periodSeconds: 10
        failureThreshold: {{ $v.probes.startupFailureThreshold }}
      livenessProbe:
        grpc:
          port: {{ $probePort }}
        periodSeconds: 15
        timeoutSeconds: 5
        failureThreshold: 4
      readinessProbe:
        grpc:
          port: {{ $probePort }}
          {{- with $v.probes.readinessService }}
          service: {{ . }}
          {{- end }}
        periodSeconds: 5
        timeoutSeconds: 3
        failureThreshold: 3
      {{- end }}
      volumeMounts:
        {{- include "instructrl.commonMounts" (dict "ctx" $ctx "file" (printf "%s.yaml" .role)) | trim | nindent 8 }}
        - name: dshm
          mountPath: /dev/shm
        {{- with .volumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with $v.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    {{- if $worker }}
    {{- $w := $v.worker }}
    - name: worker
      image: {{ $image | quote }}
      imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
      args:
        - rollout-worker
        - --config
        - /etc/instructrl/config.yaml
        # The consumer name in the prompt group and the id it registers with the learner:
        # the pod's name, the same as its rollout server's replica_id.
        - "replica_id=$(POD_NAME)"
        # On SIGTERM it finishes its batches within this, inside the server's preStop wait.
        - "drain_timeout_s={{ max 1 (sub (int $w.drainTimeoutSeconds) 5) }}"
        {{- range $w.configOverrides }}
        - {{ . | quote }}
        {{- end }}
      ports:
        - name: worker-metrics
          containerPort: {{ $ctx.Values.ports.workerMetrics }}
          protocol: TCP
      env:
        {{- include "instructrl.commonEnv" (dict "ctx" $ctx "threads" $w.ompNumThreads "metricsPort" $ctx.Values.ports.workerMetrics "gpus" 0) | trim | nindent 8 }}
        # This pod's rollout service, over loopback.
        - name: INSTRUCTRL_ROLLOUT_ADDRESS
          value: {{ printf "127.0.0.1:%d" (int $ctx.Values.ports.grpc) }}
        # Where the learner reaches this pod's rollout service (what the worker registers).
        - name: INSTRUCTRL_ADVERTISE_ADDRESS
          value: {{ printf "$(POD_IP):%d" (int $ctx.Values.ports.grpc) }}
        {{- include "instructrl.redisEnv" $ctx | trim | nindent 8 }}
        {{- with $w.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $w.extraEnvFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $ctx.Values.securityContext | nindent 8 }}
      volumeMounts:
        {{- include "instructrl.commonMounts" (dict "ctx" $ctx "file" "rollout-worker.yaml") | trim | nindent 8 }}
        {{- with $w.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "instructrl.componentName" (dict "ctx" $ctx "component" "config") }}
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $ctx.Values.shmSize }}
    - name: tmp
      emptyDir: {}
    # HOME: the caches (huggingface_hub, torch, Triton, vLLM, DeepSpeed JIT ops) on a
    # read-only root filesystem.
    - name: home
      emptyDir: {}
    {{- if $ctx.Values.tls.enabled }}
    - name: tls
      secret:
        secretName: {{ include "instructrl.tlsSecretName" $ctx }}
        defaultMode: 0440
    {{- end }}
    {{- with include "instructrl.modelsVolume" $ctx }}
    - name: models
      {{- . | nindent 6 }}
    {{- end }}
    {{- with .volumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- with $v.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
