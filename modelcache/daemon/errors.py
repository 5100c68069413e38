"""Load failures, classified: the class is a metric label and a CR status reason."""

from __future__ import annotations


class ModelLoadError(Exception):
    """A model that cannot be served. ``error_class`` is short and stable (a label value);
    the message says what is wrong and what to change."""

    #: Failure classes, also the values of modelcache_model_loads_total{outcome}.
    CLASSES = (
        "not_found",  # files missing where we looked
        "bad_config",  # config.json unreadable / unknown architecture / wrong task
        "remote_code",  # checkpoint needs trust_remote_code and it is not set
        "corrupt_weights",  # unreadable, truncated or inconsistent safetensors
        "missing_weights",  # checkpoint keys missing (and not allowed)
        "unexpected_weights",
        "unsupported_quantization",  # quantized weights (config or tensor dtypes): refused
        "meta_tensor",  # a parameter or buffer left on the meta device
        "verify_failed",  # fingerprint or canary mismatch
        "out_of_memory",
        "device",  # device unavailable (e.g. cuda on a CPU node)
        "download",  # the fetch container could not download it (auth, gated, network)
        "downloading",  # not a failure: the fetch container is downloading it
        "internal",
    )

    def __init__(self, error_class: str, message: str) -> None:
        if error_class not in self.CLASSES:
            raise ValueError(f"unknown error class {error_class!r}")
        super().__init__(message)
        self.error_class = error_class
        self.message = message

    def __str__(self) -> str:
        return f"{self.error_class}: {self.message}"
