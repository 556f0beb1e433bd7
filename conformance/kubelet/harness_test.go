package conformance

// The harness: the real kubelet device manager (and the real PodResources v1
// server in front of it) in a temporary directory, our plugin as a child
// process, and helpers that play the kubelet's part (admitting pods, asking
// for run-container options, reading capacity).

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/klog/v2"
	"k8s.io/klog/v2/ktesting"
	podresourcesv1 "k8s.io/kubelet/pkg/apis/podresources/v1"
	"sigs.k8s.io/yaml"

	"k8s.io/kubernetes/pkg/kubelet/apis/podresources"
	"k8s.io/kubernetes/pkg/kubelet/cm/containermap"
	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
	"k8s.io/kubernetes/pkg/kubelet/lifecycle"
)

const (
	res1x = "kyb.ai/gpu-1x-seat"
	res2x = "kyb.ai/gpu-2x-seat"

	// How long the plugin may take to start (a Python process importing grpc
	// and pydantic on a slow CI machine) and register every profile.
	startTimeout = 30 * time.Second
	// How long a state change may take to reach the manager. SPEC section 2
	// asks for re-registration "within a second"; this leaves room for a
	// loaded machine, and the tests log the time it actually took.
	settleTimeout = 10 * time.Second
)

// ---------------------------------------------------------------- kubelet

type readySources struct{}

func (readySources) AddSource(string) {}
func (readySources) AllReady() bool   { return true }

// podStore is the kubelet's pod manager as far as the device manager and the
// PodResources server see it: the active pods.
type podStore struct {
	mu   sync.Mutex
	pods map[types.UID]*v1.Pod
}

func newPodStore() *podStore { return &podStore{pods: map[types.UID]*v1.Pod{}} }

func (s *podStore) add(p *v1.Pod) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pods[p.UID] = p
}

func (s *podStore) remove(p *v1.Pod) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.pods, p.UID)
}

