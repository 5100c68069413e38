"""Values a loaded model puts on the wire, validated at load.

Measured (issue 11): an MPNet-style checkpoint whose pad_token_id exceeds its positions
gives a negative max_length; ``ListModels`` then failed with INTERNAL "Value out of range"
for *every* model (and with it the operator's status probe), because the value only met
the uint32 field when the status was serialised. Here every such value is computed the way
the serving code computes it (``ModelCompute``) and checked once, at load: a model with an
impossible one is FAILED (bad_config) with the reason, and the daemon serves the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelcache.daemon.errors import ModelLoadError

if TYPE_CHECKING:
    from modelcache.daemon.loader import LoadedModel

UINT32_MAX = 2**32 - 1


def _bad(name: str, value: object, why: str) -> ModelLoadError:
    return ModelLoadError("bad_config", f"{name} would be {value}: {why}; fix config.json")


def check(loaded: LoadedModel) -> None:
    """max_length, output dimensions and vocabulary size: integers in [1, 2^32-1]."""
    # Imported here: inference imports the loader (LoadedModel).
    from modelcache.daemon.inference import ModelCompute

    try:
        compute = ModelCompute(loaded)
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:
        raise ModelLoadError(
            "bad_config", f"the model's serving parameters cannot be derived: {exc}"
        ) from None
    cfg = loaded.model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    values = {
        "max_length": compute.max_length,
        "output_dims": loaded.output_dims,
        "vocabulary size": compute.vocab_size,
    }
    for name, value in values.items():
        if not isinstance(value, int) or not 1 <= value <= UINT32_MAX:
            why = "it must be an integer from 1 to 2^32-1"
            if name == "max_length":
                why += (
                    f" (max_position_embeddings={getattr(text, 'max_position_embeddings', None)}"
                    f", pad_token_id={getattr(text, 'pad_token_id', None)}, "
                    f"tokenizer model_max_length="
                    f"{getattr(loaded.tokenizer, 'model_max_length', None)})"
                )
            raise _bad(name, value, why)
