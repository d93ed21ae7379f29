{{/* The pod template of the four instructrl roles and the pieces it is made of. */}}

{{/*
Environment every instructrl container gets. Call with (dict "ctx" $ "threads" N "metricsPort" P).
The addresses are host:port inside the cluster; $(VAR) in args expands them.
*/}}
{{- define "instructrl.commonEnv" -}}
{{- $ctx := .ctx }}
{{- $grpc := int $ctx.Values.ports.grpc }}
- name: INSTRUCTRL_CONFIG
  value: /etc/instructrl/config.yaml
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: OMP_NUM_THREADS
  value: {{ .threads | quote }}
- name: INSTRUCTRL_METRICS_PORT
  value: {{ .metricsPort | quote }}
- name: INSTRUCTRL_GRPC_PORT
  value: {{ $grpc | quote }}
- name: INSTRUCTRL_RUN_ID
  value: {{ $ctx.Values.buffer.runId | quote }}
- name: INSTRUCTRL_REWARD_ADDRESS
  value: {{ printf "%s:%d" (include "instructrl.componentName" (dict "ctx" $ctx "component" "reward")) $grpc }}
- name: INSTRUCTRL_REFERENCE_ADDRESS
  value: {{ printf "%s:%d" (include "instructrl.componentName" (dict "ctx" $ctx "component" "reference")) $grpc }}
- name: INSTRUCTRL_LEARNER_ADDRESS
  value: {{ printf "%s:%d" (include "instructrl.componentName" (dict "ctx" $ctx "component" "learner")) $grpc }}
{{- if $ctx.Values.tls.enabled }}
- name: INSTRUCTRL_TLS_DIR
  value: /etc/instructrl/tls
- name: INSTRUCTRL_MTLS
  value: {{ $ctx.Values.tls.mtls | quote }}
- name: INSTRUCTRL_TLS_SERVER_NAME
  value: {{ $ctx.Values.tls.serverName | quote }}
{{- end }}
{{- if $ctx.Values.auth.token.enabled }}
- name: INSTRUCTRL_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "instructrl.tokenSecretName" $ctx }}
      key: {{ include "instructrl.tokenSecretKey" $ctx }}
{{- end }}
{{- end }}

{{/* Redis access: the URL, and for the bundled Redis the password (read by the buffer client). */}}
{{- define "instructrl.redisEnv" -}}
- name: INSTRUCTRL_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "instructrl.redisSecretName" . }}
      key: {{ include "instructrl.redisSecretKey" . }}
{{- if eq .Values.redis.mode "bundled" }}
- name: INSTRUCTRL_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "instructrl.redisSecretName" . }}
      key: password
{{- end }}
{{- end }}

{{/* torch.distributed interface pinning (learner and rollout). */}}
{{- define "instructrl.distEnv" -}}
{{- with .Values.networkInterface }}
- name: GLOO_SOCKET_IFNAME
  value: {{ . }}
- name: NCCL_SOCKET_IFNAME
  value: {{ . }}
{{- end }}
{{- end }}

{{/*
`key=value` overrides for the settings the chart owns in a role's config: server.* (every
role's ServerConfig), device/torch_threads (reward, reference), engine.tensor_parallel_size
(rollout), sync.master_port, deepspeed.torch_threads, checkpoint.dir (learner); then the
role's configOverrides. Call with (dict "ctx" $ "role" "reward").
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
{{- if and (eq .role "rollout") (gt (int $v.gpus) 0) }}
- engine.tensor_parallel_size={{ $v.gpus }}
{{- end }}
{{- if eq .role "learner" }}
- sync.master_port={{ $ctx.Values.ports.weightSync }}
- deepspeed.torch_threads={{ $v.ompNumThreads }}
- checkpoint.dir={{ $v.checkpoints.mountPath }}
{{- end }}
{{- range $v.configOverrides }}
- {{ . }}
{{- end }}
{{- end }}

{{/* Volume mounts of an instructrl container. Call with (dict "ctx" $ "file" "reward.yaml"). */}}
{{- define "instructrl.commonMounts" -}}
- name: config
  mountPath: /etc/instructrl/config.yaml
  subPath: {{ .file }}
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if .ctx.Values.tls.enabled }}
- name: tls
  mountPath: /etc/instructrl/tls
  readOnly: true
{{- end }}
{{- if .ctx.Values.models.existingClaim }}
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
`grpcProbes` false leaves out the startup, liveness and readiness probes.
*/}}
{{- define "instructrl.podTemplate" -}}
{{- $ctx := .ctx }}
{{- $v := index $ctx.Values .role }}
{{- $resources := deepCopy (default dict $v.resources) }}
{{- if gt (int $v.gpus) 0 }}
{{- $limits := deepCopy (default dict (get $resources "limits")) }}
{{- $_ := set $limits "nvidia.com/gpu" (int $v.gpus) }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- $image := include "instructrl.image" (dict "ctx" $ctx "gpus" $v.gpus) }}
{{- $probePort := include "instructrl.probePort" $ctx }}
{{- $worker := and (eq .role "rollout") $v.worker.enabled }}
{{- $probes := ternary true .grpcProbes (not (hasKey . "grpcProbes")) }}
metadata:
  labels:
    {{- include "instructrl.labels" (dict "ctx" $ctx "component" .role) | nindent 4 }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include (print $ctx.Template.BasePath "/configmap.yaml") $ctx | sha256sum }}
    {{- if $ctx.Values.metrics.podAnnotations }}
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
        {{- include "instructrl.commonEnv" (dict "ctx" $ctx "threads" $v.ompNumThreads "metricsPort" $ctx.Values.ports.metrics) | trim | nindent 8 }}
        {{- with .env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with $v.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $ctx.Values.securityContext | nindent 8 }}
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
    {{- if $worker }}
    {{- $w := $v.worker }}
    - name: worker
      image: {{ $image | quote }}
      imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
      args:
        - rollout-worker
        - --config
        - /etc/instructrl/config.yaml
        {{- range $w.configOverrides }}
        - {{ . | quote }}
        {{- end }}
      ports:
        - name: worker-metrics
          containerPort: {{ $ctx.Values.ports.workerMetrics }}
          protocol: TCP
      env:
        {{- include "instructrl.commonEnv" (dict "ctx" $ctx "threads" $w.ompNumThreads "metricsPort" $ctx.Values.ports.workerMetrics) | trim | nindent 8 }}
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
      {{- with $w.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $ctx.Values.securityContext | nindent 8 }}
      volumeMounts:
        {{- include "instructrl.commonMounts" (dict "ctx" $ctx "file" "rollout-worker.yaml") | trim | nindent 8 }}
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
    {{- if $ctx.Values.tls.enabled }}
    - name: tls
      secret:
        secretName: {{ include "instructrl.tlsSecretName" $ctx }}
        defaultMode: 0440
    {{- end }}
    {{- if $ctx.Values.models.existingClaim }}
    - name: models
      persistentVolumeClaim:
        claimName: {{ $ctx.Values.models.existingClaim }}
        readOnly: true
    {{- end }}
    {{- with .volumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
