"""Reading files, caching the tokenized data, and which samples form each optimizer step."""

import json
import re

import numpy as np
import pytest

import batches
from sftloop import sft_data, sources
import templates

BELLE = {"conversations": [{"from": "human", "value": "hi"}, {"from": "assistant", "value": "hello there"}]}
OPENAI = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
ALPACA = {"instruction": "Repeat", "input": "abc", "output": "abc"}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def prepare(files, tok, cache, **kw):
    """The usable samples of these sources, in order, as the loop reads them."""
    kw = {"template": "qwen2.5", "max_len": 2048, "system_prompt": None, **kw}
    corpus = sft_data.load_corpus([{"spec": f} for f in files], tok, cache_dir=cache, **kw)
    return sft_data.first_samples(corpus)


def test_reads_json_jsonl_and_parquet_with_all_shapes(tmp_path, qwen_tok):
    import datasets

    a = write_jsonl(tmp_path / "a.jsonl", [BELLE, OPENAI])
    b = tmp_path / "b.json"
    b.write_text(json.dumps([ALPACA]))
    c = tmp_path / "c.parquet"
    datasets.Dataset.from_list([BELLE]).to_parquet(str(c))
    ds = prepare([a, str(b), str(c)], qwen_tok, tmp_path / "cache")
    assert len(ds) == 4
    expected = [templates.encode(templates.to_messages(r), qwen_tok) for r in (BELLE, OPENAI, ALPACA, BELLE)]
    assert [row["input_ids"] for row in ds] == [e["input_ids"] for e in expected]
    assert [row["labels"] for row in ds] == [e["labels"] for e in expected]
    assert [row["sample_id"] for row in ds] == [0, 1, 2, 3]


