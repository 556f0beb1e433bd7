{{/*
  Copied into the chart by `python -m codegen chart`. What the manifests generator
  (codegen/manifests.py) works out in Python for a whole deployment, helm works out here
  from the values; codegen/chart.py names these where the templates need them.
*/}}

{{/* The namespace of every namespaced object: the values', else the release's. */}}
{{- define "kyb-device-plugin.namespace" -}}
{{- .Values.namespace | default .Release.Namespace -}}
{{- end -}}

{{/*
  (list $ $pool NAME): NAME with one pool, NAME-<pool> with several (as
  manifests.pool_view names the DaemonSet and the ConfigMap).
*/}}
{{- define "kyb-device-plugin.pooled" -}}
{{- $root := index . 0 -}}
{{- index . 2 -}}{{- if gt (len $root.Values.pools) 1 -}}-{{ (index . 1).name }}{{- end -}}
{{- end -}}

{{/* Every seat resource some pool serves, sorted, as a CEL list of strings. */}}
{{- define "kyb-device-plugin.seatResourcesCel" -}}
{{- $resources := list -}}
{{- range .Values.pools -}}
{{- range .config.profiles -}}
{{- $resources = append $resources (printf "'%s'" .resource) -}}
{{- end -}}
{{- end -}}
[{{ $resources | uniq | sortAlpha | join ", " }}]
{{- end -}}
