"""Data at scale: weighted mixtures, named sources and sets, directories and saved datasets,
truncation choices, and the cache shared by workers and processes."""

import json
import os
import shutil
from collections import Counter

import numpy as np
import pytest

import batches
from sftloop import sft_data, sources
import templates
from helpers import launch, max_diff, metrics, train, weights


def conv(i, reply_words=3):
    return {"conversations": [{"from": "human", "value": f"question {i}"},
                              {"from": "assistant", "value": " ".join([f"w{i}"] * reply_words)}]}


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def corpus_of(specs, tok, cache, **kw):
    kw = {"template": "qwen2.5", "max_len": 2048, "system_prompt": None, **kw}
    return sft_data.load_corpus([{"spec": s} if isinstance(s, str) else s for s in specs], tok, cache_dir=cache, **kw)


@pytest.fixture
def three(tmp_path):
    a = write(tmp_path / "a.jsonl", [conv(i) for i in range(10)])
    b = write(tmp_path / "b.jsonl", [conv(100 + i) for i in range(10)])
    c = write(tmp_path / "c.jsonl", [conv(200 + i) for i in range(4)])
    return a, b, c


def test_weights_take_a_share_repeat_or_count_without_replacement_within_a_pass(tmp_path, tiny_tok, three, caplog):
    a, b, c = three
    with caplog.at_level("INFO", logger="sft"):
        corpus = corpus_of([f"{a}:0.5", f"{b}:2.0", f"{c}:10"], tiny_tok, tmp_path / "cache")
    assert corpus.names == ["a", "b", "c"] and corpus.counts == [5, 20, 10]
    assert "c.jsonl:10: 10 samples asked for but it holds 4 usable: it repeats (2.50 passes per epoch)" in caplog.text
    assert "mixture, per epoch: a 5 of 10 (14.3%); b 20 of 10 (57.1%); c 10 of 4 (28.6%)" in caplog.text
    a_rows, b_rows, c_rows = (set(r.tolist()) for r in corpus.rows)
    seen_a = set()
    for epoch in range(4):
        pool = batches.epoch_samples(corpus.rows, corpus.counts, seed=3, epoch=epoch)
        n = Counter(pool.tolist())
        assert len(pool) == 35
        picked_a = [r for r in n if r in a_rows]
        assert len(picked_a) == 5 and all(n[r] == 1 for r in picked_a)  # half of a, no repeats
        assert all(n[r] == 2 for r in b_rows)  # all of b, twice
        assert sorted(n[r] for r in c_rows) == [2, 2, 3, 3]  # 10 of 4: two passes, then 2 without replacement
        seen_a |= set(picked_a)
        assert np.array_equal(pool, batches.epoch_samples(corpus.rows, corpus.counts, seed=3, epoch=epoch))
    assert len(seen_a) > 5  # each epoch draws its half anew


def test_mixture_steps_depend_only_on_seed_and_global_batch_with_grouping(tmp_path, tiny_tok, three):
    a, b, c = three
    corpus = corpus_of([f"{a}:0.5", f"{b}:2.0", f"{c}:10"], tiny_tok, tmp_path / "cache")

    def step_sets(per_device, accum, world, group):
        gb = per_device * accum * world
        order = batches.epoch_rows(corpus, 5, 1, gb, group)
        return [sorted(i for r in range(world) for mb in batches.step_micro_batches(order, s, gb, r, world, accum)
                       for i in mb) for s in range(batches.steps_per_epoch(len(order), gb))]

    for group in (False, True):
        ref = step_sets(8, 1, 1, group)
        assert all(step_sets(*split, group) == ref for split in [(2, 4, 1), (4, 1, 2), (1, 2, 4)])
    assert batches.order_fingerprint(corpus, 5, 1, 8, False, False) != batches.order_fingerprint(
        corpus_of([f"{a}:0.5", f"{b}:3.0", f"{c}:10"], tiny_tok, tmp_path / "cache"), 5, 1, 8, False, False)


