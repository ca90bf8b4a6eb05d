#!/usr/bin/env bash
# Installs, once per machine, what `make image` and the container test use: mmdebstrap (the root
# filesystem from Debian's packages), umoci (an OCI image of it), skopeo (archive formats), podman
# with runc (the container test; crun cannot start containers on hybrid-cgroup kernels).
# Debian packages only (no Docker engine, no registry); skipped when every tool is present.
set -euo pipefail

declare -A PACKAGE_OF=(
  [mmdebstrap]=mmdebstrap [umoci]=umoci [skopeo]=skopeo [podman]=podman [runc]=runc
  [unshare]=util-linux [dpkg-query]=dpkg [tar]=tar
)
missing=()
for tool in "${!PACKAGE_OF[@]}"; do
  command -v "$tool" >/dev/null || missing+=("${PACKAGE_OF[$tool]}")
done
# mmdebstrap checks the mirror's signatures with Debian's keys.
[[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] || missing+=(debian-archive-keyring)
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ $(id -u) -ne 0 ]]; then
  echo "image tools missing (${missing[*]}): install them as root, or run this script as root" >&2
  exit 1
fi
echo "[image-tools] installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# No recommends: podman's would bring rootless networking and fuse-overlayfs, unused here.
apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
