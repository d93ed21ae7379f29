{{/*
Model provisioning (models.source):
  pvc  an existing claim holds the models (models.existingClaim), mounted read-only;
  hf   an init container (`instructrl fetch-models`) downloads the repos of models.hf.repos
       at their pinned commits into a cache volume (models.hf.cache.existingClaim, shared, or an
       emptyDir per pod), once: a marker on the volume makes later starts do nothing. Every
       role then reads <mountPath>/<name>, read-only.
*/}}

{{/* The `models` volume source (YAML), or nothing. */}}
{{- define "instructrl.modelsVolume" -}}
{{- $m := .Values.models }}
{{- if eq $m.source "hf" }}
{{- if $m.hf.cache.existingClaim }}
persistentVolumeClaim:
  claimName: {{ $m.hf.cache.existingClaim }}
{{- else }}
emptyDir:
  sizeLimit: {{ $m.hf.cache.sizeLimit }}
{{- end }}
{{- else if $m.existingClaim }}
persistentVolumeClaim:
  claimName: {{ $m.existingClaim }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The repos one role needs: [{repo, revision, name[, allow_patterns]}]. Call with (dict "ctx" $ "role" "reward"). */}}
{{- define "instructrl.roleRepos" -}}
{{- $out := list }}
{{- range .ctx.Values.models.hf.repos }}
{{- if or (not .roles) (has $.role .roles) }}
{{- $r := dict "repo" .repo "revision" .revision "name" .name }}
{{- with .allowPatterns }}{{ $_ := set $r "allow_patterns" . }}{{ end }}
{{- $out = append $out $r }}
{{- end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* The init container that fetches a role's repos (YAML list item), or nothing. */}}
{{- define "instructrl.fetchModelsContainer" -}}
{{- $ctx := .ctx }}
{{- $m := $ctx.Values.models }}
{{- $repos := include "instructrl.roleRepos" (dict "ctx" $ctx "role" .role) }}
{{- if and (eq $m.source "hf") (ne $repos "[]") }}
- name: fetch-models
  image: {{ .image | quote }}
  imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
  args:
    - fetch-models
    - {{ printf "dest=%s" $m.mountPath | quote }}
    - {{ printf "repos=%s" $repos | quote }}
    {{- with $m.hf.endpoint }}
    - {{ printf "endpoint=%s" . | quote }}
    {{- end }}
  env:
    {{- include "instructrl.gpuVisibilityEnv" 0 | nindent 4 }}
    # The Hub cache (and huggingface_hub's other files) live on the models volume.
    - name: HF_HOME
      value: {{ printf "%s/.huggingface" $m.mountPath | quote }}
    - name: HF_HUB_DISABLE_TELEMETRY
      value: "1"
    - name: HOME
      value: {{ include "instructrl.homeDir" . }}
    {{- with $m.hf.tokenSecret.name }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ . }}
          key: {{ $m.hf.tokenSecret.key }}
    {{- end }}
  {{- with $m.hf.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $ctx.Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: {{ $m.mountPath }}
    - name: tmp
      mountPath: /tmp
    - name: home
      mountPath: {{ include "instructrl.homeDir" . }}
{{- end }}
{{- end }}
