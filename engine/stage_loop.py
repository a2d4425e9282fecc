"""The loop, metrics log, checkpoints and resumption of the training modes that train one module
beside the Flamingo objective: ``mode: contrastive`` (a vision tower) and ``mode: token_probe``
(the resampler). The Flamingo objective's own loop is `engine.train.Trainer` (sharding, gates).

A subclass sets, in its __init__: cfg, accelerator, module (what trains and is checkpointed),
optimizer, scheduler, feeds (objects with name / state_dict / load_state_dict), run_dir, and then
calls `start(resume)`; it implements `train_step() -> dict` (with "step"; `optimizer_step(loss)`
does the update), `postfix(metrics)` for the progress bar and `finish()` (writes the run's result
when the loop ends).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from . import checkpoint as ckpt
from .train import apply_schedule, resolve_mixed_precision

log = logging.getLogger(__name__)


def stage_accelerator(run):
    """An Accelerator on run.device (auto: CUDA when there is one) with run.mixed_precision."""
    cpu = run.device == "cpu" or (run.device == "auto" and not torch.cuda.is_available())
    return Accelerator(cpu=cpu, mixed_precision=resolve_mixed_precision(run.mixed_precision, "cpu" if cpu else "cuda"))


class StageLoop:
    desc = "train"  # the progress bar's label

    def start(self, resume: str | bool) -> None:
        """Resumes from the latest checkpoint (resume True) or a given one, then prepares the run dir."""
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.step = 0
        if resume:
            path = ckpt.latest_checkpoint(self.run_dir) if resume is True else Path(resume)
            if path is not None:
                state = ckpt.load_checkpoint(path, self.accelerator.unwrap_model(self.module), self.optimizer, self.scheduler,
                                             self.accelerator.process_index)
                self.check_resumed(path, state)
                self.step = int(state["step"])
                apply_schedule(self.optimizer, self.scheduler)
                for feed in self.feeds:
                    if feed.name in state["data"]:
                        feed.load_state_dict(state["data"][feed.name])
                log.info("resumed %s from %s at step %d", self.desc, path, self.step)
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    def check_resumed(self, path: Path, state: dict) -> None:
        """Raises if a checkpoint's state.json does not fit this run."""

    def checkpoint_state(self) -> dict:
        return {"step": self.step, "mode": self.cfg.mode}

    def optimizer_step(self, loss) -> float:
        """Backward, clipping, the optimiser and schedule steps; returns the rate the step used."""
        acc = self.accelerator
        acc.backward(loss)
        if self.cfg.optim.max_grad_norm > 0:
            acc.clip_grad_norm_(self.module.parameters(), self.cfg.optim.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return lr

    def fit(self) -> dict:
        from tqdm.auto import tqdm

        acc, run = self.accelerator, self.cfg.run
        started, last = time.time(), {}
        bar = tqdm(total=run.max_steps, initial=self.step, desc=self.desc, unit="step",
                   disable=not (run.progress and acc.is_main_process))
        while self.step < run.max_steps:
            t0 = time.time()
            last = self.train_step()
            last["step_time"] = time.time() - t0
            if acc.is_main_process:
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps(last) + "\n")
            bar.set_postfix(self.postfix(last))
            bar.update(1)
            stop = run.max_minutes is not None and time.time() - started > 60 * run.max_minutes
            if self.step % run.save_every == 0 or self.step == run.max_steps or stop:
                self.save_checkpoint()
            if stop:
                break
        bar.close()
        self.finish()
        return last

    def save_checkpoint(self) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            ckpt.staging_dir(self.run_dir, self.step)
        acc.wait_for_everyone()
        stage = ckpt.checkpoints_dir(self.run_dir) / f"step-{self.step}.tmp"
        ckpt.save_rank_state(stage, acc.process_index, {f.name: f.state_dict() for f in self.feeds})
        if acc.is_main_process:
            ckpt.save_main(stage, acc.unwrap_model(self.module), self.optimizer, self.scheduler, self.checkpoint_state())
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.finalize(self.run_dir, self.step, self.cfg.run.keep_last)
            from .train_plot import plot_metrics

            plot_metrics(self.metrics_path, self.run_dir / "loss.png")
        acc.wait_for_everyone()
