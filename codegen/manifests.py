"""Kubernetes manifests for the plugin, rendered from ``codegen/deployment.yaml`` (SPEC 6).

The deployment file names the namespace, the image and the node pools; each pool has
its node selector, tolerations, resources and its own plugin config, which is checked
with the plugin's own loader so a manifest can never ship a config the plugin refuses.
jinja2 templates under ``codegen/templates/`` turn that into one Namespace, one
ConfigMap and one DaemonSet per pool, and a ValidatingAdmissionPolicy with its binding
that refuses a container asking for seats of more than one of the pools' profiles. The
same templates render the Helm chart's (``codegen/chart.py``; see ``gotemplate``). The
whole of ``manifests/`` is generated (the objects in ``device-plugin/``, beside them the
config's JSON Schema and the Grafana dashboard, ``codegen/dashboard.py``): ``write``
replaces it and ``check`` reports anything that differs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, TypeVar

import jinja2
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from codegen import dashboard, gotemplate, schema, stubs, tree
from pkg.deviceplugin.config import loader
from pkg.deviceplugin.config.model import Config, loc_text

DEPLOYMENT = PurePosixPath("codegen/deployment.yaml")
TEMPLATE_ROOT = PurePosixPath("codegen/templates")
GENERATED_ROOT = PurePosixPath("manifests")
OUTPUT_ROOT = GENERATED_ROOT / "device-plugin"
# Beside the objects, not among them: `kubectl apply -f DIR` would read it as one.
CONFIG_SCHEMA = GENERATED_ROOT / "config.schema.json"
REGENERATE = "python -m codegen manifests"

# Output file -> template. `kubectl apply -f DIR` visits files in lexical order, so the
# namespace file sorts first and exists before anything is created inside it. The
# templates loop and test through `each` and `when` only (see gotemplate).
FILES = {
    "00-namespace.yaml": "namespace.yaml.j2",
    "admission.yaml": "admission.yaml.j2",
    "configmap.yaml": "configmap.yaml.j2",
    "daemonset.yaml": "daemonset.yaml.j2",
    # Only where some pool serves metrics; a file that renders no object is left out.
    "metrics.yaml": "metrics.yaml.j2",
}

NAME = "kyb-device-plugin"
CONFIGMAP_NAME = "kyb-deviceplugin-config"
CONFIG_DIR = PurePosixPath("/etc/kyb/device-plugin")
CONFIG_FILE = "config.yaml"
# Cluster-scoped: the ValidatingAdmissionPolicy and its binding share this name.
ADMISSION_POLICY_NAME = f"{NAME}-one-seat-profile-per-container"

_T = TypeVar("_T")

_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# A pool name ends up in object names (`kyb-deviceplugin-config-<pool>`, 63 at most).
_MAX_POOL_NAME = 63 - len(f"{CONFIGMAP_NAME}-")
_NAME_PART = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{_NAME_PART}$"
_LABEL_VALUE = rf"^({_NAME_PART})?$"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
# The pod's IP is not known when rendering, so a metrics endpoint that Prometheus is to
# reach must listen on every address of the pod.
METRICS_ADDRESS_IN_POD = r"^(0\.0\.0\.0|\[::\])?:([0-9]+)$"
METRICS_PORT_NAME = "metrics"
METRICS_PATH = "/metrics"

# What the templates see that no deployment changes.
CONSTANTS = {
    "admission_policy": ADMISSION_POLICY_NAME,
    "name": NAME,
    "config_dir": str(CONFIG_DIR),
    "config_key": CONFIG_FILE,
    "config_file": str(CONFIG_DIR / CONFIG_FILE),
    "metrics_port_name": METRICS_PORT_NAME,
    "metrics_path": METRICS_PATH,
    "node_label": dashboard.NODE_LABEL,
}


def _number_as_text(value: object) -> object:
    # `cpu: 1` is a fine quantity in YAML; the manifest still wants the string "1".
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


DnsLabel = Annotated[str, StringConstraints(strict=True, pattern=_DNS_LABEL, max_length=63)]
PoolName = Annotated[
    str, StringConstraints(strict=True, pattern=_DNS_LABEL, max_length=_MAX_POOL_NAME)
]
LabelKey = Annotated[str, StringConstraints(strict=True, pattern=_LABEL_KEY)]
LabelValue = Annotated[str, StringConstraints(strict=True, pattern=_LABEL_VALUE)]
Quantity = Annotated[
    str, BeforeValidator(_number_as_text), StringConstraints(strict=True, pattern=QUANTITY_PATTERN)
]


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
    )


class Toleration(_Model):
    key: LabelKey | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: LabelValue | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: Annotated[int, Field(strict=True, ge=0)] | None = None

    @model_validator(mode="after")
    def _operator_fits(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("operator Exists takes no value")
        if self.key is None and self.operator != "Exists":
            raise ValueError("a toleration without a key needs operator Exists")
        return self


class Quantities(_Model):
    cpu: Quantity
    memory: Quantity


class Resources(_Model):
    """Both are required: a node-critical pod without limits can starve the node."""

    requests: Quantities
    limits: Quantities


class PodMonitor(_Model):
    """The prometheus-operator PodMonitor of a pool whose config sets metricsAddress."""

    enabled: Annotated[bool, Field(strict=True)] = True
    """False: no PodMonitor (for clusters without prometheus-operator's CRDs); the
    container port and the headless Service stay."""
    labels: dict[LabelKey, LabelValue] = {}
    """Extra labels, e.g. the ones a Prometheus' podMonitorSelector asks for."""


class Pool(_Model):
    """Nodes that share one plugin config: one ConfigMap and one DaemonSet."""

    name: PoolName
    node_selector: Annotated[dict[LabelKey, LabelValue], Field(min_length=1)]
    tolerations: tuple[Toleration, ...] = ()
    resources: Resources
    config: dict[str, Any]
    """The plugin's config.yaml for these nodes, in exactly the plugin's format."""
    pod_monitor: PodMonitor | None = None
    """Only with ``config.metricsAddress``; without this key a PodMonitor is rendered."""


class Deployment(_Model):
    version: Literal["v1"]
    namespace: DnsLabel
    image: Annotated[str, StringConstraints(strict=True, pattern=r"^\S+$")]
    pools: Annotated[tuple[Pool, ...], Field(min_length=1)]

    @field_validator("pools")
    @classmethod
    def _distinct_pools(cls, pools: tuple[Pool, ...]) -> tuple[Pool, ...]:
        names = [pool.name for pool in pools]
        if len(set(names)) != len(names):
            raise ValueError(f"pool names must be unique, got {names}")
        for i, first in enumerate(pools):
            for second in pools[i + 1 :]:
                if not _disjoint(first.node_selector, second.node_selector):
                    # Two plugins on one node would fight over the same sockets.
                    raise ValueError(
                        f"pools {first.name!r} and {second.name!r} can select the same node; "
                        "their node selectors must differ in the value of a shared key"
                    )
        return pools


def _disjoint(first: dict[str, str], second: dict[str, str]) -> bool:
    return any(key in second and second[key] != value for key, value in first.items())


@dataclass(frozen=True)
class PoolView:
    """What the templates need for one pool, with every name and path worked out."""

    name: str
    daemonset: str
    configmap: str
    labels: dict[str, str]
    selector: dict[str, str]
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]
    resources: dict[str, Any]
    config_yaml: str
    seat_resources: tuple[str, ...]
    kubelet_dir: str
    pod_resources_dir: str
    pod_resources_socket: str
    state_dir: str
    metrics_port: int | None
    """The container port of the metrics endpoint; None: metrics are off."""
    pod_monitor_labels: dict[str, str] | None
    """The PodMonitor's labels; None: no PodMonitor."""


