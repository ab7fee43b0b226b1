{{/* Names and labels shared by every template. */}}

{{- define "ferry.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ferry.agent.name" -}}{{ include "ferry.fullname" . }}-agent{{- end -}}
{{- define "ferry.control.name" -}}{{ include "ferry.fullname" . }}-control{{- end -}}

{{- define "ferry.labels" -}}
app.kubernetes.io/part-of: ferry
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "ferry.agent.selector" -}}
app.kubernetes.io/name: ferry-agent
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ferry.control.selector" -}}
app.kubernetes.io/name: ferry-control
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ferry.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* ferry-control's gRPC endpoint as the agents dial it (the serving
certificate is checked against the name ferry-control, not this host). */}}
{{- define "ferry.control.url" -}}
https://{{ include "ferry.control.name" . }}.{{ .Release.Namespace }}.svc:{{ .Values.control.port }}
{{- end -}}

{{/* Environment both processes get. */}}
{{- define "ferry.commonEnv" -}}
- name: FERRY_LOG
  value: {{ .Values.logLevel | quote }}
{{- with .Values.tracing.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{/* Refuses values the binaries cannot honour, at render time. */}}
{{- define "ferry.validate" -}}
{{- if ne .Values.trustDomain "cluster.local" -}}
{{- fail (printf "trustDomain %q: ferry's binaries fix the trust domain to cluster.local today (docs/identity.md)" .Values.trustDomain) -}}
{{- end -}}
{{- if lt (int .Values.control.replicas) 1 -}}
{{- fail "control.replicas must be at least 1" -}}
{{- end -}}
{{- if gt (int64 .Values.certificates.ttlSeconds) (int64 .Values.certificates.maxTtlSeconds) -}}
{{- fail (printf "certificates.ttlSeconds (%v) is above certificates.maxTtlSeconds (%v): the CA would cap every certificate" .Values.certificates.ttlSeconds .Values.certificates.maxTtlSeconds) -}}
{{- end -}}
{{- if not (has .Values.nodeAuth.mode (list "tokenreview" "tokens")) -}}
{{- fail (printf "nodeAuth.mode %q: one of tokenreview, tokens" .Values.nodeAuth.mode) -}}
{{- end -}}
{{- if lt (int64 .Values.nodeAuth.tokenExpirationSeconds) 600 -}}
{{- fail (printf "nodeAuth.tokenExpirationSeconds (%v): Kubernetes requires at least 600" .Values.nodeAuth.tokenExpirationSeconds) -}}
{{- end -}}
{{- if not (has .Values.settings.accessLog.mode (list "off" "sampled" "full")) -}}
{{- fail (printf "settings.accessLog.mode %q: one of off, sampled, full" .Values.settings.accessLog.mode) -}}
{{- end -}}
{{- end -}}
