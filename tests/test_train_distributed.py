"""Two processes on CPU (DDP over gloo): both ranks end with identical weights, with a pass per
dataset's batch (DDP syncs on the last backward) and with one pass per step (one backward)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train_fixtures import write_corpus

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from safetensors.torch import save_file
    from engine.testing import tiny_model
    from engine.train import Trainer
    from engine.train_config import parse_train_config
    from tests.train_fixtures import tiny_train_config

    corpus, run, one_pass = sys.argv[1], sys.argv[2], sys.argv[3]
    raw = tiny_train_config(corpus, run, **{{"run.max_steps": 3, "run.save_every": 2, "run.one_pass": one_pass}})
    raw["data"]["datasets"][0].update(image_contrast=0.5, query_contrast=1.0)  # hinges, logged apart on both ranks
    cfg = parse_train_config(raw)
    t = Trainer(cfg, model=tiny_model(seed=0), resume=False)
    assert t.world == 2, t.world
    t.fit()
    weights = {{n: p.detach().contiguous() for n, p in t.model.named_parameters() if p.requires_grad}}
    save_file(weights, f"{{run}}/rank{{t.rank}}.safetensors")
    # each rank read its own share of the data
    # one file per rank: two processes printing to one pipe can interleave their lines
    import pathlib
    pathlib.Path(run).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(run) / f"first-{{t.rank}}.txt").write_text(t.feeds[1].stream.source[t.feeds[1].stream._epoch_order()[0]].media[0].name)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("one_pass", ["never", "always"])
def test_two_process_ddp_ranks_end_identical(tmp_path, one_pass):
    corpus = write_corpus(tmp_path / "corpus")
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(corpus), str(run), one_pass]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = load_file(run / "rank0.safetensors"), load_file(run / "rank1.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the weights moved from the initialisation
    from engine.testing import tiny_model

    init = {n: p for n, p in tiny_model(seed=0).named_parameters() if p.requires_grad}
    assert any(not torch.equal(init[k], a[k]) for k in a)
    firsts = sorted((run / f"first-{r}.txt").read_text() for r in (0, 1))
    assert len(firsts) == 2 and firsts[0] != firsts[1]
    assert (run / "checkpoints" / "step-2" / "rank-1.pt").is_file() and (run / "model" / "flamingo.safetensors").is_file()
    logged = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 3 and all({"nll/m3w", "hinge_image/m3w", "hinge_query/m3w"} <= set(m) for m in logged)
