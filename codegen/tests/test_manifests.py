"""The rendered manifests: fresh, schema-valid, and least privilege on every pool.

Every security promise of SPEC section 6 is asserted on every DaemonSet, both of the
committed deployment and of a three-pool deployment rendered here, so a template
change cannot quietly loosen one of them for some pools only. The admission policy's
CEL is evaluated here (with cel-python) against the pods it must refuse and admit.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from celpy import celtypes
from celpy.adapter import json_to_cel

from codegen import __main__ as cli
from codegen import manifests, stubs
from codegen.tests import support
from pkg.deviceplugin.config import loader

REPO_ROOT = support.REPO_ROOT

KUBELET_DIR = "/var/lib/kubelet/device-plugins"
POD_RESOURCES_DIR = "/var/lib/kubelet/pod-resources"
STATE_DIR = "/var/lib/kyb/device-plugin"
DEFAULT_HOST_MOUNTS = {
    (KUBELET_DIR, "Directory", False),
    (POD_RESOURCES_DIR, "Directory", True),
    (STATE_DIR, "DirectoryOrCreate", False),
}

A100_CONFIG = {
    "profiles": [
        {"resource": "kyb.ai/gpu-1x-seat", "seatsPerGroup": 4},
        {"resource": "kyb.ai/gpu-2x-seat", "seatsPerGroup": 3},
    ],
    "groups": [{"name": "G01", "gpus": [0, 1]}, {"name": "G23", "gpus": [2, 3]}],
    "allowOverprovision": True,
    "metricsAddress": "0.0.0.0:9500",
}
H100_CONFIG = {
    "profiles": [{"resource": "kyb.ai/gpu-4x-seat", "seatsPerGroup": 2}],
    "preferredAllocationPolicy": "pack",
    "metricsAddress": ":9400",
}
# A distribution with its own kubelet root: the host mounts must follow the config.
K0S_CONFIG = {
    "profiles": [{"resource": "kyb.ai/gpu-1x-seat", "seatsPerGroup": 1}],
    "kubeletDir": "/var/lib/k0s/kubelet/device-plugins",
    "podResourcesSocket": "/var/lib/k0s/kubelet/pod-resources/kubelet.sock",
    "stateDir": "/var/lib/k0s/kyb",
}
CLUSTER_SCOPED = {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
POD_MONITOR = ("monitoring.coreos.com/v1", "PodMonitor")
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
RESOURCES = {
    "requests": {"cpu": "50m", "memory": "96Mi"},
    "limits": {"cpu": "1", "memory": "256Mi"},
}


def _pool(name: str, gpu: str, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "nodeSelector": {"nvidia.com/gpu.present": "true", "kyb.ai/gpu": gpu},
        "resources": RESOURCES,
        "config": config,
        **extra,
    }


THREE_POOLS = {
    "version": "v1",
    "namespace": "gpu-plugins",
    "image": "registry.example/kyb/kyb-device-plugin:1.2.3",
    "pools": [
        # Metrics, but no prometheus-operator: a Service and no PodMonitor.
        _pool(
            "a100", "a100", A100_CONFIG, tolerations=[GPU_TOLERATION], podMonitor={"enabled": False}
        ),
        _pool(
            "h100",
            "h100",
            H100_CONFIG,
            podMonitor={"labels": {"release": "prometheus"}},
            tolerations=[
                GPU_TOLERATION,
                {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"},
            ],
        ),
        _pool("k0s", "l4", K0S_CONFIG),
    ],
}
THREE_POOLS_HOST_MOUNTS = {
    "a100": DEFAULT_HOST_MOUNTS,
    "h100": DEFAULT_HOST_MOUNTS,
    "k0s": {
        ("/var/lib/k0s/kubelet/device-plugins", "Directory", False),
        ("/var/lib/k0s/kubelet/pod-resources", "Directory", True),
        ("/var/lib/k0s/kyb", "DirectoryOrCreate", False),
    },
}


def _copy_repo(target: Path) -> Path:
    """The generator's inputs and outputs, copied so a test may change them."""
    for part in (manifests.TEMPLATE_ROOT, manifests.GENERATED_ROOT):
        shutil.copytree(REPO_ROOT / part, target / part)
    shutil.copy(REPO_ROOT / manifests.DEPLOYMENT, target / manifests.DEPLOYMENT)
    return target


