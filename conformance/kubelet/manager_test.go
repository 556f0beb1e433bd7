package conformance

import (
	"bytes"
	"fmt"
	"go/ast"
	"go/parser"
	"go/printer"
	"go/token"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	_ "unsafe" // for go:linkname

	cadvisorapi "github.com/google/cadvisor/lib/model"
	"k8s.io/klog/v2"

	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
	"k8s.io/kubernetes/pkg/kubelet/cm/topologymanager"
)

// newManagerImpl is the devicemanager package's own constructor: the exported
// NewManagerImpl is `return newManagerImpl(logger, pluginapi.KubeletSocket, ...)`
// with the fixed /var/lib/kubelet/device-plugins/kubelet.sock, and the
// package's unit tests call newManagerImpl with a temporary socket path. We
// reach the same function. `go test -overlay` cannot add a file to the package
// instead: the go command refuses overlays of files beneath GOMODCACHE. See
// README.md. The linker does not check the signature, so checkConstructor
// compares it with the source before the first call.
//
//go:linkname newManagerImpl k8s.io/kubernetes/pkg/kubelet/cm/devicemanager.newManagerImpl
func newManagerImpl(logger klog.Logger, socketPath string, topology []cadvisorapi.Node, topologyAffinityStore topologymanager.Store) (*devicemanager.ManagerImpl, error)

// The signature declared above, as gofmt prints it from the kubelet source.
const wantConstructor = "func newManagerImpl(logger klog.Logger, socketPath string, topology []cadvisorapi.Node, topologyAffinityStore topologymanager.Store) (*ManagerImpl, error)"

var (
	constructorOnce sync.Once
	constructorErr  error
)

// checkConstructor parses manager.go of the devicemanager package this test
// is built against and fails unless newManagerImpl has exactly the signature
// declared above (a mismatch would corrupt memory rather than fail to link).
func checkConstructor() error {
	constructorOnce.Do(func() {
		out, err := exec.Command("go", "list", "-f", "{{.Dir}}", "k8s.io/kubernetes/pkg/kubelet/cm/devicemanager").Output()
		if err != nil {
			constructorErr = fmt.Errorf("locating the devicemanager sources with `go list`: %v", err)
			return
		}
		file := filepath.Join(strings.TrimSpace(string(out)), "manager.go")
		fset := token.NewFileSet()
		f, err := parser.ParseFile(fset, file, nil, parser.SkipObjectResolution)
		if err != nil {
			constructorErr = err
			return
		}
		for _, d := range f.Decls {
			fd, ok := d.(*ast.FuncDecl)
			if !ok || fd.Recv != nil || fd.Name.Name != "newManagerImpl" {
				continue
			}
			fd.Body = nil
			fd.Doc = nil
			var b bytes.Buffer
			if err := printer.Fprint(&b, fset, fd); err != nil {
				constructorErr = err
				return
			}
			if got := b.String(); got != wantConstructor {
				constructorErr = fmt.Errorf("%s: newManagerImpl changed:\n got  %s\n want %s\nupdate the go:linkname declaration in manager_test.go", file, got, wantConstructor)
			}
			return
		}
		constructorErr = fmt.Errorf("%s: no func newManagerImpl; update manager_test.go for this Kubernetes version", file)
	})
	return constructorErr
}

// newManagerAt builds the real device manager with its registration socket at
// socketPath (its checkpoint file goes next to it).
func newManagerAt(logger klog.Logger, socketPath string) (*devicemanager.ManagerImpl, error) {
	if err := checkConstructor(); err != nil {
		return nil, err
	}
	return newManagerImpl(logger, socketPath, nil, topologymanager.NewFakeManager(logger))
}