@pytest.mark.parametrize("spec, message", [
    ("{a}:0", "weight '0' must be a positive number"),
    ("{a}:-2.0", "weight '-2.0' must be a positive number"),
    ("{a}:lots", "weight 'lots' is not a number"),
    ("{a}:nan", "weight 'nan' must be a positive number"),
    ("{a}:0.01", "weight 0.01 of 10 usable sample(s) gives 0 samples"),
])
def test_bad_weights_are_clear_errors(tmp_path, tiny_tok, three, spec, message):
    with pytest.raises(sources.DataProblems, match=message.replace("(", r"\(").replace(")", r"\)")):
        corpus_of([spec.format(a=three[0])], tiny_tok, tmp_path / "cache")


def test_a_file_named_twice_and_a_source_with_nothing_usable_are_named(tmp_path, tiny_tok, three):
    a, b, _ = three
    with pytest.raises(sources.DataProblems, match="a.jsonl is named twice"):
        corpus_of([a, b, f"{a}:2.0"], tiny_tok, tmp_path / "cache")
    d = tmp_path / "dir"
    d.mkdir()
    shutil.copy(b, d / "b.jsonl")
    with pytest.raises(sources.DataProblems, match="b.jsonl is named twice"):
        corpus_of([str(d / "b.jsonl"), str(d)], tiny_tok, tmp_path / "cache")
    bad = write(tmp_path / "bad.jsonl", [{"conversations": [{"from": "human", "value": "q"}]}] * 3)
    with pytest.raises(sources.DataProblems, match=f"--train_files {bad}: no usable train sample in it \\(of 3 record"):
        corpus_of([a, bad], tiny_tok, tmp_path / "cache", skip_invalid=True)


def test_mixture_file_yaml_and_json_with_names_and_relative_paths(tmp_path, tiny_tok, three):
    a, b, c = three
    (tmp_path / "mix.yaml").write_text("train_files:\n  - a.jsonl:0.5\n  - path: b.jsonl\n    weight: 2.0\n    name: bee\n"
                                       "  - path: c.jsonl\nvalidation_files:\n  - c.jsonl\n")
    train_entries, eval_entries = sources.read_mixture_file(str(tmp_path / "mix.yaml"))
    corpus = corpus_of(train_entries, tiny_tok, tmp_path / "cache")
    assert corpus.names == ["a", "bee", "c"] and corpus.counts == [5, 20, 4]
    assert [e["spec"] for e in eval_entries] == [str(tmp_path / "c.jsonl")]
    (tmp_path / "mix.json").write_text(json.dumps([f"{a}:0.5", {"path": b, "weight": "2.0", "name": "bee"}, c]))
    again = corpus_of(sources.read_mixture_file(str(tmp_path / "mix.json"))[0], tiny_tok, tmp_path / "cache")
    assert again.names == corpus.names and again.counts == corpus.counts
    (tmp_path / "bad.yaml").write_text("train_files:\n  - {path: a.jsonl, weigth: 2}\n")
    with pytest.raises(sources.DataProblems, match=r"bad.yaml: train_files\[0\]: expected 'path\[:weight\]'"):
        sources.read_mixture_file(str(tmp_path / "bad.yaml"))


def test_directories_saved_datasets_and_their_bad_rows(tmp_path, qwen_tok):
    import datasets

    records = [conv(i) for i in range(6)]
    expected = [templates.encode(templates.to_messages(r), qwen_tok)["input_ids"] for r in records]
    # a directory of files (nested, mixed formats), read in sorted path order
    d = tmp_path / "files"
    (d / "b").mkdir(parents=True)
    write(d / "a1.jsonl", records[:2])
    datasets.Dataset.from_list(records[2:4]).to_parquet(str(d / "b" / "2.parquet"))
    write(d / "c3.jsonl", records[4:])
    (d / "README.md").write_text("not data")
    # a directory written by save_to_disk, of a Dataset and of a DatasetDict
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(tmp_path / "saved_dict"))
    for spec in (d, tmp_path / "saved", tmp_path / "saved_dict"):
        corpus = corpus_of([str(spec)], qwen_tok, tmp_path / "cache")
        assert [s["input_ids"] for s in sft_data.first_samples(corpus)] == expected
    assert corpus_of([f"{d}:2.0"], qwen_tok, tmp_path / "cache").names == ["files"]

    bad = records[:3] + [{"conversations": [{"from": "robot", "value": "x"}, {"from": "assistant", "value": "y"}]}]
    write(d / "c3.jsonl", bad)  # the fourth record of the directory's last file: its line 4
    with pytest.raises(sources.DataProblems, match=rf"{d / 'c3.jsonl'}:4: conversations\[0\]: unknown role 'robot'"):
        corpus_of([str(d)], qwen_tok, tmp_path / "cache")
    datasets.Dataset.from_list(bad).save_to_disk(str(tmp_path / "saved_bad"))
    with pytest.raises(sources.DataProblems, match=rf"{tmp_path / 'saved_bad'}: row 3: conversations\[0\]: unknown role"):
        corpus_of([str(tmp_path / "saved_bad")], qwen_tok, tmp_path / "cache")


