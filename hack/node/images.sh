# Sourced by hack/kube-node.sh after lib.sh: the node's images, built here with no registry.
#
#   pause             the pod sandbox, pause.c of the same kubernetes source, gcc -static
#   base              Debian bookworm (python3 3.11) debootstrapped from the mirror apt already
#                     uses: the local stand-in for the Dockerfiles' base images
#   uv                the uv binary from its PyPI wheel (the daemon Dockerfile's UV_IMAGE)
#   modelcache:dev    deploy/docker/daemon.Dockerfile, CPU variant (BASE_IMAGE=base)
#   modelcache-operator:dev   deploy/docker/operator.Dockerfile (PYTHON_IMAGE=base)
#
# buildah (vfs storage: no kernel support needed) builds them with --network none: Python
# packages come from a wheelhouse that pip downloaded on this machine (from the index pip
# uses here, pinned by constraints.txt; torch is the local CPU wheel), mounted at /wheels.
# Every image is tagged by a hash of its inputs, so `images` is a no-op when nothing changed.

UV_VERSION="0.13.9"           # the daemon Dockerfile's UV_IMAGE tag
PAUSE_IMAGE="localhost/modelcache/pause:3.2"
BASE_INCLUDE="python3,python3-venv,ca-certificates"
BASE_REV="1"                  # bump to rebuild the base image
WHEELHOUSE_REV="1"
DAEMON_IMAGE="docker.io/library/modelcache:dev"
OPERATOR_IMAGE="docker.io/library/modelcache-operator:dev"
BUILDAH_DIR="$NODE_CACHE/buildah"
IMAGES_DIR="$NODE_CACHE/images"

sha() { sha256sum | cut -c1-16; }

buildah_setup() {
  mkdir -p "$BUILDAH_DIR" "$IMAGES_DIR"
  # No systemd here; no registry to resolve short names against (nothing is ever pulled).
  cat >"$BUILDAH_DIR/containers.conf" <<EOF
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$BUILDAH_DIR/events.log"
EOF
  printf 'unqualified-search-registries = []\nshort-name-mode = "disabled"\n' \
    >"$BUILDAH_DIR/registries.conf"
  export CONTAINERS_CONF="$BUILDAH_DIR/containers.conf"
  export CONTAINERS_REGISTRIES_CONF="$BUILDAH_DIR/registries.conf"
  B=(buildah --storage-driver vfs --root "$BUILDAH_DIR/root" --runroot "$BUILDAH_DIR/runroot")
  # buildah writes these even with --network none and its own --root: remove them afterwards
  # unless they were there before.
  BUILDAH_LEFTOVERS=()
  local d
  for d in /etc/cni /var/lib/containers; do [[ -e $d ]] || BUILDAH_LEFTOVERS+=("$d"); done
}

buildah_cleanup() {
  local d
  for d in "${BUILDAH_LEFTOVERS[@]}"; do rm -rf "$d"; done
}

image_exists() { "${B[@]}" inspect --type image "$1" >/dev/null 2>&1; }

# push_archive IMAGE NAME TAR: a docker-archive tar (what `ctr images import` reads) naming NAME.
push_archive() {
  rm -f "$3.tmp"
  "${B[@]}" push --quiet "$1" "docker-archive:$3.tmp:$2" >&2
  mv "$3.tmp" "$3"
}

# ----------------------------------------------------------------------------- pause
build_pause() {
  local src tar key dir ctr
  src="$(readlink -f "$BIN/kube-apiserver")"
  src="$(dirname "$src")/pause.c"
  [[ -f $src ]] || die "$src missing: run 'hack/kube-control-plane.sh build'"
  key="$(sha <"$src")"
  tar="$IMAGES_DIR/pause-$key.tar"
  if [[ ! -f $tar ]]; then
    log "building the pause image from $src"
    dir="$(mktemp -d)"
    gcc -Os -Wall -Werror -static -DVERSION=v3.2-modelcache -o "$dir/pause" "$src"
    strip "$dir/pause"
    ctr="$("${B[@]}" from --pull=never scratch)"
    "${B[@]}" copy --quiet "$ctr" "$dir/pause" /pause >/dev/null
    "${B[@]}" config --entrypoint '["/pause"]' --user 65535:65535 "$ctr"
    "${B[@]}" commit --quiet --rm "$ctr" "$PAUSE_IMAGE" >/dev/null
    push_archive "$PAUSE_IMAGE" "$PAUSE_IMAGE" "$tar"
    rm -rf "$dir"
  fi
  PAUSE_TAR="$tar"
}

