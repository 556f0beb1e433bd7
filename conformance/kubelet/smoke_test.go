package conformance

import (
	"os"
	"path/filepath"
	"testing"

	"k8s.io/apimachinery/pkg/util/sets"
	v1 "k8s.io/api/core/v1"
	"k8s.io/klog/v2/ktesting"
	"k8s.io/kubernetes/pkg/kubelet/cm/containermap"
)

type readySources struct{}

func (readySources) AddSource(string) {}
func (readySources) AllReady() bool    { return true }

func TestManagerStarts(t *testing.T) {
	logger, _ := ktesting.NewTestContext(t)
	dir := t.TempDir()
	m, err := newManagerAt(logger, filepath.Join(dir, "kubelet.sock"))
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Start(logger, func() []*v1.Pod { return nil }, readySources{}, containermap.NewContainerMap(), sets.New[string]()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "kubelet.sock")); err != nil {
		t.Fatal(err)
	}
	if err := m.Stop(logger); err != nil {
		t.Fatal(err)
	}
}
