{{/*
The three services are deployed alike (one image, gRPC health, SIGTERM drain,
metrics), so one Deployment, Service and PodDisruptionBudget template serves all.
They take the component dict of _helpers.tpl plus:
  values      the component's values (port, replicas, drainGraceSeconds, resources...)
  module      what `python -m` runs
  autoscaled  leave replicas to an HPA
  env         extra environment, name -> value
  models      mount the models volume (the gateway has no weights)
  gpu         nvidia.com/gpu per pod, 0 for none (codec worker only)
  headless    Service without a cluster IP
*/}}

{{- define "chorus.deployment" -}}
{{- $root := .root -}}
{{- $v := .values -}}
{{- $grace := include "chorus.terminationGrace" . | int -}}
{{- $resources := deepCopy $v.resources -}}
{{- $tolerations := $v.tolerations -}}
{{- if .gpu -}}
{{- $_ := set $resources "limits" (merge (dict "nvidia.com/gpu" .gpu) (default (dict) $resources.limits)) -}}
{{- $tolerations = append $tolerations (dict "key" "nvidia.com/gpu" "operator" "Exists" "effect" "NoSchedule") -}}
{{- end -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "chorus.name" . }}
  labels:
    {{- include "chorus.labels" . | nindent 4 }}
spec:
  {{- if not .autoscaled }}
  replicas: {{ $v.replicas }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "chorus.selectorLabels" . | nindent 6 }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      # Start the new pod before an old one drains: capacity never dips, and
      # warm-up (model load) happens while the old pod still serves.
      maxSurge: 1
      maxUnavailable: 0
  template:
    metadata:
      labels:
        {{- include "chorus.labels" . | nindent 8 }}
      annotations:
        # Roll the pods when the shared environment changes.
        checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
        prometheus.io/scrape: "true"
        prometheus.io/port: {{ $root.Values.metricsPort | quote }}
        prometheus.io/path: /metrics
    spec:
      # preStop sleep + the service's drain + slack; the service stops on its
      # own before the kubelet's SIGKILL.
      terminationGracePeriodSeconds: {{ $grace }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      {{- if and .models (eq $root.Values.models.source "demo") }}
      initContainers:
        # Same seed, same bytes: every pod builds identical demo weights.
        - name: demo-models
          image: {{ include "chorus.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: [python, -m, tools.cli, models, demo, --dir, {{ $root.Values.models.mountPath }}]
          env:
            - name: HOME
              value: /tmp
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: models
              mountPath: {{ $root.Values.models.mountPath }}
            - name: tmp
              mountPath: /tmp
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ include "chorus.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: [python, -m, {{ .module }}]
          envFrom:
            - configMapRef:
                name: {{ include "chorus.name" (dict "root" $root "component" "config") }}
          env:
            - name: CHORUS_PORT
              value: {{ $v.port | quote }}
            - name: CHORUS_DRAIN_SECONDS
              value: {{ $v.drainGraceSeconds | quote }}
            # The root filesystem is read-only; libraries that cache under
            # $HOME write to the scratch volume instead.
            - name: HOME
              value: /tmp
            {{- range $name, $value := .env }}
            - name: {{ $name }}
              value: {{ $value | quote }}
            {{- end }}
          ports:
            - name: grpc
              containerPort: {{ $v.port }}
            - name: metrics
              containerPort: {{ $root.Values.metricsPort }}
          # All three probes ask the gRPC health service, which reports
          # NOT_SERVING during warm-up and drain.
          startupProbe:
            grpc:
              port: {{ $v.port }}
            periodSeconds: 5
            timeoutSeconds: 3
            # Model load and warm-up: up to 10 minutes.
            failureThreshold: 120
          readinessProbe:
            grpc:
              port: {{ $v.port }}
            periodSeconds: 5
            # A busy 2-core pod can be slow to answer; slow is not unready.
            timeoutSeconds: 3
            failureThreshold: 2
          livenessProbe:
            grpc:
              port: {{ $v.port }}
            periodSeconds: 10
            # Outlasts terminationGracePeriodSeconds, so that NOT_SERVING while
            # draining never turns into a restart that cuts streams.
            failureThreshold: {{ add1 (div $grace 10) }}
            timeoutSeconds: 5
          lifecycle:
            preStop:
              # Keep serving while the endpoint removal reaches callers; SIGTERM
              # (NOT_SERVING, drain) follows.
              exec:
                command: [sleep, {{ $root.Values.preStopSleepSeconds | quote }}]
          resources:
            {{- toYaml $resources | nindent 12 }}
          {{- if and (hasKey . "gpu") (not .gpu) }}
          # GPU pool: set codec.gpu.enabled=true in the Helm chart, or add
          # `nvidia.com/gpu: 1` under limits and the nvidia.com/gpu toleration.
          {{- end }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            {{- if .models }}
            - name: models
              mountPath: {{ $root.Values.models.mountPath }}
              readOnly: true
            {{- end }}
            - name: tmp
              mountPath: /tmp
      volumes:
        {{- if .models }}
        - name: models
          {{- if eq $root.Values.models.source "demo" }}
          emptyDir: {}
          {{- else }}
          persistentVolumeClaim:
            claimName: {{ include "chorus.modelsClaim" $root }}
            readOnly: true
          {{- end }}
        {{- end }}
        - name: tmp
          emptyDir: {}
      # Spread replicas over nodes so that one node going away takes few streams.
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: ScheduleAnyway
          labelSelector:
            matchLabels:
              {{- include "chorus.selectorLabels" . | nindent 14 }}
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}

{{- define "chorus.service" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "chorus.name" . }}
  labels:
    {{- include "chorus.labels" . | nindent 4 }}
spec:
  {{- if .headless }}
  # Headless: DNS answers with every ready pod, so the caller spreads its
  # streams over pods. Through a cluster IP, gRPC's one long-lived connection
  # would pin all of a caller's streams to one pod.
  clusterIP: None
  {{- else }}
  type: {{ .values.service.type }}
  {{- end }}
  selector:
    {{- include "chorus.selectorLabels" . | nindent 4 }}
  ports:
    - name: grpc
      port: {{ .values.port }}
      targetPort: grpc
      appProtocol: grpc
    - name: metrics
      port: {{ .root.Values.metricsPort }}
      targetPort: metrics
{{- end -}}

{{- define "chorus.pdb" -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "chorus.name" . }}
  labels:
    {{- include "chorus.labels" . | nindent 4 }}
spec:
  # maxUnavailable rather than minAvailable: it keeps working as the HPA
  # changes the replica count, and never blocks a drain of a 1-replica install.
  maxUnavailable: {{ .values.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "chorus.selectorLabels" . | nindent 6 }}
{{- end -}}

{{/* Deployment, Service and PodDisruptionBudget of one component. */}}
{{- define "chorus.component" -}}
{{ include "chorus.deployment" . }}
---
{{ include "chorus.service" . }}
---
{{ include "chorus.pdb" . }}
{{- end -}}
