"""Loaded by ``modelcache serve`` children of tests/test_device_faults.py (PYTHONPATH):
a forward that meets token id MODELCACHE_TEST_POISON_ID raises what CUDA raises after a
device-side assert, so the daemon's handling of a poisoned context runs on a CPU."""

import os

POISON = os.environ.get("MODELCACHE_TEST_POISON_ID")
if POISON:
    import torch

    _embedding = torch.nn.functional.embedding

    def embedding(input, *args, **kwargs):  # type: ignore[no-untyped-def]
        if bool((input == int(POISON)).any()):
            raise torch.AcceleratorError(
                "CUDA error: device-side assert triggered\nCUDA kernel errors might be "
                "asynchronously reported at some other API call"
            )
        return _embedding(input, *args, **kwargs)

    torch.nn.functional.embedding = embedding
