#!/usr/bin/env bash
# Conformance of kyb-device-plugin against the real kubelet device manager
# (k8s.io/kubernetes/pkg/kubelet/cm/devicemanager, pinned in go.mod).
#
#   conformance/kubelet/run.sh [go test flags...]   e.g. -run TestFencing
#
# Python: $KYB_PYTHON, else <repo>/.venv/bin/python, else python3.
# Module downloads and build results stay in the default GOMODCACHE/GOCACHE,
# so only the first run downloads and compiles Kubernetes (minutes); later
# runs take seconds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

if ! command -v go >/dev/null 2>&1; then
    echo "conformance/kubelet: skipped: no Go toolchain"
    exit 0
fi

exec go test ./... -count=1 -v -timeout 15m "$@"
