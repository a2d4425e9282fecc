"""Teaching the resampler to carry a label before Flamingo training (``mode: token_probe``).

Some things the frozen tower sees do not reach the visual tokens. A resampler trained on pictures
is nearly blind to frame order: its time embeddings stay a few percent of the features, so a clip
and its reversal give almost the same visual tokens (stage 4 of the built-in model: cosine 0.9993,
`python -m engine.eval.order`). And its latents attend to the object, so a picture's background
colour, which a linear probe reads from the tower's corner cells 67% of the time, is read from the
tokens 22% of the time (10 colours). The LM loss breaks such a blind spot only slowly
(configs/experiment_motion.yaml: 250 video-only steps before the time-reversal hinge moved), and
steps that heavy in one kind of data cost the rest.

This stage gives the missing property a direct gradient. A linear probe over an item's visual
tokens, trained together with the resampler, predicts a field of the labelled datasets' corpus
records (``token_probe.label_field``: a clip's "motion" -- left / right / up / down / grow /
shrink / appear / disappear -- or a picture's "background" colour), while an anchor keeps the
visual tokens of the other datasets' items at the starting model's:

    loss = CE(probe(flatten(resample(item))), label) + anchor_weight * MSE(resample(other), teacher(other))

Some labels are about one thing in a picture of several: which side of a two-object scene a named
concept is on (``token_probe.query_field``). A linear probe over the whole picture cannot be asked
about one thing, so the probe then reads what a query for the thing gathers: the item's tokens
weighted by their cosine likeness to the thing's own tokens (the resampled mean feature grid of
some pictures of it), then a linear layer. The match is fixed, not learned (a learned query
matched too slowly to tell anything), so only tokens that keep each thing's place with what it is
can answer.

Only the resampler trains (the gated blocks, LM and tower stay as they are); the probe is thrown
away. The run writes a whole model (``run_dir/model``) for a generative stage to start from
(``init_from``), which teaches the gated blocks to read the new tokens. Frozen features come from
the feature cache (``data.feature_cache: true``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data.features import FeatureCache
from .data.readers import RecordStream, open_source
from .stage_loop import StageLoop, stage_accelerator
from .train import build_model, build_optimizer, build_scheduler, training_attention
from .train_config import TrainConfig, dataset_path


def read_labelled(path: str | Path, label_field: str, query_field: str | None = None) -> list[tuple[Path, str, str | None]]:
    """(absolute media path, label, query) of each corpus record with one media item, a label
    and, when query_field is given, the thing the label is about (else query None)."""
    root = Path(path).resolve().parent
    out = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            d = json.loads(line)
            media, label = d.get("media") or [], d.get(label_field)
            query = d.get(query_field) if query_field else None
            if len(media) == 1 and isinstance(label, str) and (query_field is None or isinstance(query, str)):
                out.append((root / media[0], label, query))
    return out


def query_prototypes(path: str | Path, query_field: str, queries: list[str], renders: int,
                     cache: FeatureCache) -> torch.Tensor:
    """(Q, 1, S, d_vision) the mean cached tower feature grid (over up to `renders` pictures) of
    each queried thing, from the records of `path` whose query_field names it."""
    pictures: dict[str, list[Path]] = {q: [] for q in queries}
    for p, q, _ in read_labelled(path, query_field):  # the records' query_field is the "label" here
        if q in pictures and len(pictures[q]) < renders:
            pictures[q].append(p)
    missing = [q for q, ps in pictures.items() if not ps]
    if missing:
        raise ValueError(f"{path}: no pictures of {len(missing)} queried things, e.g. {missing[:3]}")
    out = []
    for q in queries:
        feats = [f for f in cache.get_many(pictures[q], "image").values() if f is not None]
        if not feats:
            raise ValueError(f"{path}: none of the pictures of {q!r} could be read")
        out.append(torch.stack([f[:1].float() for f in feats]).mean(0))
    return torch.stack(out)


def gather_like(tokens: torch.Tensor, own: torch.Tensor, sharpness: float = 20.0) -> torch.Tensor:
    """What a query for one thing gathers from an item's visual tokens: the tokens weighted by how
    much each looks like one of the thing's own tokens (cosine; softmax over the item's tokens).
    tokens: (B, R, dim), own: (B, R', dim) -> (B, dim)"""
    likeness = F.cosine_similarity(tokens[:, :, None], own[:, None], dim=-1).amax(-1)  # (B, R)
    return torch.einsum("br,brd->bd", (likeness * sharpness).softmax(-1), tokens)


class LabelledFeed:
    """Batches of ((B, T, S, d) cached features, (B,) label indices) from labelled media (T = 1 for
    pictures; the cache samples every clip to the same T frames)."""

    def __init__(self, name: str, kind: str, items: list[tuple[Path, str, str | None]], labels: list[str],
                 queries: list[str], batch_size: int, cache: FeatureCache, seed: int, rank: int, world: int):
        if not items:
            raise ValueError(f"dataset {name!r}: no records with one media item and a label")
        self.name, self.kind, self.batch_size, self.cache = name, kind, batch_size, cache
        self.index = {label: i for i, label in enumerate(labels)}
        self.query_index = {q: i for i, q in enumerate(queries)}
        self.stream = RecordStream(items, seed=seed, rank=rank, world=world)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, S, d) features, (B,) label indices, (B,) query indices (-1 without queries)."""
        picked = [next(self.stream) for _ in range(self.batch_size)]
        feats = self.cache.get_many([p for p, _, _ in picked], self.kind)
        rows = [(feats[p], self.index[label], self.query_index.get(q, -1)) for p, label, q in picked if feats[p] is not None]
        if not rows:
            raise ValueError(f"dataset {self.name!r}: none of a batch's media could be read")
        return torch.stack([f for f, _, _ in rows]), torch.tensor([y for _, y, _ in rows]), torch.tensor([q for _, _, q in rows])

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])


class AnchorFeed:
    """Batches of (B, T, S, d) cached features of each record's first media item (T = 1 for pictures)."""

    def __init__(self, spec, batch_size: int, cache: FeatureCache, seed: int, rank: int, world: int):
        options = {k: getattr(spec, k) for k in ("image_dir", "image_column", "caption_column")}
        self.name, self.kind, self.batch_size, self.cache = spec.name, spec.media_kind, batch_size, cache
        self.stream = RecordStream(open_source(spec.format, spec.path, spec.kind, **options), seed=seed, rank=rank, world=world)

    def next_batch(self) -> torch.Tensor:
        paths = [r.media[0] for r in (next(self.stream) for _ in range(self.batch_size)) if r.media]
        feats = self.cache.get_many(paths, self.kind)
        rows = [feats[p] for p in dict.fromkeys(paths) if feats[p] is not None]
        if not rows:
            raise ValueError(f"dataset {self.name!r}: none of a batch's media could be read")
        return torch.stack(rows)

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])