def generate(repo_root: Path) -> dict[str, bytes]:
    """Render every manifest: repository-relative POSIX path -> content."""
    deployment = load_deployment(repo_root)
    pools = [pool_view(pool, deployment, i) for i, pool in enumerate(deployment.pools)]
    context = {
        **CONSTANTS,
        "deployment": deployment,
        "create_namespace": True,
        "pools": pools,
        # The admission policy refuses a container that asks for two of these: the
        # kubelet merges the envs of both Allocate answers and one profile's are lost.
        # Rendered even when there is only one, where it admits every pod, so adding a
        # profile to a pool tightens it without a new file.
        "seat_resources_cel": cel_list(sorted({r for p in pools for r in p.seat_resources})),
        "header": f"# Generated by `{REGENERATE}` from {DEPLOYMENT}; do not edit.",
    }
    rendered: dict[str, bytes] = {}
    for file, text in render(repo_root, context).items():
        template = FILES[file]
        try:
            documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
        except yaml.YAMLError as error:
            raise stubs.CodegenError(
                f"{TEMPLATE_ROOT}/{template}: renders invalid YAML: {_one_line(error)}"
            ) from None
        if documents:
            rendered[f"{OUTPUT_ROOT}/{file}"] = text.encode()
    rendered[str(CONFIG_SCHEMA)] = json_text(schema.config_schema())
    rendered[str(dashboard.PATH)] = json_text(dashboard.dashboard())
    return rendered


