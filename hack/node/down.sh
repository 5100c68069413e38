# Sourced by hack/kube-node.sh after lib.sh and up.sh: `down`, and the cleanup `up` runs after
# a crash. Leaves no process, mount, veth, network namespace, cgroup or iptables rule behind,
# and restores the sysctls kubelet and kube-proxy change. Idempotent; works when every
# process of the node is already dead.

# Pods go away through the kubelet (CNI DEL, volume unmounts) while it still runs.
node_drain() {
  pid_of kubelet >/dev/null && pid_of kube-apiserver >/dev/null 2>&1 || return 0
  kubectl get --raw /readyz >/dev/null 2>&1 || return 0
  log "deleting every pod through the kubelet"
  kubectl delete pods --all --all-namespaces --grace-period=2 --wait=false >/dev/null 2>&1 || true
  local _
  for _ in $(seq 60); do
    [[ -z $("${CTR[@]}" tasks ls -q 2>/dev/null) ]] && break
    kubectl delete pods --all --all-namespaces --grace-period=0 --force --wait=false \
      >/dev/null 2>&1 || true
    sleep 1
  done
}

# Every rule that jumps to a KUBE-*/CNI-*/MCNODE-* chain, then those chains (kubelet,
# kube-proxy, CNI portmap and up.sh create them; `kube-proxy --cleanup` leaves some).
iptables_cleanup() {
  local ipt table
  for ipt in iptables ip6tables; do
    command -v "$ipt-save" >/dev/null || continue
    for table in filter nat mangle raw; do
      "$ipt-save" -t "$table" 2>/dev/null | python3 -c '
import shlex, sys
chains, rules = [], []
for line in sys.stdin:
    line = line.strip()
    if line.startswith(":"):
        name = line[1:].split()[0]
        if name.startswith(("KUBE-", "CNI-", "MCNODE-")):
            chains.append(name)
    elif line.startswith("-A "):
        words = shlex.split(line)
        if not words[1].startswith(("KUBE-", "CNI-", "MCNODE-")) and any(
            w.startswith(("KUBE-", "CNI-", "MCNODE-")) for w in words[2:]
        ):
            rules.append(" ".join(shlex.quote(w) for w in words[1:]))
for r in rules:
    print("D " + r)
for c in chains:
    print("F " + c)
for c in chains:
    print("X " + c)
' | while read -r op rest; do
        case $op in
          D) eval "$ipt -w -t $table -D $rest" 2>/dev/null || true ;;
          F) "$ipt" -w -t "$table" -F "$rest" 2>/dev/null || true ;;
          X) "$ipt" -w -t "$table" -X "$rest" 2>/dev/null || true ;;
        esac
      done
    done
  done
}

# Processes left in the kubelet's cgroups (containers whose shim died with a crash).
kill_pod_processes() {
  local procs p
  for procs in /sys/fs/cgroup/*/kubepods/cgroup.procs /sys/fs/cgroup/*/kubepods/*/cgroup.procs \
      /sys/fs/cgroup/*/kubepods/*/*/cgroup.procs /sys/fs/cgroup/*/kubepods/*/*/*/cgroup.procs; do
    [[ -f $procs ]] || continue
    while read -r p; do kill -KILL "$p" 2>/dev/null || true; done <"$procs"
  done
  # SIGKILL is asynchronous: wait until the cgroups are empty, or their rmdir fails (EBUSY).
  local _ busy
  for _ in $(seq 50); do
    busy=$(cat /sys/fs/cgroup/*/kubepods/cgroup.procs /sys/fs/cgroup/*/kubepods/*/cgroup.procs \
      /sys/fs/cgroup/*/kubepods/*/*/cgroup.procs /sys/fs/cgroup/*/kubepods/*/*/*/cgroup.procs \
      2>/dev/null | head -1 || true)
    [[ -z $busy ]] && return 0
    sleep 0.2
  done
  log "warning: processes still in the kubepods cgroups: $busy"
}

# node_cleanup [quiet]: everything but the state dir's files.
node_cleanup() {
  local m v p d
  [[ ${1:-} == quiet ]] || log "cleaning up"
  if pid_of kube-proxy >/dev/null; then
    stop_one kube-proxy
  fi
  [[ -x $BIN/kube-proxy ]] && "$BIN/kube-proxy" --cleanup >>"$LOGS/kube-proxy.log" 2>&1 || true
  stop_one kubelet
  stop_one kube-scheduler
  if pid_of containerd >/dev/null; then
    for p in $("${CTR[@]}" tasks ls -q 2>/dev/null); do
      "${CTR[@]}" tasks kill -s SIGKILL "$p" >/dev/null 2>&1 || true
    done
    sleep 1
    for p in $("${CTR[@]}" tasks ls -q 2>/dev/null); do
      "${CTR[@]}" tasks rm -f "$p" >/dev/null 2>&1 || true
    done
    for p in $("${CTR[@]}" containers ls -q 2>/dev/null); do
      "${CTR[@]}" containers rm "$p" >/dev/null 2>&1 || true
    done
  fi
  stop_one containerd
  # Shims that outlived containerd: theirs is our socket.
  for p in $(pgrep -f containerd-shim-runc-v2 || true); do
    if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q -- "-address $SOCK "; then
      kill -KILL "$p" 2>/dev/null || true
    fi
  done
  kill_pod_processes
  bash "$CP_SCRIPT" stop || true
  iptables_cleanup
  # Network namespaces, volumes and overlay mounts under the state dir, deepest first.
  for m in $(findmnt -rn -o TARGET | grep -F "$NODE_STATE/" | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  for v in $(ip -o link show master "$BRIDGE" 2>/dev/null | awk -F'[ :@]+' '{print $2}'); do
    ip link del "$v" 2>/dev/null || true
  done
  ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE"
  [[ -f $OWNER_FILE && $(<"$OWNER_FILE") == "$NODE_STATE" ]] && rm -f "$OWNER_FILE"
  if [[ -f $RUN/sysctl.orig ]]; then
    sed 's/ //g' "$RUN/sysctl.orig" | while read -r kv; do sysctl -q -w "$kv" || true; done
    rm -f "$RUN/sysctl.orig"
  fi
  if [[ -f $RUN/preexisting ]]; then
    for d in /var/log/pods /var/log/containers /var/lib/cni /run/containerd; do
      grep -qx "$d" "$RUN/preexisting" || rm -rf "$d"
    done
    if ! grep -qx /sys/fs/cgroup/memory/kubepods "$RUN/preexisting"; then
      for d in /sys/fs/cgroup/*/kubepods; do
        [[ -d $d ]] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
      done
    fi
    # The record of what existed before the first `up` outlives a crash cleanup (`up` then
    # must not mistake this run's leftovers for the machine's own); `down` drops it.
    [[ ${1:-} == quiet ]] || rm -f "$RUN/preexisting"
  fi
  # Imported-image stamps describe a containerd that is gone only with --purge; keep them.
  return 0
}

cmd_down() {
  as_root true
  [[ -d $NODE_STATE ]] || { log "no node state at $NODE_STATE"; return 0; }
  mkdir -p "$RUN" "$LOGS"
  node_drain
  node_cleanup
  if [[ ${1:-} == --purge ]]; then
    bash "$CP_SCRIPT" reset || true
    rm -rf "$NODE_STATE"
    log "down; state deleted"
  else
    log "down (state kept in $NODE_STATE; --purge deletes it)"
  fi
}