func (s *podStore) GetActivePods() []*v1.Pod {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*v1.Pod, 0, len(s.pods))
	for _, p := range s.pods {
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func (s *podStore) GetPods() []*v1.Pod { return s.GetActivePods() }

func (s *podStore) GetPodByName(namespace, name string) (*v1.Pod, bool) {
	for _, p := range s.GetActivePods() {
		if p.Namespace == namespace && p.Name == name {
			return p, true
		}
	}
	return nil, false
}

// kubelet is one life of the kubelet: a device manager on DIR/kubelet.sock and
// a PodResources v1 server on its own socket. restart() ends this life (as a
// kubelet restart does: the manager stops, its socket goes away) and starts
// the next one on the same directories, which reads the manager's checkpoint
// and wipes the plugin sockets.
type kubelet struct {
	t          *testing.T
	logger     klog.Logger
	ctx        context.Context
	dir        string // the device-plugin directory
	podResSock string
	pods       *podStore

	m        *devicemanager.ManagerImpl
	prServer *grpc.Server
	stopped  bool
}

func startKubelet(t *testing.T, dir, podResSock string, pods *podStore) *kubelet {
	t.Helper()
	logger, ctx := ktesting.NewTestContext(t)
	k := &kubelet{t: t, logger: logger, ctx: ctx, dir: dir, podResSock: podResSock, pods: pods}
	k.start()
	t.Cleanup(k.stop)
	return k
}

func (k *kubelet) start() {
	k.t.Helper()
	m, err := newManagerAt(k.logger, filepath.Join(k.dir, "kubelet.sock"))
	if err != nil {
		k.t.Fatalf("creating the device manager: %v", err)
	}
	if err := m.Start(k.logger, k.pods.GetActivePods, readySources{}, containermap.NewContainerMap(), sets.New[string]()); err != nil {
		k.t.Fatalf("starting the device manager: %v", err)
	}
	k.m = m
	k.startPodResources()
	k.stopped = false
}

// startPodResources serves the kubelet's own PodResources v1 server, fed by
// this manager, on the PodResources socket.
func (k *kubelet) startPodResources() {
	k.t.Helper()
	_ = os.Remove(k.podResSock)
	ln, err := net.Listen("unix", k.podResSock)
	if err != nil {
		k.t.Fatalf("pod-resources socket: %v", err)
	}
	srv := grpc.NewServer()
	podresourcesv1.RegisterPodResourcesListerServer(srv, podresources.NewV1PodResourcesServer(k.ctx, podresources.PodResourcesProviders{
		Pods:             k.pods,
		Devices:          devicesProvider{k.m},
		Cpus:             noCPUs{},
		Memory:           noMemory{},
		DynamicResources: noDRA{},
	}))
	go func() { _ = srv.Serve(ln) }()
	k.prServer = srv
}

// stopPodResources takes the PodResources server away (its socket too) while
// the device manager keeps running: the plugin's view of the pods is down.
func (k *kubelet) stopPodResources() {
	if k.prServer == nil {
		return
	}
	k.prServer.Stop()
	k.prServer = nil
	_ = os.Remove(k.podResSock)
}

func (k *kubelet) stop() {
	if k.stopped {
		return
	}
	k.stopped = true
	k.stopPodResources()
	if err := k.m.Stop(k.logger); err != nil {
		k.t.Errorf("stopping the device manager: %v", err)
	}
}

// restart is a kubelet restart: stop, then a new manager on the same paths.
func (k *kubelet) restart() {
	k.t.Helper()
	k.stop()
	k.start()
}

// counts returns capacity and allocatable per resource, as the kubelet puts
// them into the node status (GetCapacity).
func (k *kubelet) counts() (capacity, allocatable map[string]int64) {
	c, a, _ := k.m.GetCapacity(k.logger)
	capacity, allocatable = map[string]int64{}, map[string]int64{}
	for name, q := range c {
		capacity[string(name)] = q.Value()
	}
	for name, q := range a {
		allocatable[string(name)] = q.Value()
	}
	return capacity, allocatable
}

// allocatableIDs returns the healthy device IDs per resource (GetAllocatableDevices).
func (k *kubelet) allocatableIDs() map[string]sets.Set[string] {
	out := map[string]sets.Set[string]{}
	for r, devs := range k.m.GetAllocatableDevices(k.logger) {
		out[r] = sets.New[string]()
		for id := range devs {
			out[r].Insert(id)
		}
	}
	return out
}

// admit does what the kubelet's admission does for a pod that passed the
// scheduler: the pod becomes active, then the device manager allocates for
// each init container and then each app container, in order.
func (k *kubelet) admit(pod *v1.Pod) error {
	k.pods.add(pod)
	for i := range pod.Spec.InitContainers {
		if err := k.m.Allocate(k.ctx, pod, &pod.Spec.InitContainers[i], lifecycle.AddOperation); err != nil {
			return fmt.Errorf("allocate %s/%s: %w", pod.Name, pod.Spec.InitContainers[i].Name, err)
		}
	}
	for i := range pod.Spec.Containers {
		if err := k.m.Allocate(k.ctx, pod, &pod.Spec.Containers[i], lifecycle.AddOperation); err != nil {
			return fmt.Errorf("allocate %s/%s: %w", pod.Name, pod.Spec.Containers[i].Name, err)
		}
	}
	return nil
}

// container finds a container (app or init) of the pod by name.
func container(pod *v1.Pod, name string) *v1.Container {
	for i := range pod.Spec.InitContainers {
		if pod.Spec.InitContainers[i].Name == name {
			return &pod.Spec.InitContainers[i]
		}
	}
	for i := range pod.Spec.Containers {
		if pod.Spec.Containers[i].Name == name {
			return &pod.Spec.Containers[i]
		}
	}
	panic("no container " + name)
}

// runOptions is what the kubelet hands the runtime for the container.
func (k *kubelet) runOptions(pod *v1.Pod, name string) (*devicemanager.DeviceRunContainerOptions, error) {
	return k.m.GetDeviceRunContainerOptions(k.ctx, pod, container(pod, name))
}

// deviceIDs returns the device IDs the manager recorded for the container.
func (k *kubelet) deviceIDs(pod *v1.Pod, name, resource string) sets.Set[string] {
	out := sets.New[string]()
	for id := range k.m.GetDevices(string(pod.UID), name)[resource] {
		out.Insert(id)
	}
	return out
}

type devicesProvider struct{ m *devicemanager.ManagerImpl }

func (d devicesProvider) UpdateAllocatedDevices(logger klog.Logger) {
	d.m.UpdateAllocatedDevices(logger)
}
func (d devicesProvider) GetDevices(podUID, containerName string) []*podresourcesv1.ContainerDevices {
	return containerDevices(d.m.GetDevices(podUID, containerName))
}
func (d devicesProvider) GetAllocatableDevices(logger klog.Logger) []*podresourcesv1.ContainerDevices {
	return containerDevices(d.m.GetAllocatableDevices(logger))
}

// containerDevices is pkg/kubelet/cm.containerDevicesFromResourceDeviceInstances
// (the container manager, which the kubelet puts between the two, is not
// built here): one entry per device and NUMA node.
func containerDevices(devs devicemanager.ResourceDeviceInstances) []*podresourcesv1.ContainerDevices {
	var out []*podresourcesv1.ContainerDevices
	for resourceName, resourceDevs := range devs {
		for devID, dev := range resourceDevs {
			topo := dev.GetTopology()
			if topo == nil {
				out = append(out, &podresourcesv1.ContainerDevices{ResourceName: resourceName, DeviceIds: []string{devID}})
				continue
			}
			for _, node := range topo.GetNodes() {
				out = append(out, &podresourcesv1.ContainerDevices{
					ResourceName: resourceName,
					DeviceIds:    []string{devID},
					Topology:     &podresourcesv1.TopologyInfo{Nodes: []*podresourcesv1.NUMANode{{ID: node.GetID()}}},
				})
			}
		}
	}
	return out
}

type noCPUs struct{}

func (noCPUs) GetCPUs(*v1.Pod, *v1.Container) []int64 { return nil }
func (noCPUs) GetPodCPUs(string) []int64              { return nil }
func (noCPUs) GetAllocatableCPUs() []int64            { return nil }

type noMemory struct{}

func (noMemory) GetMemory(klog.Logger, *v1.Pod, *v1.Container) []*podresourcesv1.ContainerMemory {
	return nil
}
func (noMemory) GetPodMemory(klog.Logger, string) []*podresourcesv1.ContainerMemory { return nil }
func (noMemory) GetAllocatableMemory(klog.Logger) []*podresourcesv1.ContainerMemory { return nil }

type noDRA struct{}

func (noDRA) GetDynamicResources(klog.Logger, *v1.Pod, *v1.Container) []*podresourcesv1.DynamicResource {
	return nil
}

// ---------------------------------------------------------------- pods

type ctr struct {
	name string
	res  map[string]int64
}

func newPod(name string, initCtrs, appCtrs []ctr) *v1.Pod {
	build := func(cs []ctr) []v1.Container {
		var out []v1.Container
		for _, c := range cs {
			limits := v1.ResourceList{}
			for r, n := range c.res {
				limits[v1.ResourceName(r)] = *resource.NewQuantity(n, resource.DecimalSI)
			}
			out = append(out, v1.Container{
				Name:      c.name,
				Resources: v1.ResourceRequirements{Limits: limits, Requests: limits},
			})
		}
		return out
	}
	return &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", UID: types.UID("uid-" + name)},
		Spec:       v1.PodSpec{InitContainers: build(initCtrs), Containers: build(appCtrs)},
	}
}

