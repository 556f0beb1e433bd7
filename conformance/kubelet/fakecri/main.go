// Command fakecri is the container runtime of the real-kubelet end-to-end tests
// (conformance/kubelet/e2e): the CRI fake the kubelet's own tests use
// (k8s.io/cri-client/pkg/fake, over k8s.io/cri-api's FakeRuntimeService), served on
// a Unix socket, with what a standalone kubelet needs from a runtime and a record of
// what reaches it.
//
//	fakecri --listen /tmp/x/cri.sock --record /tmp/x/containers.jsonl
//
// Every CreateContainer request is appended to the record as one line of protojson
// (the pod sandbox config and the container config: envs, devices, CDI devices,
// annotations, mounts), before the container exists. A container whose command is
// exactly ["true"] exits 0 as soon as it starts (init containers: the fake leaves
// every started container running, and the kubelet would wait for them forever);
// every other container runs until the kubelet stops it. The process keeps its
// containers across kubelet restarts, as a real runtime does.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	"k8s.io/cri-client/pkg/fake"
)

// runtime is the fake with recording and exiting containers.
type runtime struct {
	*fake.RemoteRuntime

	mu     sync.Mutex
	record *os.File
	exits  map[string]bool // container ID -> exits 0 when started
}

func (r *runtime) CreateContainer(ctx context.Context, req *runtimeapi.CreateContainerRequest) (*runtimeapi.CreateContainerResponse, error) {
	line, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(req)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	_, err = r.record.Write(append(line, '\n'))
	r.mu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("recording CreateContainer: %w", err)
	}
	resp, err := r.RemoteRuntime.CreateContainer(ctx, req)
	if err != nil {
		return nil, err
	}
	// As a real runtime reports it. The fake leaves it empty, and then the kubelet,
	// removing the container, deletes what the glob "*" matches in its working
	// directory (containerLogManager.Clean globs "<log path>*").
	svc := r.RuntimeService
	svc.Lock()
	if c, ok := svc.Containers[resp.ContainerId]; ok {
		c.LogPath = filepath.Join(req.GetSandboxConfig().GetLogDirectory(), req.GetConfig().GetLogPath())
	}
	svc.Unlock()
	if slices.Equal(req.GetConfig().GetCommand(), []string{"true"}) {
		r.mu.Lock()
		r.exits[resp.ContainerId] = true
		r.mu.Unlock()
	}
	return resp, nil
}

func (r *runtime) StartContainer(ctx context.Context, req *runtimeapi.StartContainerRequest) (*runtimeapi.StartContainerResponse, error) {
	resp, err := r.RemoteRuntime.StartContainer(ctx, req)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	exits := r.exits[req.ContainerId]
	r.mu.Unlock()
	if exits {
		svc := r.RuntimeService
		svc.Lock()
		if c, ok := svc.Containers[req.ContainerId]; ok {
			c.State = runtimeapi.ContainerState_CONTAINER_EXITED
			c.ExitCode = 0
			c.Reason = "Completed"
			c.FinishedAt = time.Now().UnixNano()
		}
		svc.Unlock()
	}
	return resp, nil
}

func main() {
	listen := flag.String("listen", "", "Unix socket to serve the CRI runtime and image services on")
	recordPath := flag.String("record", "", "file to append each CreateContainer request to (protojson, one per line)")
	flag.Parse()
	if *listen == "" || *recordPath == "" {
		fmt.Fprintln(os.Stderr, "fakecri: --listen and --record are required")
		os.Exit(2)
	}
	record, err := os.OpenFile(*recordPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fakecri:", err)
		os.Exit(1)
	}

	r := &runtime{RemoteRuntime: fake.NewFakeRemoteRuntime(), record: record, exits: map[string]bool{}}
	r.RuntimeService.FakeStatus = &runtimeapi.RuntimeStatus{Conditions: []*runtimeapi.RuntimeCondition{
		{Type: runtimeapi.RuntimeReady, Status: true},
		{Type: runtimeapi.NetworkReady, Status: true},
	}}
	r.RuntimeService.FakeLinuxConfiguration = &runtimeapi.LinuxRuntimeConfiguration{
		CgroupDriver: runtimeapi.CgroupDriver_CGROUPFS,
	}
	// The kubelet refuses an image of size 0, and its image and eviction managers
	// want the runtime's filesystems.
	r.ImageService.SetFakeImageSize(1 << 20)
	usage := []*runtimeapi.FilesystemUsage{{
		Timestamp:  time.Now().UnixNano(),
		FsId:       &runtimeapi.FilesystemIdentifier{Mountpoint: os.TempDir()},
		UsedBytes:  &runtimeapi.UInt64Value{Value: 1 << 20},
		InodesUsed: &runtimeapi.UInt64Value{Value: 16},
	}}
	r.ImageService.SetFakeFilesystemUsage(usage)
	r.ImageService.SetFakeContainerFilesystemUsage(usage)

	_ = os.Remove(*listen)
	l, err := net.Listen("unix", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fakecri:", err)
		os.Exit(1)
	}
	server := grpc.NewServer()
	runtimeapi.RegisterRuntimeServiceServer(server, r)
	runtimeapi.RegisterImageServiceServer(server, r)

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-stop
		server.Stop()
	}()
	fmt.Fprintln(os.Stderr, "fakecri: serving on", *listen)
	if err := server.Serve(l); err != nil {
		fmt.Fprintln(os.Stderr, "fakecri:", err)
		os.Exit(1)
	}
}
