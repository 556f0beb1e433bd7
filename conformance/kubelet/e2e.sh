#!/usr/bin/env bash
# End to end with the real kubelet binary (conformance/kubelet/README.md, "The real
# kubelet binary"): builds the kubelet and the fake container runtime from this
# module's pins, then runs the tests in conformance/kubelet/e2e in a private mount
# namespace, where the kubelet, the fake runtime and the real plugin process run as
# static pods are admitted.
#
#   conformance/kubelet/e2e.sh [pytest args...]     e.g. -k restart -x
#   conformance/kubelet/e2e.sh --build-only          the binaries only (tox's kubelet env
#                                                    builds them, so that kubelet-e2e,
#                                                    which runs alone, does not link)
#
# Python: $KYB_PYTHON, else <repo>/.venv/bin/python, else python3.
# Without Go, root or a private mount namespace it prints one line why and exits 0.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

skip() {
    echo "conformance/kubelet e2e: skipped: $*"
    exit 0
}

command -v go >/dev/null 2>&1 || skip "no Go toolchain"
build_only=false
if [ "${1:-}" = --build-only ]; then
    build_only=true
else
    [ "$(id -u)" = 0 ] || skip "not root (the kubelet and the mounts that keep it in a temp dir need root)"
    command -v unshare >/dev/null 2>&1 || skip "no unshare command"
    if ! err=$(unshare -m --propagation private true 2>&1); then
        skip "no private mount namespace here (unshare -m: ${err:0:200})"
    fi
fi

# Outside the checkout, so that a fresh clone does not link them again (a minute of CPU
# for the kubelet); one directory per go.mod and go.sum. go build leaves a binary whose
# build ID is current as it is: it links only when its sources or the toolchain change.
bin=${KYB_GO_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/kyb-device-plugin/go-bin}
bin=$bin/kubelet-$(cat "$here/go.mod" "$here/go.sum" | sha256sum | cut -c1-16)
mkdir -p "$bin" 2>/dev/null || bin=$here/.bin  # no writable cache: in the checkout, as before
mkdir -p "$bin"
started=$(date +%s)
(cd "$here" && go build -o "$bin/kubelet" k8s.io/kubernetes/cmd/kubelet && go build -o "$bin/fakecri" ./fakecri)
echo "conformance/kubelet e2e: kubelet and fakecri built in $(($(date +%s) - started)) s"
if $build_only; then
    exit 0
fi

python=${KYB_PYTHON:-}
if [ -z "$python" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then python=$repo/.venv/bin/python; else python=python3; fi
fi

work=$(mktemp -d /tmp/kyb-kubelet-e2e-XXXXXX)
[ -n "${KYB_E2E_KEEP:-}" ] || trap 'rm -rf "$work"' EXIT
export KYB_E2E_BIN=$bin
KYB_E2E_HOST_MNTNS=$(readlink /proc/self/ns/mnt)
export KYB_E2E_HOST_MNTNS
cd "$repo"
unshare -m --propagation private -- bash "$here/e2e/namespace.sh" "$work" "$python" "$@"
