{{/*
The operator's permissions, exactly as operator/PERMISSIONS.md lists them.
"clusterRules": cluster-scoped reads the operator needs in every mode.
"namespacedRules": what it does inside a watched namespace (a ClusterRole in cluster-wide mode,
a Role per watched namespace in namespaced mode).
*/}}
{{- define "kubeinfer.clusterRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{- define "kubeinfer.namespacedRules" -}}
- apiGroups: ["kubeinfer.dev"]
  resources: ["inferencemodels"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["kubeinfer.dev"]
  resources: ["inferencemodels/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
