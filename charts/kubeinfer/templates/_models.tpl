{{/*
The spec the chart renders for one `models:` entry. In KEDA mode a model that asks for
autoscaling is scaled by its ScaledObject through the InferenceModel's scale subresource:
the chart turns the operator's HPA off (autoscaling.enabled: false) and leaves spec.replicas
out, so neither the operator, Helm nor Argo CD fights KEDA over the replica count.
*/}}
{{- define "kubeinfer.modelUsesKeda" -}}
{{- if and .root.Values.keda.enabled (dig "autoscaling" "enabled" false .model.spec) }}true{{- end }}
{{- end }}

{{- define "kubeinfer.modelSpec" -}}
{{- $spec := deepCopy .model.spec }}
{{- if include "kubeinfer.modelUsesKeda" . }}
{{- $autoscaling := deepCopy $spec.autoscaling }}
{{- $_ := set $autoscaling "enabled" false }}
{{- $_ := set $spec "autoscaling" $autoscaling }}
{{- $_ := unset $spec "replicas" }}
{{- end }}
{{- toYaml $spec }}
{{- end }}

{{/*
The CRD's defaults for spec.autoscaling (and its scaleUp/scaleDown), read from the chart's copy of the
CRD, so KEDA mode uses the same numbers as the operator's HPA (operator/render/hpa.py). JSON.
*/}}
{{- define "kubeinfer.autoscalingDefaults" -}}
{{- $crd := .Files.Get "crds/inferencemodels.kubeinfer.dev.yaml" | fromYaml }}
{{- $props := (index $crd.spec.versions 0).schema.openAPIV3Schema.properties.spec.properties.autoscaling.properties }}
{{- $defaults := dict }}
{{- range $key, $prop := $props }}
{{- if hasKey $prop "default" }}{{ $_ := set $defaults $key $prop.default }}{{ end }}
{{- end }}
{{- range $rule := list "scaleUp" "scaleDown" }}
{{- $ruleDefaults := dict }}
{{- range $key, $prop := (index $props $rule).properties }}
{{- if hasKey $prop "default" }}{{ $_ := set $ruleDefaults $key $prop.default }}{{ end }}
{{- end }}
{{- $_ := set $defaults $rule $ruleDefaults }}
{{- end }}
{{- toJson $defaults }}
{{- end }}

{{/* .value if .map has .key (0 included, unlike `default`), else .fallback */}}
{{- define "kubeinfer.valueOr" -}}
{{- if hasKey .map .key }}{{ index .map .key }}{{ else }}{{ .fallback }}{{ end }}
{{- end }}

{{/*
One HPA scaling rule, as operator/render/hpa.py's behavior_rule renders it: a Pods policy (podsPerPeriod,
unset = maxReplicas) and, when set, a Percent policy; the larger step wins. Args: rule, defaults, max.
*/}}
{{- define "kubeinfer.hpaRule" -}}
{{- $rule := default (dict) .rule }}
{{- $period := include "kubeinfer.valueOr" (dict "map" $rule "key" "periodSeconds" "fallback" .defaults.periodSeconds) }}
stabilizationWindowSeconds: {{ include "kubeinfer.valueOr" (dict "map" $rule "key" "stabilizationWindowSeconds" "fallback" .defaults.stabilizationWindowSeconds) }}
selectPolicy: Max
policies:
  - type: Pods
    value: {{ include "kubeinfer.valueOr" (dict "map" $rule "key" "podsPerPeriod" "fallback" (default .max .defaults.podsPerPeriod)) }}
    periodSeconds: {{ $period }}
{{- if hasKey $rule "percentPerPeriod" }}
  - type: Percent
    value: {{ $rule.percentPerPeriod }}
    periodSeconds: {{ $period }}
{{- end }}
{{- end }}