@pytest.mark.slow  # saves and loads datasets of several kinds: ~20 s
def test_sources_of_another_kind_are_clear_errors(tmp_path, tiny_tok, monkeypatch):
    import datasets

    other = tmp_path / "csvs"
    other.mkdir()
    (other / "a.csv").write_text("q,a\n")
    with pytest.raises(sources.DataProblems, match="csvs: a directory with no .json/.jsonl/.parquet files, and not one "
                                                    "written by datasets' save_to_disk .*it holds: a.csv"):
        corpus_of([str(other)], tiny_tok, tmp_path / "cache")
    datasets.DatasetDict({"test": datasets.Dataset.from_list([conv(0)])}).save_to_disk(str(tmp_path / "nodict"))
    with pytest.raises(sources.DataProblems, match="a saved DatasetDict without a 'train' split \\(it has: test\\)"):
        corpus_of([str(tmp_path / "nodict")], tiny_tok, tmp_path / "cache")
    # as on a machine without the internet, without waiting ~20 s for it: the libraries read
    # HF_HUB_OFFLINE when they are imported, so the setting they kept is patched, not the environment
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(sources.DataProblems, match="someone/no-such-dataset: not a local file or directory, and the "
                                                    "dataset id could not be loaded .*Pass a local copy instead"):
        corpus_of(["someone/no-such-dataset"], tiny_tok, tmp_path / "cache")
    with pytest.raises(sources.DataProblems, match="missing.jsonl: no such file"):  # a path, not an id
        corpus_of([str(tmp_path / "missing.jsonl")], tiny_tok, tmp_path / "cache")


def test_truncation_keep_start_or_drop_reports_the_count(tmp_path, tiny_tok, caplog):
    """Two of four replies lose their end to --max_len: kept and counted under keep_start (up to
    --max_cut_share; 50% stops the run at the default 5%, tests/test_data.py), left out under drop."""
    f = write(tmp_path / "t.jsonl", [conv(0), conv(1, reply_words=300), conv(2), conv(3, reply_words=300)])
    with caplog.at_level("INFO", logger="sft"):
        kept = corpus_of([f], tiny_tok, tmp_path / "cache", max_len=64, max_cut_share=0.5)
    assert kept.rows[0].tolist() == [0, 1, 2, 3]
    assert "2 train sample(s) longer than max_len=64 keep their first 64 tokens (--truncation keep_start" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="sft"):
        dropped = corpus_of([f], tiny_tok, tmp_path / "cache", max_len=64, truncation="drop")
    assert dropped.rows[0].tolist() == [0, 2]
    assert "Dropped 2 train sample(s) longer than max_len=64 (--truncation drop)" in caplog.text


