"""What a worker's model holds, parameter by parameter, for tests that compare two loaders' weights
bit for bit (``LLM.apply_model(parameter_digests)``; the worker imports this module by name, so a
test puts this folder on the workers' ``PYTHONPATH``)."""
from __future__ import annotations

import hashlib


def parameter_digests(model) -> dict[str, tuple]:
    """name -> (sha1 of the bytes, shape, dtype, strides) for every parameter with storage; a parameter
    without (on the meta device, or emptied) -> ("no storage", shape, dtype)."""
    import torch

    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        if t.device.type == "meta" or t.numel() == 0:
            out[name] = ("no storage", tuple(t.shape), str(t.dtype))
            continue
        raw = t.contiguous().view(torch.uint8).cpu().numpy().tobytes()
        out[name] = (hashlib.sha1(raw).hexdigest(), tuple(t.shape), str(t.dtype), tuple(t.stride()))
    return out
