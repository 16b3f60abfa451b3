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
