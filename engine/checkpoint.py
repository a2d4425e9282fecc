"""Training checkpoints: ``run_dir/checkpoints/step-N/``.

    trainable.safetensors   every parameter that trains (resampler, gated blocks, new token
                            embeddings; the LM / tower too when unfrozen), by name
    optimizer.pt            AdamW state
    scheduler.pt            LR schedule state
    state.json              step, config, per-dataset metrics
    rank-K.pt               per process: data positions (stream epoch/cursor, sampler RNG)
                            and the python / numpy / torch (/ cuda) RNG states

A checkpoint is written into ``step-N.tmp`` and renamed when complete, so a crash never leaves a
half-written ``step-N``; only the last ``keep_last`` are kept.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    d = checkpoints_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / "state.json").is_file()]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def staging_dir(run_dir: str | Path, step: int) -> Path:
    d = checkpoints_dir(run_dir) / f"step-{step}.tmp"
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_rank_state(stage: Path, rank: int, data_state: dict) -> None:
    torch.save({"data": data_state, "rng": rng_state()}, stage / f"rank-{rank}.pt")


def save_main(stage: Path, model: torch.nn.Module, optimizer, scheduler, state: dict) -> None:
    weights = {n: p.detach().cpu().contiguous() for n, p in trainable_parameters(model).items()}
    save_file(weights, stage / "trainable.safetensors")
    torch.save(optimizer.state_dict(), stage / "optimizer.pt")
    torch.save(scheduler.state_dict(), stage / "scheduler.pt")
    (stage / "state.json").write_text(json.dumps(state, indent=2))


def finalize(run_dir: str | Path, step: int, keep_last: int) -> Path:
    """Renames the staged checkpoint into place and removes the oldest beyond keep_last."""
    d = checkpoints_dir(run_dir)
    final = d / f"step-{step}"
    if final.exists():
        shutil.rmtree(final)
    (d / f"step-{step}.tmp").rename(final)
    if keep_last > 0:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_rank_state(path: str | Path, scheduler, rank: int) -> dict:
    """The parts accelerate's save_state does not hold (FSDP runs): schedule, RNG, data."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    per_rank = torch.load(path / f"rank-{rank}.pt", weights_only=False)
    set_rng_state(per_rank["rng"])
    state["data"] = per_rank["data"]
    return state


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer, scheduler, rank: int) -> dict:
    """Restores weights, optimiser, schedule and this rank's RNG; returns state.json with this
    rank's data state under "data"."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint (no state.json)")
    state = json.loads((path / "state.json").read_text())
    weights = load_file(path / "trainable.safetensors")
    own = trainable_parameters(model)
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match this model's trainable parameters: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]} (were the freezing switches changed?)")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(weights[n].to(p.dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rank_file = path / f"rank-{rank}.pt"
    if not rank_file.is_file():
        raise ValueError(f"checkpoint {path} has no state for process {rank} (saved with fewer processes?)")
    per_rank = torch.load(rank_file, weights_only=False)
    set_rng_state(per_rank["rng"])
    state["data"] = per_rank["data"]
    return state
