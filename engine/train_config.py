"""The training YAML, as typed dataclasses, validated with errors that name the bad key.

    model: {...}            # FlamingoConfig fields (engine/config.py); or instead:
    init_from: DIR          # a saved model (save_pretrained) to continue from
    model_overrides: {...}  # with init_from: config fields to change, e.g. turn on new zero-initialised
                            # weights ({resampler: {spatial_positions: 49}})
    mode: generative        # or contrastive (engine/contrastive.py), token_probe (engine/token_probe.py)
    data:
      root: corpus          # dataset paths are relative to it (itself relative to the cwd)
      num_frames: 8         # frames per video
      feature_cache: true   # train from precomputed frozen vision features
      datasets:
        - {name: m3w, kind: interleaved, path: interleaved.train.jsonl, weight: 1.0, batch_size: 8}
        - {name: ltip, kind: pairs, path: pairs.train.jsonl, weight: 0.2, batch_size: 8}
    optim: {lr: 1.0e-4, warmup_steps: 100, weight_decay: 0.1, strategy: accumulation, ...}
    run: {dir: runs/x, max_steps: 1000, save_every: 100, keep_last: 3, ...}

See configs/*.yaml for complete, commented examples.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import FlamingoConfig
from .data.readers import FORMATS, KINDS
from .model import NEW_BLOCK_INITS
from .objective import STRATEGIES

DEFAULT_MAX_TOKENS = {"interleaved": 256, "pairs": 64, "video": 64}
MODES = ("generative", "contrastive", "token_probe")
ONE_PASS = ("auto", "always", "never")
ATTENTION = ("auto", "math", "default")


@dataclass
class DatasetConfig:
    name: str
    path: str
    kind: str = "interleaved"  # interleaved | pairs | video
    format: str = "corpus"  # corpus | coco | folder | parquet | mmc4
    weight: float = 1.0  # lambda_m in the objective
    batch_size: int = 8
    max_tokens: int | None = None  # default: 256 interleaved, 64 pairs / video
    max_images: int = 5
    # > 0 adds a hinge asking each text to be likelier with its own images than another row's
    # (engine/objective.py FlamingoLoss.score); the LM pass runs the batch twice.
    image_contrast: float = 0.0
    # > 0 (videos) adds a hinge asking each text to be likelier with its frames in order than
    # reversed (FlamingoLoss.score): reading frame order pays; one more copy of the batch in the pass.
    time_contrast: float = 0.0
    # > 0 (interleaved) adds a hinge asking the text after each row's last picture to be likelier
    # with that picture than with the row's least similar earlier one (FlamingoLoss.score):
    # few-shot naming must read the query picture; one more copy of the batch in the pass.
    query_contrast: float = 0.0
    # > 0 adds a hinge asking each text to be likelier with its pictures than with them turned
    # half a turn (cached features: the grid's cells in reverse order; FlamingoLoss.score): left
    # and right, top and bottom trade places, so position answers must read the layout.
    position_contrast: float = 0.0
    # Leave each made-up word's first mention out of the loss (corpus records' "new_words", or
    # their "names" flagged "nonce"; engine/data/sampling.py): nothing can predict it.
    mask_new_words: bool = False
    # Labels on the answers only ("Answer: a<EOC>"; engine/data/sampling.py), not the questions.
    answers_only: bool = False
    shuffle: bool = True
    image_dir: str | None = None  # coco / mmc4 / parquet: where the images are
    image_column: str | None = None  # parquet
    caption_column: str | None = None  # parquet

    @property
    def media_kind(self) -> str:
        """What the dataset's media are to the loaders and the feature cache: clips or pictures."""
        return "video" if self.kind == "video" else "image"


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = field(default_factory=list)
    root: str = "."
    num_frames: int = 8
    feature_cache: bool = True
    # False fills the cache lazily as batches first need each file: training starts at once and
    # the first epoch pays the tower's cost, instead of a long pass over every file up front.
    precompute_features: bool = True
    cache_dir: str | None = None  # default: <root>/.feature_cache
    cache_key: str = "mtime"  # mtime (path + mtime + size) | content (sha256 of the file)
    # Start each sequence with the tokenizer's BOS token? null (auto): when the tokenizer adds
    # one itself on encode (Llama-style), so training sees what inference sees; SmolLM2 adds none.
    add_bos: bool | None = None
    seed: int = 0


@dataclass
class ParamGroupConfig:
    """Own learning rates for the trainable parameters whose names match `match` (a regular
    expression searched in names like `gated_blocks.8.attn.to_q.weight`; see
    FlamingoModel.trainable_state_dict): `lr` for the weights, `gate_lr` for the tanh gates.
    None: the run's rate; 0 holds them where they are (AdamW moves nothing at lr 0, weight decay
    included). E.g. new gated blocks added to a trained model learn faster than the trained ones
    they join."""
    match: str
    lr: float | None = None
    gate_lr: float | None = None


