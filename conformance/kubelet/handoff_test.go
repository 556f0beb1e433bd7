package conformance

// The init-to-app hand-off and KYB_SEAT_GEN as a fencing token (issue 13).
//
// When the kubelet admits a pod it calls the device manager's Allocate for each
// init container and then each app container, back to back, in one admission
// (pkg/kubelet/allocation: canAdmitPod runs the admit handlers; one of them is
// the topology manager, which calls Allocate on every hint provider for every
// container, pkg/kubelet/cm/topologymanager/scope*.go). An app container that
// takes over an init container's devices gets an Allocate with the same IDs.
// The plugin counts such a repeat as the same binding (same generation) only
// within handoffWindow of the binding's last Allocate, and only while its
// holder was never seen in PodResources List; anything else is a new holder.

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
	"k8s.io/kubernetes/pkg/kubelet/cm/topologymanager"
	"k8s.io/kubernetes/pkg/kubelet/lifecycle"
)

// ------------------------------------------------------------ admission

// timedDevices is the device manager as a hint provider of the topology
// manager, timing each Allocate the topology manager makes on it.
type timedDevices struct {
	*devicemanager.ManagerImpl
	mu    sync.Mutex
	calls []allocCall
}

// allocCall is one devicemanager Allocate: when the kubelet called it and
// when it returned (the plugin's GetPreferredAllocation and Allocate RPCs,
// and the manager's checkpoint write, happen in between).
type allocCall struct {
	container  string
	start, end time.Time
}

func (d *timedDevices) Allocate(ctx context.Context, pod *v1.Pod, c *v1.Container, op lifecycle.Operation) error {
	start := time.Now()
	err := d.ManagerImpl.Allocate(ctx, pod, c, op)
	end := time.Now()
	d.mu.Lock()
	d.calls = append(d.calls, allocCall{c.Name, start, end})
	d.mu.Unlock()
	return err
}

func (d *timedDevices) take() []allocCall {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := d.calls
	d.calls = nil
	return out
}

// admission is the kubelet's resource admission: the real topology manager
// with the default policy (none), the admit handler the kubelet gets from
// containerManager.GetAllocateResourcesPodAdmitHandler, with the device
// manager as its hint provider. (The kubelet also registers the CPU and
// memory managers, after the device manager; with their default policies
// their Allocate only updates in-memory state.)
type admission struct {
	k   *kubelet
	tm  topologymanager.Manager
	dev *timedDevices
}

func newAdmission(t *testing.T, k *kubelet) *admission {
	t.Helper()
	tm, err := topologymanager.NewManager(k.logger, nil, topologymanager.PolicyNone, topologymanager.ContainerTopologyScope, nil)
	if err != nil {
		t.Fatalf("topology manager: %v", err)
	}
	dev := &timedDevices{ManagerImpl: k.m}
	tm.AddHintProvider(k.logger, dev)
	return &admission{k: k, tm: tm, dev: dev}
}

// admit makes the pod active and runs the topology manager's Admit on it, as
// the kubelet's HandlePodAdditions does; it returns the device manager's
// Allocate calls in order.
func (a *admission) admit(pod *v1.Pod) ([]allocCall, error) {
	a.k.pods.add(pod)
	res := a.tm.Admit(a.k.ctx, &lifecycle.PodAdmitAttributes{Pod: pod, Operation: lifecycle.AddOperation})
	calls := a.dev.take()
	if !res.Admit {
		return calls, fmt.Errorf("admission of %s refused: %s: %s", pod.Name, res.Reason, res.Message)
	}
	return calls, nil
}

// ------------------------------------------------------------ figures

// stats is min, median, p99 (nearest rank) and max of a sample.
type stats struct {
	n                  int
	min, med, p99, max time.Duration
}