def render(repo_root: Path, context: Mapping[str, Any]) -> dict[str, str]:
    """Every template of FILES rendered with ``context``: output file -> text."""
    env = gotemplate.environment(repo_root / TEMPLATE_ROOT)
    rendered: dict[str, str] = {}
    for file, template in FILES.items():
        try:
            rendered[file] = env.get_template(template).render(context)
        except jinja2.TemplateError as error:
            raise stubs.CodegenError(f"{TEMPLATE_ROOT}/{template}: {error}") from None
    return rendered


def cel_list(items: list[str]) -> str:
    """A CEL list literal of strings (the names it holds need no escapes)."""
    return "[" + ", ".join(f"'{item}'" for item in items) + "]"


def json_text(value: Any) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode()


def write(repo_root: Path) -> None:
    """Replace the output directory with freshly rendered manifests, dropping stale ones."""
    tree.replace(repo_root, GENERATED_ROOT, generate(repo_root))


def check(repo_root: Path) -> list[str]:
    """One line per manifest that is stale, missing or extra; empty when fresh."""
    return tree.compare(
        repo_root,
        GENERATED_ROOT,
        generate(repo_root),
        regenerate=REGENERATE,
        extra=f"not rendered from {DEPLOYMENT}",
    )


def load_deployment(repo_root: Path) -> Deployment:
    """The deployment file, validated; every problem is one line naming its key path."""
    shown = str(DEPLOYMENT)
    try:
        data = yaml.safe_load((repo_root / DEPLOYMENT).read_text(encoding="utf-8"))
    except OSError as error:
        raise stubs.CodegenError(f"{shown}: cannot read: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise stubs.CodegenError(f"{shown}: invalid YAML: {_one_line(error)}") from None
    try:
        return Deployment.model_validate(data, by_alias=True, by_name=False)
    except ValidationError as error:
        raise stubs.CodegenError("\n".join(_problem_lines(error, shown))) from None


def _problem_lines(error: ValidationError, shown: str) -> list[str]:
    errors = error.errors()
    # A list whose only entries failed is also "too short"; the entries say why.
    inner = {tuple(e["loc"][:depth]) for e in errors for depth in range(len(e["loc"]))}
    wording = {"extra_forbidden": "unknown key", "missing": "required key is missing"}
    return [
        f"{shown}: {loc_text(tuple(e['loc'])) or '(top level)'}: {wording.get(e['type'], e['msg'])}"
        for e in errors
        if not (e["type"] == "too_short" and tuple(e["loc"]) in inner)
    ]


def pool_view(pool: Pool, deployment: Deployment, index: int) -> PoolView:
    """A pool's names, paths and config text; its config is checked by the plugin's loader."""
    where = f"{DEPLOYMENT}: pools[{index}].config"
    config_yaml = config_text(pool.config)
    try:
        config = loader.load_text(config_yaml, where)
    except loader.ConfigError as error:
        raise stubs.CodegenError("\n".join(error.problems)) from None
    paths = _host_paths(config, where)
    suffix = "" if len(deployment.pools) == 1 else f"-{pool.name}"
    selector = pool_selector(pool.name)
    metrics_port = _metrics_port(config, where)
    return PoolView(
        name=pool.name,
        daemonset=f"{NAME}{suffix}",
        configmap=f"{CONFIGMAP_NAME}{suffix}",
        labels=component_labels(selector, "device-plugin"),
        selector=selector,
        node_selector=dict(pool.node_selector),
        # As written (the chart passes them through as they are).
        tolerations=[t.model_dump(by_alias=True, exclude_unset=True) for t in pool.tolerations],
        resources=pool.resources.model_dump(by_alias=True),
        config_yaml=config_yaml.rstrip("\n"),
        seat_resources=tuple(config.resources),
        **paths,
        metrics_port=metrics_port,
        pod_monitor_labels=_pod_monitor_labels(
            pool, metrics_port, selector, f"{DEPLOYMENT}: pools[{index}].podMonitor"
        ),
    )


def pool_selector(name: _T) -> dict[str, str | _T]:
    """The labels that pick one pool's plugin pods (``name`` may be a Go value)."""
    return {"app.kubernetes.io/name": NAME, "kyb.ai/pool": name}


def component_labels(selector: dict[str, _T], component: str) -> dict[str, _T | str]:
    return {**selector, "app.kubernetes.io/component": component}


def _metrics_port(config: Config, where: str) -> int | None:
    if config.metrics_address is None:
        return None
    match = re.match(METRICS_ADDRESS_IN_POD, config.metrics_address)
    if match is None:
        raise stubs.CodegenError(
            f"{where}: metricsAddress: must listen on every address of the pod for "
            f"Prometheus to reach it (:PORT, 0.0.0.0:PORT or [::]:PORT), "
            f"got {config.metrics_address!r}"
        )
    return int(match[2])


def _pod_monitor_labels(
    pool: Pool, metrics_port: int | None, selector: dict[str, str], where: str
) -> dict[str, str] | None:
    if metrics_port is None:
        if pool.pod_monitor is not None:
            raise stubs.CodegenError(
                f"{where}: set, but the pool's config has no metricsAddress (metrics are off)"
            )
        return None
    monitor = pool.pod_monitor or PodMonitor()
    if not monitor.enabled:
        return None
    labels = component_labels(selector, "metrics")
    taken = sorted(labels.keys() & monitor.labels.keys())
    if taken:
        raise stubs.CodegenError(
            f"{where}: labels: {', '.join(taken)} is set by the generator (it selects the pods)"
        )
    return {**labels, **monitor.labels}


def _host_paths(config: Config, where: str) -> dict[str, str]:
    # The container sees each host directory at the same path, so the config's paths
    # hold on both sides and the mounts follow a kubelet with a non-default root.
    mounts = (
        ("kubeletDir", config.kubelet_dir, config.kubelet_dir),
        ("podResourcesSocket", config.pod_resources_socket, config.pod_resources_socket.parent),
        ("stateDir", config.state_dir, config.state_dir),
    )
    problems = [
        f"{where}: {key}: must be an absolute path below /, got {str(value)!r}"
        for key, value, directory in mounts
        if not directory.is_absolute() or directory == directory.parent
    ]
    problems += [
        f"{where}: {key} and {other_key} must lie in separate directories "
        f"(one host mount each), got {str(directory)!r} and {str(other)!r}"
        for i, (key, _, directory) in enumerate(mounts)
        for other_key, _, other in mounts[i + 1 :]
        if directory.is_relative_to(other) or other.is_relative_to(directory)
    ]
    if problems:
        raise stubs.CodegenError("\n".join(problems))
    return {
        "kubelet_dir": str(config.kubelet_dir),
        "pod_resources_dir": str(config.pod_resources_socket.parent),
        "pod_resources_socket": str(config.pod_resources_socket),
        "state_dir": str(config.state_dir),
    }


def config_text(config: Mapping[str, Any]) -> str:
    """A pool's config as its ConfigMap's config.yaml: keys sorted, lists in block style,
    as helm's toYaml writes it, so the chart's ConfigMap holds the same text."""
    return yaml.safe_dump(dict(config), sort_keys=True, default_flow_style=False, width=1000)


def _one_line(error: Exception) -> str:
    return re.sub(r"\s+", " ", str(error)).strip()
