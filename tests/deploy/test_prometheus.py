"""deploy/prometheus.yml and the Grafana provisioning + dashboard.

* ``promtool check config`` (Debian package ``prometheus``; `make test` unpacks promtool into
  the venv when it is missing) accepts the config, and rejects a broken copy;
* every flowrl service with a /metrics endpoint has a scrape job;
* every panel of the dashboard queries only metric names the code defines (grepped from
  services/ and trainer/: ``Counter("name"``, ``Histogram(``, ``Gauge(`` ...), plus an explicit short list
  of metrics that other programs export (Prometheus' ``up``, the DCGM exporter's GPU gauges);
* the dashboard refers to the provisioned datasource by its fixed uid.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.composefile import ROOT

PROMETHEUS = ROOT / "deploy/prometheus.yml"
DASHBOARDS = sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))
DATASOURCES = ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml"
# Metric names that flowrl does not define but a panel may query, and who exports them.
EXTERNAL = {
    "up": "Prometheus itself, one series per scrape target",
    "DCGM_FI_DEV_GPU_UTIL": "NVIDIA dcgm-exporter (docker compose --profile dcgm)",
    "DCGM_FI_DEV_FB_USED": "NVIDIA dcgm-exporter (docker compose --profile dcgm)",
}
# The sample names prometheus_client writes for each metric type (besides the *_created series).
SUFFIXES = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"],
            "summary": ["", "_sum", "_count"]}
DEFINITION = re.compile(r"\b(Counter|Gauge|Histogram|Summary)\(\s*[\"']([a-zA-Z_:][a-zA-Z0-9_:]*)[\"']")


def _promtool() -> str:
    found = shutil.which("promtool") or str(Path(sys.executable).with_name("promtool"))
    if not Path(found).exists():
        pytest.fail("promtool is not installed: `make venv` unpacks it from Debian's `prometheus` package "
                    "into .venv/bin, or `apt-get install prometheus`")
    return found


def defined_metrics() -> dict[str, str]:
    """``{name: type}`` of every metric constructed in services/ and trainer/ (the name as passed
    to the constructor, i.e. without the ``_total`` prometheus_client adds to counters)."""
    found = {}
    for path in sorted([*(ROOT / "services").rglob("*.py"), *(ROOT / "trainer").rglob("*.py")]):
        for kind, name in DEFINITION.findall(path.read_text()):
            found[name.removesuffix("_total") if kind == "Counter" else name] = kind.lower()
    return found


def series_names() -> set[str]:
    return {name + suffix for name, kind in defined_metrics().items() for suffix in SUFFIXES[kind]}


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
             "unless", "le", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (identifiers that are not functions, label
    names, keywords, durations or strings)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)                       # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)                               # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)                              # range / subquery windows
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        rest = expr[m.end():].lstrip()
        if rest.startswith("(") or m.group(0).lower() in _KEYWORDS:
            continue  # a function call or a keyword
        if m.start() > 0 and (expr[m.start() - 1].isdigit() or expr[m.start() - 1] == "."):
            continue  # the exponent / unit of a number, e.g. 1e3
        names.add(m.group(0))
    return names


def dashboard_exprs(dashboard: dict):
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                yield inner["title"], target["expr"]


# --- Prometheus ---------------------------------------------------------------------------------


@pytest.mark.integration
def test_promtool_accepts_the_config_and_rejects_a_broken_one(tmp_path):
    promtool = _promtool()
    # The bearer token file exists at run time (a compose secret); promtool insists on reading it.
    token = tmp_path / "token"
    token.write_text("t")
    config = tmp_path / "prometheus.yml"
    config.write_text(PROMETHEUS.read_text().replace("/run/secrets/flowrl_api_token", str(token)))
    ok = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(config.read_text().replace("dns_sd_configs:", "dns_sd_config:", 1))
    bad = subprocess.run([promtool, "check", "config", str(broken)], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "dns_sd_config" in bad.stdout + bad.stderr, bad.stdout + bad.stderr


def test_every_metrics_endpoint_has_a_scrape_job():
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert len(jobs) == len(config["scrape_configs"]), "duplicate job names"
    for name, port in [("flowrl-sampler", 9101), ("flowrl-reward-worker", 9102), ("flowrl-trainer", 9200),
                       ("flowrl-reward", 8000), ("flowrl-preview", 8001), ("dcgm", 9400)]:
        job = jobs[name]
        assert job.get("metrics_path", "/metrics") == "/metrics"
        assert [sd["port"] for sd in job["dns_sd_configs"]] == [port], name
    for name in ("flowrl-reward", "flowrl-preview"):
        assert jobs[name]["authorization"]["type"] == "Bearer", f"{name}: the server's /metrics needs the token"


# --- Grafana ------------------------------------------------------------------------------------


def test_metric_grep_matches_what_the_registries_expose():
    """The grep sees every metric the services register (so a new definition style cannot
    slip past it): compare with the families the two registries really collect."""
    from prometheus_client import REGISTRY

    import services.reward.worker_app  # noqa: F401  (registers the reward worker metrics)
    import services.sampler.app  # noqa: F401  (registers the sampler metrics)
    from services.reward.metrics import Metrics
    from services.sampler.server import ServeMetrics
    from trainer.metrics import TrainerMetrics

    live = {(f.name, f.type) for f in Metrics().registry.collect()}
    live |= {(f.name, f.type) for f in ServeMetrics().registry.collect()}
    live |= {(f.name, f.type) for f in TrainerMetrics().registry.collect()}
    live |= {(f.name, f.type) for f in REGISTRY.collect() if f.name.startswith("flowrl_")}
    assert live == set(defined_metrics().items())


def test_promql_name_extraction():
    assert metric_names('histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{job="x"}[5m])))') == {"a_bucket"}
    assert metric_names("max(b) - min(b) * 1e3 + sum without (gpu) (c_total offset 5m)") == {"b", "c_total"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_queries_only_defined_metrics(path):
    dashboard = json.loads(path.read_text())
    known = series_names() | set(EXTERNAL)
    exprs = list(dashboard_exprs(dashboard))
    assert exprs, "a dashboard without queries"
    for title, expr in exprs:
        unknown = metric_names(expr) - known
        assert not unknown, f"panel {title!r} queries {sorted(unknown)}, which nothing exports ({expr})"
    used = set().union(*(metric_names(e) for _, e in exprs))
    missing = {n for n, kind in defined_metrics().items() if not any(n + x in used for x in SUFFIXES[kind])}
    assert not missing, f"metrics the services export but no panel shows: {sorted(missing)}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_uses_the_provisioned_datasource(path):
    text = path.read_text()
    assert "${DS_" not in text and "__inputs" not in text, "an 'exported for sharing' dashboard: file provisioning cannot resolve its inputs"
    dashboard = json.loads(text)
    assert dashboard["uid"] and dashboard.get("id") is None
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    for panel in dashboard["panels"]:
        for item in [panel, *panel.get("targets", [])]:
            if "datasource" in item:
                assert item["datasource"] == {"type": "prometheus", "uid": source["uid"]}, panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