func summarize(xs []time.Duration) stats {
	if len(xs) == 0 {
		return stats{}
	}
	s := append([]time.Duration(nil), xs...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	rank := func(p float64) time.Duration {
		i := int(math.Ceil(p*float64(len(s)))) - 1
		if i < 0 {
			i = 0
		}
		return s[i]
	}
	return stats{n: len(s), min: s[0], med: rank(0.5), p99: rank(0.99), max: s[len(s)-1]}
}

func (s stats) String() string {
	f := func(d time.Duration) string { return fmt.Sprintf("%.3fms", float64(d.Microseconds())/1000) }
	return fmt.Sprintf("n=%d min %s median %s p99 %s max %s", s.n, f(s.min), f(s.med), f(s.p99), f(s.max))
}

// ------------------------------------------------------------ plugin log

// seatBound is one "seat bound" line of the plugin's text log: the plugin made
// a new binding (generation) of a seat, at that time (millisecond resolution).
type seatBound struct {
	at             time.Time
	resource, seat string
	generation     string
}

var seatBoundLine = regexp.MustCompile(`^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO +seat bound \[(.*)\]$`)

// seatBoundLines reads every "seat bound" line of the node's plugin log.
func seatBoundLines(t *testing.T, n node) []seatBound {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(n.root, "plugin.log"))
	if err != nil {
		t.Fatal(err)
	}
	var out []seatBound
	for _, line := range strings.Split(string(b), "\n") {
		m := seatBoundLine.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		at, err := time.ParseInLocation("2006-01-02 15:04:05,000", m[1], time.Local)
		if err != nil {
			t.Fatalf("plugin log time %q: %v", m[1], err)
		}
		sb := seatBound{at: at}
		for _, kv := range strings.Fields(m[2]) {
			k, v, _ := strings.Cut(kv, "=")
			switch k {
			case "resource":
				sb.resource = v
			case "seat":
				sb.seat = v
			case "generation":
				sb.generation = v
			}
		}
		out = append(out, sb)
	}
	return out
}

// ------------------------------------------------------------ state file

