"""How long `make default-model` takes on this machine: every stage of the recipe and every
command of `make eval-default`, timed.

Reads the stages from the Makefile's `default-model` target (each `engine train --config C`),
runs each for a few optimiser steps on a slice of the corpus (the first N records of every
training file the stages read, their media copied), chained as the recipe chains them (a stage
starts from the model of the bench stage it names in init_from), and projects each stage's
time as its step budget (run.max_steps, less the steps an earlier stage already ran in the same
run dir) x its median step time after the warm-up steps, plus the stage's set-up (model load,
saving); the first stage runs once untimed before, to warm the process up. The vision
features are timed apart, before the stages: the slice's media through the
frozen tower into an empty feature cache (media/s), projected to the corpus's distinct training
media. Then each `make eval-default` command runs on the slice's test files with its --limit
capped (--eval-cap), projected to its full --limit. --profile-stage N adds where one step of
stage N goes (data loading, device kernels, host ops).

    python bench/recipe.py [--steps 8] [--warmup 3] [--records 16] [--device auto]
    python bench/recipe.py --write-slice .gpu/slice     # only write the slice (to carry elsewhere)
    python bench/recipe.py --slice .gpu/slice --lm-arch .gpu/smollm2-arch --device cuda

--lm-arch DIR builds the LM from DIR's config.json and tokenizer with random weights: the same
architecture, hence the same step time, for a machine without the built-in LM's 98 MB GGUF
(its replies run to their length limit, so the generative evals' projections are then upper
bounds). --write-lm-arch DIR writes such a folder from the built-in LM. bench/gpu.sh is what a
lent GPU runs. Prints one JSON object; progress lines go to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

META = "bench_meta.json"


def target_recipe(target: str, makefile: Path = ROOT / "Makefile") -> str:
    """The command lines of a Makefile target."""
    found = re.search(rf"^{re.escape(target)}:.*?\n((?:\t.*\n)+)", makefile.read_text(), re.M)
    if found is None:
        raise ValueError(f"{makefile}: no {target} target")
    return found.group(1)


def recipe_configs() -> list[Path]:
    """The configs `make default-model` trains, in order."""
    return [ROOT / c for c in re.findall(r"engine train --config (\S+)", target_recipe("default-model"))]


def eval_commands() -> list[list[str]]:
    """The `engine eval` arguments of each command `make eval-default` runs, in order."""
    return [line.split("$(EVAL)", 1)[1].split() for line in target_recipe("eval-default").splitlines() if "$(EVAL) " in line]


def eval_files(commands: list[list[str]]) -> list[str]:
    """The test files those commands read (their --data, else the task's default file)."""
    from engine.eval.datasets import CORPUS_FILES

    files = []
    for args in commands:
        task = args[args.index("--task") + 1]
        data = args[args.index("--data") + 1].replace("$(CORPUS)/", "") if "--data" in args else CORPUS_FILES.get(task)
        if data and data not in files:
            files.append(data)
    return files


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if limit is not None and len(rows) == limit:
                    break
    return rows


def training_files(configs: list[Path]) -> list[str]:
    from engine.train_config import load_train_config

    files = []
    for c in configs:
        for ds in load_train_config(c).data.datasets:
            if ds.path not in files:
                files.append(ds.path)
    return files


def write_slice(corpus: Path, out: Path, files: list[str], records: int, test_files: list[str], test_records: int) -> dict:
    """The first `records` rows of each training file and `test_records` of each test file, with
    their media; META records the full corpus's distinct training media (for the feature
    projection)."""
    out.mkdir(parents=True, exist_ok=True)
    all_media = set()
    for name in files:
        for row in read_jsonl(corpus / name):
            all_media.update(row.get("media", []))
    for name in files + test_files:
        rows = read_jsonl(corpus / name, records if name in files else test_records)
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        for m in (m for r in rows for m in r.get("media", [])):
            (out / m).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(corpus / m, out / m)
    meta = {"records_per_file": records, "test_records_per_file": test_records, "files": files, "test_files": test_files,
            "corpus_training_media": len(all_media)}
    (out / META).write_text(json.dumps(meta, indent=2))
    return meta


def write_lm_arch(out: Path) -> None:
    """The built-in LM's config and tokenizer, without its weights."""
    from engine.lm import load_lm

    lm, tok = load_lm("smollm2")
    out.mkdir(parents=True, exist_ok=True)
    lm.config.save_pretrained(out)
    tok.save_pretrained(out)


def random_lm(arch: Path, out: Path) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(arch)).save_pretrained(out)
    AutoTokenizer.from_pretrained(arch).save_pretrained(out)
    return str(out)


