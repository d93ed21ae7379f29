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

{{/* The prompt stream's Redis key (services/instructrl/buffer/config.py: Keys.prompts). */}}
{{- define "instructrl.promptStream" -}}
{{- printf "instructrl:{%s}:prompts" .Values.buffer.runId }}
{{- end }}

{{/* In-cluster addresses (host:port) the roles dial. */}}
{{- define "instructrl.learnerHeadless" -}}
{{- include "instructrl.componentName" (dict "ctx" . "component" "learner-headless") }}
{{- end }}

{{/* Learner ranks per pod (one per GPU; one on CPU) and pods (StatefulSet replicas); a
multiple is enforced by instructrl.validate. */}}
{{- define "instructrl.learnerRanksPerPod" -}}
{{- max 1 (int .Values.learner.gpusPerPod) }}
{{- end }}

{{- define "instructrl.learnerPods" -}}
{{- div (int .Values.learner.ranks) (include "instructrl.learnerRanksPerPod" . | int) }}
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


{{/*
The external Redis URL given inline (redis.external.url), parsed: scheme, host, port, db,
username, password. Empty values when the URL lives in a Secret the chart cannot read.
Sprig has no URL-decoding: a percent-encoded user or password is refused with a message.
*/}}
{{- define "instructrl.externalRedisParts" -}}
{{- $url := .Values.redis.external.url }}
{{- $out := dict "scheme" "" "host" "" "port" "6379" "db" "" "username" "" "password" "" }}
{{- if and (eq .Values.redis.mode "external") $url }}
{{- $u := urlParse $url }}
{{- $_ := set $out "scheme" $u.scheme }}
{{- $hostport := splitList ":" $u.host }}
{{- $_ := set $out "host" (first $hostport) }}
{{- if gt (len $hostport) 1 }}{{ $_ := set $out "port" (last $hostport) }}{{ end }}
{{- $_ := set $out "db" (trimPrefix "/" $u.path) }}
{{- with $u.userinfo }}
{{- if contains "%" . }}
{{- fail "redis.external.url: the user or password is percent-encoded, which the chart cannot decode for the KEDA trigger's credentials; put the URL in a Secret (redis.external.existingSecret) and give rollout.autoscaling.keda.passwordSecret/usernameSecret" }}
{{- end }}
{{- $parts := splitn ":" 2 . }}
{{- $_ := set $out "username" $parts._0 }}
{{- $_ := set $out "password" (default "" $parts._1) }}
{{- end }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/*
How KEDA reaches the run's Redis (the redis-streams trigger): address, databaseIndex,
enableTLS, and Secret refs {name, key} for username, password and ca. Explicit
rollout.autoscaling.keda.* settings win; then what the inline external URL says
(rediss:// = TLS, /N = database N, user:password@); the bundled Redis is database 0 without TLS.
*/}}
{{- define "instructrl.kedaRedis" -}}
{{- $k := .Values.rollout.autoscaling.keda }}
{{- $p := include "instructrl.externalRedisParts" . | fromYaml }}
{{- $bundled := eq .Values.redis.mode "bundled" }}
{{- $secret := include "instructrl.componentName" (dict "ctx" . "component" "redis") }}
{{- $address := $k.redisAddress }}
{{- if not $address }}
{{- $address = ternary (printf "%s:6379" (include "instructrl.redisHost" .)) (printf "%s:%s" $p.host $p.port) $bundled }}
{{- end }}
{{- $db := "0" }}
{{- if ne (toString $k.databaseIndex) "" }}{{ $db = toString $k.databaseIndex }}{{ else if $p.db }}{{ $db = $p.db }}{{ end }}
{{- $out := dict "address" $address "databaseIndex" $db "enableTLS" (or $k.enableTLS (eq $p.scheme "rediss")) }}
{{- if $k.passwordSecret.name }}
{{- $_ := set $out "password" $k.passwordSecret }}
{{- else if $bundled }}
{{- $_ := set $out "password" (dict "name" $secret "key" "password") }}
{{- else if $p.password }}
{{- $_ := set $out "password" (dict "name" $secret "key" "password") }}
{{- end }}
{{- if $k.usernameSecret.name }}
{{- $_ := set $out "username" $k.usernameSecret }}
{{- else if $p.username }}
{{- $_ := set $out "username" (dict "name" $secret "key" "username") }}
{{- end }}
{{- if $k.caSecret.name }}
{{- $_ := set $out "ca" $k.caSecret }}
{{- end }}
{{- toYaml $out }}
{{- end }}
