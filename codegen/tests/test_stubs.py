"""The kubelet API stubs: committed, fresh, importable and wire-compatible.

The field numbers pinned below were checked against the descriptors compiled into
k8s.io/kubelet v0.34.1 (Kubernetes 1.34.1); the kubelet only understands these.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor, FileDescriptor

from codegen import __main__ as cli
from codegen import stubs
from pkg.deviceplugin.api.deviceplugin.v1beta1 import api_pb2 as dp
from pkg.deviceplugin.api.deviceplugin.v1beta1 import api_pb2_grpc as dp_grpc
from pkg.deviceplugin.api.podresources.v1 import api_pb2 as pr
from pkg.deviceplugin.api.podresources.v1 import api_pb2_grpc as pr_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
V1BETA1 = f"{stubs.OUTPUT_ROOT}/deviceplugin/v1beta1"


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """The protos and the generated tree, copied so a test may break them."""
    ignore = shutil.ignore_patterns("__pycache__")
    for part in (stubs.PROTO_ROOT, stubs.OUTPUT_ROOT):
        shutil.copytree(REPO_ROOT / part, tmp_path / part, ignore=ignore)
    return tmp_path


def test_committed_stubs_are_fresh() -> None:
    assert stubs.check(REPO_ROOT) == []


def test_check_cli_exits_zero_when_fresh() -> None:
    assert cli.main(["stubs", "--check"]) == 0


def test_check_names_each_stale_missing_and_extra_file(repo_copy: Path) -> None:
    with (repo_copy / V1BETA1 / "api_pb2.py").open("ab") as stale:
        stale.write(b"# hand edit\n")
    (repo_copy / V1BETA1 / "api_pb2_grpc.pyi").unlink()
    (repo_copy / V1BETA1 / "leftover_pb2.py").write_bytes(b"")
    (repo_copy / V1BETA1 / "__pycache__").mkdir()
    (repo_copy / V1BETA1 / "__pycache__" / "api_pb2.cpython-311.pyc").write_bytes(b"")

    problems = stubs.check(repo_copy)

    assert [line.split(":")[0] for line in problems] == [
        f"{V1BETA1}/api_pb2.py",
        f"{V1BETA1}/api_pb2_grpc.pyi",
        f"{V1BETA1}/leftover_pb2.py",
    ]
    assert all("python -m codegen stubs" in line for line in problems)


def test_check_reports_stubs_stale_after_a_proto_changes(repo_copy: Path) -> None:
    proto = repo_copy / stubs.PROTO_ROOT / V1BETA1 / "api.proto"
    proto.write_text(proto.read_text() + "\nmessage Extra {}\n")

    stale = {line.split(":")[0] for line in stubs.check(repo_copy)}

    assert f"{V1BETA1}/api_pb2.py" in stale
    assert f"{V1BETA1}/api_pb2.pyi" in stale


def test_write_replaces_the_tree_wholesale(repo_copy: Path) -> None:
    (repo_copy / V1BETA1 / "leftover_pb2.py").write_bytes(b"")
    (repo_copy / V1BETA1 / "api_pb2.py").write_bytes(b"")

    stubs.write(repo_copy)

    assert stubs.check(repo_copy) == []
    assert not (repo_copy / V1BETA1 / "leftover_pb2.py").exists()


def test_generation_is_deterministic() -> None:
    assert stubs.generate(REPO_ROOT) == stubs.generate(REPO_ROOT)


def test_generated_imports_are_package_absolute() -> None:
    grpc_module = (REPO_ROOT / V1BETA1 / "api_pb2_grpc.py").read_text()
    assert "from pkg.deviceplugin.api.deviceplugin.v1beta1 import api_pb2 as" in grpc_module


def test_generated_modules_expose_the_kubelet_services() -> None:
    for name in ("RegistrationStub", "RegistrationServicer", "DevicePluginStub"):
        assert hasattr(dp_grpc, name)
    assert callable(dp_grpc.add_DevicePluginServicer_to_server)
    assert callable(dp_grpc.add_RegistrationServicer_to_server)
    assert hasattr(dp_grpc, "DevicePluginServicer")
    assert hasattr(pr_grpc, "PodResourcesListerStub")
    assert callable(pr_grpc.add_PodResourcesListerServicer_to_server)


def _rpcs(file: FileDescriptor, service: str) -> dict[str, tuple[str, str, bool]]:
    return {
        method.name: (
            method.input_type.full_name,
            method.output_type.full_name,
            method.server_streaming,
        )
        for method in file.services_by_name[service].methods
    }


def test_device_plugin_services_match_the_kubelet() -> None:
    assert dp.DESCRIPTOR.package == "v1beta1"
    assert _rpcs(dp.DESCRIPTOR, "Registration") == {
        "Register": ("v1beta1.RegisterRequest", "v1beta1.Empty", False),
    }
    assert _rpcs(dp.DESCRIPTOR, "DevicePlugin") == {
        "GetDevicePluginOptions": ("v1beta1.Empty", "v1beta1.DevicePluginOptions", False),
        "ListAndWatch": ("v1beta1.Empty", "v1beta1.ListAndWatchResponse", True),
        "GetPreferredAllocation": (
            "v1beta1.PreferredAllocationRequest",
            "v1beta1.PreferredAllocationResponse",
            False,
        ),
        "Allocate": ("v1beta1.AllocateRequest", "v1beta1.AllocateResponse", False),
        "PreStartContainer": (
            "v1beta1.PreStartContainerRequest",
            "v1beta1.PreStartContainerResponse",
            False,
        ),
    }


def test_pod_resources_service_matches_the_kubelet() -> None:
    assert pr.DESCRIPTOR.package == "v1"
    assert _rpcs(pr.DESCRIPTOR, "PodResourcesLister") == {
        "List": ("v1.ListPodResourcesRequest", "v1.ListPodResourcesResponse", False),
        "GetAllocatableResources": (
            "v1.AllocatableResourcesRequest",
            "v1.AllocatableResourcesResponse",
            False,
        ),
        "Get": ("v1.GetPodResourcesRequest", "v1.GetPodResourcesResponse", False),
    }


DEVICE_PLUGIN_FIELDS = {
    "DevicePluginOptions": {"pre_start_required": 1, "get_preferred_allocation_available": 2},
    "RegisterRequest": {"version": 1, "endpoint": 2, "resource_name": 3, "options": 4},
    "Empty": {},
    "ListAndWatchResponse": {"devices": 1},
    "TopologyInfo": {"nodes": 1},
    "NUMANode": {"ID": 1},
    "Device": {"ID": 1, "health": 2, "topology": 3},
    "PreStartContainerRequest": {"devices_ids": 1},
    "PreStartContainerResponse": {},
    "PreferredAllocationRequest": {"container_requests": 1},
    "ContainerPreferredAllocationRequest": {
        "available_deviceIDs": 1,
        "must_include_deviceIDs": 2,
        "allocation_size": 3,
    },
    "PreferredAllocationResponse": {"container_responses": 1},
    "ContainerPreferredAllocationResponse": {"deviceIDs": 1},
    "AllocateRequest": {"container_requests": 1},
    "ContainerAllocateRequest": {"devices_ids": 1},
    "CDIDevice": {"name": 1},
    "AllocateResponse": {"container_responses": 1},
    "ContainerAllocateResponse": {
        "envs": 1,
        "mounts": 2,
        "devices": 3,
        "annotations": 4,
        "cdi_devices": 5,
    },
    "Mount": {"container_path": 1, "host_path": 2, "read_only": 3},
    "DeviceSpec": {"container_path": 1, "host_path": 2, "permissions": 3},
}

POD_RESOURCES_FIELDS = {
    "AllocatableResourcesRequest": {},
    "AllocatableResourcesResponse": {"devices": 1, "cpu_ids": 2, "memory": 3},
    "ListPodResourcesRequest": {},
    "ListPodResourcesResponse": {"pod_resources": 1},
    "PodResources": {"name": 1, "namespace": 2, "containers": 3},
    "ContainerResources": {
        "name": 1,
        "devices": 2,
        "cpu_ids": 3,
        "memory": 4,
        "dynamic_resources": 5,
    },
    "ContainerMemory": {"memory_type": 1, "size": 2, "topology": 3},
    "ContainerDevices": {"resource_name": 1, "device_ids": 2, "topology": 3},
    "TopologyInfo": {"nodes": 1},
    "NUMANode": {"ID": 1},
    # Field 1 (class_name) was removed upstream in 1.31 and must stay unused.
    "DynamicResource": {"claim_name": 2, "claim_namespace": 3, "claim_resources": 4},
    "ClaimResource": {"cdi_devices": 1, "driver_name": 2, "pool_name": 3, "device_name": 4},
    "CDIDevice": {"name": 1},
    "GetPodResourcesRequest": {"pod_name": 1, "pod_namespace": 2},
    "GetPodResourcesResponse": {"pod_resources": 1},
}


def _field_numbers(file: FileDescriptor) -> dict[str, dict[str, int]]:
    return {
        name: {field.name: field.number for field in message.fields}
        for name, message in file.message_types_by_name.items()
    }


@pytest.mark.parametrize(
    ("file", "expected"),
    [(dp.DESCRIPTOR, DEVICE_PLUGIN_FIELDS), (pr.DESCRIPTOR, POD_RESOURCES_FIELDS)],
    ids=["deviceplugin-v1beta1", "podresources-v1"],
)
def test_every_message_keeps_the_kubelet_field_numbers(
    file: FileDescriptor, expected: dict[str, dict[str, int]]
) -> None:
    assert _field_numbers(file) == expected


def test_wire_types_that_are_easy_to_get_wrong() -> None:
    response = dp.ContainerAllocateResponse.DESCRIPTOR.fields_by_name
    envs, annotations = response["envs"].message_type, response["annotations"].message_type
    assert envs is not None and envs.GetOptions().map_entry
    assert annotations is not None and annotations.GetOptions().map_entry
    assert response["cdi_devices"].message_type is dp.CDIDevice.DESCRIPTOR
    assert dp.NUMANode.DESCRIPTOR.fields_by_name["ID"].type == FieldDescriptor.TYPE_INT64
    allocation = dp.ContainerPreferredAllocationRequest.DESCRIPTOR.fields_by_name
    assert allocation["allocation_size"].type == FieldDescriptor.TYPE_INT32
    assert pr.ContainerMemory.DESCRIPTOR.fields_by_name["size"].type == FieldDescriptor.TYPE_UINT64
    cpu_ids = pr.ContainerResources.DESCRIPTOR.fields_by_name["cpu_ids"]
    assert cpu_ids.type == FieldDescriptor.TYPE_INT64
    assert cpu_ids.is_repeated