# ----------------------------------------------------------------------------- base
# The first URI of a deb entry for bookworm, from the sources apt is configured with.
bookworm_mirror() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    uri="$(awk 'BEGIN { RS = "" }
      /(^|\n)Types:[^\n]*deb([ \n]|$)/ && /(^|\n)Suites:[^\n]*[ ]bookworm([ \n]|$)/ {
        if (match($0, /URIs: *[^ \n]+/)) { u = substr($0, RSTART, RLENGTH); sub(/URIs: */, "", u); print u; exit }
      }' "$f")"
    [[ -n $uri ]] && { echo "$uri"; return 0; }
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f $f ]] || continue
    uri="$(awk '$1 == "deb" && $0 ~ / bookworm / { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' "$f")"
    [[ -n $uri ]] && { echo "$uri"; return 0; }
  done
  return 1
}

build_base() {
  local mirror key ctr mnt
  mirror="$(bookworm_mirror)" || die "no bookworm deb entry in apt's sources to debootstrap from"
  key="$(printf '%s\n' "$BASE_REV" "$BASE_INCLUDE" "$mirror" | sha)"
  BASE_IMAGE_TAG="localhost/modelcache/base:bookworm-$key"
  image_exists "$BASE_IMAGE_TAG" && return 0
  log "debootstrap bookworm ($BASE_INCLUDE) into a new base image (about 2 min)"
  ctr="$("${B[@]}" from --pull=never scratch)"
  mnt="$("${B[@]}" mount "$ctr")"
  if ! debootstrap --variant=minbase --include="$BASE_INCLUDE" bookworm "$mnt" "$mirror" \
      >"$LOGS/debootstrap.log" 2>&1; then
    tail -20 "$LOGS/debootstrap.log" >&2
    "${B[@]}" rm "$ctr" >/dev/null 2>&1 || true
    die "debootstrap failed (log: $LOGS/debootstrap.log)"
  fi
  rm -rf "$mnt"/var/cache/apt/archives/*.deb "$mnt"/var/lib/apt/lists/* "$mnt"/var/log/*.log
  "${B[@]}" umount "$ctr" >/dev/null
  "${B[@]}" config --cmd '["/bin/bash"]' \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --label org.opencontainers.image.description="Debian bookworm minbase + $BASE_INCLUDE" "$ctr"
  "${B[@]}" commit --quiet --rm "$ctr" "$BASE_IMAGE_TAG" >/dev/null
}

# pip_download ARGS...: wheels only, from the index pip is configured with here.
pip_download() {
  if ! "$PYTHON" -m pip download -q --only-binary=:all: "$@" >>"$LOGS/pip.log" 2>&1; then
    grep -v '^WARNING: Location' "$LOGS/pip.log" | tail -20 >&2
    die "pip download $* failed (log: $LOGS/pip.log)"
  fi
}

# ----------------------------------------------------------------------------- uv
build_uv() {
  local dir ctr
  UV_IMAGE_TAG="localhost/modelcache/uv:$UV_VERSION"
  image_exists "$UV_IMAGE_TAG" && return 0
  log "uv $UV_VERSION from its PyPI wheel"
  dir="$(mktemp -d)"
  pip_download --no-deps "uv==$UV_VERSION" -d "$dir"
  "$PYTHON" - "$dir" <<'EOF'
import glob, os, sys, zipfile
d = sys.argv[1]
with zipfile.ZipFile(glob.glob(os.path.join(d, "uv-*.whl"))[0]) as w:
    name = next(n for n in w.namelist() if n.endswith(".data/scripts/uv"))
    with open(os.path.join(d, "uv"), "wb") as f:
        f.write(w.read(name))
os.chmod(os.path.join(d, "uv"), 0o755)
EOF
  ctr="$("${B[@]}" from --pull=never scratch)"
  "${B[@]}" copy --quiet "$ctr" "$dir/uv" /uv >/dev/null
  "${B[@]}" commit --quiet --rm "$ctr" "$UV_IMAGE_TAG" >/dev/null
  rm -rf "$dir"
}

# ----------------------------------------------------------------------------- wheels
# The daemon and operator extras of pyproject.toml plus the build backend, pinned by
# constraints.txt.
build_wheelhouse() {
  local key reqs tmp
  key="$(cat "$REPO_ROOT/pyproject.toml" "$REPO_ROOT/constraints.txt" <(echo "$WHEELHOUSE_REV") | sha)"
  WHEELHOUSE="$NODE_CACHE/wheels/$key"
  [[ -f $WHEELHOUSE/.complete ]] && return 0
  log "pip download the pinned dependencies into $WHEELHOUSE"
  reqs="$("$PYTHON" - "$REPO_ROOT/pyproject.toml" <<'EOF'
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))
extras = p["project"]["optional-dependencies"]
deps = extras["daemon"] + extras["operator"] + list(p["build-system"]["requires"])
# The CPU build of torch (the local wheel): a plain pin could take the CUDA build from PyPI.
print("\n".join(d + "+cpu" if d.startswith("torch==") else d for d in deps))
EOF
)"
  tmp="$WHEELHOUSE.tmp"
  rm -rf "$tmp"; mkdir -p "$tmp"
  # shellcheck disable=SC2086
  pip_download -c "$REPO_ROOT/constraints.txt" -d "$tmp" $reqs
  ls "$tmp" | grep -q '^torch-.*+cpu' || die "the wheelhouse has no CPU build of torch"
  touch "$tmp/.complete"
  rm -rf "$WHEELHOUSE"; mv "$tmp" "$WHEELHOUSE"
  # Older wheelhouses are garbage.
  find "$NODE_CACHE/wheels" -mindepth 1 -maxdepth 1 ! -name "$key" -exec rm -rf {} +
}

# ----------------------------------------------------------------------------- project images
# stage_context DIR: exactly what the Dockerfiles' build context lets through (.dockerignore).
stage_context() {
  rm -rf "$1"; mkdir -p "$1"
  (cd "$REPO_ROOT" && tar -cf - --exclude='__pycache__' --exclude='*.pyc' \
      pyproject.toml constraints.txt README.md .dockerignore modelcache) | tar -xf - -C "$1"
}

# build_project_image NAME DOCKERFILE IMAGE BUILD-ARG...: sets IMAGE_TAR.
build_project_image() {
  local name="$1" dockerfile="$2" image="$3"; shift 3
  local ctx="$NODE_CACHE/context-$name" key tar
  stage_context "$ctx"
  key="$( {
    (cd "$ctx" && find . -type f -print0 | sort -z | xargs -0 sha256sum)
    sha256sum "$REPO_ROOT/$dockerfile"
    printf '%s\n' "$@" "$WHEELHOUSE"
  } | sha)"
  tar="$IMAGES_DIR/$name-$key.tar"
  IMAGE_TAR="$tar"
  printf '%s\n%s\n' "$tar" "$image" >"$IMAGES_DIR/$name.current.tmp"
  if [[ -f $tar ]]; then
    mv "$IMAGES_DIR/$name.current.tmp" "$IMAGES_DIR/$name.current"
    log "$image: inputs unchanged ($name-$key)"
    return 0
  fi
  local build_args=() a start=$SECONDS
  for a in "$@"; do build_args+=(--build-arg "$a"); done
  log "building $image from $dockerfile (log: $LOGS/build-$name.log)"
  if ! "${B[@]}" bud --pull=never --network none --isolation oci --layers=false \
      -f "$REPO_ROOT/$dockerfile" "${build_args[@]}" \
      --volume "$WHEELHOUSE:/wheels:ro" -t "localhost/$name:dev" "$ctx" \
      >"$LOGS/build-$name.log" 2>&1; then
    tail -30 "$LOGS/build-$name.log" >&2
    die "building $image failed (log: $LOGS/build-$name.log)"
  fi
  push_archive "localhost/$name:dev" "$image" "$tar"
  mv "$IMAGES_DIR/$name.current.tmp" "$IMAGES_DIR/$name.current"
  find "$IMAGES_DIR" -maxdepth 1 -name "$name-*.tar" ! -name "$(basename "$tar")" -delete
  # Layers of earlier builds: the tar is what the node imports.
  "${B[@]}" rmi --prune >/dev/null 2>&1 || true
  log "$image built in $((SECONDS - start))s ($(du -h "$tar" | cut -f1))"
}

# import_image TAR NAME: into containerd's k8s.io namespace, unless this very tar was imported.
import_image() {
  local tar="$1" name="$2" stamp="$RUN/imported-${2//[\/:]/_}"
  if [[ -f $stamp && $(<"$stamp") == "$tar" ]] \
     && "${CTR[@]}" images ls -q "name==$name" | grep -qx "$name"; then
    return 0
  fi
  log "importing $name into containerd"
  "${CTR[@]}" images import "$tar" >/dev/null || die "ctr images import $tar failed"
  echo "$tar" >"$stamp"
}

# import_built_images: the latest tars `images` built (IMAGES_DIR/NAME.current: tar, name).
import_built_images() {
  local current tar name
  for current in "$IMAGES_DIR"/*.current; do
    [[ -f $current ]] || continue
    { read -r tar; read -r name; } <"$current"
    [[ -f $tar ]] && import_image "$tar" "$name"
  done
  return 0
}