class LinearReadout(nn.Linear):
    """A label of the whole item, linear in all its visual tokens (an nn.Linear, so its
    parameters keep the names earlier runs checkpointed: probe.weight, probe.bias)."""

    def __init__(self, num_tokens: int, dim: int, num_labels: int):
        super().__init__(num_tokens * dim, num_labels)

    def forward(self, tokens: torch.Tensor, own: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: (B, R, dim), own: unused -> (B, labels) logits"""
        return super().forward(tokens.flatten(1))


class MatchReadout(nn.Module):
    """A label about one thing in the item, read from what a query for that thing gathers
    (`gather_like`: the item's tokens that look like the thing's own tokens). The match is fixed,
    not learned, so the probe can only succeed if the tokens that look like the thing carry the
    label: for a side, each thing's place must stay with what it is."""

    def __init__(self, dim: int, num_labels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, num_labels)

    def forward(self, tokens: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """tokens: (B, R, dim), own: (B, R', dim) the queried things' own tokens -> (B, labels) logits"""
        return self.out(self.norm(gather_like(tokens, own)))


class TokenProbe(nn.Module):
    """The trainable resampler and the probe as one module (one forward, so DDP syncs it all).
    With `prototypes` ((Q, 1, S, d) feature grids of the queried things), each labelled item's
    queried thing is resampled too, giving the MatchReadout its own tokens."""

    def __init__(self, resampler: nn.Module, probe: nn.Module, prototypes: torch.Tensor | None = None):
        super().__init__()
        self.resampler, self.probe = resampler, probe
        self.register_buffer("prototypes", prototypes, persistent=False)

    def forward(self, labelled: torch.Tensor, anchored: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        labelled: (B, T, S, d) frozen features of labelled items
        anchored: (B', T', S, d) frozen features of items whose tokens stay put
        queries: (B,) what each label is about (indices into prototypes; unused without them)
        returns (B, labels) probe logits and (B', R, dim) the anchored items' visual tokens
        """
        tokens = self.resampler(labelled[:, None])[:, 0]  # (B, R, dim)
        own = None if self.prototypes is None else self.resampler(self.prototypes[queries][:, None])[:, 0]  # (B, R, dim)
        return self.probe(tokens, own), self.resampler(anchored[:, None])[:, 0]


class TokenProbeTrainer(StageLoop):
    desc = "token probe"

    def __init__(self, cfg: TrainConfig, model=None, resume: str | bool = True):
        self.cfg, run = cfg, cfg.run
        self.accelerator = acc = stage_accelerator(run)
        self.attention = training_attention(run.attention, acc.device.type)
        torch.manual_seed(run.seed)
        self.model = model if model is not None else build_model(cfg)
        self.model.requires_grad_(False)
        resampler = self.model.resampler.requires_grad_(True)
        # The anchored items' visual tokens as the starting model made them: what the gated blocks read.
        self.teacher = copy.deepcopy(resampler).requires_grad_(False).eval().to(acc.device)
        self.labelled_feeds, self.anchor_feeds, self.labels, self.queries, prototypes = self._build_feeds()
        self.feeds = self.labelled_feeds + self.anchor_feeds
        num_tokens = self.model.config.resampler.num_tokens
        readout = (LinearReadout(num_tokens, resampler.dim, len(self.labels)) if prototypes is None
                   else MatchReadout(resampler.dim, len(self.labels)))
        probe = TokenProbe(resampler, readout, prototypes)
        self.optimizer = build_optimizer(probe, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.module, self.optimizer = acc.prepare(probe, self.optimizer)
        self.run_dir = Path(run.dir)
        self.start(resume)
        if acc.is_main_process:
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))

    def _build_feeds(self):
        cfg, acc = self.cfg, self.accelerator
        d, tp = cfg.data, cfg.token_probe
        cache = FeatureCache(d.cache_dir or str(Path(d.root) / ".feature_cache"), self.model.vision, d.num_frames,
                             d.cache_key, device=acc.device)
        used = [ds for ds in d.datasets if ds.weight > 0]
        names = tp.labelled_datasets(used)
        items = {ds.name: read_labelled(dataset_path(cfg, ds), tp.label_field, tp.query_field) for ds in used if ds.name in names}
        labels = sorted({label for rows in items.values() for _, label, _ in rows})
        if len(labels) < 2:
            raise ValueError(f"mode token_probe: the labelled datasets' records ({', '.join(names)}) need at least "
                             f"two values of {tp.label_field!r}, found {labels}")
        queries = sorted({q for rows in items.values() for _, _, q in rows if q is not None})
        prototypes = None
        if tp.query_field is not None:
            prototypes = query_prototypes(Path(d.root) / tp.query_pictures, tp.query_field, queries, tp.query_renders,
                                          cache).to(acc.device)
        where = dict(seed=d.seed, rank=acc.process_index, world=acc.num_processes)
        labelled = [LabelledFeed(ds.name, ds.media_kind, items[ds.name], labels, queries, ds.batch_size, cache, **where)
                    for ds in used if ds.name in names]
        anchored = [AnchorFeed(dataclasses.replace(ds, path=str(dataset_path(cfg, ds))), ds.batch_size, cache, **where)
                    for ds in used if ds.name not in names]
        return labelled, anchored, labels, queries, prototypes

    def check_resumed(self, path: Path, state: dict) -> None:
        if state.get("labels") != self.labels:
            raise ValueError(f"checkpoint {path} was trained on the labels {state.get('labels')}, the data now has {self.labels}")
        if state.get("queries", []) != self.queries:
            raise ValueError(f"checkpoint {path} was trained on other queried things than the data now has")

    def checkpoint_state(self) -> dict:
        return {**super().checkpoint_state(), "labels": self.labels, "queries": self.queries}

    def train_step(self) -> dict:
        """One optimiser step: a labelled batch (in turn over the labelled datasets) through the
        probe, an anchored batch (in turn over the others) against the teacher's tokens."""
        acc, device = self.accelerator, self.accelerator.device
        self.module.train()
        feats, labels, queries = (t.to(device) for t in self.labelled_feeds[self.step % len(self.labelled_feeds)].next_batch())
        anchored = self.anchor_feeds[self.step % len(self.anchor_feeds)].next_batch().to(device)
        with acc.autocast(), self.attention():
            logits, tokens = self.module(feats.float(), anchored.float(), queries)
        with torch.no_grad():
            target = self.teacher(anchored[:, None].float())[:, 0]  # (B', R, dim)
        ce = F.cross_entropy(logits.float(), labels)
        anchor = F.mse_loss(tokens.float(), target)
        loss = ce + self.cfg.token_probe.anchor_weight * anchor
        lr = self.optimizer_step(loss)
        drift = ((tokens.float() - target).norm(dim=-1) / target.norm(dim=-1).clamp(min=1e-6)).mean()
        return {"step": self.step, "loss": loss.item(), "loss/probe": ce.item(),
                "loss/anchor": self.cfg.token_probe.anchor_weight * anchor.item(),
                "probe_accuracy": (logits.argmax(-1) == labels).float().mean().item(), "anchored_token_drift": drift.item(), "lr": lr}

    def postfix(self, last: dict) -> dict:
        return {"ce": f"{last['loss/probe']:.3f}", "drift": f"{last['anchored_token_drift']:.3f}"}

    def finish(self) -> None:
        self.save_model()

    def save_model(self) -> Path:
        """run_dir/model: the whole Flamingo with the trained resampler (init_from for the next stage)."""
        out = self.run_dir / "model"
        if self.accelerator.is_main_process:
            self.model.save_pretrained(out)
        self.accelerator.wait_for_everyone()
        return out


def train_token_probe(cfg: TrainConfig, resume: str | bool = True, model=None) -> dict:
    return TokenProbeTrainer(cfg, model, resume).fit()
