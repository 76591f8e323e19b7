{{- define "aob.labels" -}}
app.kubernetes.io/name: aob
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "aob.image" -}}
{{ printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The environment every AOB container reads. */}}
{{- define "aob.env" -}}
{{- if .Values.nats.urlSecret }}
- name: NATS_URL
  valueFrom:
    secretKeyRef: {name: {{ .Values.nats.urlSecret }}, key: url}
{{- else }}
- name: NATS_URL
  value: {{ .Values.nats.url | quote }}
{{- end }}
{{- if .Values.nats.caSecret }}
- name: AOB_NATS_CA
  value: /etc/aob/nats-ca/ca.pem
{{- end }}
{{- if .Values.http.port }}
- name: AOB_HTTP_ADDR
  value: {{ printf "0.0.0.0:%v" .Values.http.port | quote }}
{{- end }}
- name: AOB_PAYLOAD_URL
  value: {{ .Values.storage.payloadUrl | quote }}
- name: AOB_AUDIT_URL
  value: {{ .Values.storage.auditUrl | quote }}
- name: AOB_KB_URL
  value: {{ .Values.storage.kbUrl | quote }}
{{- if .Values.models.configMap }}
- name: AOB_MODELS
  value: /etc/aob/models/models.yaml
{{- end }}
{{- if .Values.tools.configMap }}
- name: AOB_TOOLS
  value: /etc/aob/tools/tools.yaml
{{- end }}
{{- if .Values.embeddingModel.persistentVolumeClaim }}
- name: AOB_EMBED_MODEL_DIR
  value: /var/lib/aob/model
{{- end }}
{{- range $k, $v := .Values.env }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- end }}

{{- define "aob.envFrom" -}}
{{- range .Values.envFromSecrets }}
- secretRef: {name: {{ . }}}
{{- end }}
{{- end }}

{{- define "aob.volumeMounts" -}}
{{- if .Values.nats.caSecret }}
- {name: nats-ca, mountPath: /etc/aob/nats-ca, readOnly: true}
{{- end }}
{{- if .Values.models.configMap }}
- {name: models, mountPath: /etc/aob/models, readOnly: true}
{{- end }}
{{- if .Values.tools.configMap }}
- {name: tools, mountPath: /etc/aob/tools, readOnly: true}
{{- end }}
{{- if .Values.embeddingModel.persistentVolumeClaim }}
- {name: model, mountPath: /var/lib/aob/model, readOnly: true}
{{- end }}
{{- end }}

{{- define "aob.volumes" -}}
{{- if .Values.nats.caSecret }}
- name: nats-ca
  secret: {secretName: {{ .Values.nats.caSecret }}}
{{- end }}
{{- if .Values.models.configMap }}
- name: models
  configMap: {name: {{ .Values.models.configMap }}}
{{- end }}
{{- if .Values.tools.configMap }}
- name: tools
  configMap: {name: {{ .Values.tools.configMap }}}
{{- end }}
{{- if .Values.embeddingModel.persistentVolumeClaim }}
- name: model
  persistentVolumeClaim: {claimName: {{ .Values.embeddingModel.persistentVolumeClaim }}, readOnly: true}
{{- end }}
{{- end }}

{{/* A Deployment running one AOB binary. Arguments: root context, name, binary, replicas, resources. */}}
{{- define "aob.deployment" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- $binary := index . 2 -}}
{{- $replicas := index . 3 -}}
{{- $resources := index . 4 -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ printf "%s-%s" $root.Release.Name $name | trunc 63 | trimSuffix "-" }}
  labels:
    {{- include "aob.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ $name }}
spec:
  replicas: {{ $replicas }}
  selector:
    matchLabels:
      app.kubernetes.io/instance: {{ $root.Release.Name }}
      app.kubernetes.io/component: {{ $name }}
  template:
    metadata:
      labels:
        {{- include "aob.labels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ $name }}
      {{- if $root.Values.http.port }}
      annotations:
        prometheus.io/scrape: "true"
        prometheus.io/port: {{ $root.Values.http.port | quote }}
        prometheus.io/path: /metrics
      {{- end }}
    spec:
      # A pod stopping finishes its work in flight: the binaries drain on SIGTERM.
      terminationGracePeriodSeconds: 60
      securityContext:
        runAsNonRoot: true
        runAsUser: 10001
      containers:
        - name: {{ $name }}
          image: {{ include "aob.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: [{{ $binary | quote }}]
          env:
            {{- include "aob.env" $root | nindent 12 }}
          {{- with (include "aob.envFrom" $root) }}
          envFrom:
            {{- . | nindent 12 }}
          {{- end }}
          {{- with (include "aob.volumeMounts" $root) }}
          volumeMounts:
            {{- . | nindent 12 }}
          {{- end }}
          {{- if $root.Values.http.port }}
          ports:
            - {name: http, containerPort: {{ $root.Values.http.port }}}
          livenessProbe:
            httpGet: {path: /healthz, port: http}
            periodSeconds: 10
          readinessProbe:
            httpGet: {path: /readyz, port: http}
            periodSeconds: 5
          {{- end }}
          resources:
            {{- toYaml $resources | nindent 12 }}
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
      {{- with (include "aob.volumes" $root) }}
      volumes:
        {{- . | nindent 8 }}
      {{- end }}
{{- end }}