// ---------------------------------------------------------------- plugin

// repoRoot is the tree the plugin runs from: $KYB_REPO_ROOT, else the
// repository root (this module lives in conformance/kubelet).
func repoRoot(t *testing.T) string {
	t.Helper()
	if r := os.Getenv("KYB_REPO_ROOT"); r != "" {
		return r
	}
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Clean(filepath.Join(wd, "..", ".."))
}

// python is $KYB_PYTHON, else ../../.venv/bin/python (the repository's
// .venv), else python3.
func python(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("KYB_PYTHON"); p != "" {
		return p
	}
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	venv := filepath.Join(wd, "..", "..", ".venv", "bin", "python")
	if _, err := os.Stat(venv); err == nil {
		return venv
	}
	p, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("skipped: no Python (set KYB_PYTHON, or create the repository's .venv)")
	}
	return p
}

// pluginEnv is the environment without KYB_* settings, so that the plugin
// sees only the flags the test gives it.
func pluginEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "KYB_") {
			env = append(env, kv)
		}
	}
	return env
}

// pyRun runs a short plugin subcommand (plan, status) and returns stdout.
func pyRun(t *testing.T, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(python(t), append([]string{"-m", "cmd.kyb_device_plugin"}, args...)...)
	cmd.Dir = repoRoot(t)
	cmd.Env = pluginEnv()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("python -m cmd.kyb_device_plugin %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return out
}

// node holds one test's directories: the kubelet's device-plugin directory,
// the PodResources socket and the plugin's state directory.
type node struct {
	root, kubeletDir, podResSock, stateDir string
}

func newNode(t *testing.T) node {
	t.Helper()
	// Unix socket paths are limited to 107 bytes: keep the root short.
	root, err := os.MkdirTemp("", "kyb-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(root) })
	n := node{
		root:       root,
		kubeletDir: filepath.Join(root, "device-plugins"),
		podResSock: filepath.Join(root, "pod-resources", "kubelet.sock"),
		stateDir:   filepath.Join(root, "state"),
	}
	for _, d := range []string{n.kubeletDir, filepath.Dir(n.podResSock), n.stateDir} {
		if err := os.MkdirAll(d, 0o750); err != nil {
			t.Fatal(err)
		}
	}
	return n
}

type plugin struct {
	t    *testing.T
	n    node
	args []string
	cmd  *exec.Cmd
	log  *os.File
	done chan struct{}
	err  error // Wait's result, once done is closed
	runs int
}

// startPlugin starts `python -m cmd.kyb_device_plugin serve` from the
// repository root against the node's directories, with extra flags.
func startPlugin(t *testing.T, n node, extra ...string) *plugin {
	t.Helper()
	p := &plugin{t: t, n: n, args: extra}
	p.start()
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			p.dumpLog()
		}
	})
	return p
}

