#!/usr/bin/env bash
# Prints the folder of a `go` that can build the control-plane binaries: the one on PATH if it is
# 1.25 or later by itself (not by fetching a toolchain, which GOTOOLCHAIN=local or GOPROXY=off
# forbid), else Go $GO_VERSION from the Go module proxy (golang.org/toolchain, what `go` itself
# downloads), unpacked once per machine outside the repo. Its user should unset GOROOT: one set
# for another Go would make this one use that Go's compiler.
set -euo pipefail

GO_VERSION="${GO_VERSION:-1.25.5}"
NEEDED_MINOR=25
# SHA-256 of the proxy's zips of Go 1.25.5: the toolchain runs as whoever builds, so it is checked
# as `go` itself checks it (against sum.golang.org, out of reach here). Another GO_VERSION needs GO_SHA256.
declare -A GO_SUMS=(
  [1.25.5-amd64]=8cea6783dab64d68b38f5b81ecd38d45155a3c06638991acc6af19e0fca80edb
  [1.25.5-arm64]=4d31d22f75fed99025f7b082319eabeb74106d11e343fc203b336ba2afdeb3a1
)

if command -v go >/dev/null; then
  minor=$(GOTOOLCHAIN=local go env GOVERSION 2>/dev/null | sed -E 's/^go1\.([0-9]+).*/\1/' || true)
  if [[ "$minor" =~ ^[0-9]+$ ]] && (( minor >= NEEDED_MINOR )); then
    dirname "$(command -v go)"
    exit 0
  fi
fi

case "$(uname -m)" in
  x86_64) arch=amd64 ;;
  aarch64 | arm64) arch=arm64 ;;
  *) echo "[go] no Go toolchain for $(uname -m)" >&2; exit 1 ;;
esac
name="go$GO_VERSION.linux-$arch"
sum="${GO_SHA256:-${GO_SUMS[$GO_VERSION-$arch]:-}}"
if [[ -z "$sum" ]]; then
  echo "[go] no known SHA-256 for $name: set GO_SHA256 to the one of its golang.org/toolchain zip" >&2
  exit 1
fi
cache="${XDG_CACHE_HOME:-$HOME/.cache}/workerqueue-operator/$name"
mkdir -p "$(dirname "$cache")"
# One fetch at a time per machine; the one that waited finds it there.
exec 8>"$cache.lock"
flock 8
if [[ ! -x "$cache/bin/go" ]]; then
  echo "[go] fetching $name from the Go module proxy into $cache" >&2
  tmp=$(mktemp -d "$(dirname "$cache")/.$name.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  python3 - "https://proxy.golang.org/golang.org/toolchain/@v/v0.0.1-$name.zip" "$tmp" "$sum" <<'PY'
import hashlib, io, os, sys, urllib.request, zipfile
url, into, expected = sys.argv[1], sys.argv[2], sys.argv[3]
with urllib.request.urlopen(url, timeout=300) as answer:
    data = answer.read()
if hashlib.sha256(data).hexdigest() != expected:
    sys.exit(f"[go] {url}: SHA-256 {hashlib.sha256(data).hexdigest()}, expected {expected}")
archive = zipfile.ZipFile(io.BytesIO(data))
for entry in archive.infolist():
    # Every path is under golang.org/toolchain@<version>/, which is the GOROOT.
    relative = entry.filename.split("/", 2)[-1]
    target = os.path.join(into, "go", relative)
    if entry.is_dir() or not relative:
        continue
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with archive.open(entry) as src, open(target, "wb") as dst:
        dst.write(src.read())
    # A module zip keeps no modes: the commands are what `go` itself marks executable.
    if relative.startswith(("bin/", "pkg/tool/")):
        os.chmod(target, 0o755)
PY
  rm -rf "$cache"
  mv "$tmp/go" "$cache"
fi
echo "$cache/bin"