def time_features(slice_dir: Path, files: list[str], cache_dir: Path, device: str, cfg) -> dict:
    """The slice's distinct media through the frozen tower of `cfg` (a TrainConfig, the first
    stage's) into an empty cache, as its training fills the cache."""
    from engine.data.features import FeatureCache
    from engine.device import resolve
    from engine.vision import load_vision_tower

    paths = list(dict.fromkeys(slice_dir / m for f in files for r in read_jsonl(slice_dir / f) for m in r.get("media", [])))
    dev = resolve(device).device
    tower = load_vision_tower(cfg.model_config().vision).to(dev)
    cache = FeatureCache(cache_dir, tower, num_frames=cfg.data.num_frames, key=cfg.data.cache_key, device=dev)
    t = time.perf_counter()
    stats = cache.build(paths, progress=False)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    return {"media": len(paths), "computed": stats["computed"], "seconds": round(dt, 2),
            "media_per_s": round(len(paths) / dt, 1)}


def step_times(run_dir: Path) -> list[float]:
    return [r["step_time"] for r in read_jsonl(run_dir / "metrics.jsonl") if "step_time" in r]


def bench_overrides(cfg, slice_dir: Path, work: Path, run_dir: Path, steps: int, device: str,
                    variant: dict | None = None) -> dict:
    """A stage's config, changed to run `steps` steps on the slice into `run_dir`."""
    return {"data.root": str(slice_dir), "data.cache_dir": str(work / "features"), "data.precompute_features": False,
            "run.dir": str(run_dir), "run.max_steps": steps, "run.save_every": steps, "run.keep_last": 1,
            "run.max_minutes": None, "run.device": device, "run.progress": False, **(variant or {}),
            # the schedule's shape does not change a step's time; its lengths must fit the steps
            "optim.warmup_steps": min(cfg.optim.warmup_steps, steps),
            "optim.decay_steps": min(cfg.optim.decay_steps, steps)}


def train_stage(path: Path, run_dir: Path, init_from: str | None, slice_dir: Path, work: Path, steps: int,
                device: str, lm: str | None, variant: dict | None = None):
    """One stage for `steps` steps on the slice; returns (its config as run, wall seconds)."""
    from engine.train import train
    from engine.train_config import load_train_config

    cfg = load_train_config(path)
    over = bench_overrides(cfg, slice_dir, work, run_dir, steps, device, variant)
    if cfg.init_from:
        over["init_from"] = init_from
    if lm is not None and not over.get("init_from"):
        over["model.lm"] = lm
    cfg = load_train_config(path, over)
    t = time.perf_counter()
    train(cfg, resume=False)
    return cfg, time.perf_counter() - t


def run_stages(configs: list[Path], slice_dir: Path, work: Path, steps: int, warmup: int, device: str,
               lm: str | None, variant: dict | None = None) -> list[dict]:
    from engine.train_config import load_train_config

    # The first stage once more before the timed ones, untimed: on a GPU the process's first
    # training pays for CUDA's first calls, the allocator's growth and every batch shape's first
    # use (stage 1 measured 1.3-1.5 s per step there, stage 2 0.7-1.0 s on the same records).
    work = work / variant_name(variant)
    train_stage(configs[0], work / "00-warm-up", None, slice_dir, work.parent, steps, device, lm, variant)
    bench_dir_of, done_in_dir, out = {}, {}, []
    for i, path in enumerate(configs):
        recipe = load_train_config(path)  # as the Makefile runs it
        budget = recipe.run.max_steps - done_in_dir.get(recipe.run.dir, 0)
        done_in_dir[recipe.run.dir] = recipe.run.max_steps
        run_dir = work / f"{i + 1:02d}-{path.stem}"
        source = str(Path(recipe.init_from).parent) if recipe.init_from else None
        cfg, wall = train_stage(path, run_dir, str(bench_dir_of[source] / "model") if source in bench_dir_of else None,
                                slice_dir, work.parent, steps, device, lm, variant)
        bench_dir_of[recipe.run.dir] = run_dir
        times = step_times(run_dir)
        median = statistics.median(times[warmup:] or times)
        setup = wall - sum(times)
        out.append({"stage": i + 1, "config": str(path.relative_to(ROOT)), "mode": cfg.mode, **(variant or {}), "steps": budget,
                    "median_step_s": round(median, 4), "first_step_s": round(times[0], 3), "setup_s": round(setup, 1),
                    "projected_min": round((budget * median + setup) / 60, 1)})
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def profile_step(config: Path, slice_dir: Path, work: Path, device: str, lm: str | None, steps: int = 4,
                 variant: dict | None = None) -> dict:
    """Where one step of a (generative) stage goes: its batches' loading (features from the warm
    cache, tokens, the copy to the device) timed alone; the whole step timed plain; and under
    torch.profiler, the device's kernel time and the ops that take the most host time."""
    from torch.profiler import ProfilerActivity, profile

    from engine.objective import step_plan
    from engine.train import Trainer
    from engine.train_config import load_train_config

    cfg = load_train_config(config)
    over = bench_overrides(cfg, slice_dir, work, work / f"profile-{config.stem}-{variant_name(variant)}", 100, device, variant)
    over.update({"init_from": None, **({"model.lm": lm} if lm else {})})
    trainer = Trainer(load_train_config(config, over), resume=False)
    dev = trainer.accelerator.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(3):  # warm-up: the feature cache, the allocator, kernels' first calls
        trainer.train_step()
    sync()
    t = time.perf_counter()
    for s in range(steps):
        for i in step_plan(trainer.step + s, trainer.weights, cfg.optim.strategy):
            trainer.feeds[i].next_batch().to(dev)
    sync()
    data = (time.perf_counter() - t) / steps
    t = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    sync()
    step = (time.perf_counter() - t) / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.train_step()
        sync()
    events = prof.key_averages()
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {"config": str(config.relative_to(ROOT)), **(variant or {}), "step_s": round(step, 3), "data_s": round(data, 3),
            "device_kernel_s": round(sum(e.self_device_time_total for e in events) / 1e6 / steps, 3),
            "ops_per_step": sum(e.count for e in events) // steps,
            "top_host_ops_ms": {e.key: round(e.self_cpu_time_total / 1e3 / steps, 1) for e in top}}


