"""Weight averaging ("model soup", Wortsman et al. 2022) of saved Flamingo models.

    python -m engine.soup --out runs/soup runs/a/model runs/b/model [--dtype float16]

Runs that start from one model and train on other batches end in nearby weights whose mean can
do better than either (the built-in model's stage 10 is such a mean; assets/model/README.md).
Only the added weights are averaged (the resampler, the gated blocks, the new tokens'
embeddings); the frozen LM and tower are named by the config, which every input must share.
The mean is taken in fp32 whatever the inputs' dtype, then stored in `--dtype` (default fp32).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from .config import FlamingoConfig
from .model import CONFIG_NAME, WEIGHTS_METADATA, WEIGHTS_NAME

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _load(directory: Path) -> tuple[FlamingoConfig, dict[str, torch.Tensor]]:
    if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise ValueError(f"{directory} is not a saved Flamingo model (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    return FlamingoConfig.load(directory / CONFIG_NAME), load_file(directory / WEIGHTS_NAME)


def average_weights(directories: Sequence[str | Path]) -> tuple[FlamingoConfig, dict[str, torch.Tensor]]:
    """The shared config and the fp32 mean of the saved weights of `directories` (at least 2).
    Raises ValueError when their configs, weight names or shapes differ."""
    if len(directories) < 2:
        raise ValueError("a weight average needs at least 2 models")
    config, total = _load(Path(directories[0]))
    total = {k: v.float() for k, v in total.items()}
    for directory in directories[1:]:
        other_config, weights = _load(Path(directory))
        if other_config != config:
            raise ValueError(f"{directory}: its config differs from {directories[0]}'s; only models of one config average")
        if weights.keys() != total.keys():
            diff = sorted(set(weights) ^ set(total))
            raise ValueError(f"{directory}: its weights differ in name from {directories[0]}'s: {diff[:5]}")
        for k, v in weights.items():
            if v.shape != total[k].shape:
                raise ValueError(f"{directory}: {k} has shape {tuple(v.shape)}, {directories[0]}'s {tuple(total[k].shape)}")
            total[k] += v.float()
    return config, {k: v / len(directories) for k, v in total.items()}


def save_average(directories: Sequence[str | Path], out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Writes the mean of `directories` as a saved model in `out` (loadable with
    FlamingoModel.from_pretrained) and returns `out`."""
    config, weights = average_weights(directories)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / CONFIG_NAME)
    save_file({k: v.to(dtype).contiguous() for k, v in weights.items()}, out / WEIGHTS_NAME,
              metadata=WEIGHTS_METADATA)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.soup", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="saved model directories (flamingo_config.json + flamingo.safetensors)")
    parser.add_argument("--out", required=True, help="directory to write the averaged model to")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the stored weights")
    args = parser.parse_args(argv)
    try:
        out = save_average(args.models, args.out, DTYPES[args.dtype])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote the mean of {len(args.models)} models to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
