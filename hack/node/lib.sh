# Shared by hack/kube-node.sh and hack/node/*.sh (sourced, never run): where the one-node
# cluster keeps its binaries, state and logs, its network constants, and process helpers.
#
# Layout
#   $CACHE (~/.cache/modelcache-kube, kept across runs, keyed by inputs)
#     bin/                every kube binary (hack/kube-control-plane.sh build) + kubectl/helm
#     node/               the pause image tar, the wheelhouse, buildah's image store, image tars
#   $NODE_STATE (/tmp/modelcache-node-<checkout hash>, one node per checkout; `down` keeps it,
#                `down --purge` deletes it)
#     cp/                 the control plane's state (MODELCACHE_KUBE_STATE)
#     containerd/ kubelet/ cni/ etc/ pki/ logs/ run/
#
# Network: one bridge ($BRIDGE, $GW/24) that exists only inside this machine. Pods get
# addresses in $POD_CIDR and routes to $POD_CIDR and $SERVICE_CIDR only: no default route, no
# masquerade, net.ipv4.ip_forward untouched (0), so nothing a pod sends can leave the machine.
# Every listener is on 127.0.0.1 or on $GW.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
CACHE="${MODELCACHE_KUBE_CACHE:-${HOME:-/root}/.cache/modelcache-kube}"
NODE_CACHE="$CACHE/node"
NODE_STATE="${MODELCACHE_NODE_STATE:-/tmp/modelcache-node-$(printf '%s' "$REPO_ROOT" | sha256sum | cut -c1-12)}"
BIN="$CACHE/bin"
CP_SCRIPT="$REPO_ROOT/hack/kube-control-plane.sh"

NODE_NAME="modelcache-node"
BRIDGE="mcnode0"
POD_CIDR="10.244.0.0/24"
GW="10.244.0.1"
SERVICE_CIDR="10.96.0.0/16"  # kube-control-plane.sh's --service-cluster-ip-range
CLUSTER_DOMAIN="cluster.local"
OWNER_FILE="/run/modelcache-node.owner"  # which state dir owns the bridge (one node per machine)

# The control plane of this node: its own state dir, and its apiserver on the bridge address
# so that pods reach it through the `kubernetes` Service (kube-proxy DNATs 10.96.0.1:443 to
# $GW, a local address: delivered to the host, never forwarded).
export MODELCACHE_KUBE_STATE="$NODE_STATE/cp"
export MODELCACHE_KUBE_APISERVER_HOST="$GW"
export KUBECONFIG="$MODELCACHE_KUBE_STATE/admin.kubeconfig"
export PATH="$BIN:$PATH"
PKI="$MODELCACHE_KUBE_STATE/pki"

LOGS="$NODE_STATE/logs"
RUN="$NODE_STATE/run"
SOCK="$NODE_STATE/containerd/containerd.sock"
CTR=(ctr --address "$SOCK" --namespace k8s.io)

# Never send anything through a proxy: every connection here stays on this machine.
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY
export NO_PROXY="127.0.0.1,localhost,$GW" no_proxy="127.0.0.1,localhost,$GW"
export DEBIAN_FRONTEND=noninteractive

log() { printf '[kube-node] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

as_root() {
  [[ $(id -u) -eq 0 ]] || die "the node needs root (network namespaces, mounts, iptables): $*"
  "$@"
}

# pid_of NAME -> the pid recorded in $RUN/NAME.pid, if that process is alive and is NAME.
pid_of() {
  local pid exe
  [[ -f $RUN/$1.pid ]] || return 1
  pid="$(<"$RUN/$1.pid")"
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  exe="$(readlink "/proc/$pid/exe" 2>/dev/null)" || return 1
  [[ $(basename "${exe% (deleted)}") == "$1" ]] || return 1
  echo "$pid"
}

# launch NAME BINARY ARGS... : in its own session; the pid file holds the daemon's own pid
# (bash writes $$ and then execs it), never a wrapper's.
launch() {
  local name="$1"; shift
  mkdir -p "$RUN" "$LOGS"
  rm -f "$RUN/$name.pid"
  log "starting $name (log: $LOGS/$name.log)"
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "$RUN/$name.pid" "$@" \
    </dev/null >>"$LOGS/$name.log" 2>&1 8>&- 9>&- &
  local _
  for _ in $(seq 50); do [[ -s $RUN/$name.pid ]] && break; sleep 0.1; done
}

stop_one() {
  local pid _
  pid="$(pid_of "$1")" || { rm -f "$RUN/$1.pid"; return 0; }
  log "stopping $1 (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; sleep 0.3; fi
  rm -f "$RUN/$1.pid"
}

# wait_until TIMEOUT WHAT [DAEMON] -- CMD... : poll CMD; die with the daemon's log tail when
# the daemon exits or the time is up.
wait_until() {
  local timeout="$1" what="$2" daemon=""
  shift 2
  if [[ $1 != -- ]]; then daemon="$1"; shift; fi
  shift
  local end=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if [[ -n $daemon ]] && ! pid_of "$daemon" >/dev/null; then
      tail -20 "$LOGS/$daemon.log" >&2 2>/dev/null || true
      die "$daemon exited while waiting for $what (log: $LOGS/$daemon.log)"
    fi
    if ((SECONDS >= end)); then
      [[ -n $daemon ]] && { tail -20 "$LOGS/$daemon.log" >&2 2>/dev/null || true; }
      die "timed out after ${timeout}s waiting for $what"
    fi
    sleep 0.5
  done
}

free_port() {  # free_port [HOST]
  python3 -c 'import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])' "${1:-127.0.0.1}"
}

# port_file NAME [HOST]: a port kept in $RUN/NAME.port, picked free the first time.
port_file() {
  local f="$RUN/$1.port" p
  if [[ -f $f ]] && p="$(<"$f")" && [[ $p =~ ^[0-9]+$ ]] \
     && ! (exec 3<>"/dev/tcp/${2:-127.0.0.1}/$p") 2>/dev/null; then
    echo "$p"; return 0
  fi
  p="$(free_port "${2:-127.0.0.1}")"
  echo "$p" >"$f"
  echo "$p"
}
