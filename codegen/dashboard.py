"""The Grafana dashboard for the plugin's metrics (issue 15), generated beside the
manifests as ``manifests/grafana/kyb-device-plugin.json`` (import it, or load it with
Grafana's dashboard provisioning; not among the objects ``kubectl apply`` reads).

Every query names only what the plugin exports (``pkg/deviceplugin/metrics.py``) and
the ``node`` label the generated PodMonitor sets from the pod's node name; the
datasource is a variable, so the file fits any Grafana with a Prometheus datasource.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

PATH = PurePosixPath("manifests/grafana/kyb-device-plugin.json")
NODE_LABEL = "node"
"""The label the PodMonitor's relabeling gives each target: its pod's node name."""
UID = "kyb-device-plugin"
SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

_WIDTH, _HEIGHT = 12, 8
_SELECT = f'{NODE_LABEL}=~"$node", resource=~"$resource"'
_ON_NODE = f'{NODE_LABEL}=~"$node"'
_RATE = "[$__rate_interval]"


def dashboard() -> dict[str, Any]:
    panels = [
        _panel(
            "Seats by state per node and profile",
            [
                _target(
                    f"sum by ({NODE_LABEL}, resource, state) (kyb_seats{{{_SELECT}}})",
                    f"{{{{{NODE_LABEL}}}}} {{{{resource}}}} {{{{state}}}}",
                )
            ],
            stacked=True,
        ),
        _panel(
            "GPU health (1 healthy, 0 unhealthy)",
            [
                _target(
                    f"kyb_gpu_healthy{{{_ON_NODE}}}",
                    f"{{{{{NODE_LABEL}}}}} GPU {{{{gpu}}}} {{{{uuid}}}}",
                )
            ],
            kind="state-timeline",
            mappings=[
                {
                    "type": "value",
                    "options": {
                        "0": {"text": "unhealthy", "color": "red"},
                        "1": {"text": "healthy", "color": "green"},
                    },
                }
            ],
        ),
        _panel(
            "Holders per GPU",
            [
                _target(
                    f"count by ({NODE_LABEL}, gpu, UUID) (kyb_seat_holder{{{_SELECT}}})",
                    f"{{{{{NODE_LABEL}}}}} GPU {{{{gpu}}}}",
                )
            ],
            stacked=True,
        ),
        _panel(
            "Who holds which seat",
            [
                _target(
                    f"kyb_seat_holder{{{_SELECT}}}",
                    "",
                    instant=True,
                )
            ],
            kind="table",
            transformations=[
                {
                    "id": "organize",
                    "options": {"excludeByName": {"Time": True, "Value": True, "__name__": True}},
                }
            ],
        ),
        _latency_panel("Allocate latency", "kyb_allocate_seconds_bucket"),
        _latency_panel("GetPreferredAllocation latency", "kyb_preferred_allocation_seconds_bucket"),
        _panel(
            "Allocate errors",
            [
                _target(
                    f"sum by ({NODE_LABEL}, resource) "
                    f"(increase(kyb_allocate_errors_total{{{_SELECT}}}{_RATE}))",
                    f"{{{{{NODE_LABEL}}}}} {{{{resource}}}}",
                )
            ],
        ),
        _panel(
            "Registrations with the kubelet",
            [
                _target(
                    f"sum by ({NODE_LABEL}, resource, kind) "
                    f"(increase(kyb_registrations_total{{{_SELECT}}}{_RATE}))",
                    f"{{{{{NODE_LABEL}}}}} {{{{resource}}}} {{{{kind}}}}",
                )
            ],
        ),
        _panel(
            "Config reloads",
            [
                _target(
                    f"sum by ({NODE_LABEL}, result) "
                    f"(increase(kyb_config_reloads_total{{{_ON_NODE}}}{_RATE}))",
                    f"{{{{{NODE_LABEL}}}}} {{{{result}}}}",
                )
            ],
        ),
    ]
    for i, panel in enumerate(panels):
        panel["id"] = i + 1
        panel["gridPos"] = {
            "h": _HEIGHT,
            "w": _WIDTH,
            "x": (i % 2) * _WIDTH,
            "y": (i // 2) * _HEIGHT,
        }
    return {
        "uid": UID,
        "title": "kyb device plugin",
        "description": "GPU seats per node and profile, their holders, GPU health, and the "
        "plugin's answers to the kubelet.",
        "tags": ["kyb", "gpu", "device-plugin"],
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "annotations": {"list": []},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                _label_variable("node", f"label_values(kyb_seats, {NODE_LABEL})"),
                _label_variable(
                    "resource", f"label_values(kyb_seats{{{_ON_NODE}}}, resource)", "Profile"
                ),
            ]
        },
        "panels": panels,
    }


def _label_variable(name: str, query: str, label: str | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "label": label or name.capitalize(),
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "sort": 1,
        "hide": 0,
    }


def _latency_panel(title: str, buckets: str) -> dict[str, Any]:
    return _panel(
        title,
        [
            _target(
                f"histogram_quantile({q}, sum by ({NODE_LABEL}, resource, le) "
                f"(rate({buckets}{{{_SELECT}}}{_RATE})))",
                f"p{round(q * 100)} {{{{{NODE_LABEL}}}}} {{{{resource}}}}",
            )
            for q in (0.5, 0.99)
        ],
        unit="s",
    )


def _target(expr: str, legend: str, *, instant: bool = False) -> dict[str, Any]:
    target: dict[str, Any] = {"datasource": DATASOURCE, "expr": expr, "refId": ""}
    if instant:
        target |= {"instant": True, "range": False, "format": "table"}
    else:
        target["legendFormat"] = legend
    return target


def _panel(
    title: str,
    targets: list[dict[str, Any]],
    *,
    kind: str = "timeseries",
    unit: str = "short",
    stacked: bool = False,
    mappings: list[dict[str, Any]] | None = None,
    transformations: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    custom: dict[str, Any] = {}
    if stacked:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    for i, target in enumerate(targets):
        target["refId"] = chr(ord("A") + i)
    return {
        "type": kind,
        "title": title,
        "datasource": DATASOURCE,
        "targets": targets,
        "fieldConfig": {
            "defaults": {"unit": unit, "mappings": mappings or [], "custom": custom},
            "overrides": [],
        },
        "options": {},
        "transformations": transformations or [],
    }
