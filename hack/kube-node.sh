#!/usr/bin/env bash
# A real one-node Kubernetes v1.20.2 cluster on this machine, offline: pods run.
#
#   hack/kube-node.sh build     apt packages (containerd 1.6, runc 1.1, CNI plugins 1.1,
#                               iptables, buildah, debootstrap) + every kube binary, built
#                               from Debian's kubernetes source by hack/kube-control-plane.sh,
#                               and (at the same time; MODELCACHE_NODE_BUILD_IMAGES=0: not)
#                               the images of `images`
#   hack/kube-node.sh up        containerd -> etcd + kube-apiserver + kube-controller-manager
#                               -> kube-scheduler -> kubelet (CRI: containerd, runc,
#                               cgroupfs) -> node Ready -> kube-proxy (iptables)
#   hack/kube-node.sh images    build modelcache:dev (the daemon, CPU variant) and
#                               modelcache-operator:dev from deploy/docker/*.Dockerfile on a
#                               debootstrapped bookworm base, import them into containerd
#                               (or, when the node is down, at the next `up`); a no-op when
#                               a hash of their inputs has not changed
#   hack/kube-node.sh env       prints: export KUBECONFIG=... PATH=...
#   hack/kube-node.sh status    exit 0 when every component runs and the node is Ready
#   hack/kube-node.sh down      stop everything; no process, mount, veth, netns, cgroup or
#                               iptables rule is left (--purge also deletes the state dir)
#
# Network: pods live on the bridge mcnode0 (10.244.0.0/24, host side 10.244.0.1) and get
# routes to that subnet and to the Service range 10.96.0.0/16 only: no default route, no
# masquerade, IP forwarding untouched, so nothing leaves the machine. kube-apiserver and the
# kubelet listen on 10.244.0.1 (pods reach the API through the `kubernetes` Service), every
# other listener on 127.0.0.1. No image is ever pulled: the pause image is built from the
# kubernetes source, the others by `images`. Needs root.
#
# Environment:
#   MODELCACHE_KUBE_CACHE   binaries, wheels, images (default ~/.cache/modelcache-kube)
#   MODELCACHE_NODE_STATE   containerd, kubelet, control-plane state, logs
#                           (default /tmp/modelcache-node-<hash of this checkout's path>)
#   PYTHON                  the Python whose pip downloads wheels (default .venv/bin/python)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
# shellcheck source=hack/node/lib.sh
source "$HERE/node/lib.sh"
# shellcheck source=hack/node/images.sh
source "$HERE/node/images.sh"
# shellcheck source=hack/node/up.sh
source "$HERE/node/up.sh"
# shellcheck source=hack/node/down.sh
source "$HERE/node/down.sh"

PYTHON="${PYTHON:-$REPO_ROOT/.venv/bin/python}"
[[ -x $PYTHON ]] || PYTHON="$(command -v python3)"

NODE_PACKAGES=(containerd runc containernetworking-plugins iptables conntrack buildah
  debootstrap gcc libc6-dev openssl curl)

cmd_build() {
  local missing=() p
  as_root true
  for p in "${NODE_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' \
      || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null || die "apt-get update failed"
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
      || die "apt-get install ${missing[*]} failed"
  fi
  mkdir -p "$LOGS" "$RUN"
  # The project images need no kube binary: build them while Go compiles (the first build
  # takes minutes each; a no-op when cached).
  local images_pid=""
  if [[ ${MODELCACHE_NODE_BUILD_IMAGES:-1} == 1 ]]; then
    log "building the images meanwhile (log: $LOGS/images.log)"
    (cmd_images) >"$LOGS/images.log" 2>&1 &
    images_pid=$!
  fi
  bash "$CP_SCRIPT" build
  buildah_setup
  build_pause
  buildah_cleanup
  if [[ -n $images_pid ]] && ! wait "$images_pid"; then
    tail -20 "$LOGS/images.log" >&2
    die "building the images failed (log: $LOGS/images.log)"
  fi
  log "built: $(containerd --version | awk '{print $3}') runc $(runc --version | awk 'NR==1 {print $3}')" \
    "kubelet $("$BIN/kubelet" --version | awk '{print $2}')"
}

cmd_images() {
  as_root true
  mkdir -p "$LOGS" "$RUN"
  buildah_setup
  trap buildah_cleanup EXIT
  build_base
  build_uv
  build_wheelhouse
  build_project_image modelcache deploy/docker/daemon.Dockerfile "$DAEMON_IMAGE" \
    "BASE_IMAGE=$BASE_IMAGE_TAG" "UV_IMAGE=$UV_IMAGE_TAG" \
    UV_OFFLINE=1 UV_NO_INDEX=1 UV_FIND_LINKS=/wheels
  local daemon_tar="$IMAGE_TAR"
  build_project_image modelcache-operator deploy/docker/operator.Dockerfile "$OPERATOR_IMAGE" \
    "PYTHON_IMAGE=$BASE_IMAGE_TAG" PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels
  local operator_tar="$IMAGE_TAR"
  if pid_of containerd >/dev/null; then
    import_image "$daemon_tar" "$DAEMON_IMAGE"
    import_image "$operator_tar" "$OPERATOR_IMAGE"
    log "images in containerd: ${DAEMON_IMAGE#docker.io/library/} ${OPERATOR_IMAGE#docker.io/library/}"
  else
    log "images built; the next 'hack/kube-node.sh up' imports them"
  fi
}

cmd_env() {
  echo "export MODELCACHE_NODE_STATE=$NODE_STATE"
  echo "export KUBECONFIG=$KUBECONFIG"
  echo "export PATH=$BIN:\$PATH"
}

cmd_status() {
  local c pid rc=0
  for c in containerd kube-scheduler kubelet kube-proxy; do
    if pid="$(pid_of "$c")"; then echo "$c: running (pid $pid)"
    else echo "$c: stopped"; rc=1
    fi
  done
  bash "$CP_SCRIPT" status || rc=1
  if node_ready; then echo "node $NODE_NAME: Ready"
  else echo "node $NODE_NAME: not Ready"; rc=1
  fi
  return $rc
}

case "${1:-}" in
  build) cmd_build ;;
  up) cmd_up ;;
  images) cmd_images ;;
  env) cmd_env ;;
  status) cmd_status ;;
  down) cmd_down "${2:-}" ;;
  *)
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 2
    ;;
esac