@dataclass
class OptimConfig:
    lr: float = 1e-4
    warmup_steps: int = 100
    # The paper's schedule is warm-up then constant. decay_steps > 0 anneals the rate linearly
    # towards 0 over the run's last decay_steps (the final step uses 1/decay_steps of it): warm-up,
    # stable, decay. A run resumed with a larger max_steps and a decay phase turns a
    # constant-rate run into one.
    decay_steps: int = 0
    weight_decay: float = 0.1
    # The tanh gates start at 0 and Adam moves a parameter by about `lr` a step, so at lr 1e-4
    # a gate needs thousands of steps to open (the paper trains 500k). A short run gives the
    # gates their own, larger learning rate. None: the same as `lr`.
    gate_lr: float | None = None
    # The resampler's time and spatial embeddings are added to features whose elements are ~1
    # in size; from 0.02 (time) or 0 (spatial) at `lr` they stay a few percent of the features
    # in a short run (the built-in model's time embeddings: 2%). None: the same as `lr`.
    embedding_lr: float | None = None
    # Rates for parameters picked by name (ParamGroupConfig); the first group that matches a
    # parameter wins; weight decay follows the usual rules.
    groups: list[ParamGroupConfig] = field(default_factory=list)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    fused: bool = True  # torch's fused AdamW kernel (CPU and CUDA): much faster on CPU
    strategy: str = "accumulation"  # accumulation | round_robin
    gradient_checkpointing: bool = False
    freeze_vision: bool = True
    freeze_lm: bool = True


@dataclass
class RunConfig:
    dir: str = "runs/flamingo"
    max_steps: int = 1000
    max_minutes: float | None = None  # stop (and save) after this much wall time
    save_every: int = 100
    keep_last: int = 3
    log_every: int = 1
    mixed_precision: str = "auto"  # auto | no | bf16 (auto: bf16 on GPU and CPU -- faster there, see README)
    device: str = "auto"  # auto | cpu | cuda
    # always: every dataset's batch of a step through the LM in one padded pass (OnePassLoss);
    # never: a pass per batch; auto: always on a GPU (host-bound small passes), never on a CPU
    # (there the padding costs more than the launches save). The same losses and gradients.
    one_pass: str = "auto"
    # A training step's attention kernels (every mode): math (matmul + softmax), default (PyTorch's choice:
    # fused flash kernels where it can), auto: math on a CPU (there the fused backward is slow
    # for short sequences), default on a GPU.
    attention: str = "auto"
    seed: int = 0
    progress: bool = True


@dataclass
class ContrastiveConfig:
    text_dim: int = 256
    text_layers: int = 2
    text_heads: int = 4
    embed_dim: int = 256
    max_tokens: int = 32
    init_temperature: float = 0.07
    train_tower: bool = True  # False trains the projection heads only


@dataclass
class TokenProbeConfig:
    """mode: token_probe (engine/token_probe.py): the resampler learns to carry a field of the
    labelled datasets' records (a clip's motion, a picture's background colour) while the other
    datasets' visual tokens stay at the starting model's."""
    label_field: str = "motion"  # the corpus records' field the probe predicts
    labelled: list[str] = field(default_factory=list)  # dataset names with the labels; [] = the video datasets
    anchor_weight: float = 100.0  # on the MSE between the other items' visual tokens and the start's
    # With query_field set, each labelled record's label is about one thing in its picture (the
    # field names it, e.g. concept_id): the probe then reads the label through attention from that
    # thing's prototype (its mean tower feature over up to query_renders pictures of the records
    # in query_pictures, under data.root, whose query_field names it) over the visual tokens.
    query_field: str | None = None
    query_pictures: str = "pairs.train.jsonl"
    query_renders: int = 8

    def labelled_datasets(self, datasets: list[DatasetConfig]) -> list[str]:
        """The names of the datasets the probe reads labels from (the rest are anchored)."""
        return list(self.labelled) or [ds.name for ds in datasets if ds.kind == "video"]


