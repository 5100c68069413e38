# Sourced by hack/kube-node.sh after lib.sh and images.sh: `up`.
#
# The kubelet resyncs pods (and so ConfigMap volumes) every 10 s instead of its default 1 min,
# so that live configuration changes reach pods quickly in tests.
#
# Order: leftovers of a crashed run cleaned -> bridge -> containerd (+ the pause image) ->
# control plane (hack/kube-control-plane.sh, apiserver on the bridge address) -> client
# certificates -> kube-scheduler -> kubelet -> node Ready -> kube-proxy. Idempotent: what
# runs already is kept.

NODE_SYSCTLS=(kernel.panic kernel.panic_on_oops vm.overcommit_memory vm.panic_on_oom
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes net.ipv4.conf.all.route_localnet
  net.ipv4.ip_forward)
# Created outside the state dir by kubelet (hardcoded), containerd's shims and go-cni: `down`
# removes those that did not exist before the first `up`.
NODE_OUTSIDE_DIRS=(/var/log/pods /var/log/containers /run/containerd /var/lib/cni
  /sys/fs/cgroup/memory/kubepods)

# sign_client NAME SUBJECT: a client certificate of the control plane's CA.
sign_client() {
  local dir="$NODE_STATE/pki"
  [[ -f $dir/$1.crt ]] && return 0
  mkdir -p "$dir"; chmod 700 "$dir"
  openssl genrsa -out "$dir/$1.key" 2048 2>/dev/null
  openssl req -new -key "$dir/$1.key" -subj "$2" -out "$dir/$1.csr" 2>/dev/null
  printf '%s\n' "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=clientAuth" >"$dir/$1.ext"
  openssl x509 -req -in "$dir/$1.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile "$dir/$1.ext" -out "$dir/$1.crt" 2>/dev/null
  rm -f "$dir/$1.csr" "$dir/$1.ext"
}

# write_kubeconfig NAME USER
write_kubeconfig() {
  local dir="$NODE_STATE/pki" server
  server="$(sed -n 's/^ *server: //p' "$KUBECONFIG" | head -1)"
  cat >"$dir/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: modelcache-node
  cluster: {server: "$server", certificate-authority: "$PKI/ca.crt"}
users:
- name: $2
  user: {client-certificate: "$dir/$1.crt", client-key: "$dir/$1.key"}
contexts:
- name: modelcache-node
  context: {cluster: modelcache-node, user: $2}
current-context: modelcache-node
EOF
}

check_owner() {
  local other
  [[ -f $OWNER_FILE ]] || return 0
  other="$(<"$OWNER_FILE")"
  [[ $other == "$NODE_STATE" ]] && return 0
  if [[ -d $other ]] && MODELCACHE_NODE_STATE="$other" bash "$REPO_ROOT/hack/kube-node.sh" \
      status >/dev/null 2>&1; then
    die "a node of another state dir runs ($other): 'MODELCACHE_NODE_STATE=$other hack/kube-node.sh down' first (one node per machine)"
  fi
}

node_network() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$GW/${POD_CIDR#*/}" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
  # Host -> ClusterIP traffic goes onto the bridge with source $GW (which pods can answer:
  # they have no default route), never to the machine's default route.
  ip route replace "$SERVICE_CIDR" dev "$BRIDGE" src "$GW"
  # The CNI bridge plugin turns net.ipv4.ip_forward on (always, at the first pod). Pods have
  # no route off the machine, but a pod with a raw socket could still hand the host a packet
  # for elsewhere: nothing is forwarded between the bridge and any other interface. In the
  # mangle table, which kube-proxy and the kubelet leave alone, so their rules cannot come
  # first.
  iptables -w -t mangle -N MCNODE-FORWARD 2>/dev/null || true
  iptables -w -t mangle -F MCNODE-FORWARD
  iptables -w -t mangle -A MCNODE-FORWARD -i "$BRIDGE" ! -o "$BRIDGE" -j DROP
  iptables -w -t mangle -A MCNODE-FORWARD ! -i "$BRIDGE" -o "$BRIDGE" -j DROP
  iptables -w -t mangle -C FORWARD -j MCNODE-FORWARD 2>/dev/null \
    || iptables -w -t mangle -I FORWARD 1 -j MCNODE-FORWARD
  echo "$NODE_STATE" >"$OWNER_FILE"
}