def time_evals(model_dir: Path, slice_dir: Path, work: Path, cap: int, device: str, tasks: list[str] | None = None
               ) -> list[dict]:
    """Each `make eval-default` command on the slice's test files with --limit at most `cap`,
    timed in this process and projected to its full --limit: load + (seconds - load) x limit / ran."""
    from engine.commands import eval as eval_cmd

    parser = argparse.ArgumentParser()
    eval_cmd.add_arguments(parser)
    for _ in range(2):  # the second load is the one each command pays (imports and files warm)
        t = time.perf_counter()
        eval_cmd.load_model(str(model_dir), device)
        load = time.perf_counter() - t
    (work / "eval").mkdir(parents=True, exist_ok=True)
    out = []
    for args in eval_commands():
        if tasks is not None and args[args.index("--task") + 1] not in tasks:
            continue
        label = " ".join(args[:args.index("--out")]).replace("$(CORPUS)/", "")
        args = [a.replace("$(CORPUS)", str(slice_dir)).replace("$(EVAL_OUT)", str(work / "eval")) for a in args]
        full = ran = None
        if "--limit" in args:
            i = args.index("--limit") + 1
            full = int(args[i])
            ran = min(full, cap)
            args[i] = str(ran)
        ns = parser.parse_args(["--model", str(model_dir), "--data", str(slice_dir), "--no-progress", "--device", device, *args])
        t = time.perf_counter()
        try:
            eval_cmd.run(ns)
        except Exception as e:  # e.g. pycocoevalcap missing on a GPU image: time the other commands
            out.append({"command": label, "error": f"{type(e).__name__}: {e}"})
            print(json.dumps(out[-1]), file=sys.stderr, flush=True)
            continue
        seconds = time.perf_counter() - t
        projected = seconds if full is None else load + max(seconds - load, 0.0) * full / ran
        out.append({"command": label, "queries": ran, "of": full, "seconds": round(seconds, 1),
                    "projected_min": round(projected / 60, 1)})
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=ROOT / "corpus")
    p.add_argument("--records", type=int, default=16, help="records per training file in the slice")
    p.add_argument("--slice", type=Path, help="an existing slice (from --write-slice) instead of --corpus")
    p.add_argument("--write-slice", type=Path, metavar="DIR", help="write the slice to DIR and stop")
    p.add_argument("--write-lm-arch", type=Path, metavar="DIR", help="write the built-in LM's config + tokenizer and stop")
    p.add_argument("--lm-arch", type=Path, help="train with a random-weight LM of this config (see above)")
    p.add_argument("--test-records", type=int, default=48, help="records per test file in the slice")
    p.add_argument("--eval-cap", type=int, default=24, help="queries per eval command (its --limit at most this)")
    p.add_argument("--eval-model", type=Path, help="time the evals on this model (default: the last stage's)")
    p.add_argument("--no-train", action="store_true", help="skip the stages (with --eval-model)")
    p.add_argument("--no-eval", action="store_true", help="skip the evals")
    p.add_argument("--stages", type=int, default=None, help="only the first N stages")
    p.add_argument("--eval-tasks", default=None, help="only the eval commands of these tasks (comma-separated)")
    p.add_argument("--profile-stage", type=int, default=None, metavar="N", help="also profile stage N's step")
    p.add_argument("--compare", metavar="run.KEY=A,B",
                   help="run the stages twice, side by side, with a run setting at A then B (e.g. run.one_pass=never,always)")
    p.add_argument("--steps", type=int, default=8, help="steps per stage")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the median")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", type=Path, help="run dirs and feature cache (default: a temporary folder)")
    args = p.parse_args()
    from engine.stdio import stdout_to_stderr

    with stdout_to_stderr():  # libraries print while models load; stdout is the JSON's
        result = run(args)
    if result is not None:
        print(json.dumps(result, indent=2))


