{{/* Common labels: every object says it belongs to this release. */}}
{{- define "omni.labels" -}}
app.kubernetes.io/part-of: omni-platform
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels of one component: omni.selector (list $ "mlflow") */}}
{{- define "omni.selector" -}}
app.kubernetes.io/name: {{ index . 1 }}
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
{{- end -}}

{{/* An image of ours: omni.image (list $ "cpu") */}}
{{- define "omni.image" -}}
{{- $images := (index . 0).Values.images -}}
{{- printf "%s/%s:%s" $images.registry (index $images (index . 1)) $images.tag -}}
{{- end -}}

{{/* Pod-level security for Pod Security "restricted". */}}
{{- define "omni.podSecurity" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container-level security for Pod Security "restricted": non-root, read-only root FS, no capabilities. */}}
{{- define "omni.containerSecurity" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Placement on a pool: omni.placement (list $ "cpu") */}}
{{- define "omni.placement" -}}
{{- $pool := index (index . 0).Values.pools (index . 1) -}}
{{- with $pool.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $pool.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}


{{/* The label every TrainJob node pod carries (set on the runtime's pod template). */}}
{{- define "omni.trainjobPeer" -}}
omni-platform/trainjob-node: "true"
{{- end -}}
