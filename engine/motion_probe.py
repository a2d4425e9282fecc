"""Teaching the resampler frame order before Flamingo training (``mode: motion_probe``).

A resampler trained on pictures is nearly blind to frame order: its time embeddings stay a few
percent of the features, so a clip and its reversal give almost the same visual tokens (the
built-in model: cosine 0.9993, `python -m engine.eval.order`). The LM loss on motion captions
breaks that symmetry only slowly (configs/experiment_motion.yaml: 250 video-only steps before the
time-reversal hinge moved), and steps that heavy in videos cost the pictures.

This stage gives frame order a direct gradient. A linear probe over a clip's visual tokens,
trained together with the resampler, predicts the clip's motion label (a field of the corpus
records, "motion": left / right / up / down / grow / shrink / appear / disappear), while an
anchor keeps the visual tokens of pictures (T = 1) at the starting model's:

    loss = CE(probe(flatten(resample(clip))), label) + anchor_weight * MSE(resample(image), teacher(image))

Only the resampler trains (the gated blocks, LM and tower stay as they are); the probe is thrown
away. The run writes a whole model (``run_dir/model``) for a generative stage to start from
(``init_from``), which teaches the gated blocks to read the new tokens. Frozen features come from
the feature cache (``data.feature_cache: true``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from .data.features import FeatureCache
from .data.readers import RecordStream, open_source
from .train import apply_schedule, build_model, build_optimizer, build_scheduler, resolve_mixed_precision
from .train_config import TrainConfig, dataset_path

log = logging.getLogger(__name__)


def read_labelled_clips(path: str | Path, label_field: str) -> list[tuple[Path, str]]:
    """(absolute media path, label) of each corpus record with one media item and a label."""
    root = Path(path).resolve().parent
    out = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            d = json.loads(line)
            media, label = d.get("media") or [], d.get(label_field)
            if len(media) == 1 and isinstance(label, str):
                out.append((root / media[0], label))
    return out


class ClipFeed:
    """Batches of ((B, T, S, d) cached clip features, (B,) label indices) from labelled clips
    (the cache samples every clip to the same T frames)."""

    def __init__(self, name: str, clips: list[tuple[Path, str]], labels: list[str], batch_size: int,
                 cache: FeatureCache, seed: int, rank: int, world: int):
        if not clips:
            raise ValueError(f"dataset {name!r}: no records with one media item and a label")
        self.name, self.batch_size, self.cache = name, batch_size, cache
        self.index = {label: i for i, label in enumerate(labels)}
        self.stream = RecordStream(clips, seed=seed, rank=rank, world=world)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        picked = [next(self.stream) for _ in range(self.batch_size)]
        feats = self.cache.get_many([p for p, _ in picked], "video")
        rows = [(feats[p], self.index[label]) for p, label in picked if feats[p] is not None]
        if not rows:
            raise ValueError(f"dataset {self.name!r}: none of a batch's clips could be read")
        return torch.stack([f for f, _ in rows]), torch.tensor([y for _, y in rows])

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])


class ImageFeed:
    """Batches of (B, 1, S, d) cached features of each record's first picture."""

    def __init__(self, spec, batch_size: int, cache: FeatureCache, seed: int, rank: int, world: int):
        options = {k: getattr(spec, k) for k in ("image_dir", "image_column", "caption_column")}
        self.name, self.batch_size, self.cache = spec.name, batch_size, cache
        self.stream = RecordStream(open_source(spec.format, spec.path, spec.kind, **options), seed=seed, rank=rank, world=world)

    def next_batch(self) -> torch.Tensor:
        paths = [r.media[0] for r in (next(self.stream) for _ in range(self.batch_size)) if r.media]
        feats = self.cache.get_many(paths, "image")
        rows = [feats[p] for p in dict.fromkeys(paths) if feats[p] is not None]
        if not rows:
            raise ValueError(f"dataset {self.name!r}: none of a batch's pictures could be read")
        return torch.stack(rows)

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])


class MotionProbe(nn.Module):
    """The trainable resampler and the probe as one module: (B, T, S, d) clips -> (B, labels) logits."""

    def __init__(self, resampler: nn.Module, num_tokens: int, dim: int, num_labels: int):
        super().__init__()
        self.resampler = resampler
        self.probe = nn.Linear(num_tokens * dim, num_labels)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        tokens = self.resampler(clips[:, None])[:, 0]  # (B, R, dim)
        return self.probe(tokens.flatten(1))


