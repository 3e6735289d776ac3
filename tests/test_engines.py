"""The engines beside DDP, on CPU: FSDP2 (torch's fully_shard through accelerate's FSDP plugin) and
DeepSpeed with the optimizer (ZeRO-2) or the optimizer and parameters (ZeRO-3) offloaded to CPU memory.
Their split-equivalence with DDP and DeepSpeed is in test_exactness (SPLITS holds FSDP2)."""

import pickle
import shutil

import pytest

from sftloop import checkpoints
from helpers import launch, losses, max_diff, train, uneven_data, weights

ARGS = ["--max_steps", 4, "--save_steps", 2, "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 2,
        "--learning_rate", 1e-3, "--eval_steps", 0]


def full_and_resumed(config, tmp_path, data, cache):
    """A 4-step run saving at step 2, and a run resumed from that checkpoint in a fresh directory."""
    full, cut = tmp_path / f"full-{config}", tmp_path / f"cut-{config}"
    launch(config, ["--output_dir", full, "--train_files", data, *ARGS], cache)
    shutil.copytree(full / "checkpoint-2", cut / "checkpoint-2")
    r = launch(config, ["--output_dir", cut, "--train_files", data, *ARGS, "--resume_from_checkpoint", "true"], cache)
    assert "at step 2" in r.stderr
    return full, cut


def test_fsdp2_saves_whole_models_resumes_exactly_and_refuses_deepspeed_state(tmp_path, sft_cache):
    data = uneven_data(tmp_path / "d.jsonl", 20)
    full, cut = full_and_resumed("cpu_fsdp2.yaml", tmp_path, data, sft_cache)
    assert max_diff(weights(cut), weights(full)) == 0.0
    assert losses(cut) == {s: v for s, v in losses(full).items() if s > 2}
    state = full / "checkpoint-2" / "training_state"
    assert (state / "pytorch_model_fsdp_0").is_dir() and (state / "optimizer_0").is_dir()  # sharded, per process
    one = tmp_path / "one"  # the gathered model.safetensors is the whole model: one process's weights
    train(["--output_dir", one, "--train_files", data, *ARGS, "--per_device_train_batch_size", 8,
           "--gradient_accumulation_steps", 1], sft_cache)
    assert max_diff(weights(full), weights(one)) < 5e-2 * 1e-3
    assert weights(full / "checkpoint-2").keys() == weights(one / "checkpoint-2").keys()

    r = launch("cpu_zero2.yaml", ["--output_dir", tmp_path / "x", "--train_files", data, *ARGS,
                                  "--resume_from_checkpoint", full / "checkpoint-2"], sft_cache, check=False)
    assert r.returncode != 0 and "holds training state written under FSDP, which DeepSpeed cannot load" in r.stderr
    assert f"--model_name_or_path {full / 'checkpoint-2'}" in r.stderr


class Shell:
    def __reduce__(self):
        import os

        return os.system, ("echo pwned",)


def test_fsdp_checkpoint_index_is_unpickled_only_as_plain_records(tmp_path):
    """torch.distributed.checkpoint reads its .metadata with pickle.load: anything beyond its own
    records is refused before it is loaded."""
    meta = tmp_path / "training_state" / "pytorch_model_fsdp_0" / ".metadata"
    meta.parent.mkdir(parents=True)
    meta.write_bytes(pickle.dumps(Shell()))
    with pytest.raises(SystemExit, match=r"refusing to resume from .*\.metadata.*(posix|os)\.system"):
        checkpoints.check_state_is_plain_data(tmp_path / "training_state")


@pytest.mark.parametrize("config", ["cpu_zero2_offload.yaml", "cpu_zero3_offload.yaml"])
def test_offloaded_deepspeed_matches_and_resumes(tmp_path, sft_cache, config):
    """Offloaded, the update is DeepSpeed's CPU Adam's: equal to torch's AdamW without offload within
    Adam's rounding (the bound of test_adamw_splits_agree, where ZeRO-2 and ZeRO-3 without offload
    equal one process); resumed, it continues exactly."""
    data = uneven_data(tmp_path / "d.jsonl", 20)
    full, cut = full_and_resumed(config, tmp_path, data, sft_cache)
    assert max_diff(weights(cut), weights(full)) <= 1e-6
    ref = tmp_path / "ref"
    train(["--output_dir", ref, "--train_files", data, *ARGS, "--per_device_train_batch_size", 8,
           "--gradient_accumulation_steps", 1], sft_cache)
    assert max_diff(weights(full), weights(ref)) < 5e-2 * 1e-3
    for step, loss in losses(ref).items():
        assert losses(full)[step] == pytest.approx(loss, rel=1e-5)
    if config == "cpu_zero2_offload.yaml":  # the reverse refusal: DeepSpeed state under FSDP2
        r = launch("cpu_fsdp2.yaml", ["--output_dir", tmp_path / "x", "--train_files", data, *ARGS,
                                      "--resume_from_checkpoint", full / "checkpoint-2"], sft_cache, check=False)
        assert r.returncode != 0 and "holds training state written under DeepSpeed, which FSDP cannot load" in r.stderr


def test_sgd_with_an_offloaded_optimizer_is_refused(tmp_path, sft_cache):
    """accelerate would replace any optimizer by DeepSpeed's CPU Adam when it is offloaded."""
    r = launch("cpu_zero2_offload.yaml", ["--output_dir", tmp_path / "o", "--optim", "sgd", "--max_steps", 1],
               sft_cache, check=False)
    assert r.returncode != 0 and "--optim sgd" in r.stderr and "offload" in r.stderr