node_containerd() {
  local f
  mkdir -p "$NODE_STATE/containerd" "$NODE_STATE/etc" "$NODE_STATE/cni/net.d"
  for f in containerd.toml cni.conflist; do
    sed -e "s#@STATE@#$NODE_STATE#g" -e "s#@BRIDGE@#$BRIDGE#g" -e "s#@GW@#$GW#g" \
      -e "s#@POD_CIDR@#$POD_CIDR#g" -e "s#@SERVICE_CIDR@#$SERVICE_CIDR#g" \
      -e "s#@PAUSE_IMAGE@#$PAUSE_IMAGE#g" "$REPO_ROOT/hack/node/$f.in" >"$NODE_STATE/etc/$f"
  done
  mv "$NODE_STATE/etc/cni.conflist" "$NODE_STATE/cni/net.d/10-modelcache-node.conflist"
  if ! pid_of containerd >/dev/null; then
    launch containerd containerd --config "$NODE_STATE/etc/containerd.toml"
    wait_until 60 "containerd" containerd -- "${CTR[@]}" version
  fi
  import_image "$PAUSE_TAR" "$PAUSE_IMAGE"
  import_built_images
}

node_kubelet() {
  local port healthz
  pid_of kubelet >/dev/null && return 0
  port="$(port_file kubelet "$GW")"
  healthz="$(port_file kubelet-healthz)"
  mkdir -p "$NODE_STATE/kubelet/pki" "$NODE_STATE/kubelet/volume-plugins"
  printf 'nameserver %s\n' "$GW" >"$NODE_STATE/etc/resolv.conf"
  launch kubelet "$BIN/kubelet" \
    --kubeconfig="$NODE_STATE/pki/kubelet.kubeconfig" \
    --hostname-override="$NODE_NAME" --node-ip="$GW" \
    --container-runtime=remote \
    --container-runtime-endpoint="unix://$SOCK" \
    --image-service-endpoint="unix://$SOCK" \
    --runtime-request-timeout=5m \
    --pod-infra-container-image="$PAUSE_IMAGE" \
    --cgroup-driver=cgroupfs --cgroups-per-qos=true --enforce-node-allocatable=pods \
    --root-dir="$NODE_STATE/kubelet" --cert-dir="$NODE_STATE/kubelet/pki" \
    --volume-plugin-dir="$NODE_STATE/kubelet/volume-plugins" \
    --address="$GW" --port="$port" --read-only-port=0 \
    --anonymous-auth=false --client-ca-file="$PKI/ca.crt" --authorization-mode=Webhook \
    --healthz-bind-address=127.0.0.1 --healthz-port="$healthz" \
    --pod-cidr="$POD_CIDR" \
    --resolv-conf="$NODE_STATE/etc/resolv.conf" \
    --cluster-dns="$GW" --cluster-domain="$CLUSTER_DOMAIN" \
    --fail-swap-on=false \
    --sync-frequency=10s \
    --image-gc-high-threshold=100 --image-gc-low-threshold=99 \
    --eviction-hard='memory.available<100Mi,nodefs.available<1%,imagefs.available<1%' \
    --v=1
  wait_until 120 "kubelet healthz" kubelet -- curl -sf "http://127.0.0.1:$healthz/healthz"
}

node_scheduler() {
  local port
  pid_of kube-scheduler >/dev/null && return 0
  port="$(port_file kube-scheduler)"
  launch kube-scheduler "$BIN/kube-scheduler" \
    --kubeconfig="$NODE_STATE/pki/scheduler.kubeconfig" \
    --authentication-kubeconfig="$NODE_STATE/pki/scheduler.kubeconfig" \
    --authorization-kubeconfig="$NODE_STATE/pki/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$port" --port=0 \
    --leader-elect=false --profiling=false --v=1
  wait_until 60 "kube-scheduler" kube-scheduler -- curl -skf "https://127.0.0.1:$port/healthz"
}

