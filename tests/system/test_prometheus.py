"""A real Prometheus (Debian's `prometheus`) scrapes the three services, run as
processes with --metrics-port, while they serve requests; PromQL over its HTTP API
then finds the TTFA histogram, the request counters by status, every series the
autoscalers read, and evaluates the chart's alert rules and dashboard queries.

scripts/test.sh installs the package when it is missing (CI runs as root); elsewhere
this module is skipped with the command to install it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from chorus.proto.tts.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tools.supervisor import Stack
from ports import free_port, free_port_run

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus")
NAMESPACE = "chorus-test"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PROMETHEUS is None, reason="apt-get install prometheus (scripts/test.sh does, as root)"),
]




@pytest.fixture(scope="module")
def stack(demo_models, tmp_path_factory):
    # As `chorus serve --metrics-port BASE` spreads them: gateway, token server, codec worker.
    base = free_port_run(3)
    ports = {"gateway": base, "token_server": base + 1, "codec_worker": base + 2}
    with Stack(
        calibrate=False,  # measures no capacity: start without calibrating
        models_dir=demo_models.root, slots=2, token_servers=1, codec_workers=1,
        work_dir=tmp_path_factory.mktemp("prometheus-stack"), metrics_port=base,
    ) as running:
        assert running.metrics_addresses == {"gateway": f"127.0.0.1:{base}", "token server": f"127.0.0.1:{base + 1}",
                                             "codec worker": f"127.0.0.1:{base + 2}"}
        yield running, ports


def _chart_alert_rules() -> dict:
    """The PrometheusRule the chart renders, as a Prometheus rule file (same `groups`)."""
    from test_deploy import _render

    for text in _render({"monitoring": {"prometheusRule": {"enabled": True}}}).values():
        for doc in yaml.safe_load_all(text):
            if doc and doc["kind"] == "PrometheusRule":
                return doc["spec"]
    raise AssertionError("the chart rendered no PrometheusRule")


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        return self.get("/api/v1/query", query=promql)["result"]

    def values(self, promql: str, label: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(promql)}

    def wait_for(self, promql: str, label: str, want, timeout_s: float = 60) -> dict[str, float]:
        deadline = time.monotonic() + timeout_s
        while True:
            got = self.values(promql, label)
            if want(got) or time.monotonic() > deadline:
                return got
            time.sleep(0.5)


@pytest.fixture(scope="module")
def prometheus(stack, tmp_path_factory):
    _, ports = stack
    work = tmp_path_factory.mktemp("prometheus")
    (work / "rules.yml").write_text(yaml.safe_dump(_chart_alert_rules()))
    pods = {"gateway": "chorus-gateway-0", "token_server": "chorus-token-server-0",
            "codec_worker": "chorus-codec-worker-0"}
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(work / "rules.yml")],
        "scrape_configs": [{
            "job_name": "chorus",
            # The labels a ServiceMonitor gives (prometheus-adapter's rules need them).
            "static_configs": [{"targets": [f"127.0.0.1:{ports[key]}"], "labels": {"namespace": NAMESPACE, "pod": pod}}
                               for key, pod in pods.items()],
        }],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (work / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    server = Prometheus(f"http://127.0.0.1:{port}")
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if process.poll() is not None:
                    raise AssertionError((work / "prometheus.log").read_text()[-3000:])
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def _speak_over_http(running, text: str) -> int:
    """POST /v1/audio/speech on the gateway's HTTP port; its status."""
    body = json.dumps({"model": "tts-1", "input": text, "response_format": "pcm",
                       "sampling": {"max_tokens": 7 * 4, "seed": 5}}).encode()
    request = urllib.request.Request(f"http://{running.gateway_http_address}/v1/audio/speech", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture(scope="module")
def served(stack, prometheus):
    """Requests through the gateway: two that succeed, one that is refused, and one
    over the HTTP port."""
    running, _ = stack
    sampling = common_pb2.SamplingParams(max_tokens=7 * 4, seed=5)
    with grpc.insecure_channel(running.gateway_address) as channel:
        gateway = gateway_pb2_grpc.SynthesisServiceStub(channel)
        for text in ("Counted once.", "Counted twice."):
            responses = list(gateway.Synthesize(gateway_pb2.SynthesizeRequest(text=text, sampling=sampling), timeout=120))
            assert responses[-1].WhichOneof("payload") == "summary"
        with pytest.raises(grpc.RpcError) as refused:
            list(gateway.Synthesize(gateway_pb2.SynthesizeRequest(text="Hi.", voice="nobody"), timeout=30))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _speak_over_http(running, "Counted over HTTP.") == 200
    return prometheus


def test_request_counters_by_status_in_every_service(served):
    by_code = served.wait_for(
        'sum by (code) (chorus_gateway_requests_total{api="tts.v1",method="Synthesize"})', "code",
        lambda got: got.get("OK") == 2 and got.get("INVALID_ARGUMENT") == 1,
    )
    assert by_code == {"OK": 2, "INVALID_ARGUMENT": 1}
    # The refused request never left the gateway; the two others and the HTTP one
    # crossed every tier.
    for service, method in (("token_server", "Generate"), ("codec_worker", "Decode")):
        got = served.wait_for(f'sum by (code) (chorus_{service}_requests_total{{method="{method}"}})', "code",
                              lambda got: got.get("OK") == 3)
        assert got == {"OK": 3}, service
    in_flight = served.values('sum by (method) (chorus_gateway_in_flight_requests)', "method")
    assert in_flight.get("Synthesize") == 0
    # The HTTP door's requests are in the same counter, under their own api.
    over_http = served.wait_for('sum by (code) (chorus_gateway_requests_total{api="openai",'
                                'method="POST /v1/audio/speech"})', "code", lambda got: got.get("OK") == 1)
    assert over_http == {"OK": 1}
    # The token server's own call came from the gateway, whatever door the client used.
    assert set(served.values("sum by (api) (chorus_token_server_requests_total)", "api")) == {"tts.v1"}


def test_every_service_exports_process_metrics(served):
    """CPU seconds, resident memory and open file descriptors, from each of the three."""
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
        pods = served.wait_for(f"sum by (pod) ({name})", "pod", lambda got: len(got) == 3)
        assert set(pods) == {"chorus-gateway-0", "chorus-token-server-0", "chorus-codec-worker-0"}, name
        assert all(value > 0 for value in pods.values()), (name, pods)


def test_ttfa_histogram_is_queryable(served):
    buckets = served.wait_for("sum by (le) (chorus_gateway_time_to_first_audio_seconds_bucket)", "le",
                              lambda got: got.get("+Inf") == 3)
    assert buckets["+Inf"] == 3  # the two gRPC requests that got audio, and the HTTP one
    ordered = [buckets[le] for le in sorted(buckets, key=lambda le: float(le))]
    assert ordered == sorted(ordered) and len(ordered) > 10  # cumulative buckets
    (p95,) = served.query("histogram_quantile(0.95, sum by (le) (chorus_gateway_time_to_first_audio_seconds_bucket))")
    assert 0 < float(p95["value"][1]) < 60


def test_every_series_the_autoscalers_read_is_scraped_live(served):
    from test_deploy import HPA_METRICS, adapter_inputs, adapter_rules, hpa_metric_names

    assert hpa_metric_names() == HPA_METRICS
    rules = adapter_rules()
    wanted = {name for rule in rules for name in adapter_inputs(rule)}
    found = served.wait_for(f'count by (__name__) ({{__name__=~"{"|".join(sorted(wanted))}"}})', "__name__",
                            lambda got: set(got) == wanted)
    assert set(found) == wanted
    # Each rule's query, as prometheus-adapter expands it for one namespace, gives a
    # value per pod: what the HPA of that tier reads.
    for rule in rules:
        series = re.search(r"(chorus_[a-z_]+)\{", rule["seriesQuery"]).group(1)
        promql = (rule["metricsQuery"].replace("<<.Series>>", series)
                  .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}"').replace("<<.GroupBy>>", "pod"))
        pods = served.values(promql, "pod")
        tier = series.split("_")[1] + "-" + series.split("_")[2] if "token_server" in series or "codec_worker" in series \
            else "gateway"
        assert list(pods) == [f"chorus-{tier}-0"], (rule["name"]["as"], pods)


def _alert_rules(prometheus: Prometheus) -> dict[str, dict]:
    return {r["name"]: r for g in prometheus.get("/api/v1/rules")["groups"] if g["name"] == "chorus"
            for r in g["rules"]}


def test_alert_rules_load_and_evaluate(served):
    rules = _alert_rules(served)
    assert len(rules) == 6
    deadline = time.monotonic() + 30
    while any(r.get("lastEvaluation", "").startswith("0001") for r in rules.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
        rules = _alert_rules(served)
    for name, rule in rules.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
    # Two good requests and one refused: no server error, no capacity shortage, no
    # stalled engine. (Time to first audio depends on this machine's load: not asserted.)
    quiet = {"ChorusErrorRateHigh", "ChorusCapacityExhausted", "ChorusTokenEngineStalled",
             "ChorusCodecEngineStalled", "ChorusAudioUnderruns"}
    assert {name: rules[name]["state"] for name in quiet} == dict.fromkeys(quiet, "inactive")


def test_dashboard_queries_run(served):
    dashboard = json.loads((ROOT / "deploy" / "helm" / "chorus" / "dashboards" / "chorus.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(exprs) >= 20
    empty = []
    for expr in exprs:
        promql = expr.replace("$namespace", ".*").replace("$__rate_interval", "1m")
        if not served.query(promql):
            empty.append(expr)
    # Every panel query is valid PromQL over series that exist (rates of counters that
    # have not moved yet may be empty; gauges and the request counters may not).
    gauges = [e for e in empty if "rate(" not in e]
    assert gauges == []


# Last: it stops the stack's token server.
def test_error_rate_alert_goes_pending_when_the_token_servers_are_gone(stack, served):
    running, _ = stack
    running.token_server_processes[0].stop()
    counted = 'sum by (code) (chorus_gateway_requests_total{api="tts.v1",method="Synthesize"})'
    with grpc.insecure_channel(running.gateway_address) as channel:
        gateway = gateway_pb2_grpc.SynthesisServiceStub(channel)
        for failures in (1, 2, 3):
            with pytest.raises(grpc.RpcError) as failed:
                list(gateway.Synthesize(gateway_pb2.SynthesizeRequest(text="Anyone there?"), timeout=30))
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            # One failure per scrape: rate() sees a counter grow, not a new series
            # that appeared at its final value.
            by_code = served.wait_for(counted, "code", lambda got, n=failures: got.get("UNAVAILABLE") == n)
            assert by_code["UNAVAILABLE"] == failures
    # An HTTP request fails alike and is counted where the alert's expression sees it.
    assert _speak_over_http(running, "Anyone over HTTP?") == 503
    over_http = served.wait_for('sum by (code) (chorus_gateway_requests_total{api="openai"})', "code",
                                lambda got: got.get("UNAVAILABLE") == 1)
    assert over_http["UNAVAILABLE"] == 1
    deadline = time.monotonic() + 60
    while _alert_rules(served)["ChorusErrorRateHigh"]["state"] == "inactive" and time.monotonic() < deadline:
        time.sleep(0.5)
    # Pending: its condition holds; it would fire after its `for:` of five minutes.
    assert _alert_rules(served)["ChorusErrorRateHigh"]["state"] in ("pending", "firing")
