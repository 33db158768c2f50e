{{/*
The three services are deployed alike (gRPC health, SIGTERM drain, metrics, one
ServiceAccount), so one Deployment, Service, PodDisruptionBudget and
HorizontalPodAutoscaler template serves all. They take the component dict of
_helpers.tpl plus:
  key         the component's key in .Values.tls (gateway, tokenServer, codecWorker)
  values      the component's values (port, replicas, drainGraceSeconds, resources...)
  command     the console script the image runs (chorus-gateway...)
  image       images.<kind> to run when the tier has no GPU
  env         extra environment, name -> value
  models      mount the models volume (the gateway has no weights)
  headless    Service without a cluster IP
  metrics     the HPA's Pods metrics: list of dict name, target
  httpPort    the gateway's HTTP port (OpenAI endpoint, page); unset or 0: none
  identity    the component whose TLS identity the pods present (its Secret, its
              tier name in probes); unset: their own. A second family's pool is
              a token server or codec worker to its peers, so it is one to TLS.
  backbone, snacDir, demoArgs
              the model files the init container waits for, and what it adds to
              `chorus models demo`; unset: the Orpheus pool's
  voiceStore  mount the voice store: "read" or "write"; unset: not mounted
*/}}

{{/*
How the kubelet asks a service's gRPC health: dict tls, tier, port, timeout (the
probe's timeoutSeconds). The kubelet's own grpc probe speaks plaintext only, and a
TLS port fails its handshake (UNAVAILABLE), so with TLS the pod checks itself with
python -m chorus.rpc.probe, which reads the pod's CHORUS_TLS_* and presents the pod's
own certificate; --tier is the name the certificate is checked against. Its own
deadline is a second under the kubelet's, so a slow answer reports why instead of
being killed.
*/}}
{{- define "chorus.probeHandler" -}}
{{- if .tls -}}
exec:
  command: [python, -m, chorus.rpc.probe, --tier, {{ .tier }}, --port, {{ .port | quote }},
            --timeout, {{ sub .timeout 1 | quote }}]
{{- else -}}
grpc:
  port: {{ .port }}
{{- end -}}
{{- end -}}

{{- define "chorus.deployment" -}}
{{- $root := .root -}}
{{- $v := .values -}}
{{- $grace := include "chorus.terminationGrace" . | int -}}
{{- $resources := deepCopy $v.resources -}}
{{- $tolerations := $v.tolerations -}}
{{- $gpu := and (hasKey $v "gpu") $v.gpu.enabled -}}
{{- $image := ternary "cuda" .image $gpu -}}
{{- if $gpu -}}
{{- $_ := set $resources "limits" (merge (dict "nvidia.com/gpu" $v.gpu.count) (default (dict) $resources.limits)) -}}
{{- $tolerations = append $tolerations (dict "key" "nvidia.com/gpu" "operator" "Exists" "effect" "NoSchedule") -}}
{{- end -}}
{{- $tls := $root.Values.tls.enabled -}}
{{- $identity := .identity | default .component -}}
{{- $probe := dict "tls" $tls "tier" (printf "chorus-%s" $identity) "port" $v.port -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "chorus.name" . }}
  labels:
    {{- include "chorus.labels" . | nindent 4 }}
