"""Start the chat app.

    python launch.py [--host 127.0.0.1] [--port 7860] [--data-dir DIR]
                     [--model default|tiny|PATH|HF_ID] [--device auto|cpu|cuda]

Everything the app writes (the SQLite database, media, Gradio's upload cache, exports) goes under
--data-dir (default ./data, or $FLAMINGO_DATA_DIR). Prints the URL once the page is being served.
`--model tiny` runs a small random-weight model built in-process (for tests and demos).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("launch")


def parse_args(argv: list[str] | None = None):
    from app.config import AppConfig, UploadLimits, default_data_dir, default_max_upload_mb

    p = argparse.ArgumentParser(description="Flamingo chat: talk about images and videos.")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--data-dir", type=Path, default=default_data_dir(),
                   help="where the database and media live (default ./data or $FLAMINGO_DATA_DIR)")
    p.add_argument("--model", default="default",
                   help="'default' (shipped in assets/), 'tiny' (random test model), a folder, or a HF id")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-upload-mb", type=float, default=default_max_upload_mb(),
                   help="largest accepted upload per file, in MB (default 50 or $FLAMINGO_MAX_UPLOAD_MB)")
    p.add_argument("--concurrency", type=int, default=4, help="replies generated at once (default 4)")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    if a.max_upload_mb <= 0:
        p.error("--max-upload-mb must be positive")
    limits = UploadLimits(max_bytes=int(a.max_upload_mb * 1024 * 1024))
    config = AppConfig(data_dir=a.data_dir.resolve(), host=a.host, port=a.port, model=a.model,
                       device=a.device, limits=limits, concurrency=max(1, a.concurrency))
    return config, a.log_level


def prepare_environment(data_dir: Path) -> None:
    """Keep every file the app, Gradio and Python's tempfile write under the data dir; no analytics."""
    for sub in ("media", "gradio-tmp", "tmp", "exports"):
        (data_dir / sub).mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(data_dir / "gradio-tmp")
    os.environ["TMPDIR"] = str(data_dir / "tmp")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    import tempfile

    tempfile.tempdir = None  # re-read TMPDIR


def port_is_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def load_engine(model: str, device: str):
    """default | tiny | a saved model folder | a Hugging Face id (engine.chat decides)."""
    from engine.chat import ChatEngine

    return ChatEngine.load(model, device=device)


def main(argv: list[str] | None = None) -> int:
    config, level = parse_args(argv)
    prepare_environment(config.data_dir)
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from app.service import ChatService
    from app.store import Store
    from app.ui import build_ui, launch_options

    if not port_is_free(config.host, config.port):  # say so before a long model load
        print(f"error: {config.host}:{config.port} is in use; pick another --port", file=sys.stderr)
        return 1
    log.info("loading model %r on %s", config.model, config.device)
    try:
        engine = load_engine(config.model, config.device)
    except ValueError as exc:  # a model or device the user named that is not there
        print(f"error: {exc}", file=sys.stderr)
        return 2
    service = ChatService(Store(config.data_dir), engine, config.limits)
    log.info("%s", service.model_status())
    demo = build_ui(service, config)
    demo.queue(default_concurrency_limit=8)
    try:
        _, url, _ = demo.launch(prevent_thread_lock=True, **launch_options(config))
    except OSError as exc:  # e.g. the port is taken
        print(f"error: cannot serve on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1
    print(f"Running on {url}", flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        service.store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
