"""Spreading a large LM over GPUs, CPU memory and disk with accelerate (1.15).

`shard_lm(model, max_memory)` asks `accelerate.infer_auto_device_map` for a placement of the LM's
modules under the given budgets, never splitting a decoder layer (a `FlamingoDecoderLayer`, i.e.
the frozen layer together with its gated cross-attention block), and installs it with
`accelerate.dispatch_model`. Hooks then move each layer's inputs to its device; modules placed on
"cpu" while the main device is a GPU, or on "disk", are kept off the GPU and brought to the main
device for their forward (offload). The vision tower, resampler and new-token embeddings stay on
the main device (ChatEngine places them). The media context travels as a keyword argument the
hooks do not move; the gated blocks and the model's embedding/logit code move what they need to
their activations' device themselves.

    shard_lm(model, {0: "10GiB", 1: "10GiB", "cpu": "48GiB"}, placement)   # two GPUs + CPU
    shard_lm(model, {"cpu": "200MiB", "disk": "10GiB"}, placement)         # CPU + disk offload
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import weakref

from .device import Placement

log = logging.getLogger(__name__)


def shard_lm(model, max_memory: dict, placement: Placement, offload_dir: str | None = None) -> dict:
    """Dispatches `model.lm` over the devices of `max_memory`; returns the device map."""
    from accelerate import dispatch_model, infer_auto_device_map

    lm = model.lm.to(placement.dtype)
    no_split = ["FlamingoDecoderLayer", *(getattr(lm, "_no_split_modules", None) or [])]
    device_map = infer_auto_device_map(lm, max_memory=max_memory, no_split_module_classes=no_split, dtype=placement.dtype)
    if "disk" in device_map.values() and offload_dir is None:
        offload_dir = tempfile.mkdtemp(prefix="flamingo-offload-")
        # Ours, so ours to remove: with the LM, or at exit (a copy of the weights per load).
        weakref.finalize(lm, shutil.rmtree, offload_dir, True)
    main = placement.device.index if placement.device.type == "cuda" and placement.device.index is not None else (0 if placement.device.type == "cuda" else "cpu")
    dispatch_model(lm, device_map=device_map, main_device=main, offload_dir=offload_dir)
    log.info("LM sharded: %s", _summary(device_map))
    return device_map


def _summary(device_map: dict) -> str:
    counts: dict[str, int] = {}
    for device in device_map.values():
        counts[str(device)] = counts.get(str(device), 0) + 1
    return ", ".join(f"{n} module group(s) on {d}" for d, n in counts.items())