def test_second_run_reads_the_cache_instead_of_tokenizing(tmp_path, qwen_tok, monkeypatch):
    f = write_jsonl(tmp_path / "d.jsonl", [BELLE, OPENAI] * 5)
    first = prepare([f], qwen_tok, tmp_path / "cache")
    calls = []
    real = templates.encode_rendered
    monkeypatch.setattr(templates, "encode_rendered", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = prepare([f], qwen_tok, tmp_path / "cache")
    assert calls == [] and again == first
    prepare([f], qwen_tok, tmp_path / "cache", max_len=1000)  # other settings: tokenized anew
    assert calls


def test_samples_max_len_cuts_are_left_out_and_counted_and_stop_the_run_only_above_max_cut_share(tmp_path, qwen_tok,
                                                                                                   caplog):
    """One rule (sft_data.max_len_cuts): a sample whose every trained token lies beyond --max_len trains
    nothing and is left out, counted with its place; above --max_cut_share of the samples the run
    stops naming the share, the threshold, the places and the ways out. --skip_invalid_samples, which
    is about malformed records, changes nothing here."""
    long_prompt = {"conversations": [{"from": "human", "value": "word " * 200}, {"from": "assistant", "value": "ok"}]}
    f = write_jsonl(tmp_path / "t.jsonl", [BELLE, long_prompt, OPENAI])
    said = r"--max_len 64 cuts 1 of 3 train samples \(33\.33%\): 1 lose every trained token \(left out\), 0 the end of a " \
           r"trained reply \(trained up to the cut\); the first: .*t\.jsonl:2"
    for skip in (False, True):
        with pytest.raises(sources.DataProblems, match=said + r"\. That is more than --max_cut_share 0\.05: raise "
                           r"--max_len, pass --truncation drop .*, or raise --max_cut_share to train on the rest"):
            prepare([f], qwen_tok, tmp_path / "cache", max_len=64, skip_invalid=skip)
    with caplog.at_level("WARNING", logger="sft"):
        ds = prepare([f], qwen_tok, tmp_path / "cache", max_len=64, max_cut_share=0.4)
    assert [row["sample_id"] for row in ds] == [0, 2]
    assert all(len(row["input_ids"]) <= 64 for row in ds)
    assert re.search(said + r" \(up to --max_cut_share 0\.4 goes on\)", caplog.text)
    with caplog.at_level("WARNING", logger="sft"):  # --truncation drop leaves it out with the other long ones
        ds = prepare([f], qwen_tok, tmp_path / "cache", max_len=64, truncation="drop")
    assert [row["sample_id"] for row in ds] == [0, 2]
    assert "Dropped 1 train sample(s) longer than max_len=64 (--truncation drop)" in caplog.text


def test_a_reply_that_loses_its_end_counts_against_max_cut_share_too(tmp_path, qwen_tok, caplog):
    """A sample cut inside a trained reply keeps its start and trains up to the cut; it counts toward
    --max_cut_share with those cut away entirely, as --check counts it."""
    long_reply = {"conversations": [{"from": "human", "value": "hi"}, {"from": "assistant", "value": "word " * 200}]}
    f = write_jsonl(tmp_path / "t.jsonl", [BELLE, long_reply, OPENAI, BELLE])
    with caplog.at_level("WARNING", logger="sft"):
        corpus = sft_data.load_corpus([{"spec": f}], qwen_tok, template="qwen2.5", max_len=64, system_prompt=None,
                                      cache_dir=tmp_path / "cache", max_cut_share=0.3)
    assert corpus.cut == {"samples": 4, "left_out": 0, "lost_end_of_reply": 1, "share": 0.25, "max_cut_share": 0.3,
                          "first": [f"{f}:2"], "said": corpus.cut["said"]}
    assert sum(len(r) for r in corpus.rows) == 4 and "1 the end of a trained reply" in caplog.text
    with pytest.raises(sources.DataProblems, match="more than --max_cut_share 0.2"):
        sft_data.load_corpus([{"spec": f}], qwen_tok, template="qwen2.5", max_len=64, system_prompt=None,
                             cache_dir=tmp_path / "cache", max_cut_share=0.2)


@pytest.mark.parametrize("content, match", [
    ('{"conversations": [{"from": "human", "value": "q"}, {"from": "assistant", "value": "a"}]}\n{"conv\n', r"t\.jsonl:2: invalid JSON"),
    (json.dumps(BELLE) + "\n" + json.dumps({"conversations": [{"from": "robot", "value": "x"}]}) + "\n", r"t\.jsonl:2: conversations\[0\]: unknown role 'robot'"),
])
def test_bad_lines_are_reported_with_file_and_line(tmp_path, qwen_tok, content, match):
    (tmp_path / "t.jsonl").write_text(content)
    with pytest.raises(sources.DataProblems, match=match):
        prepare([str(tmp_path / "t.jsonl")], qwen_tok, tmp_path / "cache")


def test_missing_file_and_bad_extension(tmp_path, qwen_tok):
    with pytest.raises(sources.DataProblems, match="nope.jsonl: no such file"):
        prepare([str(tmp_path / "nope.jsonl")], qwen_tok, tmp_path / "cache")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(sources.DataProblems, match="unsupported extension '.csv'"):
        prepare([str(tmp_path / "x.csv")], qwen_tok, tmp_path / "cache")


def step_sets(n, seed, per_device, accum, world, steps):
    """The set of sample indices in each optimizer step, gathered over all ranks and micro-batches."""
    out = []
    gb = per_device * accum * world
    for step in range(steps):
        order = batches.epoch_order(n, seed, step // batches.steps_per_epoch(n, gb))
        s = step % batches.steps_per_epoch(n, gb)
        mbs = [batches.step_micro_batches(order, s, gb, r, world, accum) for r in range(world)]
        for rank_mbs in mbs:
            assert len(rank_mbs) == accum and all(len(mb) <= per_device for mb in rank_mbs)
        out.append(sorted(i for rank_mbs in mbs for mb in rank_mbs for i in mb))
    return out


def test_step_composition_depends_only_on_seed_and_global_batch():
    splits = [(8, 1, 1), (2, 4, 1), (4, 1, 2), (2, 2, 2), (1, 2, 4)]
    ref = step_sets(37, 3, *splits[0], steps=12)  # 37 samples: the last step of each epoch is short
    for split in splits[1:]:
        assert step_sets(37, 3, *split, steps=12) == ref
    # each epoch covers every sample exactly once, in a new order
    assert sorted(i for s in ref[:5] for i in s) == list(range(37))
    assert ref[:5] != ref[5:10]
    assert step_sets(37, 4, 8, 1, 1, steps=5) != ref[:5]
    assert np.array_equal(batches.epoch_order(37, 3, 1), batches.epoch_order(37, 3, 1))
