{{/*
Names and labels. Templates that describe one component take a dict:
  root       the chart's top-level context (.)
  component  gateway | token-server | codec-worker (omit for shared objects)
*/}}

{{- define "chorus.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The object name of a component (or of the release when component is unset). */}}
{{- define "chorus.name" -}}
{{- $base := include "chorus.fullname" .root -}}
{{- if .component -}}
{{- printf "%s-%s" $base .component -}}
{{- else -}}
{{- $base -}}
{{- end -}}
{{- end -}}

{{- define "chorus.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end -}}

{{/*
No helm.sh/chart or managed-by label: deploy/k8s/ is this chart rendered, and
those manifests are applied with kubectl, not managed by Helm.
*/}}
{{- define "chorus.labels" -}}
{{ include "chorus.selectorLabels" . }}
app.kubernetes.io/part-of: chorus
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
{{- end -}}

{{/*
An image of .Values.images ("cpu", "cuda", "gateway"): dict root, kind. The
repository is the name the Dockerfile's header builds, behind images.registry
when that is set (podman's localhost/, or the registry pushed to), and pinned to
its digest when one is given.
*/}}
{{- define "chorus.image" -}}
{{- $images := .root.Values.images -}}
{{- $image := index $images .kind -}}
{{- with $images.registry }}{{ . }}/{{ end -}}
{{ $image.repository }}:{{ $image.tag | default .root.Chart.AppVersion }}
{{- with $image.digest }}@{{ . }}{{ end -}}
{{- end -}}

{{- define "chorus.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{ .Values.serviceAccount.name | default (include "chorus.fullname" .) }}
{{- else -}}
{{ .Values.serviceAccount.name | default "default" }}
{{- end -}}
{{- end -}}

{{/* Where traces go: the chosen endpoint, else the bundled Jaeger, else nowhere. */}}
{{- define "chorus.otlpEndpoint" -}}
{{- if .Values.otlpEndpoint -}}
{{ .Values.otlpEndpoint }}
{{- else if .Values.jaeger.enabled -}}
{{ include "chorus.name" (dict "root" . "component" "jaeger") }}:4317
{{- end -}}
{{- end -}}

{{/* The Secret holding a tier's certificate (cert-manager's or the user's). */}}
{{- define "chorus.tlsSecret" -}}
{{- $given := index .root.Values.tls (printf "%sSecretName" .key) -}}
{{ $given | default (printf "%s-tls" (include "chorus.name" .)) }}
{{- end -}}

{{/* host:port of a component's Service, as the other components dial it. */}}
{{- define "chorus.address" -}}
{{ include "chorus.name" . }}:{{ .port }}
{{- end -}}

{{- define "chorus.voiceStoreClaim" -}}
{{ .Values.neutts.voiceStore.existingClaim | default (printf "%s-voices" (include "chorus.fullname" .)) }}
{{- end -}}

{{- define "chorus.modelsClaim" -}}
{{ .Values.models.existingClaim | default (printf "%s-models" (include "chorus.fullname" .)) }}
{{- end -}}

{{/* Pod seconds to drain: endpoint propagation, then the service's own drain, then slack. */}}
{{- define "chorus.terminationGrace" -}}
{{ add .root.Values.preStopSleepSeconds .values.drainGraceSeconds 10 }}
{{- end -}}