def _with_deployment(root: Path, deployment: dict[str, Any]) -> Path:
    (root / manifests.DEPLOYMENT).write_text(yaml.safe_dump(deployment, sort_keys=False))
    return root


def _of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    return _copy_repo(tmp_path)


@pytest.fixture(scope="module")
def three_pools(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _with_deployment(_copy_repo(tmp_path_factory.mktemp("three-pools")), THREE_POOLS)


@pytest.fixture(params=["committed", "three-pools"])
def rendered(request: pytest.FixtureRequest, three_pools: Path) -> tuple[Path, dict[str, Any]]:
    """(repo root, deployment data) of each deployment under test."""
    root = REPO_ROOT if request.param == "committed" else three_pools
    return root, yaml.safe_load((root / manifests.DEPLOYMENT).read_text())


def _daemonsets(rendered: tuple[Path, dict[str, Any]]) -> list[tuple[dict[str, Any], Any]]:
    """Each pool of the deployment with its DaemonSet; fails unless there is one per pool."""
    root, deployment = rendered
    by_pool = {
        ds["spec"]["template"]["metadata"]["labels"]["kyb.ai/pool"]: ds
        for ds in _of_kind(support.rendered_documents(root), "DaemonSet")
    }
    assert sorted(by_pool) == sorted(pool["name"] for pool in deployment["pools"])
    return [(pool, by_pool[pool["name"]]) for pool in deployment["pools"]]


def _container(daemonset: dict[str, Any]) -> dict[str, Any]:
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def _pod(daemonset: dict[str, Any]) -> dict[str, Any]:
    pod = daemonset["spec"]["template"]["spec"]
    assert isinstance(pod, dict)
    return pod


# --- committed, fresh, deterministic --------------------------------------------------


def test_committed_manifests_are_fresh() -> None:
    assert manifests.check(REPO_ROOT) == []


def test_check_cli_exits_zero_when_fresh() -> None:
    assert cli.main(["manifests", "--check"]) == 0


def test_committed_default_is_one_pool_with_the_seed_profiles() -> None:
    docs = support.rendered_documents(REPO_ROOT)
    assert [doc["kind"] for doc in docs] == [
        "Namespace",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "ConfigMap",
        "DaemonSet",
    ]
    (configmap,) = _of_kind(docs, "ConfigMap")
    assert configmap["metadata"]["name"] == "kyb-deviceplugin-config"
    config = loader.load_text(configmap["data"]["config.yaml"], "configmap")
    assert [(p.resource, p.seats_per_group) for p in config.profiles] == [
        ("kyb.ai/gpu-1x-seat", 4),
        ("kyb.ai/gpu-2x-seat", 3),
    ]
    (daemonset,) = _of_kind(docs, "DaemonSet")
    assert daemonset["metadata"]["name"] == "kyb-device-plugin"
    assert _pod(daemonset)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert GPU_TOLERATION in _pod(daemonset)["tolerations"]


def test_rendering_is_deterministic(three_pools: Path) -> None:
    assert manifests.generate(three_pools) == manifests.generate(three_pools)


def test_write_replaces_the_output_wholesale_and_check_names_each_problem(
    repo_copy: Path,
) -> None:
    output = repo_copy / manifests.OUTPUT_ROOT
    (output / "daemonset.yaml").write_text("# hand edit\n")
    (output / "configmap.yaml").unlink()
    (output / "leftover.yaml").write_text("")

    problems = manifests.check(repo_copy)

    assert [line.split(":")[0] for line in problems] == [
        f"{manifests.OUTPUT_ROOT}/configmap.yaml",
        f"{manifests.OUTPUT_ROOT}/daemonset.yaml",
        f"{manifests.OUTPUT_ROOT}/leftover.yaml",
    ]
    assert all("python -m codegen manifests" in line for line in problems)

    manifests.write(repo_copy)

    assert manifests.check(repo_copy) == []
    assert not (output / "leftover.yaml").exists()


def test_check_reports_stale_manifests_after_the_deployment_changes(repo_copy: Path) -> None:
    deployment = repo_copy / manifests.DEPLOYMENT
    deployment.write_text(deployment.read_text().replace("seatsPerGroup: 4", "seatsPerGroup: 5"))

    assert [line.split(":")[0] for line in manifests.check(repo_copy)] == [
        f"{manifests.OUTPUT_ROOT}/configmap.yaml"
    ]


# --- schemas -------------------------------------------------------------------------


def test_every_document_validates_strictly_against_the_kubernetes_schemas(
    rendered: tuple[Path, dict[str, Any]],
) -> None:
    docs = support.rendered_documents(rendered[0])
    assert docs
    for doc in docs:
        support.validate(doc)


def test_the_schemas_used_are_strict_enough_to_catch_a_misspelt_key(three_pools: Path) -> None:
    (daemonset,) = _of_kind(support.rendered_documents(REPO_ROOT), "DaemonSet")
    _container(daemonset)["securityContext"]["privilegd"] = True
    with pytest.raises(support.InvalidObject):
        support.validate(daemonset)
    (monitor,) = _of_kind(support.rendered_documents(three_pools), "PodMonitor")
    monitor["spec"]["podMetricsEndpoints"][0]["prot"] = "metrics"
    with pytest.raises(support.InvalidObject, match="'prot' was unexpected"):
        support.validate(monitor)
    del monitor["spec"]["podMetricsEndpoints"][0]["prot"]
    monitor["metadata"]["lables"] = {}
    with pytest.raises(support.InvalidObject, match="'lables' was unexpected"):
        support.validate(monitor)


# --- least privilege, on every pool ---------------------------------------------------


def test_every_pool_runs_node_critical_on_its_own_gpu_nodes(
    rendered: tuple[Path, dict[str, Any]],
) -> None:
    for pool, daemonset in _daemonsets(rendered):
        pod = _pod(daemonset)
        assert pod["priorityClassName"] == "system-node-critical"
        assert pod["nodeSelector"] == pool["nodeSelector"]
        assert pod.get("tolerations", []) == pool.get("tolerations", [])


def test_every_pool_has_no_api_token_and_no_host_namespaces(
    rendered: tuple[Path, dict[str, Any]],
) -> None:
    for _, daemonset in _daemonsets(rendered):
        pod = _pod(daemonset)
        assert pod["automountServiceAccountToken"] is False
        assert pod["hostNetwork"] is False
        assert pod["hostPID"] is False
        assert pod["hostIPC"] is False
        assert "hostUsers" not in pod
        assert pod["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}


def test_every_pool_container_is_unprivileged_without_capabilities(
    rendered: tuple[Path, dict[str, Any]],
) -> None:
    for _, daemonset in _daemonsets(rendered):
        # Exact: no added capability, no runAsUser/runAsNonRoot games, nothing else.
        assert _container(daemonset)["securityContext"] == {
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        assert [c["name"] for c in _pod(daemonset)["containers"]] == ["device-plugin"]
        assert "initContainers" not in _pod(daemonset)
        assert "ephemeralContainers" not in _pod(daemonset)


def test_every_pool_has_requests_and_limits_for_cpu_and_memory(
    rendered: tuple[Path, dict[str, Any]],
) -> None:
    for pool, daemonset in _daemonsets(rendered):
        resources = _container(daemonset)["resources"]
        assert resources == pool["resources"]
        for kind in ("requests", "limits"):
            assert set(resources[kind]) == {"cpu", "memory"}


def test_every_pool_gets_nvml_and_devices_from_the_nvidia_runtime(
    rendered: tuple[Path, dict[str, Any]],
) -> None:
    for _, daemonset in _daemonsets(rendered):
        assert _pod(daemonset)["runtimeClassName"] == "nvidia"
        env = {e["name"]: e.get("value") for e in _container(daemonset)["env"]}
        assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
        assert "utility" in env["NVIDIA_DRIVER_CAPABILITIES"].split(",")
        assert env["NVIDIA_MIG_MONITOR_DEVICES"] == "all"  # NVML sees MIG-enabled GPUs


def test_every_pool_tells_the_plugin_its_node_name_through_the_downward_api(
    rendered: tuple[Path, dict[str, Any]],
) -> None:
    """Issue 15 point 1: the config's ``nodes.<name>`` override applies where the plugin
    knows its node's name, and the downward API tells it without API-server access."""
    for _, daemonset in _daemonsets(rendered):
        env = {e["name"]: e for e in _container(daemonset)["env"]}
        assert env["KYB_NODE_NAME"] == {
            "name": "KYB_NODE_NAME",
            "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}},
        }


def test_every_pool_mounts_exactly_three_host_directories(
    rendered: tuple[Path, dict[str, Any]],
) -> None:
    root, _ = rendered
    expected = {"default": DEFAULT_HOST_MOUNTS} if root == REPO_ROOT else THREE_POOLS_HOST_MOUNTS
    for pool, daemonset in _daemonsets(rendered):
        volumes = {v["name"]: v for v in _pod(daemonset)["volumes"]}
        mounts = {m["name"]: m for m in _container(daemonset)["volumeMounts"]}
        assert set(mounts) == set(volumes)
        host = {
            (v["hostPath"]["path"], v["hostPath"]["type"], mounts[name].get("readOnly", False))
            for name, v in volumes.items()
            if "hostPath" in v
        }
        assert host == expected[pool["name"]]
        for name, volume in volumes.items():
            assert set(volume) - {"name"} <= {"hostPath", "configMap"}, name
            assert "subPath" not in mounts[name] and "subPathExpr" not in mounts[name]
            if "hostPath" in volume:
                # Same path inside as outside, so the config's paths hold in the pod.
                assert mounts[name]["mountPath"] == volume["hostPath"]["path"]
        assert "volumeDevices" not in _container(daemonset)


def test_every_pool_mounts_its_configmap_as_a_directory(
    rendered: tuple[Path, dict[str, Any]],
) -> None:
    configmaps = {
        cm["metadata"]["name"]: cm
        for cm in _of_kind(support.rendered_documents(rendered[0]), "ConfigMap")
    }
    for pool, daemonset in _daemonsets(rendered):
        (volume,) = [v for v in _pod(daemonset)["volumes"] if "configMap" in v]
        (mount,) = [m for m in _container(daemonset)["volumeMounts"] if m["name"] == volume["name"]]
        assert mount == {
            "name": volume["name"],
            "mountPath": "/etc/kyb/device-plugin",
            "readOnly": True,
        }
        configmap = configmaps[volume["configMap"]["name"]]
        assert configmap["metadata"]["namespace"] == daemonset["metadata"]["namespace"]
        # What the plugin will read is exactly the pool's config, by its own loader.
        assert loader.load_text(configmap["data"]["config.yaml"], "rendered") == loader.validate(
            pool["config"], "deployment"
        )


def test_every_pool_serves_with_the_mounted_paths(
    rendered: tuple[Path, dict[str, Any]],
) -> None:
    for _, daemonset in _daemonsets(rendered):
        container = _container(daemonset)
        args = container["args"]
        assert args[0] == "serve"
        flags = dict(zip(args[1::2], args[2::2], strict=True))
        mounted = {m["mountPath"] for m in container["volumeMounts"]}
        assert flags["--config"] == "/etc/kyb/device-plugin/config.yaml"
        assert flags["--kubelet-dir"] in mounted
        assert str(Path(flags["--pod-resources-socket"]).parent) in mounted
        assert flags["--state-dir"] in mounted
        assert container["workingDir"] == "/app"
        assert "command" not in container  # the image's entrypoint, which runs from /app


def test_every_pool_has_a_liveness_probe_that_dials_the_plugin(
    rendered: tuple[Path, dict[str, Any]],
) -> None:
    for _, daemonset in _daemonsets(rendered):
        container = _container(daemonset)
        probe = container["livenessProbe"]
        command = probe["exec"]["command"]
        assert command[:4] == ["python", "-m", "cmd.kyb_device_plugin", "healthz"]
        flags = dict(zip(command[4::2], command[5::2], strict=True))
        serve = dict(zip(container["args"][1::2], container["args"][2::2], strict=True))
        assert flags["--kubelet-dir"] == serve["--kubelet-dir"]
        assert flags["--config"] == serve["--config"]
        # healthz takes up to 2 s per profile plus interpreter start.
        assert probe["timeoutSeconds"] >= 8
        assert probe["periodSeconds"] >= probe["timeoutSeconds"]
        assert probe["failureThreshold"] >= 2
        assert probe["initialDelaySeconds"] >= 5


def test_every_pool_rolls_out_node_by_node_and_stops_in_time(
    rendered: tuple[Path, dict[str, Any]],
) -> None:
    for pool, daemonset in _daemonsets(rendered):
        assert daemonset["spec"]["updateStrategy"]["type"] == "RollingUpdate"
        assert 5 <= _pod(daemonset)["terminationGracePeriodSeconds"] <= 60
        selector = daemonset["spec"]["selector"]["matchLabels"]
        labels = daemonset["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
        assert selector["kyb.ai/pool"] == pool["name"]
        assert "annotations" not in daemonset["spec"]["template"]["metadata"]


# --- several pools -------------------------------------------------------------------


def test_several_pools_get_suffixed_names_in_one_namespace(three_pools: Path) -> None:
    docs = support.rendered_documents(three_pools)
    assert [doc["metadata"]["name"] for doc in _of_kind(docs, "ConfigMap")] == [
        "kyb-deviceplugin-config-a100",
        "kyb-deviceplugin-config-h100",
        "kyb-deviceplugin-config-k0s",
    ]
    assert [doc["metadata"]["name"] for doc in _of_kind(docs, "DaemonSet")] == [
        "kyb-device-plugin-a100",
        "kyb-device-plugin-h100",
        "kyb-device-plugin-k0s",
    ]
    namespaced = [doc for doc in docs if doc["kind"] not in CLUSTER_SCOPED]
    assert {doc["metadata"].get("namespace", doc["metadata"]["name"]) for doc in namespaced} == {
        "gpu-plugins"
    }
    assert {_container(ds)["image"] for ds in _of_kind(docs, "DaemonSet")} == {
        "registry.example/kyb/kyb-device-plugin:1.2.3"
    }


# --- metrics --------------------------------------------------------------------------


def _metrics_objects(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    """The Services or PodMonitors of ``docs``, by the pool they were rendered for."""
    return {doc["metadata"]["labels"]["kyb.ai/pool"]: doc for doc in _of_kind(docs, kind)}


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_metrics_are_off_by_default() -> None:
    rendered = manifests.generate(REPO_ROOT)
    assert f"{manifests.OUTPUT_ROOT}/metrics.yaml" not in rendered
    docs = support.rendered_documents(REPO_ROOT)
    assert not _of_kind(docs, "Service") and not _of_kind(docs, "PodMonitor")
    (daemonset,) = _of_kind(docs, "DaemonSet")
    assert "ports" not in _container(daemonset)
    (configmap,) = _of_kind(docs, "ConfigMap")
    assert loader.load_text(configmap["data"]["config.yaml"], "cm").metrics_address is None


def test_only_the_pools_that_set_metrics_address_get_a_port_and_a_service(
    three_pools: Path,
) -> None:
    docs = support.rendered_documents(three_pools)
    services = _metrics_objects(docs, "Service")
    assert sorted(services) == ["a100", "h100"]
    by_pool = {pool["name"]: ds for pool, ds in _daemonsets((three_pools, THREE_POOLS))}
    assert "ports" not in _container(by_pool["k0s"])
    for name, port in (("a100", 9500), ("h100", 9400)):
        container = _container(by_pool[name])
        assert container["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
        service = services[name]
        assert service["metadata"]["namespace"] == by_pool[name]["metadata"]["namespace"]
        assert service["spec"]["clusterIP"] == "None"  # headless: one target per node
        assert service["spec"]["ports"] == [
            {"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}
        ]
        # The Service selects this pool's plugin pods and no other pool's.
        for other, daemonset in by_pool.items():
            labels = daemonset["spec"]["template"]["metadata"]["labels"]
            assert _selects(service["spec"]["selector"], labels) == (other == name)


def test_a_pool_with_metrics_gets_a_podmonitor_selecting_its_pods_unless_it_opts_out(
    three_pools: Path,
) -> None:
    docs = support.rendered_documents(three_pools)
    monitors = _metrics_objects(docs, "PodMonitor")
    assert sorted(monitors) == ["h100"]  # a100 sets podMonitor.enabled false
    monitor = monitors["h100"]
    assert (monitor["apiVersion"], monitor["kind"]) == POD_MONITOR
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    by_pool = {pool["name"]: ds for pool, ds in _daemonsets((three_pools, THREE_POOLS))}
    assert monitor["metadata"]["namespace"] == by_pool["h100"]["metadata"]["namespace"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    for name, daemonset in by_pool.items():
        labels = daemonset["spec"]["template"]["metadata"]["labels"]
        assert _selects(selector, labels) == (name == "h100")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    port_names = {p["name"] for p in _container(by_pool["h100"])["ports"]}
    # honorLabels: kyb_seat_holder's namespace, pod and container stay the holder's.
    assert endpoint == {
        "port": "metrics",
        "path": "/metrics",
        "honorLabels": True,
        "relabelings": [
            {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}
        ],
    }
    assert endpoint["port"] in port_names


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            {"config": {**H100_CONFIG, "metricsAddress": "127.0.0.1:9400"}},
            "pools[0].config: metricsAddress: must listen on every address of the pod "
            "for Prometheus to reach it (:PORT, 0.0.0.0:PORT or [::]:PORT), got '127.0.0.1:9400'",
        ),
        (
            {"config": {**H100_CONFIG, "metricsAddress": "9400"}},
            "pools[0].config: metricsAddress: must be HOST:PORT",
        ),
        (
            {
                "config": {k: v for k, v in H100_CONFIG.items() if k != "metricsAddress"},
                "podMonitor": {},
            },
            "pools[0].podMonitor: set, but the pool's config has no metricsAddress "
            "(metrics are off)",
        ),
        (
            {"podMonitor": {"interval": "30s"}},
            "pools[0].podMonitor.interval: unknown key",
        ),
        (
            {"podMonitor": {"enabled": "no"}},
            "pools[0].podMonitor.enabled: Input should be a valid boolean",
        ),
        (
            {"podMonitor": {"labels": {"kyb.ai/pool": "other"}}},
            "pools[0].podMonitor: labels: kyb.ai/pool is set by the generator (it selects "
            "the pods)",
        ),
    ],
    ids=["loopback", "no-host", "monitor-without-metrics", "unknown-key", "not-bool", "label"],
)
def test_bad_metrics_settings_are_refused_naming_the_key(
    repo_copy: Path, change: dict[str, Any], problem: str
) -> None:
    pool = {**_pool("h100", "h100", H100_CONFIG), **change}
    problems = _problems(repo_copy, {**THREE_POOLS, "pools": [pool]})
    assert len(problems) == 1
    assert problems[0].startswith(f"codegen/deployment.yaml: {problem}")


# --- admission: one seat profile per container ---------------------------------------

SEAT_1X = "kyb.ai/gpu-1x-seat"
SEAT_2X = "kyb.ai/gpu-2x-seat"
SEAT_4X = "kyb.ai/gpu-4x-seat"
ONE_PROFILE_ONLY = (
    "; a container may use seats of one profile only (their envs would be merged by the kubelet)"
)


def _cel_join(items: list[str], separator: str = "") -> celtypes.StringType:
    # cel-go's strings extension, which Kubernetes enables and cel-python lacks.
    return celtypes.StringType(separator.join(items))


def _admission(root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    docs = support.rendered_documents(root)
    (policy,) = _of_kind(docs, "ValidatingAdmissionPolicy")
    (binding,) = _of_kind(docs, "ValidatingAdmissionPolicyBinding")
    return policy, binding


def _run_cel(expression: str, pod: dict[str, Any], variables: dict[str, Any]) -> Any:
    env = celpy.Environment()
    program = env.program(env.compile(expression), functions={"join": _cel_join})
    activation = {
        "object": json_to_cel(pod),
        "variables": celtypes.MapType({celtypes.StringType(k): v for k, v in variables.items()}),
    }
    return program.evaluate(activation)


def _admit(policy: dict[str, Any], pod: dict[str, Any]) -> str | None:
    """What creating ``pod`` meets: None when admitted, else the policy's message.

    As the API server does: each variable in order, seen by the later ones as
    ``variables.<name>``, then each validation, its messageExpression when it fails. An
    expression that cannot be evaluated raises here; under failurePolicy Fail it would
    refuse the pod.
    """
    spec = policy["spec"]
    variables: dict[str, Any] = {}
    for variable in spec["variables"]:
        variables[variable["name"]] = _run_cel(variable["expression"], pod, variables)
    for validation in spec["validations"]:
        allowed = _run_cel(validation["expression"], pod, variables)
        assert isinstance(allowed, celtypes.BoolType)
        if not allowed:
            message = _run_cel(validation["messageExpression"], pod, variables)
            assert isinstance(message, str)
            return str(message)
    return None


def _asking(name: str, limits: dict[str, Any] | None = None) -> dict[str, Any]:
    container: dict[str, Any] = {"name": name, "image": "registry.example/app:1"}
    if limits is not None:
        container["resources"] = {"limits": limits}
    return container


def _workload(
    containers: list[dict[str, Any]], init_containers: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": containers}
    if init_containers is not None:
        spec["initContainers"] = init_containers
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "w"}, "spec": spec}


def test_the_admission_policy_refuses_pod_creation_and_is_bound_to_deny() -> None:
    policy, binding = _admission(REPO_ROOT)
    assert policy["metadata"]["name"] == binding["metadata"]["name"]
    assert "namespace" not in policy["metadata"] and "namespace" not in binding["metadata"]
    assert policy["spec"]["failurePolicy"] == "Fail"
    assert policy["spec"]["matchConstraints"]["resourceRules"] == [
        {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}
    ]
    (validation,) = policy["spec"]["validations"]
    # The fallback, should the messageExpression ever fail.
    assert validation["message"].endswith(ONE_PROFILE_ONLY)
    assert binding["spec"] == {
        "policyName": policy["metadata"]["name"],
        "validationActions": ["Deny"],
    }
    assert "matchResources" not in binding["spec"]  # every namespace


@pytest.mark.parametrize(
    "pod",
    [
        _workload([_asking("main", {SEAT_1X: 1, "cpu": "1"}), _asking("log", {"cpu": "100m"})]),
        _workload([_asking("main", {SEAT_1X: "2"}), _asking("helper", {SEAT_2X: 1})]),
        _workload([_asking("main", {SEAT_2X: 1})], [_asking("setup", {SEAT_1X: 1})]),
        _workload([_asking("main")]),
        _workload([{**_asking("main"), "resources": {}}]),
        _workload([{**_asking("main"), "resources": {"requests": {"cpu": "1"}}}], []),
        # Only the seat resources that some pool serves count.
        _workload([_asking("main", {SEAT_1X: 1, SEAT_4X: 1, "nvidia.com/gpu": 1})]),
    ],
    ids=[
        "one-profile-per-container",
        "two-containers-each-its-own-profile",
        "init-and-main-each-its-own-profile",
        "no-resources",
        "empty-resources",
        "requests-only",
        "unserved-resources",
    ],
)
def test_the_admission_policy_admits_a_pod_whose_containers_use_one_profile_each(
    pod: dict[str, Any],
) -> None:
    policy, _ = _admission(REPO_ROOT)
    assert _admit(policy, pod) is None


@pytest.mark.parametrize(
    ("pod", "message"),
    [
        (
            _workload([_asking("main", {SEAT_2X: 1, SEAT_1X: 1, "cpu": "2"})]),
            f"container main asks for {SEAT_1X} and {SEAT_2X}",
        ),
        (
            _workload(
                [_asking("main", {SEAT_1X: 1})], [_asking("setup", {SEAT_1X: 1, SEAT_2X: 1})]
            ),
            f"init container setup asks for {SEAT_1X} and {SEAT_2X}",
        ),
        (
            _workload(
                [_asking("ok", {SEAT_1X: 1}), _asking("a", {SEAT_1X: 2, SEAT_2X: "1"})],
                [_asking("b", {SEAT_1X: 1, SEAT_2X: 1})],
            ),
            f"container a asks for {SEAT_1X} and {SEAT_2X}; "
            f"init container b asks for {SEAT_1X} and {SEAT_2X}",
        ),
    ],
    ids=["container", "init-container", "each-offender-named"],
)
def test_the_admission_policy_refuses_a_container_with_seats_of_two_profiles(
    pod: dict[str, Any], message: str
) -> None:
    policy, _ = _admission(REPO_ROOT)
    assert _admit(policy, pod) == message + ONE_PROFILE_ONLY


def test_the_admission_policy_covers_the_seat_resources_of_every_pool(three_pools: Path) -> None:
    policy, _ = _admission(three_pools)
    pod = _workload([_asking("main", {SEAT_2X: 1, SEAT_4X: 1})])
    assert _admit(policy, pod) == f"container main asks for {SEAT_2X} and {SEAT_4X}" + (
        ONE_PROFILE_ONLY
    )
    every = _workload([_asking("main", {SEAT_1X: 1, SEAT_2X: 1, SEAT_4X: 1})])
    assert _admit(policy, every) == (
        f"container main asks for {SEAT_1X} and {SEAT_2X} and {SEAT_4X}" + ONE_PROFILE_ONLY
    )


def test_with_one_seat_resource_the_admission_policy_is_rendered_and_admits_every_pod(
    repo_copy: Path,
) -> None:
    deployment = {**THREE_POOLS, "pools": [_pool("h100", "h100", H100_CONFIG)]}
    policy, _ = _admission(_with_deployment(repo_copy, deployment))
    pod = _workload([_asking("main", {SEAT_4X: 2, SEAT_1X: 1, SEAT_2X: 1})])
    assert _admit(policy, pod) is None


# --- refusing bad deployments ---------------------------------------------------------


def _problems(repo_copy: Path, deployment: dict[str, Any]) -> list[str]:
    with pytest.raises(stubs.CodegenError) as error:
        manifests.generate(_with_deployment(repo_copy, deployment))
    return str(error.value).splitlines()


def test_a_pool_config_the_plugin_refuses_is_refused_with_its_loader_message(
    repo_copy: Path,
) -> None:
    bad = {**H100_CONFIG, "profiles": [{"resource": "kyb.ai/gpu-3x-seat", "seatsPerGroup": 0}]}
    deployment = {**THREE_POOLS, "pools": [_pool("h100", "h100", bad)]}

    problems = _problems(repo_copy, deployment)

    assert problems
    assert all(
        p.startswith("codegen/deployment.yaml: pools[0].config: profiles[0].") for p in problems
    )
    assert any("seatsPerGroup" in p for p in problems)
    assert any("resource" in p for p in problems)


def test_unknown_keys_in_the_deployment_file_are_refused(repo_copy: Path) -> None:
    pool = {**_pool("a100", "a100", A100_CONFIG), "privileged": True}
    problems = _problems(repo_copy, {**THREE_POOLS, "pools": [pool]})
    assert problems == ["codegen/deployment.yaml: pools[0].privileged: unknown key"]


def test_pools_that_could_share_a_node_are_refused(repo_copy: Path) -> None:
    first = _pool("a100", "a100", A100_CONFIG)
    second = {**_pool("more", "a100", H100_CONFIG), "nodeSelector": {"kyb.ai/gpu": "a100"}}

    (problem,) = _problems(repo_copy, {**THREE_POOLS, "pools": [first, second]})

    assert "'a100' and 'more' can select the same node" in problem


def test_host_paths_that_overlap_or_are_relative_are_refused(repo_copy: Path) -> None:
    config = {
        **H100_CONFIG,
        "stateDir": "/var/lib/kubelet/device-plugins/kyb",
        "podResourcesSocket": "kubelet.sock",
    }
    problems = _problems(repo_copy, {**THREE_POOLS, "pools": [_pool("h100", "h100", config)]})
    assert problems == [
        "codegen/deployment.yaml: pools[0].config: podResourcesSocket: "
        "must be an absolute path below /, got 'kubelet.sock'",
        "codegen/deployment.yaml: pools[0].config: kubeletDir and stateDir must lie in "
        "separate directories (one host mount each), got '/var/lib/kubelet/device-plugins' "
        "and '/var/lib/kubelet/device-plugins/kyb'",
    ]


def test_cli_reports_each_problem_on_its_own_line_and_exits_1(
    repo_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = {"profiles": [{"resource": "kyb.ai/gpu-1x-seat", "seatsPerGroup": 0}], "drain": 3}
    _with_deployment(repo_copy, {**THREE_POOLS, "pools": [_pool("a100", "a100", bad)]})
    monkeypatch.setattr(cli, "REPO_ROOT", repo_copy)

    assert cli.main(["manifests", "--check"]) == 1

    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert all(
        line.startswith("codegen: codegen/deployment.yaml: pools[0].config: ") for line in lines
    )
