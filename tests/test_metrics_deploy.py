"""Prometheus and Grafana in docker-compose.yml scrape and chart what the processes serve.

No Docker engine here: these check the files fit together (ports, mounts, datasource,
metric names), so a renamed metric or port breaks a test, not a dashboard in production.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.metrics import MetricWrapperBase

from shelver.worker import metrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SCRAPED = ("dispatcher", "worker", "trainer", "beat")

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def services() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def exposed_names() -> set[str]:
    """Every sample name a Shelver process can serve."""
    names = {metrics.QUEUE_DEPTH, metrics.QUEUE_CLAIMED, metrics.QUEUE_OLDEST_AGE,
             metrics.WORKERS_ALIVE}  # fmt: skip
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            for family in metric.describe():
                names.update(family.name + s for s in SUFFIXES[family.type])
    return names


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bshelver_[a-z_]+", expr))


def mounts(service: dict) -> dict[str, Path]:
    """Container path -> repository path of a service's bind mounts."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            found[target] = ROOT / source
    return found


def test_every_shelver_process_serves_metrics_on_the_port_prometheus_scrapes() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    scraped = {
        (name, sd["port"])
        for job in config["scrape_configs"]
        for sd in job["dns_sd_configs"]
        for name in sd["names"]
    }
    for name in SCRAPED:
        command = services()[name]["command"]
        port = int(command[command.index("--metrics-port") + 1])
        assert (name, port) in scraped, name


def test_prometheus_mounts_its_config_and_the_alert_rules_it_loads() -> None:
    prometheus = services()["prometheus"]
    mounted = mounts(prometheus)
    config_path = mounted["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load(config_path.read_text())
    for rule_file in config["rule_files"]:
        assert mounted[rule_file].is_file(), rule_file
    assert "healthcheck" in prometheus


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    grafana = services()["grafana"]
    mounted = mounts(grafana)
    provisioning = mounted["/etc/grafana/provisioning"]
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert source["url"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in services()["prometheus"]["ports"]
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"

    provider = yaml.safe_load((provisioning / "dashboards" / "shelver.yml").read_text())
    dashboards_dir = mounted[provider["providers"][0]["options"]["path"]]
    dashboard = json.loads((dashboards_dir / "shelver.json").read_text())
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        assert panel["targets"], panel["title"]


def test_dashboard_and_alerts_use_only_metrics_shelver_exposes() -> None:
    known = exposed_names()
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "shelver.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            unknown = metric_names(target["expr"]) - known
            assert not unknown, (panel["title"], unknown)
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for rule in rules["groups"][0]["rules"]:
        unknown = metric_names(rule["expr"]) - known
        assert not unknown, (rule["alert"], unknown)


def test_every_alert_is_explained_in_the_operations_guide() -> None:
    guide = (ROOT / "docs" / "operations.md").read_text()
    section = guide.split("## Alerts worth setting", 1)[1]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for rule in rules["groups"][0]["rules"]:
        assert rule["alert"] in section, rule["alert"]