func (p *plugin) start() {
	p.t.Helper()
	p.runs++
	args := append([]string{"-m", "cmd.kyb_device_plugin", "serve",
		"--kubelet-dir", p.n.kubeletDir,
		"--state-dir", p.n.stateDir,
		"--pod-resources-socket", p.n.podResSock,
	}, p.args...)
	if !hasFlag(args, "--nvml-mock") {
		args = append(args, "--nvml-mock", "dgx-a100")
	}
	log, err := os.OpenFile(filepath.Join(p.n.root, "plugin.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		p.t.Fatal(err)
	}
	fmt.Fprintf(log, "==== run %d: %s %s\n", p.runs, python(p.t), strings.Join(args, " "))
	cmd := exec.Command(python(p.t), args...)
	cmd.Dir = repoRoot(p.t)
	cmd.Env = pluginEnv()
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		p.t.Fatalf("starting the plugin: %v", err)
	}
	p.cmd, p.log, p.done = cmd, log, make(chan struct{})
	go func(done chan struct{}) {
		p.err = cmd.Wait()
		close(done)
	}(p.done)
}

func hasFlag(args []string, flag string) bool {
	for _, a := range args {
		if a == flag || strings.HasPrefix(a, flag+"=") {
			return true
		}
	}
	return false
}

func (p *plugin) running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// stop sends SIGTERM and returns the exit code (-1: killed after 15 s).
func (p *plugin) stop() int {
	p.t.Helper()
	if !p.running() {
		return p.exitCode()
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return p.exitCode()
	case <-time.After(15 * time.Second):
		p.kill()
		return -1
	}
}

// kill is a crash: SIGKILL, no cleanup.
func (p *plugin) kill() {
	if p.cmd == nil || !p.running() {
		return
	}
	_ = p.cmd.Process.Kill()
	<-p.done
}

func (p *plugin) exitCode() int {
	var ee *exec.ExitError
	if p.err == nil {
		return 0
	}
	if errors.As(p.err, &ee) {
		return ee.ExitCode()
	}
	return -1
}

func (p *plugin) dumpLog() {
	b, err := os.ReadFile(filepath.Join(p.n.root, "plugin.log"))
	if err != nil {
		return
	}
	const max = 12000
	if len(b) > max {
		b = append([]byte("...\n"), b[len(b)-max:]...)
	}
	p.t.Logf("plugin log (%s):\n%s", filepath.Join(p.n.root, "plugin.log"), b)
}

// ---------------------------------------------------------------- plan

// group is one group of one profile, as `plan --output json` shows it.
type group struct {
	GPUs      []int                      `json:"gpus"`
	NUMANodes []int                      `json:"numaNodes"`
	UUIDs     []string                   `json:"uuids"`
	Seats     map[string]json.RawMessage `json:"seats"`
}

// plan is the SPEC section 9 document: resource -> group name -> group.
type plan map[string]map[string]group

