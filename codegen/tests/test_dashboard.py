"""The Grafana dashboard (issue 15 point 6): generated and fresh, loads as a dashboard,
and its queries name only what the plugin exports and the generated PodMonitor adds."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from codegen import dashboard, manifests
from codegen.tests.test_manifests import THREE_POOLS, _copy_repo, _with_deployment
from pkg.deviceplugin.metrics import Metrics

REPO_ROOT = Path(__file__).resolve().parents[2]

# What PromQL itself brings: the functions and keywords the dashboard may use.
PROMQL = frozenset(
    {
        "sum",
        "count",
        "max",
        "min",
        "avg",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "rate",
        "increase",
        "histogram_quantile",
        "label_values",
        "and",
        "or",
        "unless",
    }
)


@pytest.fixture(scope="module")
def exported() -> dict[str, frozenset[str]]:
    """Every series name the plugin's real registry serves, with its labels, every
    collector fed (a status with a holder, a GPU, one event of each kind)."""
    status = {
        "resources": {
            "kyb.ai/r": {
                "groups": {
                    "G0": {
                        "gpus": [0],
                        "uuids": ["GPU-0"],
                        "seats": {
                            "G0-s0": {
                                "state": "held",
                                "generation": 1,
                                "holder": {"namespace": "n", "pod": "p", "container": "c"},
                            }
                        },
                    }
                }
            }
        }
    }

    @dataclass(frozen=True)
    class Gpu:
        index: int = 0
        uuid: str = "GPU-0"
        healthy: bool = True

    metrics = Metrics(status=lambda: status, gpu_health=lambda: [Gpu()])
    metrics.observe_allocate("kyb.ai/r", 0.001, ok=False)
    metrics.observe_preferred("kyb.ai/r", 0.001)
    metrics.registered("kyb.ai/r", first=True)
    metrics.config_reload(accepted=True)
    labels: dict[str, frozenset[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            labels[sample.name] = labels.get(sample.name, frozenset()) | set(sample.labels)
    return labels


@pytest.fixture(scope="module")
def target_labels(tmp_path_factory: pytest.TempPathFactory) -> frozenset[str]:
    """The labels the generated PodMonitor's relabelings give every target."""
    root = _with_deployment(_copy_repo(tmp_path_factory.mktemp("repo")), THREE_POOLS)
    rendered = manifests.generate(root)
    docs = yaml.safe_load_all(rendered[f"{manifests.OUTPUT_ROOT}/metrics.yaml"])
    monitors = [doc for doc in docs if doc and doc["kind"] == "PodMonitor"]
    assert monitors
    return frozenset(
        relabel["targetLabel"]
        for monitor in monitors
        for endpoint in monitor["spec"]["podMetricsEndpoints"]
        for relabel in endpoint.get("relabelings", ())
    )


@pytest.fixture(scope="module")
def board() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((REPO_ROOT / dashboard.PATH).read_text())
    return loaded


def queries(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    for panel in board["panels"]:
        for target in panel["targets"]:
            yield f"panel {panel['title']!r}", target["expr"]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            yield f"variable {variable['name']}", variable["query"]["query"]


def names(query: str) -> tuple[set[str], set[str]]:
    """The metric names and label names a PromQL query uses (string literals, Grafana
    variables and range durations taken out first)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', query)
    text = re.sub(r"\$\w+|\[[^\]]*\]", " ", text)
    labels = set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", text))
    for group in re.findall(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text
    ):
        labels |= {label.strip() for label in group.split(",") if label.strip()}
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    label_values = re.findall(r"label_values\([^,]*,\s*(\w+)\)", text)
    labels |= set(label_values)
    for label in label_values:
        text = re.sub(rf",\s*{label}\)", ")", text)
    identifiers = set(re.findall(r"\b[A-Za-z_:][\w:]*\b", text))
    return identifiers - PROMQL, labels


def test_the_committed_dashboard_is_what_the_generator_writes() -> None:
    rendered = manifests.generate(REPO_ROOT)[str(dashboard.PATH)]
    assert (REPO_ROOT / dashboard.PATH).read_bytes() == rendered
    assert not dashboard.PATH.is_relative_to(manifests.OUTPUT_ROOT)  # kubectl apply -f skips it


def test_the_dashboard_loads_as_a_grafana_dashboard_with_a_datasource_variable(
    board: dict[str, Any],
) -> None:
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    assert board["uid"] and board["title"]
    (source,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert (source["name"], source["query"]) == ("datasource", "prometheus")
    uses = {"type": "prometheus", "uid": "${datasource}"}
    assert board["panels"]
    for panel in board["panels"]:
        assert panel["datasource"] == uses, panel["title"]
        assert panel["targets"], panel["title"]
        assert all(t["datasource"] == uses for t in panel["targets"]), panel["title"]
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"] == uses
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))


def test_every_query_names_only_exported_metrics_and_their_labels(
    board: dict[str, Any], exported: dict[str, frozenset[str]], target_labels: frozenset[str]
) -> None:
    assert dashboard.NODE_LABEL in target_labels
    problems = []
    for where, query in queries(board):
        metrics, labels = names(query)
        problems += [f"{where}: {m} is not exported" for m in sorted(metrics - exported.keys())]
        known = target_labels.union(*(exported.get(m, ()) for m in metrics))
        problems += [
            f"{where}: no {sorted(metrics)} series has label {label}"
            for label in sorted(labels - known)
        ]
    assert problems == []


def test_every_exported_metric_is_on_the_dashboard(
    board: dict[str, Any], exported: dict[str, frozenset[str]]
) -> None:
    shown = {m for _, query in queries(board) for m in names(query)[0]}
    families = {re.sub(r"_(bucket|sum|count|total|created)$", "", m) for m in exported}
    on_board = {re.sub(r"_(bucket|sum|count|total|created)$", "", m) for m in shown}
    assert families - on_board == set()


@pytest.mark.parametrize(
    ("query", "metrics", "labels"),
    [
        (
            'sum by (node, le) (rate(kyb_x_bucket{node=~"$node", a="b,c"}[$__rate_interval]))',
            {"kyb_x_bucket"},
            {"node", "le", "a"},
        ),
        ('label_values(kyb_seats{node=~"$node"}, resource)', {"kyb_seats"}, {"node", "resource"}),
        ("up * on(UUID) group_left(pod) kyb_y", {"up", "kyb_y"}, {"UUID", "pod"}),
    ],
)
def test_the_query_reader_finds_metrics_and_labels(
    query: str, metrics: set[str], labels: set[str]
) -> None:
    assert names(query) == (metrics, labels)
