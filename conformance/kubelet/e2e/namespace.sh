#!/usr/bin/env bash
# Runs inside the private mount namespace e2e.sh made (unshare -m, private propagation):
# puts the harness's temp dir where the kubelet writes outside its --root-dir, then
# runs the tests. Nothing mounted here is seen outside this namespace, and it all goes
# away with the namespace's last process.
#
#   namespace.sh WORK PYTHON [pytest args...]
set -euo pipefail
work=$1
python=$2
shift 2

skip() {
    echo "conformance/kubelet e2e: skipped: $*"
    exit 0
}

if [ "$(readlink /proc/self/ns/mnt)" = "${KYB_E2E_HOST_MNTNS:-}" ]; then
    echo "conformance/kubelet e2e: not in a private mount namespace; run conformance/kubelet/e2e.sh" >&2
    exit 1
fi

# The kubelet always uses /var/lib/kubelet/device-plugins (whatever --root-dir says)
# and creates /var/log/containers: an overlay whose upper layer is ours over their
# parents (so nothing is created there when they do not exist), and a fresh directory
# of ours bound over each (so a real kubelet's files there are neither seen nor touched).
for dir in /var/lib/kubelet /var/log/containers; do
    parent=$(dirname "$dir")
    layer=$work/overlay${parent//\//-}
    mkdir -p "$layer/upper" "$layer/work" "$work/mnt$dir"
    mount -t overlay overlay -o "lowerdir=$parent,upperdir=$layer/upper,workdir=$layer/work" "$parent" 2>"$work/mount.err" ||
        skip "cannot mount an overlay on $parent here ($(head -c 200 "$work/mount.err"))"
    mkdir -p "$dir"
    mount --bind "$work/mnt$dir" "$dir" 2>"$work/mount.err" ||
        skip "cannot bind a temp dir over $dir here ($(head -c 200 "$work/mount.err"))"
done

# At start the kubelet writes these host-wide sysctls; it writes our copies instead.
for key in kernel/panic kernel/panic_on_oops vm/overcommit_memory; do
    copy=$work/sysctl-${key//\//.}
    cat "/proc/sys/$key" >"$copy"
    mount --bind "$copy" "/proc/sys/$key" 2>"$work/mount.err" ||
        skip "cannot bind a file over /proc/sys/$key here ($(head -c 200 "$work/mount.err"))"
done

export KYB_E2E_WORK=$work
exec "$python" -m pytest -q -p no:cacheprovider conformance/kubelet/e2e "$@"
