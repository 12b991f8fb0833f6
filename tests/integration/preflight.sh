#!/usr/bin/env bash
# Can this machine run the integration tests (real SLURM daemons in network
# namespaces, podman image builds)? Installs what they need with apt and exits 0 if
# so; otherwise prints the reason on stdout and exits 1.
#
#   if reason="$(tests/integration/preflight.sh)"; then make test-integration; else echo "skipped: $reason"; fi
#
# apt's own output goes to stderr.
set -uo pipefail
packages=(slurm-wlm munge podman buildah runc mmdebstrap iproute2)
need=(slurmctld slurmd munged mungekey podman buildah runc mmdebstrap ip unshare nsenter)

if [ "$(id -u)" != 0 ]; then
    echo "not root: the tests start SLURM daemons and create network namespaces"
    exit 1
fi
missing=()
for p in "${need[@]}"; do
    command -v "$p" >/dev/null 2>&1 || [ -x "/usr/sbin/$p" ] || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "missing ${missing[*]} and no apt-get to install ${packages[*]}"
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -q && apt-get install -y -q "${packages[@]}"; } >&2; then
        echo "apt-get could not install ${packages[*]}"
        exit 1
    fi
fi
probe="itprobe$$"  # interface names: 15 characters at most
if ! ip netns add "$probe" 2>/dev/null; then
    echo "network namespaces are not available (ip netns add failed)"
    exit 1
fi
ip netns del "$probe"
if ! ip link add "b$probe" type bridge 2>/dev/null; then
    echo "cannot create a network bridge (ip link add type bridge failed)"
    exit 1
fi
ip link del "b$probe"
exit 0