spec:
  {{- if not $v.autoscaling.enabled }}
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
        {{- if $root.Values.monitoring.podAnnotations }}
        prometheus.io/scrape: "true"
        prometheus.io/port: {{ $root.Values.metricsPort | quote }}
        prometheus.io/path: /metrics
        {{- end }}
        {{- with $v.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "chorus.serviceAccountName" $root }}
      # The services call no Kubernetes API: no token in the pod.
      automountServiceAccountToken: false
      # preStop sleep + the service's drain + slack; the service stops on its
      # own before the kubelet's SIGKILL.
      terminationGracePeriodSeconds: {{ $grace }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      {{- if .models }}
      initContainers:
        {{- if eq $root.Values.models.source "demo" }}
        # Same seed, same bytes: every pod builds identical demo weights.
        - name: demo-models
          image: {{ include "chorus.image" (dict "root" $root "kind" "cpu") }}
          imagePullPolicy: {{ $root.Values.images.pullPolicy }}
          command: [chorus, models, demo, --dir, {{ $root.Values.models.mountPath }}{{ range .demoArgs }}, {{ . }}{{ end }}]
        {{- else }}
        # The weights may still be on their way (models.fetch): start once they are there.
        - name: wait-for-models
          image: {{ include "chorus.image" (dict "root" $root "kind" $image) }}
          imagePullPolicy: {{ $root.Values.images.pullPolicy }}
          command: [python, -m, tools.fetch_models, --wait, --dir, {{ $root.Values.models.mountPath }},
                    --backbone-name, {{ .backbone | default $root.Values.models.backbone }},
                    --snac-name, {{ .snacDir | default $root.Values.models.snacDir }}]
        {{- end }}
          env:
            - name: HOME
              value: /tmp
          resources:
            {{- toYaml $v.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: models
              mountPath: {{ $root.Values.models.mountPath }}
              readOnly: {{ ne $root.Values.models.source "demo" }}
            - name: tmp
              mountPath: /tmp
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ include "chorus.image" (dict "root" $root "kind" $image) }}
          imagePullPolicy: {{ $root.Values.images.pullPolicy }}
          command: [{{ .command }}]
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
            {{- if $tls }}
            - name: CHORUS_TLS_CERT
              value: /etc/chorus/tls/tls.crt
            - name: CHORUS_TLS_KEY
              value: /etc/chorus/tls/tls.key
            - name: CHORUS_TLS_CA
              value: /etc/chorus/tls/ca.crt
            {{- end }}
            {{- if and (eq .component "gateway") $v.apiKeysSecret }}
            - name: CHORUS_API_KEYS_FILE
              value: /etc/chorus/api-keys/keys
            {{- end }}
            {{- with $v.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          ports:
            - name: grpc
              containerPort: {{ $v.port }}
            {{- with .httpPort }}
            - name: http
              containerPort: {{ . }}
            {{- end }}
            - name: metrics
              containerPort: {{ $root.Values.metricsPort }}
          # All three probes ask the gRPC health service, which reports
          # NOT_SERVING during warm-up and drain (over TLS when tls.enabled).
          startupProbe:
            {{- include "chorus.probeHandler" (merge (dict "timeout" 3) $probe) | nindent 12 }}
            periodSeconds: 5
            timeoutSeconds: 3
            # Model load and warm-up: up to 10 minutes.
            failureThreshold: 120
          readinessProbe:
            {{- include "chorus.probeHandler" (merge (dict "timeout" 3) $probe) | nindent 12 }}
            periodSeconds: 5
            # A busy pod can be slow to answer; slow is not unready.
            timeoutSeconds: 3
            failureThreshold: 2
          livenessProbe:
            {{- include "chorus.probeHandler" (merge (dict "timeout" 5) $probe) | nindent 12 }}
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
          # The CPU limit is also the services' thread count: they read their
          # cgroup quota.
          resources:
            {{- toYaml $resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            {{- if .models }}
            - name: models
              mountPath: {{ $root.Values.models.mountPath }}
              readOnly: true
            {{- end }}
            {{- if $tls }}
            - name: tls
              mountPath: /etc/chorus/tls
              readOnly: true
            {{- end }}
            {{- if and (eq .component "gateway") $v.apiKeysSecret }}
            - name: api-keys
              mountPath: /etc/chorus/api-keys
              readOnly: true
            {{- end }}
            {{- if .voiceStore }}
            - name: voices
              mountPath: {{ $root.Values.neutts.voiceStore.mountPath }}
              readOnly: {{ eq .voiceStore "read" }}
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
        {{- if $tls }}
        - name: tls
          secret:
            secretName: {{ include "chorus.tlsSecret" (dict "root" $root "component" $identity "key" .key) }}
        {{- end }}
        {{- if and (eq .component "gateway") $v.apiKeysSecret }}
        # Mounted as a directory, not a subPath: Kubernetes then updates the file
        # in place when the Secret changes, and the gateway re-reads it.
        - name: api-keys
          secret:
            secretName: {{ $v.apiKeysSecret }}
        {{- end }}
        {{- if .voiceStore }}
        - name: voices
          persistentVolumeClaim:
            claimName: {{ include "chorus.voiceStoreClaim" $root }}
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
  {{- with (and (not .headless) .values.service.annotations) }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
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
    {{- with .httpPort }}
    - name: http
      port: {{ . }}
      targetPort: http
      # HTTPS with the gateway's certificate when TLS is on: never plaintext then.
      appProtocol: {{ ternary "https" "http" $.root.Values.tls.enabled }}
    {{- end }}
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

{{/*
Pods metrics come from prometheus-adapter with the rules in
deploy/prometheus-adapter/values.yaml; each names a metric a service exports
(or, for a ratio, the metrics it is computed from).
*/}}
{{- define "chorus.hpa" -}}
{{- $a := .values.autoscaling -}}
{{- if gt (int $a.minReplicas) (int $a.maxReplicas) }}
{{- fail (printf "%s: autoscaling.minReplicas must not exceed maxReplicas" .component) }}
{{- end }}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "chorus.name" . }}
  labels:
    {{- include "chorus.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "chorus.name" . }}
  minReplicas: {{ $a.minReplicas }}
  maxReplicas: {{ $a.maxReplicas }}
  # The largest count any metric asks for wins.
  metrics:
    {{- range .metrics }}
    - type: Pods
      pods:
        metric:
          name: {{ .name }}
        target:
          type: AverageValue
          averageValue: {{ .target | quote }}
    {{- end }}
  behavior:
    # Up at once: a stream that waits for capacity underruns.
    scaleUp:
      stabilizationWindowSeconds: 0
      policies:
        - type: Percent
          value: 100
          periodSeconds: 30
    # Down slowly, a pod at a time: each removal drains its streams.
    scaleDown:
      stabilizationWindowSeconds: 300
      policies:
        - type: Pods
          value: 1
          periodSeconds: 60
{{- end -}}

{{/* Deployment, Service, PodDisruptionBudget and (when on) HPA of one component. */}}
{{- define "chorus.component" -}}
{{ include "chorus.deployment" . }}
---
{{ include "chorus.service" . }}
---
{{ include "chorus.pdb" . }}
{{- if .values.autoscaling.enabled }}
---
{{ include "chorus.hpa" . }}
{{- end }}
{{- end -}}
