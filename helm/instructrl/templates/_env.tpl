{{/* What the chart puts into its containers besides the pod template: environment, the
rollout server's drain hook. */}}

{{/*
A container that requests no GPU must see none: the GPU image (like every CUDA base image)
sets NVIDIA_VISIBLE_DEVICES=all, and the NVIDIA container runtime exposes every GPU of the node
to a container whose environment says so, requested or not. "void" makes the runtime behave
like runc (no GPU, no driver libraries; NVIDIA Container Toolkit, "Specialized Configurations
with Docker": https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/latest/docker-specialized.html).
Containers with a GPU request get the variable from the device plugin. Call with the
container's GPU count.
*/}}
{{- define "instructrl.gpuVisibilityEnv" -}}
{{- if eq (int .) 0 }}
- name: NVIDIA_VISIBLE_DEVICES
  value: void
{{- end }}
{{- end }}

{{/*
preStop of the rollout server: wait (at most rollout.worker.drainTimeoutSeconds) until the
rollout worker of the same pod has exited, i.e. its metrics port on loopback refuses
connections. The kubelet sends SIGTERM to the worker at once (it has no hook): the worker stops
claiming prompts, finishes or releases the batches it holds and leaves the learner's weight
group; all the while its rollout server keeps serving its Generate calls. Only then does the
server get its own SIGTERM. Python is in every image (stdlib only).
*/}}
{{- define "instructrl.drainWorkerCommand" -}}
- python
- -c
- |
  import socket, sys, time
  port, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
  while time.monotonic() < deadline:
      try:
          socket.create_connection(("127.0.0.1", port), timeout=1).close()
      except OSError:
          sys.exit(0)  # the worker is gone
      time.sleep(1)
- {{ .Values.ports.workerMetrics | quote }}
- {{ .Values.rollout.worker.drainTimeoutSeconds | quote }}
{{- end }}

{{/*
Environment every instructrl container gets.
Call with (dict "ctx" $ "threads" N "metricsPort" P "gpus" G).
The addresses are host:port inside the cluster; $(VAR) in args expands them.
*/}}
{{- define "instructrl.commonEnv" -}}
{{- $ctx := .ctx }}
{{- $grpc := int $ctx.Values.ports.grpc }}
- name: INSTRUCTRL_CONFIG
  value: /etc/instructrl/config.yaml
- name: HOME
  value: {{ include "instructrl.homeDir" . }}
{{- include "instructrl.gpuVisibilityEnv" .gpus }}
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

{{/* torch.distributed interface pinning and NCCL logging (learner and rollout). */}}
{{- define "instructrl.distEnv" -}}
{{- with .Values.networkInterface }}
- name: GLOO_SOCKET_IFNAME
  value: {{ . }}
- name: NCCL_SOCKET_IFNAME
  value: {{ . }}
{{- end }}
{{- with .Values.nccl.debug }}
- name: NCCL_DEBUG
  value: {{ . }}
{{- end }}
{{- with .Values.nccl.debugSubsys }}
- name: NCCL_DEBUG_SUBSYS
  value: {{ . | quote }}
{{- end }}
{{- end }}