def run(args) -> dict | None:
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = recipe_configs()[:args.stages]
    files, test_files = training_files(configs), eval_files(eval_commands())
    if args.write_lm_arch:
        write_lm_arch(args.write_lm_arch)
        return None
    if args.write_slice:
        return write_slice(args.corpus, args.write_slice, files, args.records, test_files, args.test_records)
    work = args.work or Path(tempfile.mkdtemp(prefix="recipe-bench-"))
    slice_dir = args.slice or work / "slice"
    if args.slice is None:
        write_slice(args.corpus, slice_dir, files, args.records, test_files, args.test_records)
    meta = json.loads((slice_dir / META).read_text())
    lm = random_lm(args.lm_arch, work / "lm") if args.lm_arch else None

    from engine.device import resolve
    from engine.train_config import load_train_config

    placement = resolve(args.device)
    result = {"device": placement.describe(),
              "gpu": torch.cuda.get_device_name() if placement.device.type == "cuda" else None,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "lm": "random weights, built-in architecture" if lm else "built-in"}
    if not args.no_train:
        result.update(train_stages(args, configs, files, slice_dir, work, meta, lm))
    if args.profile_stage:
        profiles = [profile_step(recipe_configs()[args.profile_stage - 1], slice_dir, work, args.device, lm, variant=v)
                    for v in variants(args.compare)]
        for prof in profiles:
            print(json.dumps(prof), file=sys.stderr, flush=True)
        result["profile"] = profiles[0] if len(profiles) == 1 else profiles
    if not args.no_eval:
        model = args.eval_model or sorted(work.glob("stages-*/*/model"))[-1]
        tasks = args.eval_tasks.split(",") if args.eval_tasks else None
        evals = time_evals(model, slice_dir, work, args.eval_cap, args.device, tasks)
        result.update({"eval_model": str(model), "eval_cap": args.eval_cap, "evals": evals,
                       "projected_eval_min": round(sum(e.get("projected_min", 0.0) for e in evals), 1)})
    return result


def train_stages(args, configs, files, slice_dir, work, meta, lm) -> dict:
    from engine.train_config import load_train_config

    features = time_features(slice_dir, files, work / "features", args.device, load_train_config(configs[0]))
    features["projected_corpus_min"] = round(meta["corpus_training_media"] / features["media_per_s"] / 60, 1)
    print(json.dumps({"features": features}), file=sys.stderr, flush=True)
    runs = [(v, run_stages(configs, slice_dir, work, args.steps, args.warmup, args.device, lm, v))
            for v in variants(args.compare)]
    stages = runs[0][1]
    train_min = sum(s["projected_min"] for s in stages)
    out = {
        "steps_per_stage": args.steps, "warmup": args.warmup, "records_per_file": meta["records_per_file"],
        "features": features, "stages": stages,
        "projected_training_min": round(train_min, 1),
        "projected_training_and_features_min": round(train_min + features["projected_corpus_min"], 1),
    }
    if len(runs) == 2:  # side by side, in this process: each stage's step time and the ratio
        (a, first), (b, second) = runs
        out["compare"] = {
            "variants": [a, b],
            "stages": [s["stage"] for s in first],
            "median_step_s": [[s["median_step_s"] for s in rows] for rows in (first, second)],
            "step_ratio_second_over_first": [round(y["median_step_s"] / x["median_step_s"], 3) for x, y in zip(first, second)],
            "projected_training_min": [round(sum(s["projected_min"] for s in rows), 1) for rows in (first, second)],
        }
    return out


def variants(compare: str | None) -> list[dict]:
    """--compare KEY=A,B -> [{KEY: A}, {KEY: B}] (config overrides); none -> [{}]."""
    if not compare:
        return [{}]
    key, sep, values = compare.partition("=")
    values = values.split(",")
    if not sep or not key.startswith("run.") or len(values) != 2:
        raise SystemExit(f"--compare: run.KEY=A,B (two values of one run setting), got {compare!r}")
    return [{key: v} for v in values]


def variant_name(variant: dict | None) -> str:
    return "stages-" + ("-".join(f"{k.removeprefix('run.')}-{v}" for k, v in variant.items()) if variant else "as-configured")


if __name__ == "__main__":
    main()
