#!/usr/bin/env bash
# Builds a minimal local stand-in for the PyTorch base image, for machines that reach
# no container registry: Debian bookworm with python3, venv and pip, imported into
# podman. The reproduction Dockerfile takes it through its BASE_IMAGE argument.
#
#   tests/integration/make_base_image.sh [IMAGE_NAME]    (default localhost/pybase:bookworm)
#
# Needs root, mmdebstrap and podman. Reuses the image when it already exists.
set -euo pipefail
image="${1:-localhost/pybase:bookworm}"
if podman image exists "$image"; then
    echo "$image already exists"
    exit 0
fi
# The mirror apt already uses here, so that no other network is needed.
mirror="${DEBIAN_MIRROR:-$(grep -rhoE 'https?://[^ ]*debian\.org/debian/?' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | head -n1 || true)}"
mirror="${mirror:-http://deb.debian.org/debian}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# EXTERNALLY-MANAGED goes, so that plain `pip install` works as in the PyTorch images.
mmdebstrap --variant=apt --mode=root --quiet \
    --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
    bookworm "$work/base.tar" "$mirror"
podman import --quiet "$work/base.tar" "$image"
echo "built $image"
