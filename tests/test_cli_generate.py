"""python -m engine generate: the reply alone on stdout, user mistakes as exit 2 without traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.__main__ import main

ROOT = Path(__file__).resolve().parents[1]



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(d / name)
    frames = [Image.new("RGB", (32, 32), (20 * i, 100, 200 - 20 * i)) for i in range(6)]
    frames[0].save(d / "clip.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    return d


def run_cli(capsys, *args):
    code = main(["generate", "--model", "tiny", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_prints_the_reply_alone(files, capsys):
    code, out, err = run_cli(capsys, "--media", str(files / "a.png"), "--media", str(files / "clip.gif"),
                             "--prompt", "Compare <image> with <image>.", "--max-new-tokens", "6", "--no-repeat-ngram-size", "0")
    assert code == 0, err
    assert out.endswith("\n") and out.count("\n") <= 7
    from engine.chat import ChatEngine
    from engine.conversation import Conversation, GenerationSettings, Turn

    engine = ChatEngine.load("tiny", "cpu")
    conv = Conversation(turns=[Turn("user", "Compare <image> with <image>.", [str(files / "a.png"), str(files / "clip.gif")])])
    expected = engine.reply(conv, GenerationSettings(max_new_tokens=6, no_repeat_ngram_size=0))
    assert out == expected.strip() + "\n"


def test_media_without_markers_go_first(files, capsys):
    code, out, err = run_cli(capsys, "--media", str(files / "a.png"), "--prompt", "What is this?", "--max-new-tokens", "3")
    assert code == 0, err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--media", "missing.png", "--prompt", "x"], "does not exist"),
        (["--media", "{d}/a.png", "--prompt", "<image> and <image>"], "2 <image> marker"),
        (["--media", "{d}/corrupt.jpg", "--prompt", "x"], "corrupt.jpg"),
        (["--media", "{d}", "--prompt", "x"], "not a file"),
        (["--prompt", "x", "--temperature", "-1"], "temperature"),
    ],
)
def test_user_mistakes_exit_2(files, capsys, args, message):
    code, out, err = run_cli(capsys, *[a.format(d=files) for a in args])
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err


def test_subprocess_exit_code_and_no_traceback(files):
    """The real `python -m engine` entry: stdout stays empty (the tiny tokenizer's trainer prints there)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "engine", "generate", "--model", "tiny", "--prompt", "hi"]
    bad = subprocess.run(cmd + ["--media", str(files / "corrupt.jpg")], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stdout == "" and "Traceback" not in bad.stderr and "corrupt.jpg" in bad.stderr


@pytest.mark.slow
def test_real_smollm2_and_efficientnet_reply(files):
    """The built-in model (or, until assets/model exists, an untrained Flamingo around the real
    SmolLM2-135M-Instruct + EfficientNet-Lite0): a non-empty reply."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "engine", "generate", "--model", "default", "--device", "cpu",
           "--media", str(files / "a.png"), "--prompt", "Describe this picture in one sentence.", "--max-new-tokens", "24"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip(), r.stderr[-3000:]
    assert r.stdout.count("\n") >= 1 and "Traceback" not in r.stderr