@dataclass
class TrainConfig:
    data: DataConfig
    model: dict | None = None
    init_from: str | None = None
    model_overrides: dict | None = None  # with init_from (FlamingoModel.from_pretrained's overrides)
    # Gated blocks the overrides add to a trained model start closed (tanh gates 0) either with
    # random weights (random) or with a copy of the nearest trained block's weights (copy_nearest):
    # at gate 0 only the gates learn, and their gradient is the block's output, which is noise
    # for a random block.
    new_block_init: str = "random"
    mode: str = "generative"  # generative | contrastive | token_probe
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    token_probe: TokenProbeConfig = field(default_factory=TokenProbeConfig)

    def model_config(self) -> FlamingoConfig:
        return FlamingoConfig.from_dict(self.model or {})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_train_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from e
    for dotted, value in (overrides or {}).items():
        d = raw
        *parents, last = dotted.split(".")
        for k in parents:
            d = d.setdefault(k, {})
        d[last] = value
    return parse_train_config(raw, str(path))


def parse_train_config(raw: Any, where: str = "config") -> TrainConfig:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: the top level must be a mapping")
    if "data" not in raw:
        raise ValueError(f"{where}: missing section 'data' (datasets to train on)")
    try:
        cfg: TrainConfig = _build(TrainConfig, raw, "")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    _validate(cfg, where)
    return cfg


def _build(cls, d: Any, where: str):
    if not isinstance(d, dict):
        raise ValueError(f"{where or 'the top level'}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        at = f"{where}." if where else ""
        raise ValueError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(at + k for k in unknown)}; known there: {', '.join(sorted(known))}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in d]
    if required:
        at = f"{where}." if where else ""
        raise ValueError(f"missing key{'s' if len(required) > 1 else ''} {', '.join(at + k for k in required)}")
    return cls(**{k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in d.items()})


