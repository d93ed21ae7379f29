{{/*
Names. The full name is capped at 40 characters so that the longest derived name
("<fullname>-learner-headless", and StatefulSet pod names under it) stays a DNS label.
*/}}
{{- define "instructrl.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "instructrl.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "instructrl.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<fullname>-<component>". Call with (dict "ctx" $ "component" "rollout"). */}}
{{- define "instructrl.componentName" -}}
{{- printf "%s-%s" (include "instructrl.fullname" .ctx) .component }}
{{- end }}

{{/* Selector labels of one component. Call with (dict "ctx" $ "component" "rollout"). */}}
{{- define "instructrl.selectorLabels" -}}
app.kubernetes.io/name: {{ include "instructrl.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The recommended app.kubernetes.io/* labels. Call with (dict "ctx" $ "component" "rollout"). */}}
{{- define "instructrl.labels" -}}
helm.sh/chart: {{ include "instructrl.chart" .ctx }}
{{ include "instructrl.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: instructrl
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end }}

{{- define "instructrl.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "instructrl.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image of a role. Call with (dict "ctx" $ "gpus" N). */}}
{{- define "instructrl.image" -}}
{{- $flavor := ternary "gpu" "cpu" (gt (int .gpus) 0) }}
{{- $tag := default (printf "%s-%s" .ctx.Chart.AppVersion $flavor) .ctx.Values.image.tag }}
{{- printf "%s:%s" .ctx.Values.image.repository $tag }}
{{- end }}

{{/* Port the kubelet probes use: the plaintext health port whenever TLS is on. */}}
{{- define "instructrl.probePort" -}}
{{- if .Values.tls.enabled }}{{ .Values.ports.health }}{{ else }}{{ .Values.ports.grpc }}{{ end }}
{{- end }}

{{/* Secrets and their keys. */}}
{{- define "instructrl.redisSecretName" -}}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.existingSecret }}
{{- .Values.redis.external.existingSecret }}
{{- else }}
{{- include "instructrl.componentName" (dict "ctx" . "component" "redis") }}
{{- end }}
{{- end }}

{{- define "instructrl.redisSecretKey" -}}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.existingSecret }}
{{- .Values.redis.external.existingSecretKey }}
{{- else }}url{{ end }}
{{- end }}

{{- define "instructrl.tokenSecretName" -}}
{{- default (include "instructrl.componentName" (dict "ctx" . "component" "token")) .Values.auth.token.existingSecret }}
{{- end }}

{{- define "instructrl.tokenSecretKey" -}}
{{- if .Values.auth.token.existingSecret }}{{ .Values.auth.token.existingSecretKey }}{{ else }}token{{ end }}
{{- end }}

{{- define "instructrl.tlsSecretName" -}}
{{- default (include "instructrl.componentName" (dict "ctx" . "component" "tls")) .Values.tls.existingSecret }}
{{- end }}

{{/* The prompt stream's Redis key (services/buffer/config.py: Keys.prompts). */}}
{{- define "instructrl.promptStream" -}}
{{- printf "instructrl:{%s}:prompts" .Values.buffer.runId }}
{{- end }}

{{/* In-cluster addresses (host:port) the roles dial. */}}
{{- define "instructrl.learnerHeadless" -}}
{{- include "instructrl.componentName" (dict "ctx" . "component" "learner-headless") }}
{{- end }}

{{- define "instructrl.learnerRank0Host" -}}
{{- printf "%s-0.%s.%s.svc" (include "instructrl.componentName" (dict "ctx" . "component" "learner")) (include "instructrl.learnerHeadless" .) .Release.Namespace }}
{{- end }}

{{- define "instructrl.redisHost" -}}
{{- printf "%s.%s.svc" (include "instructrl.componentName" (dict "ctx" . "component" "redis")) .Release.Namespace }}
{{- end }}

{{/*
A NetworkPolicy peer: the pods of the given components of this release.
Call with (dict "ctx" $ "components" (list "learner" "rollout")).
*/}}
{{- define "instructrl.peer" -}}
- podSelector:
    matchLabels:
      app.kubernetes.io/name: {{ include "instructrl.name" .ctx }}
      app.kubernetes.io/instance: {{ .ctx.Release.Name }}
    matchExpressions:
      - key: app.kubernetes.io/component
        operator: In
        values: {{ toJson .components }}
{{- end }}

