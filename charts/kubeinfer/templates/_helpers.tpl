{{/* Chart name, overridable. */}}
{{- define "kubeinfer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>" (or just the release when it already contains the chart name). */}}
{{- define "kubeinfer.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kubeinfer.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object of the release. */}}
{{- define "kubeinfer.commonLabels" -}}
helm.sh/chart: {{ include "kubeinfer.chart" . }}
app.kubernetes.io/name: {{ include "kubeinfer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels on the operator's objects. */}}
{{- define "kubeinfer.labels" -}}
{{ include "kubeinfer.commonLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels that select the operator pods. */}}
{{- define "kubeinfer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubeinfer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubeinfer.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubeinfer.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kubeinfer.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) }}
{{- end }}

{{- define "kubeinfer.engineCpuImage" -}}
{{- printf "%s:%s" .Values.engine.cpuImage.repository (default (printf "%s-cpu" .Chart.AppVersion) .Values.engine.cpuImage.tag) }}
{{- end }}

{{- define "kubeinfer.engineImage" -}}
{{- printf "%s:%s" .Values.engine.image.repository (default .Chart.AppVersion .Values.engine.image.tag) }}
{{- end }}

{{/* The operator's liveness endpoint (kopf's, on KUBEINFER_LIVENESS_PORT). */}}
{{- define "kubeinfer.healthPort" -}}8080{{- end }}
{{- define "kubeinfer.healthPath" -}}/healthz{{- end }}

{{/* Labels the operator puts on every engine pod and Service (kubeinfer.operator.render.common). */}}
{{- define "kubeinfer.enginePodSelector" -}}
app.kubernetes.io/component: engine
app.kubernetes.io/managed-by: kubeinfer-operator
{{- end }}
{{/* The engine pod label that names its InferenceModel. */}}
{{- define "kubeinfer.engineModelLabel" -}}kubeinfer.dev/model{{- end }}
