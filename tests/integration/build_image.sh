#!/usr/bin/env bash
# Builds docker/Dockerfile with podman where no registry is reachable: the base is the
# local stand-in from make_base_image.sh and torch comes from a local CPU wheel.
#
#   tests/integration/build_image.sh TAG [WHEEL_DIR]
#
# WHEEL_DIR (default: the find-links folder pip uses here) must hold the CPU torch
# wheel; TORCH_SPEC (default torch==2.13.0) picks it. The host's CA bundle and a pip
# config go into the build steps only (as volumes), never into the image.
set -euo pipefail
tag="${1:?usage: build_image.sh TAG [WHEEL_DIR]}"
wheels="${2:-$(pip config get global.find-links 2>/dev/null || echo /opt/wheels)}"
base="${BASE_IMAGE:-localhost/pybase:bookworm}"
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
ca="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

"$here/make_base_image.sh" "$base"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cat > "$work/pip.conf" <<EOF
[global]
cert = /etc/ssl/certs/host-ca.crt
find-links = /wheels
EOF

podman build --isolation chroot --pull=never \
    --build-arg BASE_IMAGE="$base" --build-arg TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}" \
    --volume "$ca:/etc/ssl/certs/host-ca.crt:ro" \
    --volume "$work/pip.conf:/etc/pip.conf:ro" \
    --volume "$wheels:/wheels:ro" \
    -f "$repo/docker/Dockerfile" -t "$tag" "$repo"
