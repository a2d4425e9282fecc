"""The app in Debian Chromium (Playwright) against a real ``launch.py --model tiny`` server.

One server (and one data dir) serves the whole module; the last test restarts it on the same
data dir. Screenshots of the main views go to tests/artifacts/.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest_plugins = ["conftest_app"]
pytestmark = [pytest.mark.browser]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
START_TIMEOUT = 120
REPLY_TIMEOUT = 60_000  # ms


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`launch.py --model tiny` in a subprocess, started in its own working folder so that any
    file written outside --data-dir would show up there."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.log_path = workdir.parent / f"{workdir.name}-server.log"
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> None:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("FLAMINGO_DATA_DIR", "GRADIO_TEMP_DIR")}
        env.update(PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
        cmd = [sys.executable, str(ROOT / "launch.py"), "--model", "tiny", "--device", "cpu",
               "--port", str(port), "--data-dir", "data", "--max-upload-mb", "5"]
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        ready = threading.Event()
        threading.Thread(target=self._pump, args=(log, ready), daemon=True).start()
        if not ready.wait(START_TIMEOUT):
            self.stop()
            raise RuntimeError(f"launch.py did not print its URL; log:\n{self.log()}")

    def _pump(self, log, ready: threading.Event) -> None:
        for line in self.proc.stdout:
            log.write(line)
            log.flush()
            match = re.search(r"Running on (http://\S+)", line)
            if match:
                self.url = match.group(1)
                ready.set()
        log.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("app")
    srv = Server(workdir)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from conftest_app import MediaFactory

    return MediaFactory(tmp_path_factory.mktemp("inputs"))


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    pg = context.new_page()
    outside: list[str] = []
    local = server.url.rstrip("/")
    pg.on("request", lambda r: outside.append(r.url)
          if not (r.url.startswith(local) or r.url.startswith(("data:", "blob:"))) else None)
    pg.set_default_timeout(30_000)
    pg.goto(server.url)
    pg.wait_for_selector("#chat-input textarea")
    pg.wait_for_function("document.querySelector('#model-status')?.innerText.includes('trainable')")
    yield pg
    context.close()
    assert outside == [], f"the page fetched from outside the server: {outside}"


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def ask(page, text: str, files: list[Path] = ()) -> None:
    if files:
        page.locator("#chat-input input[type=file]").set_input_files([str(f) for f in files])
        page.wait_for_function(  # the upload is done when its thumbnails are in the box
            "n => document.querySelectorAll('#chat-input [aria-label=\"File thumbnail\"]').length >= n",
            arg=len(files))
    page.locator("#chat-input textarea").fill(text)
    page.locator("#chat-input .submit-button").click()


def wait_reply_done(page, bot_messages: int) -> None:
    page.wait_for_function(
        "n => document.querySelectorAll('#chatbot [data-testid=bot]').length >= n", arg=bot_messages,
        timeout=REPLY_TIMEOUT)
    page.wait_for_selector("#chat-input .submit-button", timeout=REPLY_TIMEOUT)
    page.wait_for_function(
        "() => ![...document.querySelectorAll('#chatbot [data-testid=bot]')].some(m => m.innerText.trim() === '…')",
        timeout=REPLY_TIMEOUT)


def wait_count(page, selector: str, n: int) -> None:
    """Wait until exactly `n` elements match (media in messages render a moment after the text)."""
    page.wait_for_function("([s, n]) => document.querySelectorAll(s).length === n", arg=[selector, n])


def open_tab(page, label: str) -> None:
    page.locator("button[role=tab]", has_text=label).first.click()


def replies_stored(server) -> int:
    return len(re.findall(r"reply \d+ stored", server.log()))


def test_image_question_gets_a_reply(page, inputs, server):
    ask(page, "What colour is this square?", [inputs.image((220, 20, 20))])
    wait_reply_done(page, 1)
    wait_count(page, "#chatbot [data-testid=user] img", 1)
    assert "What colour is this square?" in page.locator("#chatbot").inner_text()
    assert page.locator("#sessions").inner_text().count("What colour is this square?") == 1
    shot(page, "chat-image")
    before = replies_stored(server)
    page.locator("#regenerate").click()  # replaces the reply, does not add one
    deadline = time.time() + REPLY_TIMEOUT / 1000
    while replies_stored(server) == before and time.time() < deadline:
        time.sleep(0.2)
    assert replies_stored(server) == before + 1
    wait_reply_done(page, 1)
    wait_count(page, "#chatbot [data-testid=bot]", 1)


def test_video_question_gets_a_reply(page, inputs):
    page.locator("#new-session").click()
    ask(page, "What happens in this clip?", [inputs.video()])
    wait_reply_done(page, 1)
    wait_count(page, "#chatbot [data-testid=user] video", 1)
    assert "What happens in this clip?" in page.locator("#sessions").inner_text()
    shot(page, "chat-video")


def test_example_set_reaches_the_prompt(page, inputs, server):
    open_tab(page, "Few-shot examples")
    page.locator("#new-set-name textarea, #new-set-name input").first.fill("Colour captions")
    page.locator("#create-set").click()
    page.wait_for_function("() => document.querySelector('#examples-status')?.innerText.includes('Created')")
    for colour, text in [((250, 0, 0), "A red square."), ((0, 0, 250), "A blue square.")]:
        page.locator("#example-media input[type=file]").set_input_files(str(inputs.image(colour)))
        page.wait_for_selector("#example-media .file-preview, #example-media table")
        page.locator("#example-text textarea").fill(text)
        page.locator("#add-example").click()
        page.wait_for_function("t => document.querySelector('#example-picker')?.innerText.includes(t)", arg=text)
    wait_count(page, "#example-gallery img", 2)
    shot(page, "examples-tab")

    open_tab(page, "Chat")
    page.locator("#settings").click()
    page.locator("#example-set input").click()
    page.locator("ul[role=listbox] li", has_text="Colour captions").click()
    ask(page, "", [inputs.image((0, 250, 0))])
    wait_reply_done(page, 1)
    page.locator("#prompt-details").click()
    debug = page.locator("#prompt-debug")
    debug.wait_for()
    assert "A red square." in debug.inner_text() and "A blue square." in debug.inner_text()
    assert "2 example(s) before the conversation" in server.log()
    shot(page, "chat-with-examples")


def test_corrupt_upload_shows_an_error_and_next_message_works(page, inputs):
    ask(page, "And this one?", [inputs.corrupt_image()])
    error = page.locator("#chatbot [data-testid=bot]", has_text="could not be read")
    error.wait_for(timeout=REPLY_TIMEOUT)
    assert "corrupt" in error.inner_text()
    shot(page, "chat-upload-error")
    page.locator("#chat-input textarea").fill("Just text now, please.")
    page.locator("#chat-input .submit-button").click()
    page.wait_for_function(
        "() => document.querySelector('#chatbot')?.innerText.includes('Just text now, please.')")
    wait_reply_done(page, 1)
    assert "could not be read" not in page.locator("#chatbot").inner_text()


def test_rename_export_and_delete_a_session(page):
    page.locator("#sessions label", has_text="Image chat").click()
    page.wait_for_function("() => document.querySelectorAll('#chatbot [data-testid=bot]').length > 0")
    page.locator("#session-actions").click()
    page.locator("#session-title textarea, #session-title input").first.fill("Renamed chat")
    page.locator("#rename-session").click()
    page.wait_for_function("() => document.querySelector('#sessions')?.innerText.includes('Renamed chat')")
    page.locator("#export-session").click()
    page.locator("#session-export-file a").first.wait_for()
    assert ".zip" in page.locator("#session-export-file").inner_text()
    shot(page, "session-actions")
    page.locator("#delete-session").click()
    page.locator("#delete-session-confirm").click()
    page.wait_for_function("() => !document.querySelector('#sessions')?.innerText.includes('Renamed chat')")
    assert page.locator("#chatbot [data-testid=user]").count() == 0


def test_restart_restores_sessions(server, browser):
    server.stop()
    server.start()
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.goto(server.url)
    sessions = page.locator("#sessions")
    page.wait_for_function("() => document.querySelector('#sessions')?.innerText.includes('What colour is this square?')")
    for title in ("What colour is this square?", "What happens in this clip?", "Just text now, please."):
        assert title in sessions.inner_text()
    sessions.locator("label", has_text="What colour is this square?").click()
    page.wait_for_function(
        "() => document.querySelector('#chatbot')?.innerText.includes('What colour is this square?')")
    wait_count(page, "#chatbot [data-testid=user] img", 1)
    wait_count(page, "#chatbot [data-testid=bot]", 1)
    shot(page, "restored-session")
    context.close()
    # nothing was written outside --data-dir
    assert sorted(p.name for p in server.workdir.iterdir()) == ["data"]
    assert (server.data_dir / "flamingo.sqlite3").exists() and any((server.data_dir / "media").rglob("*.png"))
