{{/*
The operator's permissions, copied from operator/PERMISSIONS.md (tests/delivery checks that the
rendered rules equal that file's blocks).
"namespacedRules": inside each watched namespace (ClusterRole in cluster-wide mode, a Role per
watched namespace in namespaced mode). "clusterRules": cluster-scoped reads kopf needs in
cluster-wide mode only. "leaseRules": leader election in the operator's own namespace.
*/}}
{{- define "kubeinfer.namespacedRules" -}}
- apiGroups: ["kubeinfer.dev"]
  resources: ["inferencemodels"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["kubeinfer.dev"]
  resources: ["inferencemodels/status"]
  verbs: ["patch"]
- apiGroups: ["kubeinfer.dev"]
  resources: ["inferencemodels/finalizers"]
  verbs: ["update"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{- define "kubeinfer.clusterRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}

{{- define "kubeinfer.leaseRules" -}}
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "create", "update"]
{{- end }}
