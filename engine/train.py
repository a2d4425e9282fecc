"""Training: the weighted multi-dataset objective with AdamW, under accelerate.

One process or many (``accelerate launch`` / ``torchrun``: DDP; FSDP through an accelerate
config), the same code: `Accelerator` places the model, wraps it for data parallelism and
applies bf16 autocast. Each process reads its own share of every dataset.

A step (engine/objective.py): for each dataset of the step's plan, one batch, its loss times the
dataset's weight, backward (gradients accumulate; DDP syncs only on the last backward of the
step) -- or, with `run.one_pass` (on a GPU by default), every batch through the LM in one padded
pass and one backward, the same sum; then one gradient clipping, one AdamW update, one
LR-schedule step (linear warmup, then constant, as the paper).

Weight decay applies to the weight matrices of the resampler's and gated blocks' linear layers
(and of the LM / tower when unfrozen); not to the tanh gates (decay would pull them shut, back
to the frozen LM, against what the step is learning), nor to norms and biases (scale and shift
parameters, which decay only distorts), nor to embeddings, the learned latents and time
embeddings (their rows are inputs, updated sparsely; decay would shrink rarely-used rows).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import re
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import checkpoint as ckpt
from .cross_attention import GATE_NAMES, block_key
from .objective import DatasetFeed, FlamingoLoss, ModelInputs, OnePassLoss, step_plan
from .train_config import TrainConfig, dataset_path

log = logging.getLogger(__name__)

NO_DECAY_NAMES = ("latents", "time_embeddings", "spatial_embeddings", "new_token_embeddings", "new_token_output", "embed", "wte", "wpe", "norm", "ln_")
POSITION_EMBEDDING_NAMES = ("resampler.time_embeddings", "resampler.spatial_embeddings", "resampler.region_embeddings",
                            "resampler.region_latent_embeddings")


def param_groups(model: torch.nn.Module, weight_decay: float, gate_lr: float | None = None,
                 embedding_lr: float | None = None, named: list | None = None) -> list[dict]:
    """Decayed weight matrices; everything else undecayed; the tanh gates, and the resampler's
    time and spatial embeddings, in groups of their own when `gate_lr` / `embedding_lr` are set
    (see OptimConfig). `named` (ParamGroupConfig list): parameters whose name a group's `match`
    finds get that group's rates (`lr`, and `gate_lr` for its gates), with the same decay rules;
    a gated block's parameters are matched by their saved names (`gated_blocks.8.attn_gate`).
    The groups come in a fixed order, so a checkpoint's optimiser state fits again on resume."""
    named = named or []
    decay, no_decay, gates, embeddings = [], [], [], []
    own = [{"decay": [], "no_decay": [], "gates": []} for _ in named]
    saved_names = {id(p): block_key(i) + n for i, block in getattr(model, "gated_blocks", {}).items()
                   for n, p in block.named_parameters()}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.lower()
        is_gate = leaf.endswith(GATE_NAMES)
        decays = p.ndim >= 2 and not any(k in leaf for k in NO_DECAY_NAMES)
        hit = next((i for i, g in enumerate(named) if re.search(g.match, saved_names.get(id(p), name))), None)
        if hit is not None:
            own[hit]["gates" if is_gate else "decay" if decays else "no_decay"].append(p)
        elif gate_lr is not None and is_gate:
            gates.append(p)
        elif embedding_lr is not None and leaf.endswith(POSITION_EMBEDDING_NAMES):
            embeddings.append(p)
        else:
            (decay if decays else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if gates:
        groups.append({"params": gates, "weight_decay": 0.0, "lr": gate_lr})
    if embeddings:
        groups.append({"params": embeddings, "weight_decay": 0.0, "lr": embedding_lr})
    for g, params in zip(named, own):
        rates = {"decay": g.lr, "no_decay": g.lr, "gates": g.gate_lr or gate_lr}
        for kind in ("decay", "no_decay", "gates"):
            group = {"params": params[kind], "weight_decay": weight_decay if kind == "decay" else 0.0}
            if rates[kind] is not None:
                group["lr"] = rates[kind]
            groups.append(group)
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, optim) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; the fused kernel (CPU and CUDA) when asked: on CPU it
    takes the update from ~13 s to ~1 s per step for a 126M-parameter Perceiver + gated blocks."""
    groups = param_groups(model, optim.weight_decay, optim.gate_lr, optim.embedding_lr, optim.groups)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=bool(optim.fused))


def lr_schedule(warmup_steps: int, max_steps: int = 0, decay_steps: int = 0):
    """The learning-rate factor for (0-based) step s: linear warm-up over warmup_steps, then 1,
    then (decay_steps > 0) a linear decay over the last decay_steps before max_steps, reaching
    1 / decay_steps on the final step. A pure function of s, so a resumed run continues it."""
    def factor(step: int) -> float:
        f = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        if decay_steps > 0:
            f *= min(1.0, max(0.0, (max_steps - step) / decay_steps))
        return f

    return factor


def build_scheduler(optimizer, cfg: TrainConfig):
    # Not prepared by accelerate: it would step the scheduler once per process.
    o = cfg.optim
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(o.warmup_steps, cfg.run.max_steps, o.decay_steps))


def apply_schedule(optimizer, scheduler) -> None:
    """After restoring a checkpoint: the rates the next step uses follow this config's schedule
    (a resumed run may add a decay phase), not the ones saved with the optimiser."""
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)


def build_model(cfg: TrainConfig):
    from .model import FlamingoModel

    if cfg.init_from:
        model = FlamingoModel.from_pretrained(cfg.init_from, overrides=cfg.model_overrides, new_block_init=cfg.new_block_init)
    else:
        model = FlamingoModel.from_config(cfg.model_config())
    apply_freezing(model, cfg)
    return model


def apply_freezing(model, cfg: TrainConfig) -> None:
    if not cfg.optim.freeze_lm:
        model.lm.requires_grad_(True)
    if not cfg.optim.freeze_vision:
        model.vision.requires_grad_(True)
    if cfg.optim.gradient_checkpointing:
        model.set_gradient_checkpointing(True)


def resolve_mixed_precision(setting: str, device_type: str) -> str:
    """auto: bf16 autocast on GPU, and on CPUs with bf16 instructions (there it measured ~1.3x
    faster than fp32 for a SmolLM2 training step); fp32 elsewhere."""
    from .device import cpu_fast_bf16

    if setting != "auto":
        return setting
    if device_type == "cuda":
        return "bf16"
    return "bf16" if cpu_fast_bf16() else "no"


def training_attention(setting: str, device_type: str):
    """run.attention -> a factory of the context a training step's forward runs in (its backward
    runs what the forward chose). On a CPU, PyTorch's fused (flash) attention is the faster
    forward but a slow backward for these short sequences; its plain matmul-softmax path made the
    built-in recipe's steps 1.15-1.41x faster here (README, Benchmarks). A GPU keeps PyTorch's
    choice (fused kernels)."""
    if setting == "math" or (setting == "auto" and device_type == "cpu"):
        return lambda: sdpa_kernel([SDPBackend.MATH])
    return nullcontext


class Trainer:
    def __init__(self, cfg: TrainConfig, model=None, resume: str | bool = True, read_only: bool = False):
        """read_only: restore the checkpoint without touching the run dir (for exporting a run
        that may still be training)."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.cfg, self.read_only = cfg, read_only
        run = cfg.run
        cpu = run.device == "cpu" or (run.device == "auto" and not torch.cuda.is_available())
        if run.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("run.device is cuda but no CUDA device is available")
        mp = resolve_mixed_precision(run.mixed_precision, "cpu" if cpu else "cuda")
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=mp,
                                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        self.run_dir = Path(run.dir)
        torch.manual_seed(run.seed)
        self.model = model if model is not None else build_model(cfg)
        if model is not None:
            apply_freezing(self.model, cfg)
        self._check_model()
        self.feeds = self._build_feeds()
        self._init_feature_stats()
        self.weights = [f.weight for f in self.feeds]
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        p_next = self.model.config.cross_attention.p_next
        self.one_pass = run.one_pass == "always" or (run.one_pass == "auto" and not cpu)
        self.attention = training_attention(run.attention, acc.device.type)
        loss_cls = OnePassLoss if self.one_pass else FlamingoLoss
        self.loss_module, self.optimizer = acc.prepare(loss_cls(self.model, p_next), self.optimizer)
        log.info("training on %s, %d process(es), mixed precision %s, %s, %s attention", acc.device, self.world, mp,
                 "one LM pass per step" if self.one_pass else "an LM pass per dataset's batch",
                 "PyTorch's default" if self.attention is nullcontext else "matmul-softmax")
        self.step = 0
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if resume:
            path = ckpt.latest_checkpoint(self.run_dir) if resume is True else Path(resume)
            if path is not None:
                self._resume(path)
        if acc.is_main_process and not read_only:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
            self._truncate_metrics()
        acc.wait_for_everyone()

    # ----- set-up -------------------------------------------------------------------------
    def _check_model(self) -> None:
        need = self.cfg.data.num_frames
        if any(ds.kind == "video" and ds.weight > 0 for ds in self.cfg.data.datasets):
            have = self.model.config.resampler.max_frames
            if need > have:
                raise ValueError(f"data.num_frames={need} exceeds the model's resampler.max_frames={have}")

    def _build_feeds(self) -> list[DatasetFeed]:
        from .data.features import FeatureCache

        cfg, acc = self.cfg, self.accelerator
        model = self.model
        cache = None
        if cfg.data.feature_cache:
            cache_dir = cfg.data.cache_dir or str(Path(cfg.data.root) / ".feature_cache")
            cache = FeatureCache(cache_dir, model.vision, cfg.data.num_frames, cfg.data.cache_key, device=acc.device)
        pad_id = model.tokenizer.pad_token_id
        feeds = []
        for ds in cfg.data.datasets:
            spec = dataclasses.replace(ds, path=str(dataset_path(cfg, ds)))
            feeds.append(DatasetFeed(spec, model.tokenizer, model.media_token_id, pad_id, seed=cfg.data.seed, rank=self.rank,
                                     world=self.world, cache=cache, image_size=model.vision.image_size,
                                     num_frames=cfg.data.num_frames, add_bos=cfg.data.add_bos))
        self.cache = cache
        if cache is not None and cfg.data.precompute_features:
            self._precompute(cache, [f for f in feeds if f.weight > 0])
        return feeds

    def _precompute(self, cache, feeds: list[DatasetFeed]) -> None:
        model = self.model
        model.vision.to(self.accelerator.device)
        kinds, paths = {}, []
        for f in feeds:
            for p in f.media_paths():
                kinds[p] = f.media_kind
                paths.append(p)
        t = time.time()
        stats = cache.build(paths, kinds, rank=self.rank, world=self.world,
                            progress=self.cfg.run.progress and self.accelerator.is_local_main_process)
        self.accelerator.wait_for_everyone()
        log.info("feature cache %s: %d media, %d computed here, %d unreadable (%.1fs)", stats["cached"], len(set(paths)),
                 stats["computed"], stats["failed"], time.time() - t)

    def _init_feature_stats(self, max_media: int = 512) -> None:
        """For resampler.standardize_features: per-channel statistics of the frozen features of
        the first media of each dataset. Deterministic, so a resumed run recomputes the same;
        a model that already has them (init_from a saved model) keeps its own."""
        resampler = self.model.resampler
        if not resampler.config.standardize_features or resampler.has_feature_stats():
            return
        feeds = [f for f in self.feeds if f.weight > 0]
        per_feed = max(1, max_media // len(feeds))
        device = self.accelerator.device
        vision = self.model.vision.to(device) if any(f.cache is None for f in feeds) else None
        chunks = []
        for f in feeds:
            paths = list(itertools.islice(dict.fromkeys(f.media_paths()), per_feed))
            for x in f.load_media(paths).values():
                if x is None:
                    continue
                if f.cache is None:  # pixels (T, 3, H, W) -> features (T, S, d)
                    with torch.no_grad():
                        x = vision(x[None].to(device))[0]
                chunks.append(x.reshape(-1, x.shape[-1]).float().cpu())
        if not chunks:
            raise ValueError("standardize_features: no readable media in the training data")
        resampler.set_feature_stats(torch.cat(chunks))
        log.info("feature statistics from %d media (%d vectors)", len(chunks), sum(len(c) for c in chunks))

    @property
    def sharded(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

    def _resume(self, path: Path) -> None:
        if self.sharded:
            self.accelerator.load_state(str(Path(path) / "accelerate"))
            state = ckpt.load_rank_state(path, self.scheduler, self.rank)
        else:
            state = ckpt.load_checkpoint(path, self.accelerator.unwrap_model(self.loss_module).model, self.optimizer,
                                         self.scheduler, self.rank)
        self.step = int(state["step"])
        apply_schedule(self.optimizer, self.scheduler)
        data = state["data"]
        for f in self.feeds:
            if f.name in data:
                f.load_state_dict(data[f.name])
        if self.accelerator.is_main_process:
            log.info("resumed from %s at step %d", path, self.step)

    def _truncate_metrics(self) -> None:
        """After a resume, drop logged steps beyond the checkpoint (they will be redone)."""
        if not self.metrics_path.is_file():
            return
        keep = [l for l in self.metrics_path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= self.step]
        self.metrics_path.write_text("".join(l + "\n" for l in keep))

    # ----- the loop -----------------------------------------------------------------------
    def train_step(self) -> dict:
        acc, cfg = self.accelerator, self.cfg
        self.loss_module.train()
        plan = step_plan(self.step, self.weights, cfg.optim.strategy)
        feeds = [self.feeds[i] for i in plan]
        batches = [f.next_batch().to(acc.device) for f in feeds]
        results = self._one_pass(feeds, batches) if self.one_pass else self._pass_per_batch(feeds, batches)
        losses, parts = {}, {}
        for feed, (loss, loss_parts) in zip(feeds, results):
            losses[feed.name] = loss.detach().float()
            if len(loss_parts) > 1:  # with hinges: log the next-token loss and each hinge apart
                parts.update({f"{k}/{feed.name}": v.float() for k, v in loss_parts.items()})
        samples = sum(b.num_samples for b in batches)
        tokens = sum(b.num_tokens for b in batches)
        grad_norm = None
        if cfg.optim.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(self.loss_module.parameters(), cfg.optim.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        names = list(losses)
        reduced = acc.reduce(torch.stack([losses[n] for n in names]), reduction="mean").tolist()
        out = {f"loss/{n}": v for n, v in zip(names, reduced)}
        if parts:  # the same keys on every rank: they depend on the datasets' hinge weights only
            out.update(zip(parts, acc.reduce(torch.stack(list(parts.values())), reduction="mean").tolist()))
        out["loss"] = sum(self.feeds[[f.name for f in self.feeds].index(n)].weight * v for n, v in zip(names, reduced))
        out["samples"], out["tokens"], out["lr"] = samples * self.world, tokens * self.world, lr
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        out.update(self.gate_values())
        return out

    @staticmethod
    def _loss_args(feed: DatasetFeed, inputs: ModelInputs) -> dict:
        spec = feed.spec
        return dict(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, labels=inputs.labels,
                    features=inputs.features, pixels=inputs.pixels, contrast=spec.image_contrast,
                    time_contrast=spec.time_contrast, query_contrast=spec.query_contrast,
                    position_contrast=spec.position_contrast)

    def _pass_per_batch(self, feeds: list[DatasetFeed], batches: list[ModelInputs]) -> list[tuple]:
        """A pass and a backward per batch; DDP syncs the gradients on the last backward only."""
        acc, results = self.accelerator, []
        for j, (feed, inputs) in enumerate(zip(feeds, batches)):
            sync = j == len(feeds) - 1
            with acc.no_sync(self.loss_module) if not sync else nullcontext():
                with acc.autocast(), self.attention():
                    loss, parts = self.loss_module(**self._loss_args(feed, inputs), return_parts=True)
                acc.backward(loss * feed.weight)
            results.append((loss, parts))
        return results

    def _one_pass(self, feeds: list[DatasetFeed], batches: list[ModelInputs]) -> list[tuple]:
        """Every batch in one LM pass (OnePassLoss), one backward of the weighted sum."""
        with self.accelerator.autocast(), self.attention():
            total, results = self.loss_module([self._loss_args(f, b) for f, b in zip(feeds, batches)], [f.weight for f in feeds])
        self.accelerator.backward(total)
        return results

    def gate_values(self) -> dict[str, float]:
        """tanh of each gated block's gates (`gate_attn/<layer>`, `gate_ff/<layer>`): how far each
        block has opened (0 = the frozen LM's layer alone), the paper's Figure 6."""
        model = self.accelerator.unwrap_model(self.loss_module).model
        out = {}
        for layer, block in getattr(model, "gated_blocks", {}).items():
            for kind, gate in (("attn", block.attn_gate), ("ff", block.ff_gate)):
                if gate is not None:
                    out[f"gate_{kind}/{layer}"] = float(gate.detach().float().tanh().item())
        return out

    def should_stop(self, started: float) -> bool:
        limit = self.cfg.run.max_minutes
        if limit is None:
            return False
        flag = torch.tensor([1.0 if time.time() - started > 60 * limit else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def fit(self) -> dict:
        from tqdm.auto import tqdm

        acc, run = self.accelerator, self.cfg.run
        started = time.time()
        bar = tqdm(total=run.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (run.progress and acc.is_main_process))
        last = {}
        while self.step < run.max_steps:
            t0 = time.time()
            m = self.train_step()
            dt = time.time() - t0
            m.update(step=self.step, step_time=dt,
                     samples_per_s=m["samples"] / dt, tokens_per_s=m["tokens"] / dt, time=time.time())
            last = m
            if acc.is_main_process and (self.step % run.log_every == 0 or self.step == run.max_steps):
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps(m) + "\n")
            bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", sps=f"{m['samples_per_s']:.2f}")
            bar.update(1)
            stop = self.should_stop(started)
            if self.step % run.save_every == 0 or self.step == run.max_steps or stop:
                self.save_checkpoint()
            if stop:
                log.info("run.max_minutes reached at step %d", self.step)
                break
        bar.close()
        self.save_final()
        return last

    # ----- saving -------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        acc = self.accelerator
        if ckpt.latest_checkpoint(self.run_dir) == ckpt.checkpoints_dir(self.run_dir) / f"step-{self.step}":
            return None
        if acc.is_main_process:
            ckpt.staging_dir(self.run_dir, self.step)
        acc.wait_for_everyone()
        stage = ckpt.checkpoints_dir(self.run_dir) / f"step-{self.step}.tmp"
        stage.mkdir(parents=True, exist_ok=True)
        ckpt.save_rank_state(stage, self.rank, {f.name: f.state_dict() for f in self.feeds})
        state = {"step": self.step, "world_size": self.world, "config": self.cfg.to_dict()}
        if self.sharded:  # FSDP: sharded weights and optimiser state, saved by accelerate (collective)
            acc.save_state(str(stage / "accelerate"))
            if acc.is_main_process:
                torch.save(self.scheduler.state_dict(), stage / "scheduler.pt")
                (stage / "state.json").write_text(json.dumps({**state, "format": "accelerate"}, indent=2))
        elif acc.is_main_process:
            ckpt.save_main(stage, acc.unwrap_model(self.loss_module).model, self.optimizer, self.scheduler, state)
        acc.wait_for_everyone()
        path = None
        if acc.is_main_process:
            path = ckpt.finalize(self.run_dir, self.step, self.cfg.run.keep_last)
            self.plot()
        acc.wait_for_everyone()
        return path

    def save_final(self, out: Path | None = None) -> None:
        """Writes the model (config + trainable weights + buffers) to `out` (default run_dir/model)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if self.sharded:  # gather the full weights (collective), then write the model as usual
            full = acc.get_state_dict(self.loss_module)
            if acc.is_main_process:
                from .model import FlamingoModel

                model = FlamingoModel.from_config(self.model.config)
                apply_freezing(model, self.cfg)
                model.load_state_dict({k.removeprefix("model."): v for k, v in full.items()}, strict=False)
                model.save_pretrained(out or self.run_dir / "model")
            acc.wait_for_everyone()
            return
        if acc.is_main_process:
            model = acc.unwrap_model(self.loss_module).model  # (FSDP: use a full-state-dict config)
            out = Path(out or self.run_dir / "model")
            if not self.cfg.optim.freeze_lm:  # the fine-tuned LM goes with the model
                model.lm.save_pretrained(out / "lm")
                model.tokenizer.save_pretrained(out / "lm")
                model.config.lm = str((out / "lm").resolve())
            model.save_pretrained(out)
            if not self.read_only:
                self.plot()
            log.info("saved the model to %s", out)
        acc.wait_for_everyone()

    def plot(self) -> Path | None:
        from .train_plot import plot_gates, plot_metrics

        plot_gates(self.metrics_path, self.run_dir / "gates.png")
        return plot_metrics(self.metrics_path, self.run_dir / "loss.png")


def export_checkpoint(cfg: TrainConfig, out: str | Path, resume: str | bool = True, model=None) -> int:
    """Writes the model of the checkpoint a run would resume from (its latest, or `resume`) to
    `out`, loadable with FlamingoModel.from_pretrained; the run itself may still be training.
    Returns the checkpoint's step."""
    if resume is False:
        raise ValueError("--export needs a checkpoint to export (drop --no-resume)")
    if cfg.mode != "generative":
        raise ValueError(f"--export reads generative runs' checkpoints; mode {cfg.mode} writes its result "
                         f"({'tower' if cfg.mode == 'contrastive' else 'model'}) into {cfg.run.dir} when it ends")
    trainer = Trainer(cfg, model=model, resume=resume, read_only=True)
    if trainer.step == 0:
        raise ValueError(f"no checkpoint to export in {cfg.run.dir}")
    trainer.save_final(Path(out))
    return trainer.step


def train(cfg: TrainConfig, resume: str | bool = True, precompute_only: bool = False) -> dict:
    if cfg.mode == "contrastive":
        from .contrastive import train_contrastive

        return train_contrastive(cfg, resume=resume)
    if cfg.mode == "token_probe":
        from .token_probe import train_token_probe

        return train_token_probe(cfg, resume=resume)
    if precompute_only:  # fill the feature cache and stop
        if not cfg.data.feature_cache:
            raise ValueError("--precompute-only needs data.feature_cache: true")
        cfg.data.precompute_features = True
        Trainer(cfg, resume=False)
        return {}
    return Trainer(cfg, resume=resume).fit()
