#!/usr/bin/env bash
# The GPU check on a machine without network (issue 12): the carried wheels (see the
# header of bench/gpu_wheels.txt for the one `pip download` command) go into a target
# directory, the project runs from this source tree with PYTHONPATH (it pins Python 3.11
# and cannot be pip-installed on the GPU machine's 3.12). Writes gpu_check.json (or $1).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/gpu_check.json}"
wheels="${WHEELS:-$root/wheels}"
site="${TMPDIR:-/tmp}/modelcache-gpu-site"
if [ -d "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --upgrade --target "$site" "$wheels"/*.whl
fi
export PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'
exec timeout 570 python3 "$root/bench/gpu_check.py" --device "${DEVICE:-cuda}" --out "$out" "${@:2}"
