package conformance

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

// slowRegistration serves the Registration API on the kubelet.sock the plugin
// knows and forwards each Register to the real manager, whose own kubelet.sock
// is in another directory (the endpoint is rewritten to point back at the
// plugin's directory), under the caller's own deadline as gRPC propagates it.
// Only the answer is late: the manager has done its work (dialed the plugin
// back, called GetDevicePluginOptions, opened ListAndWatch) and the reply
// reaches the plugin after delay. That is a loaded kubelet, or a reply lost
// on the way, with a wider window.
type slowRegistration struct {
	pluginapi.UnimplementedRegistrationServer
	backend  string // the manager's kubelet.sock
	prefix   string // endpoint prefix, relative to the manager's directory
	delay    time.Duration
	mu       sync.Mutex
	received []string
	results  []string
}

func (s *slowRegistration) Register(ctx context.Context, r *pluginapi.RegisterRequest) (*pluginapi.Empty, error) {
	s.mu.Lock()
	s.received = append(s.received, r.ResourceName)
	s.mu.Unlock()
	conn, err := grpc.NewClient("unix://"+s.backend, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	fwd := proto.Clone(r).(*pluginapi.RegisterRequest)
	fwd.Endpoint = s.prefix + r.Endpoint
	_, err = pluginapi.NewRegistrationClient(conn).Register(ctx, fwd)
	s.mu.Lock()
	s.results = append(s.results, fmt.Sprintf("%s: %v", r.ResourceName, err))
	s.mu.Unlock()
	time.Sleep(s.delay)
	return &pluginapi.Empty{}, err
}

func (s *slowRegistration) log() ([]string, []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.received...), append([]string(nil), s.results...)
}

// The kubelet may be slow. If the plugin gives up waiting for a Register
// answer and registers the same endpoint again although the kubelet has it
// (the plugin can tell: the kubelet called GetDevicePluginOptions and holds a
// ListAndWatch stream open), the real manager answers "device plugin already
// connected" and, in doing so, drops its record of the live connection: from
// then on it never notices the plugin going away (its seats stay allocatable)
// and it refuses every later Register from that socket until the kubelet
// restarts. Here the Register answer arrives 12 s late: after the plugin's own
// 10 s Register deadline, so the plugin sees its Register fail although the
// kubelet has the profile.
func TestSlowKubeletRegistration(t *testing.T) {
	const delay = 12 * time.Second
	n := newNode(t)
	managerDir := filepath.Join(n.root, "kubelet")
	if err := os.MkdirAll(managerDir, 0o750); err != nil {
		t.Fatal(err)
	}
	w := &world{n: n, pods: newPodStore(), pl: loadPlan(t, configFlags(nil)...)}
	_, gpus := fixture(t, "dgx-a100")
	w.gpus = byUUID(gpus)
	w.k = startKubelet(t, managerDir, n.podResSock, w.pods)

	proxy := &slowRegistration{
		backend: filepath.Join(managerDir, "kubelet.sock"),
		prefix:  "../device-plugins/",
		delay:   delay,
	}
	ln, err := net.Listen("unix", filepath.Join(n.kubeletDir, "kubelet.sock"))
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	pluginapi.RegisterRegistrationServer(srv, proxy)
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(srv.Stop)

	w.p = startPlugin(t, n)
	took := w.waitFull(t, startTimeout, "every profile registers through a slow kubelet")
	t.Logf("registered with Register answers %v late in %v", delay, took.Round(time.Millisecond))
	time.Sleep(delay + 2*time.Second) // past the plugin's deadline: any retry would arrive
	received, results := proxy.log()
	t.Logf("Register calls: %v", received)
	t.Logf("Register results: %v", results)
	if len(received) != len(w.pl) {
		t.Errorf("the plugin sent %d Register calls (%v) for %d resources; the kubelet had dialed back "+
			"for each, so a second one can only be refused", len(received), received, len(w.pl))
	}

	w.p.kill()
	if err := waitFor(settleTimeout, w.k.wantCounts(w.full(), map[string]int64{res1x: 0, res2x: 0})); err != nil {
		t.Errorf("plugin killed, but the kubelet still offers its seats: %v.\n"+
			"The plugin sent %d Register calls for %d resources (%v), results %v: a Register repeated for an "+
			"endpoint the kubelet already has leaves the kubelet with a connection it no longer tracks. "+
			"Do not resend Register while the kubelet holds a ListAndWatch stream of that endpoint (or has called "+
			"GetDevicePluginOptions since the Register was sent), and treat \"device plugin already connected\" as registered.", err, len(received), len(w.pl), received, results)
	}
	_, before := proxy.log()
	w.p.start()
	eventually(t, startTimeout, "the restarted plugin registers every profile again", func() error {
		_, results := proxy.log()
		ok := map[string]bool{}
		for _, r := range results[len(before):] {
			for res := range w.pl {
				if r == res+": <nil>" {
					ok[res] = true
				}
			}
		}
		if len(ok) != len(w.pl) {
			return fmt.Errorf("Register results since the restart: %v", results[len(before):])
		}
		return nil
	})
	w.waitFull(t, settleTimeout, "the restarted plugin's seats are allocatable")
	w.check(t, w.admit(t, pod1("a", res1x, 1)), "main", res1x)
}
