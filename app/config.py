"""Typed settings for the app, read in one place (``launch.py`` builds an ``AppConfig``)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from engine.conversation import GenerationSettings

DATA_DIR_ENV = "FLAMINGO_DATA_DIR"
MAX_UPLOAD_ENV = "FLAMINGO_MAX_UPLOAD_MB"


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or "./data")


def default_max_upload_mb() -> float:
    return float(os.environ.get(MAX_UPLOAD_ENV) or 50)


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int = 50 * 1024 * 1024
    max_files: int = 8

    @property
    def max_mb(self) -> float:
        return self.max_bytes / (1024 * 1024)


@dataclass(frozen=True)
class AppConfig:
    data_dir: Path = field(default_factory=default_data_dir)
    host: str = "127.0.0.1"
    port: int = 7860
    model: str = "default"
    device: str = "auto"
    limits: UploadLimits = field(default_factory=UploadLimits)
    concurrency: int = 4  # replies generated at once (Gradio queue concurrency)

    @property
    def gradio_temp_dir(self) -> Path:
        return self.data_dir / "gradio-tmp"

    @property
    def exports_dir(self) -> Path:
        return self.data_dir / "exports"


@dataclass(frozen=True)
class ChatOptions:
    """How to answer: sampling settings plus which few-shot examples go before the conversation."""

    settings: GenerationSettings = field(default_factory=GenerationSettings)
    example_set_id: int | None = None
    rices: bool = False  # pick the k most similar examples per new image instead of the whole set
    rices_k: int = 2


def clamp_settings(s: GenerationSettings) -> GenerationSettings:
    """The same settings, held to ranges the engine can honour."""
    return GenerationSettings(
        max_new_tokens=max(1, min(int(s.max_new_tokens), 1024)),
        temperature=max(0.0, min(float(s.temperature), 2.0)),
        top_p=max(0.01, min(float(s.top_p), 1.0)),
        top_k=max(0, int(s.top_k)),
        repetition_penalty=max(1.0, min(float(s.repetition_penalty), 2.0)),
        no_repeat_ngram_size=max(0, int(s.no_repeat_ngram_size)),
        num_frames=max(1, min(int(s.num_frames), 32)),
        seed=s.seed,
    )