# No --cluster-cidr: kube-proxy then masquerades nothing but hairpin traffic (which stays on
# the bridge). NodePorts answer on 127.0.0.1 only. conntrack sysctls are left alone.
node_proxy() {
  local healthz metrics
  pid_of kube-proxy >/dev/null && return 0
  healthz="$(port_file kube-proxy-healthz)"
  metrics="$(port_file kube-proxy-metrics)"
  launch kube-proxy "$BIN/kube-proxy" \
    --kubeconfig="$NODE_STATE/pki/proxy.kubeconfig" \
    --hostname-override="$NODE_NAME" \
    --proxy-mode=iptables \
    --bind-address=127.0.0.1 \
    --healthz-bind-address="127.0.0.1:$healthz" --metrics-bind-address="127.0.0.1:$metrics" \
    --nodeport-addresses=127.0.0.1/32 \
    --conntrack-max-per-core=0 --conntrack-tcp-timeout-established=0 \
    --conntrack-tcp-timeout-close-wait=0 \
    --v=1
  wait_until 60 "kube-proxy healthz" kube-proxy -- curl -sf "http://127.0.0.1:$healthz/healthz"
}

node_ready() {
  [[ $(kubectl get node "$NODE_NAME" \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]
}

# node_ready_since EPOCH: Ready, as posted by a kubelet at or after EPOCH. After a crash the
# Node object still says Ready from the dead kubelet, and a new kubelet first posts NotReady
# (runtime and PLEG not checked yet): a plain node_ready would pass on the stale condition.
node_ready_since() {
  local st beat
  read -r st beat < <(kubectl get node "$NODE_NAME" -o jsonpath=\
'{.status.conditions[?(@.type=="Ready")].status} {.status.conditions[?(@.type=="Ready")].lastHeartbeatTime}' \
    2>/dev/null || true)
  [[ $st == True && -n $beat ]] && (($(date -d "$beat" +%s) >= $1))
}

cmd_up() {
  local b d s start=$SECONDS kubelet_started
  as_root true
  for b in kubelet kube-scheduler kube-proxy kube-apiserver kubectl; do
    [[ -x $BIN/$b ]] || die "$BIN/$b missing: run 'hack/kube-node.sh build' first"
  done
  for b in containerd ctr runc /usr/lib/cni/bridge iptables; do
    command -v "$b" >/dev/null || die "$b missing: run 'hack/kube-node.sh build' first"
  done
  buildah_setup
  build_pause
  buildah_cleanup
  check_owner
  mkdir -p "$NODE_STATE" "$RUN" "$LOGS"
  # Leftovers of a run that crashed (no containerd of ours): clean them before starting.
  pid_of containerd >/dev/null || node_cleanup quiet
  if [[ ! -f $RUN/sysctl.orig ]]; then
    for s in "${NODE_SYSCTLS[@]}"; do sysctl -e "$s"; done >"$RUN/sysctl.orig"
  fi
  if [[ ! -f $RUN/preexisting ]]; then
    for d in "${NODE_OUTSIDE_DIRS[@]}"; do [[ -e $d ]] && echo "$d"; done >"$RUN/preexisting"
  fi
  node_network
  node_containerd
  bash "$CP_SCRIPT" start
  sign_client kubelet "/O=system:nodes/CN=system:node:$NODE_NAME"
  write_kubeconfig kubelet "system:node:$NODE_NAME"
  sign_client scheduler "/CN=system:kube-scheduler"
  write_kubeconfig scheduler system:kube-scheduler
  sign_client proxy "/CN=system:kube-proxy"
  write_kubeconfig proxy system:kube-proxy
  node_scheduler
  kubelet_started=$(date +%s)
  node_kubelet
  wait_until 180 "node $NODE_NAME Ready" kubelet -- node_ready_since "$kubelet_started"
  node_proxy
  log "up in $((SECONDS - start))s: eval \"\$(hack/kube-node.sh env)\""
}
