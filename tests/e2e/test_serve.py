"""The real process, the kubelet simulator, real gRPC over real Unix sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import grpc
import pytest

from pkg.deviceplugin.api.deviceplugin.v1beta1 import api_pb2
from pkg.deviceplugin.kubeletsim.simulator import AdmissionError, ContainerSpec
from pkg.deviceplugin.topology import grouping
from pkg.deviceplugin.types import Topology, group_size_of
from tests.e2e import hostile, support
from tests.e2e.conftest import RESOURCES

TOPOLOGY = support.topology_of()
SEATS = {"kyb.ai/gpu-1x-seat": 4, "kyb.ai/gpu-2x-seat": 3}  # the built-in default


def expected_seats(resource: str, topology: Topology = TOPOLOGY) -> int:
    return (len(topology.gpus) // group_size_of(resource)) * SEATS[resource]


def needs_seats(resource: str) -> None:
    if expected_seats(resource) == 0:
        pytest.skip(f"topology {support.TOPOLOGY} has no group for {resource}")


@pytest.mark.e2e
def test_every_profile_registers_on_its_own_socket_with_its_seat_count(
    serving: support.Node,
) -> None:
    for resource in RESOURCES:
        endpoint = serving.kubelet.endpoints[resource]
        assert endpoint.socket == f"kyb-gpu-{group_size_of(resource)}x-seat.sock"
        assert (serving.kubelet_dir / endpoint.socket).exists()
        assert endpoint.options.get_preferred_allocation_available
        assert len(serving.kubelet.healthy(resource)) == expected_seats(resource)
    assert serving.kubelet.register_errors == []


@pytest.mark.e2e
def test_allocate_returns_the_seat_envs_annotations_and_minor_numbered_device_specs(
    serving: support.Node,
) -> None:
    resource = "kyb.ai/gpu-2x-seat"
    needs_seats(resource)
    pod = serving.kubelet.admit("job", [ContainerSpec("main", {resource: 1})])
    [allocation] = pod.allocations["main"]
    envs = dict(allocation.response.envs)
    assert envs["KYB_GPU_SEAT"] == allocation.device_ids[0]
    assert envs["KYB_GPU_SEAT"].startswith(envs["KYB_GPU_GROUP"] + "-s")
    assert envs["KYB_SEAT_GEN"] == "1"
    assert envs["KYB_RESOURCE"] == resource
    indices = [int(i) for i in envs["KYB_GPU_INDICES"].split(",")]
    gpus = [TOPOLOGY.gpu(i) for i in indices]
    pairs = {str(grouping.group_name(m)): list(m) for m in grouping.partition(TOPOLOGY, 2)}
    assert sorted(indices) == pairs[envs["KYB_GPU_GROUP"]]
    # the container's own CUDA ordinals, its GPUs listed in PCI bus order
    assert envs["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert envs["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert [g.pci_bus_id for g in gpus] == sorted(g.pci_bus_id for g in gpus)
    assert envs["NVIDIA_VISIBLE_DEVICES"] == ",".join(g.uuid for g in gpus)
    assert envs["KYB_GPU_UUIDS"] == envs["NVIDIA_VISIBLE_DEVICES"]
    annotations = dict(allocation.response.annotations)
    assert annotations["kyb.ai/gpu-group"] == envs["KYB_GPU_GROUP"]
    assert annotations["kyb.ai/gpu-seat"] == envs["KYB_GPU_SEAT"]
    assert annotations["kyb.ai/gpu-indices"] == envs["KYB_GPU_INDICES"]
    assert annotations["kyb.ai/seat-gen"] == "1"
    specs = [(d.host_path, d.container_path, d.permissions) for d in allocation.response.devices]
    assert specs[: len(gpus)] == [(f"/dev/nvidia{g.minor}",) * 2 + ("rw",) for g in gpus]
    assert ("/dev/nvidiactl", "/dev/nvidiactl", "rw") in specs


@pytest.mark.e2e
def test_the_uvm_device_nodes_offered_are_those_the_nodes_dev_has(node: support.Node) -> None:
    resource = "kyb.ai/gpu-1x-seat"
    needs_seats(resource)
    dev_root = node.root / "host"
    (dev_root / "dev").mkdir(parents=True)
    (dev_root / "dev" / "nvidia-uvm").touch()
    node.extra_args = ("--dev-root", str(dev_root))
    node.start_plugin()
    assert node.wait_registered(RESOURCES), node.log()
    pod = node.kubelet.admit("uvm", [ContainerSpec("main", {resource: 1})])
    paths = [d.host_path for d in pod.allocations["main"][0].response.devices]
    assert "/dev/nvidia-uvm" in paths
    assert "/dev/nvidia-uvm-tools" not in paths


@pytest.mark.e2e
def test_a_2x_seat_away_from_gpu_0_gets_cuda_ordinals_0_and_1(serving: support.Node) -> None:
    # Under the NVIDIA runtime the container sees only its GPUs, numbered from 0: host
    # indices such as 2,3 in CUDA_VISIBLE_DEVICES would select no GPU there.
    resource = "kyb.ai/gpu-2x-seat"
    pairs = grouping.partition(TOPOLOGY, 2)
    if len(pairs) < 2:
        pytest.skip(f"topology {support.TOPOLOGY} has no 2x group away from GPU 0")
    for n in range(len(pairs)):
        pod = serving.kubelet.admit(f"away-{n}", [ContainerSpec("main", {resource: 1})])
        envs = dict(pod.allocations["main"][0].response.envs)
        if "0" not in envs["KYB_GPU_INDICES"].split(","):
            break
    else:
        pytest.fail("no 2x seat landed on a group without GPU 0")
    assert envs["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert len(envs["KYB_GPU_INDICES"].split(",")) == 2


@pytest.mark.e2e
def test_unknown_or_duplicate_ids_are_invalid_argument_and_the_server_stays_up(
    serving: support.Node,
) -> None:
    resource = "kyb.ai/gpu-1x-seat"
    needs_seats(resource)
    plugin = support.plugin_stub(serving, resource)
    for ids in (["nope-s9"], ["G0-s0", "G0-s0"]):
        with pytest.raises(grpc.RpcError) as err:
            plugin.Allocate(
                api_pb2.AllocateRequest(
                    container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=ids)]
                ),
                timeout=5,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = err.value.details()
        assert details is not None and ids[0] in details
    options = plugin.GetDevicePluginOptions(api_pb2.Empty(), timeout=5)
    assert options.get_preferred_allocation_available
    assert serving.process is not None and serving.process.poll() is None


@pytest.mark.e2e
def test_a_flood_of_unknown_ids_is_invalid_argument_with_a_short_message(
    serving: support.Node,
) -> None:
    # Before, the message quoted every ID: 100k IDs gave ~700 kB of details and the
    # client saw RESOURCE_EXHAUSTED (metadata over gRPC's hard limit) instead.
    plugin = support.plugin_stub(serving, "kyb.ai/gpu-1x-seat")
    for ids in ([f"nope-{i}" for i in range(100_000)], ["x" * 1_000_000]):
        with pytest.raises(grpc.RpcError) as err:
            plugin.Allocate(
                api_pb2.AllocateRequest(
                    container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=ids)]
                ),
                timeout=30,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        details = err.value.details()
        assert details is not None and len(details) < 1000
    assert max(len(line) for line in serving.log().splitlines()) < 2000


@pytest.mark.e2e
def test_init_container_seat_passes_to_the_app_container_with_the_same_generation(
    serving: support.Node,
) -> None:
    resource = "kyb.ai/gpu-1x-seat"
    needs_seats(resource)
    pod = serving.kubelet.admit(
        "with-init",
        [ContainerSpec("app", {resource: 2})],
        init_containers=[ContainerSpec("init", {resource: 2})],
    )
    init, app = pod.allocations["init"][0], pod.allocations["app"][0]
    assert sorted(app.device_ids) == sorted(init.device_ids)
    assert app.response.envs["KYB_SEAT_GEN"] == init.response.envs["KYB_SEAT_GEN"] == "1,1"
    # the kubelet sends the IDs in any order; both containers get the very same answer
    assert dict(app.response.envs) == dict(init.response.envs)
    assert dict(app.response.annotations) == dict(init.response.annotations)


@pytest.mark.e2e
def test_a_reused_seat_after_its_pod_is_deleted_gets_a_higher_generation(
    serving: support.Node,
) -> None:
    resource = "kyb.ai/gpu-1x-seat"
    needs_seats(resource)
    first = serving.kubelet.admit("first", [ContainerSpec("main", {resource: 1})])
    seat = first.allocations["main"][0].device_ids
    time.sleep(0.8)  # one reconcile pass sees the holder in PodResources
    serving.kubelet.delete("first")
    plugin = support.plugin_stub(serving, resource)
    reply = plugin.Allocate(
        api_pb2.AllocateRequest(
            container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=seat)]
        ),
        timeout=5,
    )
    assert reply.container_responses[0].envs["KYB_SEAT_GEN"] == "2"
    # The release is one log line naming the seat, its group and the group's GPUs.
    envs = reply.container_responses[0].envs
    released = (
        f"[resource={resource} group={envs['KYB_GPU_GROUP']} seat={seat[0]} "
        f"gpus={envs['KYB_GPU_INDICES']} generation=1]"
    )
    assert any(
        "seat released: " in line and line.endswith(released) for line in serving.log().splitlines()
    ), serving.log()


@pytest.mark.e2e
def test_holding_a_1x_seat_fences_the_2x_group_in_list_and_watch(serving: support.Node) -> None:
    if expected_seats("kyb.ai/gpu-2x-seat") == 0:
        pytest.skip(f"topology {support.TOPOLOGY} has no 2x group")
    before = len(serving.kubelet.healthy("kyb.ai/gpu-2x-seat"))
    pod = serving.kubelet.admit("solo", [ContainerSpec("main", {"kyb.ai/gpu-1x-seat": 1})])
    assert pod.allocations["main"][0].response.envs["KYB_SEAT_GEN"] == "1"
    assert support.wait_until(
        lambda: len(serving.kubelet.healthy("kyb.ai/gpu-2x-seat")) == before - 3, 2.0
    )
    with pytest.raises(AdmissionError):
        serving.kubelet.admit(
            "pair", [ContainerSpec("main", {"kyb.ai/gpu-2x-seat": before // 3 * 3})]
        )


@pytest.mark.e2e
@pytest.mark.kubelet_race
def test_kubelet_restart_reregisters_every_profile_within_a_second(
    serving_each: support.Node,
) -> None:
    """And before the restarted kubelet re-admits its running pods (70 ms after its
    new kubelet.sock): it kills a pod whose init container holds a seat of a profile
    not registered by then (conformance/kubelet/README.md, "The real kubelet binary")."""
    serving = serving_each
    topology = support.topology_of(serving.topology)
    held = [r for r in RESOURCES if expected_seats(r, topology)]
    for resource in held:
        serving.kubelet.admit(
            f"init-{group_size_of(resource)}x",
            [ContainerSpec("app", {resource: 1})],
            init_containers=[ContainerSpec("init", {resource: 1})],
        )
    # Held seats fence others (pushed over ListAndWatch after each Allocate): what
    # the kubelet is offered with the pods running.
    time.sleep(0.3)
    offered = {r: len(serving.kubelet.healthy(r)) for r in RESOURCES}
    before = {r: serving.kubelet.endpoints[r].registrations for r in RESOURCES}
    started = time.monotonic()
    serving.kubelet.restart()
    assert serving.wait_registered(RESOURCES, timeout=3.0, after=before), serving.log()
    assert time.monotonic() - started < 1.0, serving.log()
    assert serving.kubelet.wait_readmitted()
    assert serving.kubelet.killed == {}, serving.log()
    assert len(serving.kubelet.pods) == len(held)
    assert serving.kubelet.wait_for(
        lambda: {r: len(serving.kubelet.healthy(r)) for r in RESOURCES} == offered, 2.0
    ), serving.log()


@pytest.mark.e2e
def test_kubelet_absent_at_start_is_waited_for_and_logged_once(node: support.Node) -> None:
    node.kubelet.stop()
    node.start_plugin()
    time.sleep(1.5)
    assert node.process is not None and node.process.poll() is None
    node.kubelet.start()
    assert node.wait_registered(RESOURCES, timeout=8.0), node.log()
    failures = [
        line for line in node.log().splitlines() if "registration with the kubelet failed" in line
    ]
    assert len(failures) <= len(RESOURCES), failures


@pytest.mark.e2e
def test_sigterm_stops_serving_removes_its_sockets_and_exits_zero(serving: support.Node) -> None:
    sockets = [serving.kubelet_dir / serving.kubelet.endpoints[r].socket for r in RESOURCES]
    assert all(s.exists() for s in sockets)
    assert serving.stop_plugin(signal.SIGTERM) == 0
    assert not any(s.exists() for s in sockets)
    assert (serving.kubelet_dir / "kubelet.sock").exists()
    assert serving.kubelet.wait_for(
        lambda: all(not serving.kubelet.endpoints[r].connected for r in RESOURCES), 3.0
    )
    assert (serving.state_dir / "state.json").exists()


@pytest.mark.e2e
def test_an_idle_plugin_asks_podresources_only_while_an_answer_could_change_something(
    node: support.Node,
) -> None:
    # Each List wakes grpc's thread pool for about a second (bench/README.md, "Idle"):
    # an idle node asks nothing; a held seat, and a release's grace, are watched.
    resource = "kyb.ai/gpu-1x-seat"
    needs_seats(resource)
    # What is pinned is "asks while it could matter, never otherwise", not the rate: a
    # busy CPU (six test environments on two cores) once slowed the 200 ms loop to one
    # answer in two seconds, and nothing makes it ask when it should not.
    grace_s = 6.0
    node.extra_args = ("--reconcile-interval", "200ms", "--release-grace-period", f"{grace_s:g}s")
    node.start_plugin()
    assert node.wait_registered(RESOURCES), node.log()

    def lists_in(seconds: float) -> int:
        before = node.kubelet.list_calls
        time.sleep(seconds)
        return node.kubelet.list_calls - before

    def asks_again(times: int, within_s: float) -> bool:
        before = node.kubelet.list_calls
        return support.wait_until(lambda: node.kubelet.list_calls - before >= times, within_s)

    time.sleep(0.5)  # the start's answer
    assert lists_in(1.5) == 0
    # a seat to admit on (flaky-4's scripted faults make every GPU suspect for seconds)
    assert node.kubelet.wait_for(lambda: bool(node.kubelet.healthy(resource)), 10.0)
    node.kubelet.admit("p", [ContainerSpec("main", {resource: 1})])
    assert asks_again(3, 10.0)  # every 200 ms while the seat is held
    node.kubelet.delete("p")
    assert support.wait_until(lambda: "seat released" in node.log(), 10.0), node.log()
    released = time.monotonic()
    assert asks_again(1, grace_s - 2.0)  # its holder may come back within the grace
    time.sleep(max(0.0, released + grace_s + 0.5 - time.monotonic()))
    assert lists_in(1.5) == 0


@pytest.mark.e2e
def test_a_plugin_restarted_without_its_ledger_serves_again_within_seconds(
    serving: support.Node,
) -> None:
    # After a lost ledger no seat is handed out until PodResources has answered twice,
    # 2 s apart; the runtime asks the second time 2 s after start, not a whole
    # reconcileInterval (30 s here) later.
    assert serving.stop_plugin(signal.SIGKILL) == -signal.SIGKILL
    (serving.state_dir / "state.json").unlink()
    serving.extra_args = (*serving.extra_args, "--reconcile-interval", "30s")
    before = {r: serving.kubelet.endpoints[r].registrations for r in RESOURCES}
    serving.start_plugin()
    assert serving.wait_registered(RESOURCES, after=before), serving.log()
    assert support.wait_until(
        lambda: "answered twice since the seat ledger was lost" in serving.log(), 6.0
    ), serving.log()


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_restarted_plugin_keeps_every_binding_and_generation(
    serving: support.Node, sig: signal.Signals
) -> None:
    resource = "kyb.ai/gpu-1x-seat"
    needs_seats(resource)
    pod = serving.kubelet.admit("keeper", [ContainerSpec("main", {resource: 1})])
    seat = pod.allocations["main"][0].device_ids
    assert serving.stop_plugin(sig) == (-sig if sig == signal.SIGKILL else 0)
    reserved = json.loads((serving.state_dir / "generations.json").read_text())["reserved"]
    before = {r: serving.kubelet.endpoints[r].registrations for r in RESOURCES}
    serving.start_plugin()
    assert serving.wait_registered(RESOURCES, after=before), serving.log()
    doc = json.loads((serving.state_dir / "state.json").read_text())
    [(group, entry)] = [
        (group, group["seats"][seat[0]])
        for group in doc["resources"][resource]["groups"].values()
        if seat[0] in group["seats"]
    ]
    # held, unless a GPU of its group is unhealthy by now (flaky-4 scripts faults from
    # 1 s after the backend starts; a slow restart can reach them)
    state = "held" if group["health"] == "Healthy" else "unhealthy"
    assert (entry["state"], entry["binding"]["generation"]) == (state, 1)
    # the seat's next Allocate after the restart is a new holder, never generation 1 again:
    # after a clean stop the next one; after a crash the first above the reservation
    # (journal lines could have been lost without a trace)
    reply = support.plugin_stub(serving, resource).Allocate(
        api_pb2.AllocateRequest(
            container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=seat)]
        ),
        timeout=5,
    )
    want = reserved + 1 if sig == signal.SIGKILL else 2
    assert reply.container_responses[0].envs["KYB_SEAT_GEN"] == str(want)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cmd.kyb_device_plugin", *args],
        cwd=support.REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.own_topology
def test_bad_config_exits_2_with_one_line_per_problem_and_no_traceback() -> None:
    root = support.short_tmpdir()
    config = root / "bad.yaml"
    config.write_text("profiles:\n  - resource: kyb.ai/gpu-3x-seat\n    seatsPerGroup: 0\n")
    done = run_cli("plan", "--config", str(config), "--nvml-mock", "dgx-a100")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2, done.stderr
    assert any("profiles[0].seatsPerGroup" in line for line in lines)
    assert any("profiles[0].resource" in line for line in lines)
    assert all(str(config) in line for line in lines)
    assert "Traceback" not in done.stderr


@pytest.mark.own_topology
def test_tab_indentation_gets_its_own_message() -> None:
    config = support.short_tmpdir() / "tabs.yaml"
    config.write_text("profiles:\n\t- resource: kyb.ai/gpu-1x-seat\n")
    done = run_cli("plan", "--config", str(config), "--nvml-mock", "dgx-a100")
    assert done.returncode == 2
    assert "tab" in done.stderr.lower()
    assert "Traceback" not in done.stderr


@pytest.mark.own_topology
def test_an_unknown_gpu_index_in_a_group_names_the_file_and_key_path() -> None:
    config = support.short_tmpdir() / "groups.yaml"
    config.write_text(
        "profiles:\n  - resource: kyb.ai/gpu-2x-seat\n    seatsPerGroup: 2\n"
        "groups:\n  - name: G01\n    gpus: [0, 1]\n  - name: G99\n    gpus: [2, 99]\n"
    )
    done = run_cli("plan", "--config", str(config), "--nvml-mock", "dgx-a100")
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {config}: groups[1].gpus: unknown GPU index 99"), line
    assert "G99" in line


@pytest.mark.own_topology
def test_groups_from_a_flag_name_the_flag_not_the_file() -> None:
    done = run_cli("plan", "--nvml-mock", "dgx-a100", "--groups", "[{name: G0x, gpus: [0, 42]}]")
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: --groups: groups[0].gpus: unknown GPU index 42"), line


@pytest.mark.own_topology
def test_more_gpus_than_exact_grouping_handles_is_one_line_naming_the_limit() -> None:
    root = support.short_tmpdir()
    count = 17
    rows = [["X" if i == j else "SYS" for j in range(count)] for i in range(count)]
    gpus = [
        {
            "index": i,
            "uuid": f"GPU-{i:08d}-0000-0000-0000-000000000000",
            "name": "NVIDIA H100 80GB HBM3",
            "memoryMiB": 81920,
            "pciBusId": f"00000000:{i + 16:02X}:00.0",
            "minor": i,
            "numaNode": 0,
        }
        for i in range(count)
    ]
    (root / "big.json").write_text(json.dumps({"gpus": gpus, "links": rows}))
    done = run_cli(
        "plan",
        "--nvml-mock",
        str(root / "big.json"),
        env={
            "KYB_CONFIG": "",
            "KYB_PROFILES": "[{resource: kyb.ai/gpu-2x-seat, seatsPerGroup: 1}]",
        },
    )
    assert done.returncode == 2, done.stdout
    [line] = done.stderr.strip().splitlines()
    assert "profiles[0] (kyb.ai/gpu-2x-seat)" in line and "at most 16 GPUs" in line, line
    assert "17" in line and "Traceback" not in done.stderr
    # a 1x profile needs no search: it serves every GPU
    single = run_cli(
        "plan",
        "--nvml-mock",
        str(root / "big.json"),
        "--output",
        "json",
        env={
            "KYB_CONFIG": "",
            "KYB_PROFILES": "[{resource: kyb.ai/gpu-1x-seat, seatsPerGroup: 1}]",
        },
    )
    assert single.returncode == 0, single.stderr
    assert len(json.loads(single.stdout)["resources"]["kyb.ai/gpu-1x-seat"]["groups"]) == count


@pytest.mark.own_topology
def test_no_gpu_and_no_mock_is_one_line_and_exit_1() -> None:
    env = {"LD_LIBRARY_PATH": "", "KYB_NVML_MOCK": ""}
    done = run_cli("plan", env=env)
    if done.returncode == 0:
        pytest.skip("this machine has a real NVIDIA GPU")
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "--nvml-mock" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.own_topology
def test_unknown_mock_name_lists_the_built_in_fixtures() -> None:
    done = run_cli("plan", "--nvml-mock", "no-such-box")
    assert done.returncode == 1
    assert "dgx-a100" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.own_topology
def test_bad_flag_is_usage_error_exit_2() -> None:
    done = run_cli("plan", "--no-such-flag")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr


@pytest.mark.own_topology
def test_the_cmd_package_keeps_the_standard_cmd_module_and_pdb_working() -> None:
    probe = (
        "import runpy, sys\n"
        "import cmd.kyb_device_plugin\n"
        "import cmd, pdb\n"
        "class Shell(cmd.Cmd):\n"
        "    def do_hi(self, arg):\n"
        "        print('hi', arg)\n"
        "Shell().onecmd('hi there')\n"
        "assert issubclass(pdb.Pdb, cmd.Cmd)\n"
        "pdb.Pdb()\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=support.REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["hi", "there", "ok"]
    help_run = run_cli("--help")
    assert help_run.returncode == 0
    assert "serve" in help_run.stdout


@pytest.mark.own_topology
def test_demo_registers_every_profile_admits_pods_and_exits_zero() -> None:
    done = run_cli("demo")
    assert done.returncode == 0, done.stdout + done.stderr
    for resource in RESOURCES:
        assert f"registered {resource}" in done.stdout
    assert "pod trainer/warmup" in done.stdout and "pod trainer/main" in done.stdout
    assert "seat map:" in done.stdout


@pytest.mark.e2e
def test_healthz_passes_while_serving_and_fails_once_stopped(serving: support.Node) -> None:
    args = ["--kubelet-dir", str(serving.kubelet_dir)]
    alive = run_cli("healthz", *args)
    assert alive.returncode == 0, alive.stderr
    assert serving.process is not None
    serving.process.send_signal(signal.SIGSTOP)  # alive but wedged: answers nothing
    try:
        wedged = run_cli("healthz", *args)
    finally:
        serving.process.send_signal(signal.SIGCONT)
    assert wedged.returncode == 1
    assert "does not answer" in wedged.stderr


@pytest.mark.e2e
def test_status_shows_the_live_seat_map_as_json_and_as_a_table(serving: support.Node) -> None:
    resource = "kyb.ai/gpu-1x-seat"
    needs_seats(resource)
    pod = serving.kubelet.admit("shown", [ContainerSpec("main", {resource: 1})])
    seat = pod.allocations["main"][0].device_ids[0]
    group = seat.rsplit("-s", 1)[0]
    holder = {"namespace": "default", "pod": "shown", "container": "main"}

    def saved_holder() -> object:  # the state file is written just behind the Allocate
        doc = json.loads((serving.state_dir / "state.json").read_text())
        binding = doc["resources"][resource]["groups"][group]["seats"][seat].get("binding")
        return (binding or {}).get("holder")

    # the holder is named once PodResources has shown the container (a reconcile)
    assert support.wait_until(lambda: saved_holder() == holder, 5.0), serving.log()
    args = ["--state-dir", str(serving.state_dir)]
    done = run_cli("status", "--output", "json", *args)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    entry = doc["resources"][resource]["groups"][group]
    assert entry["seats"][seat] == {"state": "held", "generation": 1, "holder": holder}
    assert entry["health"] == "Healthy"
    assert set(doc["resources"]) == set(RESOURCES)
    table = run_cli("status", *args)
    assert table.returncode == 0
    assert f"{seat}=held/g1(default/shown/main)" in table.stdout


@pytest.mark.e2e
def test_many_concurrent_allocates_across_profiles_leave_no_gpu_with_two_holders(
    serving: support.Node,
) -> None:
    if expected_seats("kyb.ai/gpu-2x-seat") == 0:
        pytest.skip(f"topology {support.TOPOLOGY} has no 2x group")
    pair = grouping.partition(TOPOLOGY, 2)[0]
    first_pair = grouping.group_name(pair)
    singles = [grouping.group_name((i,)) for i in pair]
    jobs = [("kyb.ai/gpu-2x-seat", f"{first_pair}-s{k % 3}") for k in range(12)] + [
        ("kyb.ai/gpu-1x-seat", f"{singles[k % 2]}-s{k % 4}") for k in range(12)
    ]
    barrier = threading.Barrier(len(jobs))
    outcomes: list[tuple[str, str]] = []

    def attempt(resource: str, seat: str) -> None:
        plugin = support.plugin_stub(serving, resource)
        barrier.wait()
        try:
            support.allocate(plugin, [seat])
            outcomes.append((resource, "ok"))
        except grpc.RpcError as exc:
            outcomes.append((resource, exc.code().name))

    threads = [threading.Thread(target=attempt, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = {r for r, outcome in outcomes if outcome == "ok"}
    assert len(outcomes) == len(jobs)
    assert len(winners) == 1, outcomes
    assert {o for _, o in outcomes} <= {"ok", "FAILED_PRECONDITION"}


@pytest.mark.e2e
def test_plugin_killed_and_terminated_amid_admissions_keeps_every_generation(
    serving: support.Node,
) -> None:
    resource = "kyb.ai/gpu-1x-seat"
    needs_seats(resource)
    highest: dict[str, int] = {}

    def admit_and_delete(round_: int) -> None:
        for i in range(3):
            name = f"r{round_}-{i}"
            try:
                pod = serving.kubelet.admit(name, [ContainerSpec("main", {resource: 1})])
            except AdmissionError:
                continue
            allocation = pod.allocations["main"][0]
            seat, gen = allocation.device_ids[0], int(allocation.response.envs["KYB_SEAT_GEN"])
            assert gen >= highest.get(seat, 0), (seat, gen, highest)
            highest[seat] = gen
            if i % 2 == 0:
                time.sleep(0.6)  # seen by a reconcile pass, then gone: the next binding is new
                serving.kubelet.delete(name)

    for round_, sig in enumerate((signal.SIGKILL, signal.SIGTERM, signal.SIGKILL)):
        admit_and_delete(round_)
        before = {r: serving.kubelet.endpoints[r].registrations for r in RESOURCES}
        serving.stop_plugin(sig)
        serving.start_plugin()
        assert serving.wait_registered(RESOURCES, after=before), serving.log()
    admit_and_delete(9)

    def saved_seats() -> dict[str, Any]:
        state = json.loads((serving.state_dir / "state.json").read_text())
        return {
            seat_id: seat
            for group in state["resources"][resource]["groups"].values()
            for seat_id, seat in group["seats"].items()
        }

    # the state file follows a new binding's journal line about 20 ms later (README)
    deadline = time.monotonic() + 2.0
    while True:
        seats = saved_seats()
        behind = {s: g for s, g in highest.items() if seats[s]["generation"] < g}
        if not behind or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not behind, (behind, seats)
    held = {
        d
        for p in serving.kubelet.pods.values()
        for a in p.allocations["main"]
        for d in a.device_ids
    }
    # Every seat a live pod holds is still bound in the ledger, with its pod's generation.
    # (Its shown state may be "unhealthy" instead of "held" on a topology whose scripted
    # faults replay after each restart: health wins over held in the seat map.)
    bound = {s: v["binding"]["generation"] for s, v in seats.items() if "binding" in v}
    assert set(bound) >= held
    for seat_id in held:
        assert bound[seat_id] == highest[seat_id]
        assert seats[seat_id]["state"] in ("held", "unhealthy")


def _limit_memory() -> None:  # pragma: no cover - runs in the child
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


@pytest.mark.own_topology
@pytest.mark.parametrize("kind", sorted(hostile.HOSTILE_CONFIGS))
def test_a_hostile_config_exits_2_with_one_line_naming_the_file(kind: str) -> None:
    """Issue 18: an alias bomb hung `plan` (4 GB, killed at 90 s), deep nesting exited 1
    with RecursionError, a NUL byte added a second line without the file name."""
    config = support.short_tmpdir() / "hostile.yaml"
    config.write_text(hostile.HOSTILE_CONFIGS[kind])
    done = subprocess.run(
        [sys.executable, "-m", "cmd.kyb_device_plugin", "plan", "--config", str(config)],
        cwd=support.REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KYB_NVML_MOCK": "dgx-a100"},
        preexec_fn=_limit_memory,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and str(config) in lines[0], done.stderr[-2000:]


@pytest.mark.own_topology
@pytest.mark.parametrize("kind", ["alias bomb", "5000-deep flow nesting"])
def test_a_hostile_mock_topology_file_is_one_line(kind: str) -> None:
    topology = support.short_tmpdir() / "hostile-topology.yaml"
    topology.write_text(hostile.HOSTILE_CONFIGS[kind].replace("profiles", "gpus"))
    done = run_cli("plan", "--nvml-mock", str(topology))
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and str(topology) in lines[0], done.stderr