// holderOf reads the plugin's state file: the pod its ledger has seen in
// PodResources List holding the seat ("" while the binding's holder was never
// seen, or the seat has no binding).
func holderOf(t *testing.T, n node, resource, seat string) (string, error) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(n.stateDir, "state.json"))
	if err != nil {
		return "", err
	}
	var doc struct {
		Resources map[string]struct {
			Groups map[string]struct {
				Seats map[string]struct {
					Binding *struct {
						Holder *struct {
							Pod string `json:"pod"`
						} `json:"holder"`
					} `json:"binding"`
				} `json:"seats"`
			} `json:"groups"`
		} `json:"resources"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		return "", err
	}
	for _, g := range doc.Resources[resource].Groups {
		if s, ok := g.Seats[seat]; ok {
			if s.Binding == nil || s.Binding.Holder == nil {
				return "", nil
			}
			return s.Binding.Holder.Pod, nil
		}
	}
	return "", fmt.Errorf("state file: no seat %s of %s", seat, resource)
}

// waitSeen waits until the plugin's ledger (its state file) has seen pod in
// PodResources List holding the seat.
func (w *world) waitSeen(t *testing.T, resource, seat, pod string) time.Duration {
	t.Helper()
	return eventually(t, settleTimeout, fmt.Sprintf("the plugin's List sees %s holding %s", pod, seat), func() error {
		got, err := holderOf(t, w.n, resource, seat)
		if err != nil {
			return err
		}
		if got != pod {
			return fmt.Errorf("holder of %s in the state file: %q", seat, got)
		}
		return nil
	})
}

// oneSeatConfig is a config with a single 1x seat per group; with the
// single-gpu mock there is exactly one seat, which the manager must hand out
// to every pod in turn.
func oneSeatConfig(t *testing.T) string {
	t.Helper()
	cfg := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(cfg, []byte("profiles:\n  - resource: kyb.ai/gpu-1x-seat\n    seatsPerGroup: 1\n"), 0o640); err != nil {
		t.Fatal(err)
	}
	return cfg
}

func (w *world) mustBeOneSeat(t *testing.T) {
	t.Helper()
	if got := w.pl.seatCount(res1x); got != 1 || len(w.pl) != 1 {
		t.Fatalf("plan: %v, want one %s seat", w.pl, res1x)
	}
}

// ------------------------------------------------------------ tests

// handoffGapBound is what the measured gap must stay under. The plugin's
// default handoffWindow is 2 s; a gap anywhere near this bound would say the
// window is too tight for a loaded node.
const handoffGapBound = 500 * time.Millisecond

// handoffGapPods is how many pods (init + app container sharing one seat)
// each measurement admits.
const handoffGapPods = 50

// TestHandoffGap measures the time between the plugin's Allocate for an init
// container and the Allocate for the app container that reuses its seat, when
// the kubelet's own admission code (the topology manager's Admit with the
// device manager as hint provider) admits a pod. Two views:
//
//   - the kubelet's: around each devicemanager Allocate call. "idle" is from
//     the init container's Allocate returning to the app container's being
//     called (the kubelet's own work in between); "span" from the init
//     container's Allocate being called to the app container's returning, an
//     upper bound on the gap the plugin can see.
//   - the plugin's: with a handoff window of 1 µs every repeat is a new
//     binding, so both Allocates log "seat bound" with their time (1 ms
//     resolution); the difference is the gap as the plugin's clock sees it.
//
// It fails only if the gap exceeds handoffGapBound.
func TestHandoffGap(t *testing.T) {
	type result struct {
		idle, span, plugin []time.Duration
	}
	measure := func(t *testing.T, w *world, resource string, withPluginLog bool) result {
		adm := newAdmission(t, w.k)
		var r result
		var seats []string
		before := len(seatBoundLines(t, w.n))
		for i := 0; i < handoffGapPods; i++ {
			pod := newPod(fmt.Sprintf("gap-%d", i),
				[]ctr{{"init", map[string]int64{resource: 1}}},
				[]ctr{{"main", map[string]int64{resource: 1}}})
			calls, err := adm.admit(pod)
			if err != nil {
				t.Fatal(err)
			}
			if len(calls) != 2 || calls[0].container != "init" || calls[1].container != "main" {
				t.Fatalf("%s: devicemanager Allocate calls %v, want init then main", pod.Name, calls)
			}
			r.idle = append(r.idle, calls[1].start.Sub(calls[0].end))
			r.span = append(r.span, calls[1].end.Sub(calls[0].start))

			h := &podHandle{pod: pod}
			in := w.check(t, h, "init", resource)
			app := w.check(t, h, "main", resource)
			if !in.ids.Equal(app.ids) {
				t.Fatalf("%s: the manager gave main %v, not init's %v", pod.Name, sets.List(app.ids), sets.List(in.ids))
			}
			seat, gIn := in.seat()
			_, gApp := app.seat()
			seats = append(seats, seat)
			if withPluginLog && gApp <= gIn {
				t.Fatalf("%s: with a 1 µs handoff window main got generation %d after init's %d; the plugin did not take the window", pod.Name, gApp, gIn)
			}
			if !withPluginLog && gApp != gIn {
				t.Errorf("%s: %s generation %d for init, %d for main: the default handoff window did not cover the hand-off", pod.Name, seat, gIn, gApp)
			}
			// The pod ends; the manager frees its seat at its next Allocate.
			w.pods.remove(pod)
		}
		if !withPluginLog {
			return r
		}
		lines := seatBoundLines(t, w.n)[before:]
		if len(lines) != 2*len(seats) {
			t.Fatalf("%d \"seat bound\" lines in the plugin log for %d pods, want two per pod (init, main)", len(lines), len(seats))
		}
		for i, seat := range seats {
			a, b := lines[2*i], lines[2*i+1]
			if a.seat != seat || b.seat != seat || a.resource != resource || b.resource != resource {
				t.Fatalf("gap-%d on %s: \"seat bound\" lines %+v, %+v", i, seat, a, b)
			}
			r.plugin = append(r.plugin, b.at.Sub(a.at))
		}
		return r
	}

	report := func(t *testing.T, what string, xs []time.Duration) stats {
		s := summarize(xs)
		t.Logf("%-44s %v", what, s)
		if s.max > handoffGapBound {
			t.Errorf("%s: the hand-off gap reached %v (bound %v): the default handoffWindow of 2s may be too tight", what, s.max, handoffGapBound)
		}
		return s
	}

	// The default window: the hand-off keeps its generation; the kubelet's view.
	t.Run("kubelet", func(t *testing.T) {
		metrics := freeAddress(t)
		w := setup(t, "--allow-overprovision", "true", "--metrics-address", metrics)
		for _, resource := range []string{res1x, res2x} {
			r := measure(t, w, resource, false)
			report(t, resource+" kubelet idle (app call - init return)", r.idle)
			s := summarize(r.span)
			t.Logf("%-44s %v", resource+" kubelet span (app return - init call)", s)
			sum := scrape(t, metrics, "kyb_allocate_seconds_sum", resource)
			n := scrape(t, metrics, "kyb_allocate_seconds_count", resource)
			if n > 0 {
				t.Logf("%-44s %.2fms mean over %v calls", resource+" plugin Allocate handling", 1000*sum/n, n)
			}
		}
	})

	// A 1 µs window: every repeat is a new binding and logs "seat bound".
	t.Run("plugin", func(t *testing.T) {
		w := setup(t, "--allow-overprovision", "true", "--handoff-window", "0.000001s")
		for _, resource := range []string{res1x, res2x} {
			r := measure(t, w, resource, true)
			report(t, resource+" plugin (app seat bound - init seat bound)", r.plugin)
			report(t, resource+" kubelet idle (app call - init return)", r.idle)
		}
	})
}

// shortPodHandoffWindow is the plugin's handoffWindow in
// TestShortPodsGetRisingGenerations. Set it to the old behaviour (an
// unlimited window, e.g. 1h) to see the test fail:
//
//	conformance/kubelet/run.sh -run TestShortPods -ldflags \
//	  '-X github.com/kyb-ai/kyb-device-plugin/conformance/kubelet.shortPodHandoffWindow=1h'
var shortPodHandoffWindow = "500ms"

// shortPodPause is the time between one short pod's deletion and the next
// pod's admission: longer than the window.
const shortPodPause = time.Second

// Short-lived pods, admitted and deleted before any PodResources List could
// see them (the plugin lists once an hour here), one after the other on the
// only seat: each is a new holder, one generation higher, because each comes
// after the hand-off window. An init container and the app container that
// takes over its seat, back to back in one admission, are one binding.
func TestShortPodsGetRisingGenerations(t *testing.T) {
	start := func(t *testing.T) *world {
		w := setup(t, "--config", oneSeatConfig(t), "--nvml-mock", "single-gpu",
			"--reconcile-interval", "1h", "--handoff-window", shortPodHandoffWindow)
		w.mustBeOneSeat(t)
		return w
	}
	// neverSeen checks that the test exercises what it means to: the plugin's
	// ledger never saw the holder in List.
	neverSeen := func(t *testing.T, w *world, seat string) {
		t.Helper()
		if holder, err := holderOf(t, w.n, res1x, seat); err != nil {
			t.Logf("state file: %v (cannot tell whether the plugin saw the holder)", err)
		} else if holder != "" {
			t.Fatalf("the plugin's List saw %s holding %s, although it lists once an hour", holder, seat)
		}
	}

	t.Run("app-only", func(t *testing.T) {
		w := start(t)
		for i, name := range []string{"a", "b", "c"} {
			h := w.admit(t, pod1(name, res1x, 1))
			seat, gen := w.check(t, h, "main", res1x).seat()
			t.Logf("%s: %s generation %d", name, seat, gen)
			neverSeen(t, w, seat)
			if gen != i+1 {
				t.Errorf("%s: %s generation %d, want %d: pod %d of the seat, admitted %v after the last one was deleted (handoff window %s); a generation passed on to a new holder is no fence",
					name, seat, gen, i+1, i+1, shortPodPause, shortPodHandoffWindow)
			}
			w.pods.remove(h.pod)
			if i < 2 {
				time.Sleep(shortPodPause)
			}
		}
	})

	t.Run("init-and-app", func(t *testing.T) {
		w := start(t)
		for i, s := range []*podSpec{
			{name: "p", init: []ctr{{"init", map[string]int64{res1x: 1}}}, app: []ctr{{"main", map[string]int64{res1x: 1}}}},
			{name: "q", init: []ctr{{"init", map[string]int64{res1x: 1}}}, app: []ctr{{"main", map[string]int64{res1x: 1}}}},
			pod1("r", res1x, 1),
		} {
			want := i + 1 // pod i+1 of the seat
			h := w.admit(t, s)
			seat, gen := w.check(t, h, "main", res1x).seat()
			if len(s.init) > 0 {
				inSeat, inGen := w.check(t, h, "init", res1x).seat()
				t.Logf("%s: init %s generation %d, main %s generation %d", s.name, inSeat, inGen, seat, gen)
				if inSeat != seat {
					t.Fatalf("%s: the manager gave main %s, not init's %s", s.name, seat, inSeat)
				}
				if inGen != gen {
					t.Errorf("%s: %s generation %d for init, %d for main: the init-to-app hand-off is one binding", s.name, seat, inGen, gen)
				}
				if inGen != want {
					t.Errorf("%s: init's %s generation %d, want %d", s.name, seat, inGen, want)
				}
			} else {
				t.Logf("%s: %s generation %d", s.name, seat, gen)
				if gen != want {
					t.Errorf("%s: %s generation %d, want %d", s.name, seat, gen, want)
				}
			}
			neverSeen(t, w, seat)
			w.pods.remove(h.pod)
			if i < 2 {
				time.Sleep(shortPodPause)
			}
		}
	})
}

// A holder the plugin saw in PodResources List never passes its generation
// on: the next pod on its seat is a new holder, even straight after the old
// pod's deletion (before any List could show it gone), even within the
// handoff window (1h here, so only the "seen" rule can tell), and even while
// the plugin cannot reach PodResources at all.
func TestSeenHolderRepeatedAllocate(t *testing.T) {
	w := setup(t, "--config", oneSeatConfig(t), "--nvml-mock", "single-gpu",
		"--reconcile-interval", "200ms", "--handoff-window", "1h")
	w.mustBeOneSeat(t)

	ha := w.admit(t, pod1("a", res1x, 1))
	seat, genA := w.check(t, ha, "main", res1x).seat()
	if genA != 1 {
		t.Errorf("a: %s generation %d, want 1", seat, genA)
	}
	took := w.waitSeen(t, res1x, seat, "a")
	t.Logf("a: generation %d, seen in List after %v", genA, took.Round(time.Millisecond))

	// PodResources up: a is deleted and b admitted at once.
	w.pods.remove(ha.pod)
	hb := w.admit(t, pod1("b", res1x, 1))
	_, genB := w.check(t, hb, "main", res1x).seat()
	t.Logf("b: generation %d", genB)
	if genB != genA+1 {
		t.Errorf("b: %s generation %d, want %d: a was seen in List, so b is a new holder", seat, genB, genA+1)
	}
	took = w.waitSeen(t, res1x, seat, "b")
	t.Logf("b seen in List after %v", took.Round(time.Millisecond))

	// PodResources down: the plugin's List fails from now on.
	w.k.stopPodResources()
	time.Sleep(time.Second) // several failed reconciles
	if !w.p.running() {
		t.Fatalf("the plugin exited when PodResources went away: %v", w.p.err)
	}
	w.pods.remove(hb.pod)
	hc := w.admit(t, pod1("c", res1x, 1))
	_, genC := w.check(t, hc, "main", res1x).seat()
	t.Logf("c (PodResources down): generation %d", genC)
	if genC != genB+1 {
		t.Errorf("c: %s generation %d while PodResources is down, want %d: b was seen in List, so c is a new holder", seat, genC, genB+1)
	}

	// PodResources back: the plugin sees c.
	w.k.startPodResources()
	took = w.waitSeen(t, res1x, seat, "c")
	t.Logf("PodResources back: c seen after %v", took.Round(time.Millisecond))
	_, again := w.check(t, hc, "main", res1x).seat()
	if again != genC {
		t.Errorf("c's generation changed from %d to %d", genC, again)
	}
}
