"""The observability pack under deploy/, checked with Prometheus's own tool, and the metrics it relies on.

- deploy/prometheus/alerts.yml passes `promtool check rules` and its unit tests (`promtool test rules`);
  prometheus.yml passes `promtool check config`.
- Every metric an alert or a dashboard query names is one the gateway exports: the names come from the
  registry events/ops/metrics.py fills and the audit writer's FiguresCollector, with prometheus_client's
  suffixes (`_total` for counters, `_bucket`/`_sum`/`_count` for histograms, `_info` for info), plus the
  process collector's `process_*` and Prometheus's own `up`. Dashboard queries are valid PromQL.
- docs/metrics.md lists every metric; gateway_build_info names the release, Python and Django.
Debian's prometheus package (promtool) comes from scripts/system-packages; without it these tests fail.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import django
import pytest
import yaml
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.metrics_core import Metric

from events.ingest.audit_process import Figures, FiguresCollector
from events.ops import metrics

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "events-gateway.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count", ""),
    "info": ("_info",),
    "gauge": ("",),
}
METRIC_NAME = re.compile(r"\b((?:gateway|process)_[a-z0-9_]+|up)\b")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool is not installed: scripts/system-packages installs it (apt-get install prometheus)")
    return subprocess.run([tool, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120, check=False)


def families() -> list[Metric]:
    return [*REGISTRY.collect(), *FiguresCollector(Figures()).collect()]


def exported_names() -> set[str]:
    """Every sample name a gateway process's /metrics can carry, and `up`, which Prometheus adds."""
    names = {"up"}
    for family in families():
        names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def alert_queries() -> list[str]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


# --- promtool --------------------------------------------------------------------------------------------
def test_alert_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_rules_pass_their_unit_tests() -> None:
    result = promtool("test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {
        t["alertname"]
        for case in yaml.safe_load((PROMETHEUS_DIR / "alerts.test.yml").read_text())["tests"]
        for t in case["alert_rule_test"]
    }
    defined = {
        rule["alert"]
        for group in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
        for rule in group["rules"]
    }
    assert defined == tested, "every alert has a unit test"


def test_example_prometheus_config_passes_promtool_and_finds_consumers_by_dns() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    [consumers] = jobs["events-gateway-consumer"]["dns_sd_configs"]
    assert consumers["names"] == ["consumer"]  # the replicated service in docker-compose.yml
    assert consumers["port"] == 9108  # CONSUMER_METRICS_PORT's default
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for job in jobs.values():
        for sd in job["dns_sd_configs"]:
            assert set(sd["names"]) <= set(compose["services"]), sd["names"]


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool checks PromQL in rule files: the dashboard's queries go through it as recording rules."""
    queries = [q.replace("$__rate_interval", "5m") for q in dashboard_queries()]
    recorded = [{"record": f"q{i}", "expr": q} for i, q in enumerate(queries)]
    rules = {"groups": [{"name": "dashboard", "rules": recorded}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# --- metric names --------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_query_names_a_metric_the_gateway_exports(source: str) -> None:
    queries = dashboard_queries() if source == "dashboard" else alert_queries()
    assert queries
    named = {name for query in queries for name in METRIC_NAME.findall(query)}
    assert named - exported_names() == set()


def test_the_dashboard_shows_every_gateway_metric() -> None:
    named = {name for query in dashboard_queries() for name in METRIC_NAME.findall(query)}
    gateway = {f.name for f in families() if f.name.startswith("gateway_")}
    assert {f for f in gateway if not any(n.startswith(f) for n in named)} == set()


def test_the_metrics_reference_lists_every_metric_as_exported() -> None:
    table = METRICS_DOC.read_text()
    documented = set(re.findall(r"^\| `((?:gateway|process)_[a-z0-9_]+)`", table, re.MULTILINE))
    named = {"counter": "_total", "info": "_info"}  # histograms under their own name
    exported = {f.name + named.get(f.type, "") for f in families() if f.name.startswith("gateway_")}
    assert exported - documented == set(), "add these to docs/metrics.md"
    assert documented - exported == set(), "docs/metrics.md names metrics the gateway does not export"


def test_build_info_names_the_release_python_and_django() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == metrics.VERSION
    text = generate_latest().decode()
    expected = (
        f'gateway_build_info{{django="{django.get_version()}",python="{platform.python_version()}",'
        f'version="{project["version"]}"}} 1.0'
    )
    assert expected in text.splitlines()


# --- what the deployment files promise -----------------------------------------------------------------
def test_license_file_is_the_one_pyproject_declares() -> None:
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text
    assert "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text


def test_env_example_lists_what_the_compose_file_reads() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    read = set(re.findall(r"(?<!\$)\$\{([A-Z][A-Z0-9_]*)", compose))  # $${X} is the container shell's
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.MULTILINE))
    assert read
    assert read - documented == set()


def test_the_delivery_latency_histogram_counts_each_observation_in_its_bucket() -> None:
    def sample(suffix: str, le: str | None = None) -> float:
        labels = {"le": le} if le is not None else {}
        return REGISTRY.get_sample_value(f"gateway_delivery_latency_seconds{suffix}", labels) or 0.0

    before = {le: sample("_bucket", le) for le in ("0.001", "0.005", "1.0", "+Inf")}
    count, total = sample("_count"), sample("_sum")
    for seconds in (0.0005, 0.001, 0.003, 0.7, 100.0):  # a bound itself counts in its own bucket
        metrics.DELIVERY_LATENCY.observe(seconds)
    assert sample("_bucket", "0.001") - before["0.001"] == 2
    assert sample("_bucket", "0.005") - before["0.005"] == 3
    assert sample("_bucket", "1.0") - before["1.0"] == 4
    assert sample("_bucket", "+Inf") - before["+Inf"] == 5
    assert sample("_count") - count == 5
    assert sample("_sum") - total == pytest.approx(100.7045)
