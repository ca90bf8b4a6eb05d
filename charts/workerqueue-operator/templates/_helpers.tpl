{{/* Names ------------------------------------------------------------------------------- */}}

{{- define "workerqueue-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-<chart>, or <release> when it already contains the chart name; 63 chars max. */}}
{{- define "workerqueue-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Objects that releases in other namespaces could also put where they go (cluster-scoped ones, and
Roles beside shared default Secrets): named after the release's namespace too, so that one release
per team, each under the name the docs use, neither collides nor takes the other's with it. */}}
{{- define "workerqueue-operator.uniqueName" -}}
{{- printf "%s-%s" (include "workerqueue-operator.fullname" .) .Release.Namespace }}
{{- end }}

{{- define "workerqueue-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "workerqueue-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "workerqueue-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels ------------------------------------------------------------------------------ */}}

{{- define "workerqueue-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "workerqueue-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "workerqueue-operator.labels" -}}
helm.sh/chart: {{ include "workerqueue-operator.chart" . }}
{{ include "workerqueue-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: agentcontrol
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Behaviour --------------------------------------------------------------------------- */}}

{{/* The ClusterKopfPeering's name: the release's, and with watchNamespaces its namespace's too, as
several releases of one name may run then, one per team, each of its own (see uniqueName). */}}
{{- define "workerqueue-operator.peeringName" -}}
{{- if .Values.watchNamespaces }}{{ include "workerqueue-operator.uniqueName" . }}{{ else }}{{ include "workerqueue-operator.fullname" . }}{{ end }}
{{- end }}

{{/* "true" when kopf peering is on: asked for, or implied by several replicas. */}}
{{- define "workerqueue-operator.peering" -}}
{{- if or .Values.peering.enabled (gt (int .Values.replicaCount) 1) }}true{{ end }}
{{- end }}

{{- define "workerqueue-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "workerqueue-operator.scheme" -}}
{{- if .Values.tls.enabled }}https{{ else }}http{{ end }}
{{- end }}

{{/* The operator's in-cluster URL, handed to worker pods. */}}
{{- define "workerqueue-operator.workerControlPlaneUrl" -}}
{{- if .Values.worker.controlPlaneUrl }}
{{- .Values.worker.controlPlaneUrl }}
{{- else }}
{{- printf "%s://%s.%s.svc:%d" (include "workerqueue-operator.scheme" .) (include "workerqueue-operator.fullname" .) .Release.Namespace (int .Values.service.port) }}
{{- end }}
{{- end }}

{{/* A Prometheus duration of the values schema's form (1m30s, 500ms) in milliseconds. */}}
{{- define "workerqueue-operator.milliseconds" -}}
{{- $units := dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000 }}
{{- $total := 0 }}
{{- range regexFindAll "[0-9]+(ms|s|m|h)" . -1 }}
{{- $n := regexFind "^[0-9]+" . }}
{{- $total = add $total (mul (atoi $n) (get $units (trimPrefix $n .))) }}
{{- end }}
{{- $total }}
{{- end }}

{{- define "workerqueue-operator.configDir" -}}/etc/workerqueue-operator/config{{- end }}
{{- define "workerqueue-operator.tlsDir" -}}/etc/workerqueue-operator/tls{{- end }}

{{/* A {namespace, name, key} Secret reference for the config file, or nothing when unnamed. */}}
{{- define "workerqueue-operator.secretRef" -}}
{{- $ref := index . 0 }}{{- $root := index . 1 }}
{{- if $ref.name }}
namespace: {{ default $root.Release.Namespace $ref.namespace | quote }}
name: {{ $ref.name | quote }}
key: {{ required (printf "the key of Secret %s is required" $ref.name) $ref.key | quote }}
{{- end }}
{{- end }}

{{/* RBAC rules -------------------------------------------------------------------------- */}}

{{/* What the operator does in each namespace it serves: cluster-wide or per watched namespace. */}}
{{- define "workerqueue-operator.namespacedRules" -}}
# Watched; read to tell a deleted namesake's leftover token Secret from the live queue's; finished
# ephemeral queues are deleted. Never changed: the spec is the users'.
- apiGroups: ["agentcontrol.dev"]
  resources: ["workerqueues"]
  verbs: ["get", "list", "watch", "delete"]
- apiGroups: ["agentcontrol.dev"]
  resources: ["workerqueues/status"]
  verbs: ["patch"]
# Pods and token Secrets carry blockOwnerDeletion: clusters with OwnerReferencesPermissionEnforcement
# (OpenShift, for one) require this to create them.
- apiGroups: ["agentcontrol.dev"]
  resources: ["workerqueues/finalizers"]
  verbs: ["update"]
# Reads the Secrets queues name; creates their generated token Secrets and each worker pod's own
# token Secret. Deletes the latter with their pod (a queue's are garbage-collected with it, or deleted
# when a deleted queue of the same name left one); never updates or patches a Secret.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "delete"]
# The live-worker registry: one Lease per worker, owned by its queue; and one per worker pod that
# /start turned away, until that pod goes.
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "create", "delete"]
# core/v1 Events, the operator's and kopf's: posted, never patched.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/* What is cluster-scoped by nature, in every mode. */}}
{{- define "workerqueue-operator.clusterRules" -}}
# Authenticating and authorizing /start callers that present a Kubernetes token.
- apiGroups: ["authentication.k8s.io"]
  resources: ["tokenreviews"]
  verbs: ["create"]
- apiGroups: ["authorization.k8s.io"]
  resources: ["subjectaccessreviews"]
  verbs: ["create"]
{{- if not .Values.watchNamespaces }}
# kopf's resource discovery (lists and watches; off when it watches given namespaces only).
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end }}
{{- if include "workerqueue-operator.peering" . }}
# kopf patches its keep-alive in; the operator's informer lists and watches who is active. One
# ClusterKopfPeering also with watchNamespaces (see peering.yaml).
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end }}

{{/* The operator's config file ----------------------------------------------------------- */}}

{{/* Settings fields (snake_case) from the values; `extraConfig` overrides them. */}}
{{- define "workerqueue-operator.config" -}}
{{- $v := .Values }}
{{- $config := dict
  "organization_id" $v.organizationId
  "temporal_host" $v.temporal.host
  "temporal_namespace" $v.temporal.namespace
  "litellm_url" $v.litellm.url
  "worker_control_plane_url" (include "workerqueue-operator.workerControlPlaneUrl" .)
  "http_host" "*"
  "http_port" (int $v.containerPort)
  "token_review_audiences" $v.tokenReviewAudiences
  "auth_cache_seconds" $v.authCacheSeconds
  "auth_negative_cache_seconds" $v.authNegativeCacheSeconds
  "auth_review_timeout_seconds" $v.authReviewTimeoutSeconds
  "auth_max_concurrent_reviews" (int $v.authMaxConcurrentReviews)
  "registry_max_pending" (int $v.registry.maxPending)
  "registry_max_pending_per_queue" (int $v.registry.maxPendingPerQueue)
  "registry_max_workers" (int $v.registry.maxWorkers)
  "registry_max_workers_per_queue" (int $v.registry.maxWorkersPerQueue)
  "http_idle_timeout_seconds" $v.http.idleTimeoutSeconds
  "http_body_timeout_seconds" $v.http.bodyTimeoutSeconds
  "http_max_connections" (int $v.http.maxConnections)
  "http_reserved_fds" (int $v.http.reservedFds)
  "http_drain_seconds" $v.http.drainSeconds
  "namespaces" ($v.watchNamespaces | uniq)
  "status_resync_seconds" $v.statusResyncSeconds
  "upstream_connect_timeout_seconds" $v.upstream.connectTimeoutSeconds
  "upstream_idle_timeout_seconds" $v.upstream.idleTimeoutSeconds
  "upstream_max_connections" (int $v.upstream.maxConnections)
  "upstream_max_websockets" (int $v.upstream.maxWebsockets)
  "upstream_namespaces" ($v.upstream.namespaces | uniq)
}}
{{- with include "workerqueue-operator.secretRef" (list $v.temporal.apiKeySecret .) }}
{{- $_ := set $config "temporal_api_key_secret" (fromYaml .) }}
{{- end }}
{{- with include "workerqueue-operator.secretRef" (list $v.litellm.apiKeySecret .) }}
{{- $_ := set $config "litellm_api_key_secret" (fromYaml .) }}
{{- end }}
{{- with $v.upstream.url }}
{{- $_ := set $config "upstream_url" . }}
{{- if not $v.upstream.apiKeySecret.name }}
{{- fail "upstream.apiKeySecret.name is required with upstream.url: the operator holds the organization's key" }}
{{- end }}
{{- $_ := set $config "upstream_api_key_secret" (fromYaml (include "workerqueue-operator.secretRef" (list $v.upstream.apiKeySecret $))) }}
{{- end }}
{{- with $v.publicUrl }}
{{- $_ := set $config "public_url" . }}
{{- end }}
{{- with $v.metricsPort }}
{{- if eq (int .) (int $v.containerPort) }}
{{- fail "metricsPort must differ from containerPort (null serves /metrics on containerPort)" }}
{{- end }}
{{- $_ := set $config "metrics_port" (int .) }}
{{- end }}
{{- with $v.worker.image }}
{{- $_ := set $config "worker_image" . }}
{{- end }}
{{- with $v.worker.command }}
{{- $_ := set $config "worker_command" . }}
{{- end }}
{{- with $v.worker.podTemplate }}
{{- $_ := set $config "worker_pod_template" . }}
{{- end }}
{{- if $v.tls.enabled }}
{{- $_ := set $config "tls_cert_file" (printf "%s/tls.crt" (include "workerqueue-operator.tlsDir" .)) }}
{{- $_ := set $config "tls_key_file" (printf "%s/tls.key" (include "workerqueue-operator.tlsDir" .)) }}
{{- end }}
{{- toYaml (mergeOverwrite $config (deepCopy ($v.extraConfig | default dict))) }}
{{- end }}
