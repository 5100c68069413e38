{{/* Chart name, overridable. */}}
{{- define "modelcache.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart>, or <release> when it already contains the chart name. */}}
{{- define "modelcache.fullname" -}}
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

{{- define "modelcache.operatorName" -}}
{{- printf "%s-operator" (include "modelcache.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "modelcache.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object of the release. */}}
{{- define "modelcache.labels" -}}
helm.sh/chart: {{ include "modelcache.chart" . }}
app.kubernetes.io/name: {{ include "modelcache.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: modelcache
{{- end }}

{{/* The operator's pods. */}}
{{- define "modelcache.operatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "modelcache.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "modelcache.operatorLabels" -}}
{{ include "modelcache.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Daemon pods and Services, as the operator labels them (modelcache/operator/builders.py:
     selector_labels / common_labels). */}}
{{- define "modelcache.daemonSelectorLabels" -}}
app.kubernetes.io/name: modelcache
app.kubernetes.io/component: daemon
app.kubernetes.io/managed-by: modelcache-operator
{{- end }}

{{- define "modelcache.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "modelcache.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag or repository@digest; the tag defaults to the appVersion. */}}
{{- define "modelcache.image" -}}
{{- if .digest }}
{{- printf "%s@%s" .repository .digest }}
{{- else }}
{{- printf "%s:%s" .repository (default .appVersion .tag) }}
{{- end }}
{{- end }}

{{- define "modelcache.operatorImage" -}}
{{- include "modelcache.image" (dict "repository" .Values.image.repository "tag" .Values.image.tag "digest" .Values.image.digest "appVersion" .Chart.AppVersion) }}
{{- end }}

{{/*
The defaults ModelCaches inherit (daemon.defaults), as the JSON the operator reads from
MODELCACHE_OPERATOR_DAEMON_DEFAULTS: ModelCache spec field names, empty ones left out.
*/}}
{{- define "modelcache.daemonDefaults" -}}
{{- $d := .Values.daemon.defaults -}}
{{- $out := dict -}}
{{- if $d.image }}{{ $_ := set $out "image" (include "modelcache.daemonImage" .) }}{{ end -}}
{{- with $d.imagePullSecrets }}{{ $_ := set $out "imagePullSecrets" . }}{{ end -}}
{{- with $d.tolerations }}{{ $_ := set $out "tolerations" . }}{{ end -}}
{{- with $d.nodeSelector }}{{ $_ := set $out "nodeSelector" . }}{{ end -}}
{{- with $d.priorityClassName }}{{ $_ := set $out "priorityClassName" . }}{{ end -}}
{{- with $d.storageClassName }}{{ $_ := set $out "storageClassName" . }}{{ end -}}
{{- toJson $out -}}
{{- end }}

{{- define "modelcache.daemonImage" -}}
{{- include "modelcache.image" (dict "repository" .Values.daemon.image.repository "tag" .Values.daemon.image.tag "digest" "" "appVersion" .Chart.AppVersion) }}
{{- end }}

{{/* Namespaces the daemons live in, for monitors and NetworkPolicies. */}}
{{- define "modelcache.networkPolicyNamespaces" -}}
{{- $ns := .Values.networkPolicy.namespaces }}
{{- if not $ns }}{{ $ns = list .Release.Namespace }}{{ end }}
{{- toJson (uniq $ns) }}
{{- end }}

{{/* Labels of monitoring objects. */}}
{{- define "modelcache.monitoringLabels" -}}
{{ include "modelcache.labels" . }}
{{- with .Values.monitoring.labels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* namespaceSelector of the daemon monitors: the watched namespaces, or any. */}}
{{- define "modelcache.daemonNamespaceSelector" -}}
{{- if .Values.operator.watchNamespaces }}
matchNames:
{{- range .Values.operator.watchNamespaces }}
  - {{ . | quote }}
{{- end }}
{{- else }}
any: true
{{- end }}
{{- end }}

{{/*
The operator's RBAC rules (files/operator-rbac-rules.yaml), split by the scope of their
resources: "cluster" rules name cluster-scoped resources (bound cluster-wide), "namespaced"
rules the rest (bound per watched namespace, or cluster-wide when watching every namespace).
A namespaced operator (operator.watchNamespaces) gets no rights on ClusterKopfPeerings.
Returns {"cluster": [...], "namespaced": [...]} as JSON.
*/}}
{{- define "modelcache.rbacRules" -}}
{{- $raw := .Files.Get "files/operator-rbac-rules.yaml" }}
{{- if not $raw }}{{ fail "files/operator-rbac-rules.yaml is missing from the chart" }}{{ end }}
{{- $rules := fromYamlArray $raw }}
{{- if not $rules }}{{ fail "files/operator-rbac-rules.yaml holds no rules" }}{{ end }}
{{- $clusterScoped := list "namespaces" "nodes" "persistentvolumes" "storageclasses" "customresourcedefinitions" "clusterkopfpeerings" "clusterroles" "clusterrolebindings" "priorityclasses" }}
{{- $cluster := list }}
{{- $namespaced := list }}
{{- range $rule := $rules }}
{{- if not (kindIs "map" $rule) }}{{ fail (printf "files/operator-rbac-rules.yaml: not a rule: %v" $rule) }}{{ end }}
{{- $c := list }}
{{- $n := list }}
{{- range $r := $rule.resources }}
{{- if and $.Values.operator.watchNamespaces (eq $r "clusterkopfpeerings") }}
{{- /* a namespaced operator peers through KopfPeerings in its namespaces only */}}
{{- else if has (first (splitList "/" $r)) $clusterScoped }}{{ $c = append $c $r }}{{ else }}{{ $n = append $n $r }}{{ end }}
{{- end }}
{{- if $c }}{{ $cluster = append $cluster (merge (dict "resources" $c) (omit $rule "resources")) }}{{ end }}
{{- if $n }}{{ $namespaced = append $namespaced (merge (dict "resources" $n) (omit $rule "resources")) }}{{ end }}
{{- end }}
{{- toJson (dict "cluster" $cluster "namespaced" $namespaced) }}
{{- end }}