def test_the_cache_does_not_depend_on_the_worker_count(tmp_path, qwen_tok, monkeypatch):
    f = write(tmp_path / "d.jsonl", [conv(i, reply_words=1 + i % 7) for i in range(40)])
    two = corpus_of([f], qwen_tok, tmp_path / "c2", num_proc=2)
    one = corpus_of([f], qwen_tok, tmp_path / "c1")
    assert two.dataset["input_ids"] == one.dataset["input_ids"] and two.dataset["labels"] == one.dataset["labels"]
    assert len(two.dataset.cache_files) == 2  # one Arrow file per worker
    calls = []
    real = templates.encode_rendered
    monkeypatch.setattr(templates, "encode_rendered", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = corpus_of([f], qwen_tok, tmp_path / "c2")  # one worker now: the two workers' files are read
    assert calls == [] and again.dataset["input_ids"] == one.dataset["input_ids"]


def test_per_source_losses_and_named_eval_sets_one_and_two_processes(tmp_path, sft_cache):
    """Per-source training losses are the token-weighted parts of the step's loss, the same over
    2 processes as in 1; each validation file is a named set whose loss is what it gives alone."""
    a = write(tmp_path / "a.jsonl", [conv(i, reply_words=1 + i % 5) for i in range(24)])
    b = write(tmp_path / "b.jsonl", [conv(100 + i, reply_words=20) for i in range(8)])
    va = write(tmp_path / "va.jsonl", [conv(300 + i) for i in range(5)])
    vb = write(tmp_path / "vb.jsonl", [conv(400 + i, reply_words=8) for i in range(3)])
    common = ["--train_files", f"{a}:0.5", f"{b}:12", "--max_steps", 4, "--per_device_train_batch_size", 8,
              "--max_eval_generations", 2, "--eval_steps", 2, "--save_steps", 2]
    one, two, alone = tmp_path / "one", tmp_path / "two", tmp_path / "alone"
    train(["--output_dir", one, "--validation_files", va, vb, *common], sft_cache)
    launch("cpu_ddp.yaml", ["--output_dir", two, "--validation_files", va, vb, *common[:-6],
                            "--per_device_train_batch_size", 4, *common[-6:]], sft_cache)
    train(["--output_dir", alone, "--validation_files", va, *common], sft_cache)

    steps = [m for m in metrics(one) if "loss" in m]
    assert len(steps) == 4  # 12 + 12 samples per epoch in steps of 8: 3 steps an epoch
    for m in steps:
        parts = [(m[f"train/{n}/loss"], m[f"train/{n}/target_tokens"]) for n in ("a", "b") if f"train/{n}/loss" in m]
        assert sum(t for _, t in parts) == m["target_tokens"]
        assert sum(l * t for l, t in parts) / m["target_tokens"] == pytest.approx(m["loss"], rel=1e-6)
    for m1, m2 in zip(steps, [m for m in metrics(two) if "loss" in m]):
        for k in ("loss", "train/a/loss", "train/b/loss", "train/a/target_tokens"):
            assert m2[k] == pytest.approx(m1[k], rel=1e-5), k
    evals = [m for m in metrics(one) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [0, 2, 4]
    assert all({"eval/va/loss", "eval/vb/loss", "eval/va/exact_match", "eval/vb/exact_match"} <= set(m) for m in evals)
    assert min(evals[0]["eval/va/loss"], evals[0]["eval/vb/loss"]) < evals[0]["eval_loss"] < max(
        evals[0]["eval/va/loss"], evals[0]["eval/vb/loss"])
    alone_evals = [m for m in metrics(alone) if "eval_loss" in m]
    assert [m["eval_loss"] for m in alone_evals] == pytest.approx([m["eval/va/loss"] for m in evals], rel=1e-6)
    assert "eval/va/loss" not in alone_evals[0]  # one set: the plain names only
    assert max_diff(weights(two), weights(one)) < 5e-5

    # resuming the mixture mid-epoch (step 2 of 3) and across the epoch boundary ends where the whole run did
    shutil.rmtree(one / "checkpoint-4")
    (one / "model.safetensors").unlink()
    train(["--output_dir", one, "--validation_files", va, vb, *common, "--resume_from_checkpoint", "true"], sft_cache)
    assert max_diff(weights(one), weights(alone)) == 0.0


def test_two_processes_read_one_cache(tmp_path, sft_cache):
    """Under accelerate launch the first process tokenizes; the other reads (memory-maps) its files."""
    cache = tmp_path / "cache"
    f = write(tmp_path / "d.jsonl", [conv(i) for i in range(16)])
    for run in (1, 2):
        if run == 2:
            os.utime(f, (1, 1))  # a changed file (another mtime) is tokenized again, once
        p = launch("cpu_ddp.yaml", ["--output_dir", tmp_path / f"o{run}", "--train_files", f, "--max_steps", 1,
                                    "--preprocessing_cache_dir", cache, "--per_device_train_batch_size", 4], sft_cache)
        assert p.stderr.count("tokenized d.jsonl: 16 records") == 1
        indexes = sorted(cache.glob("tokenized-*.json"), key=lambda i: i.stat().st_mtime)
        assert len(indexes) == run and len(list(cache.glob("tokenized-*.arrow"))) == run
        # written once, by the first process: the second found the finished cache and read it
        assert json.loads(indexes[-1].read_text())["process"] == 0
