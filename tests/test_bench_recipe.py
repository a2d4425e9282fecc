"""bench/recipe.py times `make default-model` from the Makefile's own lines: they must keep parsing."""
import importlib.util
import json
from pathlib import Path

from tests.train_fixtures import write_corpus

ROOT = Path(__file__).resolve().parents[1]


def _recipe_bench():
    spec = importlib.util.spec_from_file_location("recipe_bench", ROOT / "bench" / "recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reads_every_stage_and_eval_command_of_the_makefile():
    from engine.eval.datasets import CORPUS_FILES

    bench, makefile = _recipe_bench(), (ROOT / "Makefile").read_text()
    configs = bench.recipe_configs()
    assert len(configs) == makefile.count("engine train --config") > 1
    assert all(c.is_file() for c in configs)
    commands = bench.eval_commands()
    assert len(commands) == makefile.count("$(EVAL) --task") > 1
    assert all("--task" in c and "--out" in c for c in commands)
    assert set(bench.eval_files(commands)) <= set(CORPUS_FILES.values())


def test_slice_holds_the_first_records_with_their_media(tmp_path):
    bench = _recipe_bench()
    corpus = write_corpus(tmp_path / "corpus", n_pairs=5, n_docs=3)
    meta = bench.write_slice(corpus, tmp_path / "slice", ["pairs.train.jsonl", "interleaved.train.jsonl"], 2,
                             ["videos.train.jsonl"], 1)
    rows = [json.loads(line) for line in (tmp_path / "slice" / "interleaved.train.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows == bench.read_jsonl(corpus / "interleaved.train.jsonl", 2)
    assert all((tmp_path / "slice" / m).is_file() for r in rows for m in r["media"])
    assert len(bench.read_jsonl(tmp_path / "slice" / "videos.train.jsonl")) == 1
    n_media = len({m for f in ("pairs", "interleaved") for r in bench.read_jsonl(corpus / f"{f}.train.jsonl") for m in r["media"]})
    assert meta["corpus_training_media"] == n_media == 5 + (3 + 4 + 5)


def test_compare_takes_two_values_of_one_run_setting_that_the_config_accepts():
    import pytest

    from engine.train_config import load_train_config

    bench = _recipe_bench()
    assert bench.variants(None) == [{}]
    first, second = bench.variants("run.one_pass=never,always")
    assert (first, second) == ({"run.one_pass": "never"}, {"run.one_pass": "always"})
    assert bench.variant_name(first) != bench.variant_name(second) != bench.variant_name(None)
    for variant in (first, second, *bench.variants("run.attention=default,math")):
        load_train_config(bench.recipe_configs()[0], variant)  # a setting the stages' configs accept
    for bad in ("one_pass=never,always", "run.one_pass=never", "run.one_pass"):
        with pytest.raises(SystemExit, match="--compare"):
            bench.variants(bad)