class MotionProbeTrainer:
    def __init__(self, cfg: TrainConfig, model=None, resume: str | bool = True):
        from accelerate import Accelerator

        self.cfg, run = cfg, cfg.run
        cpu = run.device == "cpu" or (run.device == "auto" and not torch.cuda.is_available())
        self.accelerator = acc = Accelerator(cpu=cpu, mixed_precision=resolve_mixed_precision(run.mixed_precision, "cpu" if cpu else "cuda"))
        torch.manual_seed(run.seed)
        self.model = model if model is not None else build_model(cfg)
        self.model.requires_grad_(False)
        resampler = self.model.resampler.requires_grad_(True)
        # The pictures' visual tokens as the starting model made them: what the gated blocks read.
        self.teacher = copy.deepcopy(resampler).requires_grad_(False).eval().to(acc.device)
        self.clip_feeds, self.image_feeds, self.labels = self._build_feeds()
        rc = self.model.config.resampler
        self.module = MotionProbe(resampler, rc.num_latents, resampler.dim, len(self.labels))
        self.optimizer = build_optimizer(self.module, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.module, self.optimizer = acc.prepare(self.module, self.optimizer)
        self.run_dir = Path(run.dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.step = 0
        if resume:
            path = ckpt.latest_checkpoint(self.run_dir) if resume is True else Path(resume)
            if path is not None:
                self._resume(path)
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))

    def _build_feeds(self):
        cfg, acc = self.cfg, self.accelerator
        d = cfg.data
        cache = FeatureCache(d.cache_dir or str(Path(d.root) / ".feature_cache"), self.model.vision, d.num_frames,
                             d.cache_key, device=acc.device)
        used = [ds for ds in d.datasets if ds.weight > 0]
        clips = {ds.name: read_labelled_clips(dataset_path(cfg, ds), cfg.motion_probe.label_field) for ds in used if ds.kind == "video"}
        labels = sorted({label for rows in clips.values() for _, label in rows})
        if len(labels) < 2:
            raise ValueError(f"mode motion_probe: the video datasets' records need at least two values of "
                             f"{cfg.motion_probe.label_field!r}, found {labels}")
        where = dict(seed=d.seed, rank=acc.process_index, world=acc.num_processes)
        clip_feeds = [ClipFeed(ds.name, clips[ds.name], labels, ds.batch_size, cache, **where)
                      for ds in used if ds.kind == "video"]
        image_feeds = [ImageFeed(dataclasses.replace(ds, path=str(dataset_path(cfg, ds))), ds.batch_size, cache, **where)
                       for ds in used if ds.kind != "video"]
        return clip_feeds, image_feeds, labels

    def _feeds(self) -> list:
        return self.clip_feeds + self.image_feeds

    def _resume(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path, self.module, self.optimizer, self.scheduler, self.accelerator.process_index)
        if state.get("labels") != self.labels:
            raise ValueError(f"checkpoint {path} was trained on the labels {state.get('labels')}, the data now has {self.labels}")
        self.step = int(state["step"])
        apply_schedule(self.optimizer, self.scheduler)
        for feed in self._feeds():
            if feed.name in state["data"]:
                feed.load_state_dict(state["data"][feed.name])
        log.info("resumed motion probe from %s at step %d", path, self.step)

    def train_step(self) -> dict:
        """One optimiser step: a clip batch (in turn over the video datasets) through the probe,
        a picture batch (in turn over the others) against the teacher's tokens."""
        acc, device = self.accelerator, self.accelerator.device
        self.module.train()
        clips, labels = (t.to(device) for t in self.clip_feeds[self.step % len(self.clip_feeds)].next_batch())
        images = self.image_feeds[self.step % len(self.image_feeds)].next_batch().to(device)
        resampler = self.model.resampler
        with acc.autocast():
            logits = self.module(clips.float())
            ce = F.cross_entropy(logits.float(), labels)
            tokens = resampler(images[:, None].float()).float()  # (B, 1, R, dim)
        with torch.no_grad():
            target = self.teacher(images[:, None].float()).float()
        anchor = F.mse_loss(tokens, target)
        loss = ce + self.cfg.motion_probe.anchor_weight * anchor
        acc.backward(loss)
        if self.cfg.optim.max_grad_norm > 0:
            acc.clip_grad_norm_(self.module.parameters(), self.cfg.optim.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        drift = ((tokens - target).norm(dim=-1) / target.norm(dim=-1).clamp(min=1e-6)).mean()
        return {"step": self.step, "loss": loss.item(), "probe_ce": ce.item(), "anchor": anchor.item(),
                "probe_accuracy": (logits.argmax(-1) == labels).float().mean().item(), "image_token_drift": drift.item(), "lr": lr}

    def fit(self) -> dict:
        from tqdm.auto import tqdm

        acc, run = self.accelerator, self.cfg.run
        started, last = time.time(), {}
        bar = tqdm(total=run.max_steps, initial=self.step, desc="motion probe", unit="step",
                   disable=not (run.progress and acc.is_main_process))
        while self.step < run.max_steps:
            t0 = time.time()
            last = self.train_step()
            last["step_time"] = time.time() - t0
            if acc.is_main_process:
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps(last) + "\n")
            bar.set_postfix(ce=f"{last['probe_ce']:.3f}", drift=f"{last['image_token_drift']:.3f}")
            bar.update(1)
            stop = run.max_minutes is not None and time.time() - started > 60 * run.max_minutes
            if self.step % run.save_every == 0 or self.step == run.max_steps or stop:
                self.save_checkpoint()
            if stop:
                break
        bar.close()
        self.save_model()
        return last

    def save_checkpoint(self) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            ckpt.staging_dir(self.run_dir, self.step)
        acc.wait_for_everyone()
        stage = ckpt.checkpoints_dir(self.run_dir) / f"step-{self.step}.tmp"
        ckpt.save_rank_state(stage, acc.process_index, {f.name: f.state_dict() for f in self._feeds()})
        if acc.is_main_process:
            ckpt.save_main(stage, acc.unwrap_model(self.module), self.optimizer, self.scheduler,
                           {"step": self.step, "mode": "motion_probe", "labels": self.labels})
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.finalize(self.run_dir, self.step, self.cfg.run.keep_last)
            from .train_plot import plot_metrics

            plot_metrics(self.metrics_path, self.run_dir / "loss.png")
        acc.wait_for_everyone()

    def save_model(self) -> Path:
        """run_dir/model: the whole Flamingo with the trained resampler (init_from for the next stage)."""
        out = self.run_dir / "model"
        if self.accelerator.is_main_process:
            self.model.save_pretrained(out)
        self.accelerator.wait_for_everyone()
        return out


def train_motion_probe(cfg: TrainConfig, resume: str | bool = True, model=None) -> dict:
    return MotionProbeTrainer(cfg, model, resume).fit()