func loadPlan(t *testing.T, args ...string) plan {
	t.Helper()
	out := pyRun(t, append([]string{"plan", "--output", "json"}, args...)...)
	var doc struct {
		Resources map[string]struct {
			Groups map[string]group `json:"groups"`
		} `json:"resources"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		t.Fatalf("plan --output json: %v\n%s", err, out)
	}
	p := plan{}
	for r, v := range doc.Resources {
		p[r] = v.Groups
	}
	return p
}

// seatCount is the number of seats of a resource in the plan.
func (p plan) seatCount(resource string) int {
	n := 0
	for _, g := range p[resource] {
		n += len(g.Seats)
	}
	return n
}

// seatIDs is every device ID of a resource in the plan.
func (p plan) seatIDs(resource string) sets.Set[string] {
	out := sets.New[string]()
	for _, g := range p[resource] {
		for id := range g.Seats {
			out.Insert(id)
		}
	}
	return out
}

// groupsWithGPU names the groups of a resource that contain GPU index i.
func (p plan) groupsWithGPU(resource string, i int) []string {
	var out []string
	for name, g := range p[resource] {
		for _, x := range g.GPUs {
			if x == i {
				out = append(out, name)
			}
		}
	}
	sort.Strings(out)
	return out
}

// topoGPU is one GPU of an NVML mock topology file (SPEC section 9).
type topoGPU struct {
	Index    int    `json:"index"`
	UUID     string `json:"uuid"`
	Minor    int    `json:"minor"`
	PCIBusID string `json:"pciBusId"`
	bus      pciAddress
}

// fixture reads a mock topology file, or a built-in one by name
// (pkg/deviceplugin/nvml/fixtures),
// for the minor numbers and PCI bus IDs, which `plan` does not show.
func fixture(t *testing.T, name string) (raw map[string]any, gpus []topoGPU) {
	t.Helper()
	path := name
	if !strings.ContainsRune(name, filepath.Separator) {
		path = filepath.Join(repoRoot(t), "pkg", "deviceplugin", "nvml", "fixtures", name+".yaml")
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("mock topology %s: %v", name, err)
	}
	if err := yaml.Unmarshal(b, &raw); err != nil {
		t.Fatalf("mock topology %s: %v", name, err)
	}
	var doc struct {
		GPUs []topoGPU `json:"gpus"`
	}
	if err := yaml.Unmarshal(b, &doc); err != nil {
		t.Fatalf("mock topology %s: %v", name, err)
	}
	for i := range doc.GPUs {
		if doc.GPUs[i].bus, err = parsePCIBusID(doc.GPUs[i].PCIBusID); err != nil {
			t.Fatalf("mock topology %s, GPU %d: %v", name, doc.GPUs[i].Index, err)
		}
	}
	return raw, doc.GPUs
}

// pciAddress is a PCI bus ID as numbers: domain, bus, device, function.
// CUDA_DEVICE_ORDER=PCI_BUS_ID numbers a container's GPUs in this order.
type pciAddress [4]uint64

var pciBusIDPattern = regexp.MustCompile(`^(?:([0-9a-fA-F]{1,8}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$`)

// parsePCIBusID reads domain:bus:device.function in hex, whatever the case
// or the domain's width (NVML has printed 4 and 8 digits; sysfs lower case).
func parsePCIBusID(s string) (pciAddress, error) {
	m := pciBusIDPattern.FindStringSubmatch(strings.TrimSpace(s))
	if m == nil {
		return pciAddress{}, fmt.Errorf("pciBusId %q is not domain:bus:device.function", s)
	}
	var a pciAddress
	for i, part := range m[1:] {
		if part == "" {
			continue // no domain: 0
		}
		v, err := strconv.ParseUint(part, 16, 64)
		if err != nil {
			return pciAddress{}, fmt.Errorf("pciBusId %q: %v", s, err)
		}
		a[i] = v
	}
	return a, nil
}

func (a pciAddress) compare(b pciAddress) int {
	for i := range a {
		if a[i] != b[i] {
			if a[i] < b[i] {
				return -1
			}
			return 1
		}
	}
	return 0
}

// compareBuses orders two sorted lists of PCI addresses element by element,
// a list before the longer lists it is a prefix of.
func compareBuses(a, b []pciAddress) int {
	for i := 0; i < len(a) && i < len(b); i++ {
		if c := a[i].compare(b[i]); c != 0 {
			return c
		}
	}
	return len(a) - len(b)
}

// ---------------------------------------------------------------- checks

var (
	seatIDPattern  = regexp.MustCompile(`^(.+)-s([0-9]+)$`)
	cdiNamePattern = regexp.MustCompile(`^[a-z0-9][a-z0-9.-]*/[a-zA-Z0-9][a-zA-Z0-9_.-]*=[a-zA-Z0-9_.:-]+$`)
)

// eventually polls cond every 50 ms until it returns nil or timeout passes;
// it returns how long that took.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() error) time.Duration {
	t.Helper()
	start := time.Now()
	var err error
	for {
		if err = cond(); err == nil {
			return time.Since(start)
		}
		if time.Since(start) > timeout {
			t.Fatalf("%s: not within %v: %v", what, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// wantCounts is a condition: capacity and allocatable per resource.
func (k *kubelet) wantCounts(capacity, allocatable map[string]int64) func() error {
	return func() error {
		c, a := k.counts()
		for r, n := range capacity {
			if c[r] != n {
				return fmt.Errorf("capacity %v, allocatable %v; want capacity[%s] = %d", c, a, r, n)
			}
		}
		for r, n := range allocatable {
			if a[r] != n {
				return fmt.Errorf("capacity %v, allocatable %v; want allocatable[%s] = %d", c, a, r, n)
			}
		}
		return nil
	}
}

// binding is what one container got for one resource, read back through the
// manager's GetDeviceRunContainerOptions.
type binding struct {
	ids         sets.Set[string]
	envs        map[string]string
	annotations map[string]string
	devices     map[string]string // host path -> permissions
	cdi         []string
	gens        map[string]int // seat -> generation
	groups      []string       // groups in seat order
	gpus        []int          // KYB_GPU_INDICES: host indices, CUDA ordinal order
}

func list(s string) []string {
	if s == "" {
		return nil
	}
	return strings.Split(s, ",")
}

func joinInts(xs []int) string {
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = strconv.Itoa(x)
	}
	return strings.Join(s, ",")
}

// ordinals is "0,1,...,n-1": the CUDA ordinals of a container that sees only
// its own n GPUs.
func ordinals(n int) string {
	xs := make([]int, n)
	for i := range xs {
		xs[i] = i
	}
	return joinInts(xs)
}

// byUUID indexes a mock topology's GPUs by UUID.
func byUUID(gpus []topoGPU) map[string]topoGPU {
	m := map[string]topoGPU{}
	for _, g := range gpus {
		m[g.UUID] = g
	}
	return m
}

// checkBinding reads a container's allocation and checks it against SPEC
// section 4 for the given plan and the GPUs of the mock topology (by UUID:
// minor numbers and PCI bus IDs).
func checkBinding(t *testing.T, k *kubelet, pl plan, gpus map[string]topoGPU, cdi bool, pod *v1.Pod, name, resource string) binding {
	t.Helper()
	opts, err := k.runOptions(pod, name)
	if err != nil {
		t.Fatalf("GetDeviceRunContainerOptions(%s/%s): %v", pod.Name, name, err)
	}
	if opts == nil {
		t.Fatalf("GetDeviceRunContainerOptions(%s/%s): no options", pod.Name, name)
	}
	b := binding{
		ids:         k.deviceIDs(pod, name, resource),
		envs:        map[string]string{},
		annotations: map[string]string{},
		devices:     map[string]string{},
		gens:        map[string]int{},
	}
	for _, e := range opts.Envs {
		b.envs[e.Name] = e.Value
	}
	for _, a := range opts.Annotations {
		b.annotations[a.Name] = a.Value
	}
	for _, d := range opts.Devices {
		if d.PathInContainer != d.PathOnHost {
			t.Errorf("%s/%s: device %s is mapped to %s in the container", pod.Name, name, d.PathOnHost, d.PathInContainer)
		}
		b.devices[d.PathOnHost] = d.Permissions
	}
	for _, c := range opts.CDIDevices {
		b.cdi = append(b.cdi, c.Name)
	}
	where := fmt.Sprintf("%s/%s (%s %v)", pod.Name, name, resource, sets.List(b.ids))
	if b.ids.Len() == 0 {
		t.Fatalf("%s: the manager recorded no devices", where)
	}

	seats := list(b.envs["KYB_GPU_SEAT"])
	groups := list(b.envs["KYB_GPU_GROUP"])
	gens := list(b.envs["KYB_SEAT_GEN"])
	if !sets.New(seats...).Equal(b.ids) || len(seats) != b.ids.Len() {
		t.Fatalf("%s: KYB_GPU_SEAT=%q, want the allocated IDs %v", where, b.envs["KYB_GPU_SEAT"], sets.List(b.ids))
	}
	if len(groups) != len(seats) || len(gens) != len(seats) {
		t.Fatalf("%s: KYB_GPU_SEAT=%q KYB_GPU_GROUP=%q KYB_SEAT_GEN=%q: want one entry per seat",
			where, b.envs["KYB_GPU_SEAT"], b.envs["KYB_GPU_GROUP"], b.envs["KYB_SEAT_GEN"])
	}
	// The GPUs of the seats' groups, once each (two seats of one group count
	// once), and for each seat the sort key of SPEC section 4: its group's
	// GPUs' PCI bus IDs, the group name, the seat number.
	type seatKey struct {
		seat, group string
		k           int
		buses       []pciAddress
	}
	var keys []seatKey
	mine := map[int]topoGPU{}
	for i, seat := range seats {
		m := seatIDPattern.FindStringSubmatch(seat)
		if m == nil || m[1] != groups[i] {
			t.Errorf("%s: seat %q is listed with group %q", where, seat, groups[i])
			continue
		}
		g, ok := pl[resource][groups[i]]
		if !ok {
			t.Errorf("%s: group %q is not a %s group of the plan", where, groups[i], resource)
			continue
		}
		gen, err := strconv.Atoi(gens[i])
		if err != nil || gen < 1 {
			t.Errorf("%s: KYB_SEAT_GEN entry %q for %s: want an integer >= 1", where, gens[i], seat)
		}
		b.gens[seat] = gen
		b.groups = append(b.groups, groups[i])
		key := seatKey{seat: seat, group: groups[i]}
		key.k, _ = strconv.Atoi(m[2])
		for j, index := range g.GPUs {
			gpu, ok := gpus[g.UUIDs[j]]
			if !ok || gpu.Index != index {
				t.Fatalf("%s: the plan's GPU %d (%s) of %s is not in the mock topology", where, index, g.UUIDs[j], groups[i])
			}
			mine[index] = gpu
			key.buses = append(key.buses, gpu.bus)
		}
		sort.Slice(key.buses, func(x, y int) bool { return key.buses[x].compare(key.buses[y]) < 0 })
		keys = append(keys, key)
	}

	// One stable seat order, whatever order the kubelet sent the IDs in.
	sorted := append([]seatKey(nil), keys...)
	sort.SliceStable(sorted, func(x, y int) bool {
		a, c := sorted[x], sorted[y]
		if d := compareBuses(a.buses, c.buses); d != 0 {
			return d < 0
		}
		if a.group != c.group {
			return a.group < c.group
		}
		return a.k < c.k
	})
	var wantSeats []string
	for _, key := range sorted {
		wantSeats = append(wantSeats, key.seat)
	}
	if got, want := b.envs["KYB_GPU_SEAT"], strings.Join(wantSeats, ","); len(keys) == len(seats) && got != want {
		t.Errorf("%s: KYB_GPU_SEAT=%q, want the seats in the order of their groups' PCI bus IDs, group name, seat number: %q", where, got, want)
	}

	// The container's GPUs in PCI bus order: position i is CUDA ordinal i.
	order := make([]topoGPU, 0, len(mine))
	for _, gpu := range mine {
		order = append(order, gpu)
	}
	sort.Slice(order, func(x, y int) bool {
		if c := order[x].bus.compare(order[y].bus); c != 0 {
			return c < 0
		}
		return order[x].Index < order[y].Index
	})
	var wantIdx []int
	var wantUUIDs, busIDs []string
	for _, gpu := range order {
		wantIdx = append(wantIdx, gpu.Index)
		wantUUIDs = append(wantUUIDs, gpu.UUID)
		busIDs = append(busIDs, fmt.Sprintf("%d:%s", gpu.Index, gpu.PCIBusID))
	}
	gotIdx := sets.New[int]()
	for _, s := range list(b.envs["KYB_GPU_INDICES"]) {
		i, err := strconv.Atoi(s)
		if err != nil {
			t.Errorf("%s: KYB_GPU_INDICES=%q: %q is not a GPU index", where, b.envs["KYB_GPU_INDICES"], s)
		}
		gotIdx.Insert(i)
		b.gpus = append(b.gpus, i)
	}
	switch {
	case !gotIdx.Equal(sets.New(wantIdx...)) || len(b.gpus) != gotIdx.Len():
		t.Errorf("%s: KYB_GPU_INDICES=%q, want the indices %v of the seats' groups, once each", where, b.envs["KYB_GPU_INDICES"], wantIdx)
	case joinInts(b.gpus) != joinInts(wantIdx):
		t.Errorf("%s: KYB_GPU_INDICES=%q, want %q: PCI bus ID order (index:bus %v)", where, b.envs["KYB_GPU_INDICES"], joinInts(wantIdx), busIDs)
	}
	// Inside the container (NVIDIA runtime, CDI) the GPUs are 0..n-1: a host
	// index would select no GPU, or another container's.
	if got, want := b.envs["CUDA_VISIBLE_DEVICES"], ordinals(len(order)); got != want {
		t.Errorf("%s: CUDA_VISIBLE_DEVICES=%q, want the container's own ordinals %q (host indices %v)", where, got, want, wantIdx)
	}
	if got := b.envs["CUDA_DEVICE_ORDER"]; got != "PCI_BUS_ID" {
		t.Errorf("%s: CUDA_DEVICE_ORDER=%q, want PCI_BUS_ID (CUDA's default, FASTEST_FIRST, need not match the runtime's numbering)", where, got)
	}
	// NVIDIA_VISIBLE_DEVICES and KYB_GPU_UUIDS list the same GPUs as
	// KYB_GPU_INDICES, in the same order.
	for _, env := range []string{"NVIDIA_VISIBLE_DEVICES", "KYB_GPU_UUIDS"} {
		if got, want := b.envs[env], strings.Join(wantUUIDs, ","); got != want {
			t.Errorf("%s: %s=%q, want the UUIDs of GPUs %v in that order: %q", where, env, got, wantIdx, want)
		}
	}
	if r := sets.New(list(b.envs["KYB_RESOURCE"])...); !r.Equal(sets.New(resource)) {
		t.Errorf("%s: KYB_RESOURCE=%q, want %q", where, b.envs["KYB_RESOURCE"], resource)
	}

	// The same facts as CRI annotations under kyb.ai/.
	for key, env := range map[string]string{
		"kyb.ai/gpu-group":   "KYB_GPU_GROUP",
		"kyb.ai/gpu-seat":    "KYB_GPU_SEAT",
		"kyb.ai/seat-gen":    "KYB_SEAT_GEN",
		"kyb.ai/gpu-indices": "KYB_GPU_INDICES",
		"kyb.ai/gpu-uuids":   "KYB_GPU_UUIDS",
	} {
		if got, ok := b.annotations[key]; !ok || got != b.envs[env] {
			t.Errorf("%s: annotation %s=%q (present %v), want %q like %s", where, key, got, ok, b.envs[env], env)
		}
	}
	for key := range b.annotations {
		if !strings.HasPrefix(key, "kyb.ai/") {
			t.Errorf("%s: annotation %q is not under kyb.ai/", where, key)
		}
	}

	if cdi {
		// deviceListStrategy cdi: CDI device names instead of raw device specs.
		if len(b.devices) != 0 {
			t.Errorf("%s: deviceListStrategy cdi, but device specs %v", where, b.devices)
		}
		if len(b.cdi) != len(order) {
			t.Errorf("%s: CDI devices %v, want one per GPU of %v", where, b.cdi, wantUUIDs)
		}
		for _, name := range b.cdi {
			if !cdiNamePattern.MatchString(name) {
				t.Errorf("%s: CDI device %q is not a qualified CDI name (vendor/class=name)", where, name)
			}
		}
		return b
	}
	if len(b.cdi) != 0 {
		t.Errorf("%s: deviceListStrategy envvar, but CDI devices %v", where, b.cdi)
	}
	// Device specs: /dev/nvidia<minor> for each GPU, /dev/nvidiactl, rw.
	want := sets.New("/dev/nvidiactl")
	for _, gpu := range order {
		want.Insert(fmt.Sprintf("/dev/nvidia%d", gpu.Minor))
	}
	got := sets.New[string]()
	for path, perm := range b.devices {
		if path == "/dev/nvidia-uvm" || path == "/dev/nvidia-uvm-tools" {
			continue // only where they exist on the node
		}
		got.Insert(path)
		if perm != "rw" {
			t.Errorf("%s: device %s has permissions %q, want rw", where, path, perm)
		}
	}
	if !got.Equal(want) {
		t.Errorf("%s: device specs %v, want %v (the GPUs' minor numbers, not their indices)", where, sets.List(got), sets.List(want))
	}
	return b
}

// seat returns the one seat and its generation of a single-seat binding.
func (b binding) seat() (string, int) {
	for s, g := range b.gens {
		return s, g
	}
	return "", 0
}
