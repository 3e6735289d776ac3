"""The GPU benchmark is known to work before a GPU is ever available: its dry run on a CPU."""

import json
import sys

from helpers import run_cmd


def test_the_gpu_benchmark_runs_end_to_end_on_a_cpu(tmp_path, sft_cache):
    """bench/gpu.py --dry_run: a tiny model, every case that needs no CUDA (DeepSpeed ZeRO-2 on one
    process included) and transformers.Trainer, each measured, then the JSON and the table."""
    # a budget no busy machine reaches: a case stopped at its share of the dry run's 300 s would fail this
    p = run_cmd([sys.executable, "-m", "bench.gpu", "--dry_run", "--out", tmp_path, "--budget_s", "3000"], sft_cache)
    r = json.loads((tmp_path / "gpu.json").read_text())
    cases = {x["case"]: x for x in r["results"]}
    assert set(cases) == {"padding", "group_by_length", "packing (sdpa)", "whole-logit cross-entropy",
                          "gradient checkpointing", "LoRA", "DeepSpeed ZeRO-2, 1 process", "transformers.Trainer"}
    for name, x in cases.items():
        assert x["stopped"] is None and x["target_tokens_per_s"] > 0, (name, x, p.stdout[-3000:])
    table = (tmp_path / "gpu.md").read_text()
    assert table.count("| tiny |") == len(cases) and "x |" in table  # every row, with its ratio to Trainer
