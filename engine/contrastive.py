"""The paper's first stage: contrastive image-text training of the vision tower (``mode: contrastive``).

CLIP-style: the tower's patch features are globally average-pooled (the paper's simplification
of CLIP's attention pooling) and projected; a small transformer text encoder embeds the caption;
a symmetric InfoNCE loss with a learned temperature pulls each image towards its own caption
among the batch. Lets a user fit the (otherwise frozen) tower to their own domain before
Flamingo training. Negatives are the other pairs of the process's own batch.

Saves ``run_dir/tower/vision.safetensors`` (the adapted tower's state dict; an HF tower is also
written with ``save_pretrained`` so ``vision.name: run_dir/tower`` loads it) and
``run_dir/tower/contrastive.safetensors`` (text encoder and projection heads).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data.features import load_pixels
from .data.readers import EOC_TOKEN, MEDIA_TOKEN, RecordStream, open_source
from .media import MediaError
from .stage_loop import StageLoop, stage_accelerator
from .train import build_optimizer, build_scheduler, training_attention
from .train_config import TrainConfig, dataset_path

log = logging.getLogger(__name__)


class TextEncoder(nn.Module):
    def __init__(self, vocab_size: int, dim: int, layers: int, heads: int, max_tokens: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(max_tokens, dim) * 0.01)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids, (B, L) 1 = token -> (B, dim): the mean over real tokens."""
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        x = self.norm(self.encoder(x, src_key_padding_mask=mask == 0))
        m = mask[..., None].to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp(min=1)


class ContrastiveModel(nn.Module):
    def __init__(self, tower, vocab_size: int, cfg):
        super().__init__()
        self.tower = tower
        self.text = TextEncoder(vocab_size, cfg.text_dim, cfg.text_layers, cfg.text_heads, cfg.max_tokens)
        self.image_proj = nn.Linear(tower.feature_dim, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        tower.requires_grad_(cfg.train_tower)

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, E) unit vectors; global average pooling of the features."""
        feats = self.tower.encode(self.tower.normalize(pixels))  # (B, S, d), with gradients
        return F.normalize(self.image_proj(feats.mean(1)), dim=-1)

    def embed_texts(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(ids, mask)), dim=-1)

    def forward(self, pixels, ids, mask) -> torch.Tensor:
        """Symmetric InfoNCE: image i should pick text i among the batch, and text i image i."""
        img, txt = self.embed_images(pixels), self.embed_texts(ids, mask)
        logits = self.logit_scale.clamp(max=math.log(100.0)).exp() * img @ txt.T
        target = torch.arange(len(img), device=img.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def caption_of(text: str) -> str:
    return text.replace(MEDIA_TOKEN, " ").replace(EOC_TOKEN, " ").strip()


class PairFeed:
    """Batches of (pixels, caption ids) from the pair datasets."""

    def __init__(self, spec, tokenizer, image_size: int, max_tokens: int, seed: int, rank: int, world: int):
        self.name, self.batch_size = spec.name, spec.batch_size
        source = open_source(spec.format, spec.path, spec.kind,
                             **{k: getattr(spec, k) for k in ("image_dir", "image_column", "caption_column")})
        self.stream = RecordStream(source, seed=seed, shuffle=spec.shuffle, rank=rank, world=world)
        self.tokenizer, self.image_size, self.max_tokens = tokenizer, image_size, max_tokens
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def next_batch(self):
        pixels, ids = [], []
        for _ in range(1000 * self.batch_size):
            if len(pixels) == self.batch_size:
                break
            r = next(self.stream)
            if len(r.media) != 1:
                continue
            try:
                pixels.append(load_pixels(r.media[0], self.image_size, 1, "image")[0])
            except (MediaError, OSError) as e:
                log.warning("%s: skipping %s", self.name, e)
                continue
            ids.append(self.tokenizer(caption_of(r.text), add_special_tokens=False)["input_ids"][: self.max_tokens] or [self.pad_id])
        if len(pixels) < self.batch_size:
            raise ValueError(f"dataset {self.name!r}: not enough readable image-text pairs")
        width = max(len(x) for x in ids)
        tok = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(tok)
        for i, x in enumerate(ids):
            tok[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
        return torch.stack(pixels), tok, mask

    def state_dict(self):
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, s):
        self.stream.load_state_dict(s["stream"])


class ContrastiveTrainer(StageLoop):
    desc = "contrastive"

    def __init__(self, cfg: TrainConfig, tower=None, tokenizer=None, resume: str | bool = True):
        self.cfg, run = cfg, cfg.run
        self.accelerator = acc = stage_accelerator(run)
        self.attention = training_attention(run.attention, acc.device.type)
        torch.manual_seed(run.seed)
        if tower is None or tokenizer is None:
            from .lm import load_lm
            from .vision import load_vision_tower

            mc = cfg.model_config()
            tower = tower or load_vision_tower(mc.vision)
            tokenizer = tokenizer or load_lm(mc.lm)[1]
        self.model = ContrastiveModel(tower, len(tokenizer), cfg.contrastive)
        pairs = [ds for ds in cfg.data.datasets if ds.kind == "pairs" and ds.weight > 0]
        if not pairs:
            raise ValueError("mode: contrastive needs at least one dataset of kind pairs with weight > 0")
        import dataclasses

        self.feeds = [PairFeed(dataclasses.replace(ds, path=str(dataset_path(cfg, ds))), tokenizer, tower.image_size,
                               cfg.contrastive.max_tokens, cfg.data.seed, acc.process_index, acc.num_processes) for ds in pairs]
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.module, self.optimizer = acc.prepare(self.model, self.optimizer)
        self.run_dir = Path(run.dir)
        self.start(resume)

    def train_step(self) -> dict:
        acc = self.accelerator
        self.module.train()
        self.model.tower.eval()  # BatchNorm statistics stay fixed; the weights train
        feed = self.feeds[self.step % len(self.feeds)]
        pixels, ids, mask = (t.to(acc.device) for t in feed.next_batch())
        with acc.autocast(), self.attention():
            loss = self.module(pixels, ids, mask)
        lr = self.optimizer_step(loss)
        loss = acc.reduce(loss.detach().float(), reduction="mean").item()
        return {"step": self.step, "loss": loss, f"loss/{feed.name}": loss, "lr": lr,
                "temperature": float(1 / self.model.logit_scale.detach().exp())}

    def postfix(self, last: dict) -> dict:
        return {"loss": f"{last['loss']:.4f}", "lr": f"{last['lr']:.2e}"}

    def finish(self) -> None:
        self.save_tower()

    def save_tower(self) -> Path:
        from safetensors.torch import save_file

        out = self.run_dir / "tower"
        if self.accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            tower = self.model.tower
            save_file({k: v.detach().cpu().contiguous() for k, v in tower.state_dict().items()}, out / "vision.safetensors")
            heads = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items() if not k.startswith("tower.")}
            save_file(heads, out / "contrastive.safetensors")
            net = getattr(tower, "net", None)
            if hasattr(net, "save_pretrained"):  # an HF tower: loadable as vision.name: <run_dir>/tower
                net.save_pretrained(out)
        self.accelerator.wait_for_everyone()
        return out


def train_contrastive(cfg: TrainConfig, resume: str | bool = True, tower=None, tokenizer=None) -> dict:
    return ContrastiveTrainer(cfg, tower, tokenizer, resume).fit()
