{{/*
Checks the schema cannot express, with a message that says what to do instead. Rendered
(as nothing) by validate.yaml, so `helm install`, `template` and `lint` all refuse.
*/}}
{{- define "instructrl.validate" -}}
{{- $r := .Values.rollout }}
{{- /* Tensor-parallel rollout: rollout.gpus is the one home of a GPU replica's
engine.tensor_parallel_size (the chart passes it; each TP worker takes a rank of the weight
group). A tensor_parallel_size set elsewhere must agree, or vLLM fails after pulling the image. */}}
{{- $tp := 0 }}
{{- $where := "" }}
{{- with dig "engine" "tensor_parallel_size" nil .Values.config.rollout }}
{{- $tp = int . }}
{{- $where = "config.rollout.engine.tensor_parallel_size" }}
{{- end }}
{{- range $r.configOverrides }}
{{- if regexMatch "^engine\\.tensor_parallel_size=" . }}
{{- $tp = int (trimPrefix "engine.tensor_parallel_size=" .) }}
{{- $where = "rollout.configOverrides" }}
{{- end }}
{{- end }}
{{- if and (gt (int $r.gpus) 0) $where (ne $tp (int $r.gpus)) }}
{{- fail (printf "%s sets engine.tensor_parallel_size=%d but rollout.gpus=%d: a GPU replica runs one tensor-parallel worker per GPU, and the chart sets engine.tensor_parallel_size from rollout.gpus. Remove it from %s and set rollout.gpus: %d instead." $where $tp (int $r.gpus) $where $tp) }}
{{- end }}
{{- /* Learner: whole pods of gpusPerPod ranks; ranks in several pods share their checkpoints
(the schema insists for one rank per pod, where lint sees it too). */}}
{{- $l := .Values.learner }}
{{- $perPod := include "instructrl.learnerRanksPerPod" . | int }}
{{- if mod (int $l.ranks) $perPod }}
{{- fail (printf "learner.ranks=%d is not a multiple of learner.gpusPerPod=%d: every learner pod runs one rank per GPU. Use learner.ranks: %d (%d pods) or another gpusPerPod." (int $l.ranks) $perPod (mul $perPod (add1 (div (int $l.ranks) $perPod))) (add1 (div (int $l.ranks) $perPod))) }}
{{- end }}
{{- if and (gt (include "instructrl.learnerPods" . | int) 1) (not $l.checkpoints.existingClaim) }}
{{- fail (printf "learner.ranks=%d with learner.gpusPerPod=%d makes %d pods: set learner.checkpoints.existingClaim to a shared (ReadWriteMany) claim, since every rank reads rank 0's model states on resume." (int $l.ranks) (int $l.gpusPerPod) (include "instructrl.learnerPods" . | int)) }}
{{- end }}
{{- /* Scale-down drain: the worker's drain and the server's shutdown fit in the grace period. */}}
{{- if and $r.worker.enabled (lt (int $r.terminationGracePeriodSeconds) (add (int $r.worker.drainTimeoutSeconds) 10)) }}
{{- fail (printf "rollout.terminationGracePeriodSeconds=%d must exceed rollout.worker.drainTimeoutSeconds=%d by at least 10 s: the kubelet kills the pod at the end of the grace period, and the rollout server shuts down only after its worker has drained" (int $r.terminationGracePeriodSeconds) (int $r.worker.drainTimeoutSeconds)) }}
{{- end }}
{{- end }}