def _coerce(tp, v: Any, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], v, where)
    if dataclasses.is_dataclass(tp):
        return _build(tp, v, where)
    if origin is list:
        if not isinstance(v, list):
            raise ValueError(f"{where}: expected a list, got {type(v).__name__}")
        return [_coerce(args[0], x, f"{where}[{i}]") for i, x in enumerate(v)]
    if origin is tuple:
        if not isinstance(v, (list, tuple)) or len(v) != len(args):
            raise ValueError(f"{where}: expected a list of {len(args)} values, got {v!r}")
        return tuple(_coerce(a, x, f"{where}[{i}]") for i, (a, x) in enumerate(zip(args, v)))
    if tp is dict:
        if not isinstance(v, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(v).__name__}")
        return v
    if tp is bool:
        if not isinstance(v, bool):
            raise ValueError(f"{where}: expected true or false, got {v!r}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{where}: expected an integer, got {v!r}")
        return v
    if tp is float:
        if isinstance(v, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(v)
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{where}: expected a number, got {v!r}")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise ValueError(f"{where}: expected a string, got {v!r}")
        return v
    return v


def _choice(value, allowed, where: str) -> None:
    if value not in allowed:
        raise ValueError(f"{where}: {value!r} is not one of {', '.join(allowed)}")


def _validate(cfg: TrainConfig, where: str) -> None:
    _choice(cfg.mode, MODES, f"{where}: mode")
    if cfg.model is not None and cfg.init_from is not None:
        raise ValueError(f"{where}: give either 'model' or 'init_from', not both")
    if cfg.model_overrides is not None:
        if cfg.init_from is None:
            raise ValueError(f"{where}: model_overrides changes a saved model's config; it needs init_from")
        try:
            FlamingoConfig().with_overrides(cfg.model_overrides)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: model_overrides: {e}") from e
    _choice(cfg.new_block_init, NEW_BLOCK_INITS, f"{where}: new_block_init")
    if cfg.new_block_init != "random" and cfg.model_overrides is None:
        raise ValueError(f"{where}: new_block_init applies to blocks that model_overrides adds to init_from's model")
    if cfg.model is not None:
        try:
            FlamingoConfig.from_dict(cfg.model)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: model: {e}") from e
    if not cfg.data.datasets:
        raise ValueError(f"{where}: data.datasets is empty")
    names = set()
    for i, ds in enumerate(cfg.data.datasets):
        at = f"{where}: data.datasets[{i}] ({ds.name})"
        if ds.name in names:
            raise ValueError(f"{at}: duplicate dataset name")
        names.add(ds.name)
        _choice(ds.kind, KINDS, f"{at}.kind")
        _choice(ds.format, FORMATS, f"{at}.format")
        if ds.weight < 0:
            raise ValueError(f"{at}.weight must be >= 0, got {ds.weight}")
        if ds.batch_size < 1:
            raise ValueError(f"{at}.batch_size must be >= 1, got {ds.batch_size}")
        if min(ds.image_contrast, ds.time_contrast, ds.query_contrast, ds.position_contrast) < 0:
            raise ValueError(f"{at}: image_contrast, time_contrast, query_contrast and position_contrast must be >= 0")
        if ds.query_contrast > 0 and ds.kind != "interleaved":
            raise ValueError(f"{at}.query_contrast needs several pictures per sequence: kind interleaved, not {ds.kind}")
        if ds.mask_new_words and ds.format != "corpus":
            raise ValueError(f"{at}.mask_new_words reads the corpus format's new words, not {ds.format}")
        if ds.time_contrast > 0 and ds.kind != "video":
            raise ValueError(f"{at}.time_contrast needs frames to reverse: kind video, not {ds.kind}")
        if ds.max_tokens is None:
            ds.max_tokens = DEFAULT_MAX_TOKENS[ds.kind]
        if ds.max_tokens < 2 or ds.max_images < 1:
            raise ValueError(f"{at}: max_tokens must be >= 2 and max_images >= 1")
    if all(ds.weight == 0 for ds in cfg.data.datasets) and cfg.mode == "generative":
        raise ValueError(f"{where}: every dataset has weight 0")
    _choice(cfg.data.cache_key, ("mtime", "content"), f"{where}: data.cache_key")
    if cfg.data.num_frames < 1:
        raise ValueError(f"{where}: data.num_frames must be >= 1")
    o = cfg.optim
    _choice(o.strategy, STRATEGIES, f"{where}: optim.strategy")
    if o.lr <= 0 or o.warmup_steps < 0 or o.weight_decay < 0 or o.max_grad_norm < 0:
        raise ValueError(f"{where}: optim: lr must be > 0; warmup_steps, weight_decay and max_grad_norm >= 0")
    for key in ("gate_lr", "embedding_lr"):
        if getattr(o, key) is not None and getattr(o, key) <= 0:
            raise ValueError(f"{where}: optim.{key} must be > 0 (or null for optim.lr), got {getattr(o, key)}")
    for i, g in enumerate(o.groups):
        try:
            re.compile(g.match)
        except re.error as e:
            raise ValueError(f"{where}: optim.groups[{i}].match is not a regular expression: {e}") from e
        if any(r is not None and r < 0 for r in (g.lr, g.gate_lr)):
            raise ValueError(f"{where}: optim.groups[{i}]: lr and gate_lr must be >= 0 (or null)")
    if not 0 <= o.decay_steps <= cfg.run.max_steps:
        raise ValueError(f"{where}: optim.decay_steps must be in [0, run.max_steps={cfg.run.max_steps}], got {o.decay_steps}")
    r = cfg.run
    _choice(r.mixed_precision, ("auto", "no", "bf16", "fp16"), f"{where}: run.mixed_precision")
    _choice(r.device, ("auto", "cpu", "cuda"), f"{where}: run.device")
    _choice(r.one_pass, ONE_PASS, f"{where}: run.one_pass")
    _choice(r.attention, ATTENTION, f"{where}: run.attention")
    if r.max_steps < 1 or r.save_every < 1 or r.log_every < 1 or r.keep_last < 0:
        raise ValueError(f"{where}: run: max_steps, save_every and log_every must be >= 1, keep_last >= 0")
    if cfg.data.feature_cache and not o.freeze_vision and cfg.mode == "generative":
        raise ValueError(f"{where}: data.feature_cache needs a frozen vision tower (optim.freeze_vision: true)")
    if cfg.mode == "token_probe":
        _validate_token_probe(cfg, where)


def _validate_token_probe(cfg: TrainConfig, where: str) -> None:
    used = [ds for ds in cfg.data.datasets if ds.weight > 0]
    unknown = set(cfg.token_probe.labelled) - {ds.name for ds in used}
    if unknown:
        raise ValueError(f"{where}: token_probe.labelled names no dataset with weight > 0: {sorted(unknown)}")
    names = cfg.token_probe.labelled_datasets(used)
    if not names or len(names) == len(used):
        raise ValueError(f"{where}: mode token_probe needs a labelled dataset (token_probe.labelled, by default the "
                         "video datasets) and another dataset whose visual tokens stay put, both with weight > 0")
    if any(ds.name in names and ds.format != "corpus" for ds in used):
        raise ValueError(f"{where}: mode token_probe reads the labels of corpus-format records")
    if not cfg.data.feature_cache:
        raise ValueError(f"{where}: mode token_probe trains from cached features (data.feature_cache: true)")
    if cfg.token_probe.anchor_weight < 0:
        raise ValueError(f"{where}: token_probe.anchor_weight must be >= 0, got {cfg.token_probe.anchor_weight}")
    if cfg.token_probe.query_field is not None and cfg.token_probe.query_renders < 1:
        raise ValueError(f"{where}: token_probe.query_renders must be >= 1, got {cfg.token_probe.query_renders}")


def dataset_path(cfg: TrainConfig, ds: DatasetConfig) -> Path:
    p = Path(ds.path)
    return p if p.is_absolute() else Path(cfg.data.root) / p
