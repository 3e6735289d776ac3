"""Beyond one machine, launched for real: two `accelerate launch` invocations on this machine act as
two nodes (num_machines 2, machine_rank 0 and 1, one process each, gloo), as a cluster's nodes would."""

import os
import signal
import stat
import sys
import time

import pytest

from helpers import (finish, free_port, max_diff, metrics_lines, node_cmd, run_cmd, start, start_nodes, train, two_nodes,
                     uneven_data, wait_for, weights)


# SGD at a constant learning rate: a run stopped and resumed with another --max_steps follows the same
# schedule, and weight differences measure gradient differences (as in test_exactness).
RECIPE = ["--optim", "sgd", "--learning_rate", 0.1, "--lr_scheduler_type", "constant", "--warmup_ratio", 0,
          "--eval_steps", 0, "--max_grad_norm", 0]
NODE_SPLIT = ["--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 2]  # x 2 processes: 8 a step


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, sft_cache):
    """The same 30 steps of global batch 8 in one process: test_exactness proves one node with two
    processes (DDP, ZeRO-2, ZeRO-3) trains these weights within its bound; two nodes must too."""
    out = tmp_path_factory.mktemp("one")
    data = uneven_data(out / "d.jsonl", 40)
    train(["--output_dir", out / "run", "--train_files", data, *RECIPE, "--max_steps", 30,
           "--per_device_train_batch_size", 8], sft_cache)
    return data, out / "run", max_diff(weights(out / "run"), weights_at_start(out, data, sft_cache))


def weights_at_start(out, data, cache):
    train(["--output_dir", out / "init", "--train_files", data, "--max_steps", 1, "--learning_rate", 0, "--optim", "sgd"],
          cache)
    return weights(out / "init")


@pytest.mark.parametrize("config", ["cpu_ddp.yaml", "cpu_zero2.yaml", "cpu_zero3.yaml"])
def test_two_nodes_stop_on_sigterm_resume_and_end_as_one_node_does(tmp_path, sft_cache, one_process, config):
    """SIGTERM to both launchers (a preempted job): each node's process finishes the same step, the
    checkpoint is complete, both exit; resumed on the two nodes, the run ends with the weights of the
    same steps on one node (within test_exactness's split-equivalence bound)."""
    data, reference, change = one_process
    out = tmp_path / "nodes"
    args = ["--train_files", data, *RECIPE, *NODE_SPLIT]
    nodes = start_nodes(config, ["--output_dir", out, *args, "--max_steps", 300], sft_cache)
    wait_for(lambda: metrics_lines(out) >= 3, nodes[0])
    for p in nodes:
        p.send_signal(signal.SIGTERM)
    logs = [text for _, text in finish(nodes, timeout=120)]
    for log in logs:
        assert log.count("SIGTERM: stopped after step") == 1, log[-4000:]
    assert "2 processes on 2 nodes" in logs[0]
    ckpts = list(out.glob("checkpoint-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "checkpoint_complete").is_file(), ckpts
    assert not list(out.glob(".tmp-checkpoint-*"))
    step = int(ckpts[0].name.split("-")[1])
    assert 3 <= step < 30
    logs = two_nodes(config, ["--output_dir", out, *args, "--max_steps", 30, "--resume_from_checkpoint", "true"],
                     sft_cache)
    assert f"at step {step}" in logs[0][1]
    assert change > 1e-3 and max_diff(weights(out), weights(reference)) <= 1e-5 * change


def test_lora_on_two_nodes_merges_with_default_flags(tmp_path, sft_cache):
    """ZeRO-3 over two nodes, LoRA, the default merge: both nodes exit by themselves, and the merged
    model is the one a single process writes (the first process merges alone, outside any collective)."""
    data = uneven_data(tmp_path / "d.jsonl", 16)
    args = ["--train_files", data, *RECIPE, "--learning_rate", 2.0, "--max_steps", 2, "--use_peft", "--lora_r", 4,
            "--lora_dropout", 0, "--ddp_timeout", 120]
    train(["--output_dir", tmp_path / "one", *args, "--per_device_train_batch_size", 8], sft_cache)
    logs = two_nodes("cpu_zero3.yaml", ["--output_dir", tmp_path / "nodes", *args, *NODE_SPLIT], sft_cache)
    assert "merged model written to" in logs[0][1]
    reference = weights(tmp_path / "one" / "merged")
    change = max_diff(reference, weights(tmp_path / "one" / "base_model"))
    assert change > 1e-3 and max_diff(weights(tmp_path / "nodes" / "merged"), reference) <= 1e-5 * change


def test_output_dirs_the_nodes_do_not_share_stop_the_run_before_training(tmp_path, sft_cache):
    """Node-local disks: node 1 sees another directory under --output_dir's name."""
    args = ["--max_steps", 2, "--per_device_train_batch_size", 2]
    results = two_nodes("cpu_ddp.yaml", ["--output_dir", tmp_path / "node0", *args], sft_cache, check=False,
                        node_args={1: ["--output_dir", tmp_path / "node1"]})
    for code, _ in results:
        assert code != 0
    log = results[0][1]
    assert "is not the same directory on every node: node 1 (" in log and "storage every node mounts" in log
    assert "storage.py\", line" not in log  # our message, not a traceback (the launcher adds its own)
    assert not list((tmp_path / "node0").glob("*")) and not (tmp_path / "node1").exists()


def test_node_local_caches_are_refused_or_tokenized_once_per_node(tmp_path, sft_cache):
    """Node 1's cache is another directory: an error naming the node and the flag; with
    --cache_on_each_node true each node tokenizes once into its own cache, and the run trains."""
    data = uneven_data(tmp_path / "d.jsonl", 24)
    caches = {0: tmp_path / "cache0", 1: tmp_path / "cache1"}
    args = ["--train_files", data, "--max_steps", 2, "--per_device_train_batch_size", 2,
            "--validation_split_percentage", 0, "--eval_steps", 0]
    results = two_nodes("cpu_ddp.yaml", ["--output_dir", tmp_path / "a", *args], sft_cache, check=False,
                        node_cache=caches)
    log = results[0][1]
    assert results[0][0] != 0 and "preprocessing cache" in log and "node 1 (" in log and "--cache_on_each_node true" in log
    assert not list(caches[1].glob("tokenized-*"))  # stopped before tokenizing
    two_nodes("cpu_ddp.yaml", ["--output_dir", tmp_path / "b", *args, "--cache_on_each_node", "true"], sft_cache,
              node_cache=caches)
    for cache in caches.values():
        assert len(list(cache.glob("tokenized-*.json"))) == 1, list(cache.iterdir())
    assert (tmp_path / "b" / "model.safetensors").is_file()


def test_nodes_launched_with_different_process_counts_are_named(tmp_path, sft_cache):
    """Node 1's config says 4 processes in all (2 per node), node 0's says 2 (1 per node)."""
    port = free_port()
    args = ["--output_dir", tmp_path / "o", "--max_steps", 1, "--per_device_train_batch_size", 2]
    procs = [start(node_cmd("cpu_ddp.yaml", rank, port, args, processes=n), sft_cache, start_new_session=True)
             for rank, n in ((0, 2), (1, 4))]
    (code, log), _ = finish(procs, timeout=300)
    assert code != 0 and "the nodes run different numbers of processes (node 0" in log and ": 1, node 1 (" in log
    assert ": 2)" in log


def kill_node(p):
    """SIGKILL a node's launcher and its processes at once (torchrun starts them in their own
    sessions), as when a machine is lost."""
    import psutil

    for proc in [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]:
        try:
            proc.kill()
        except psutil.NoSuchProcess:  # already gone with its parent
            pass


def test_a_node_that_dies_ends_the_others_with_a_message_and_the_checkpoint_intact(tmp_path, sft_cache):
    out = tmp_path / "o"
    nodes = start_nodes("cpu_ddp.yaml", ["--output_dir", out, "--max_steps", 300, "--save_steps", 2,
                                         "--per_device_train_batch_size", 2, "--eval_steps", 0,
                                         "--ddp_timeout", 60], sft_cache)
    wait_for(lambda: (out / "checkpoint-2").is_dir() and metrics_lines(out) >= 4, nodes[0])
    kill_node(nodes[1])
    t0 = time.time()
    code, log = finish(nodes[:1], timeout=120)[0]
    nodes[1].wait()
    assert code != 0 and time.time() - t0 < 90
    assert "lost contact with another process" in log and "resume with --resume_from_checkpoint true" in log, log[-3000:]
    ckpt = next(line for line in log.splitlines() if "The last complete checkpoint is" in line)
    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert str(last) in ckpt and (last / "checkpoint_complete").is_file()
    assert weights(last)  # a whole model, readable


@pytest.mark.parametrize("script, config", [("slurm.sbatch", "configs/cpu_ddp.yaml"), ("slurm_torchrun.sbatch", None)])
def test_a_node_that_never_joins_stops_the_shipped_scripts_at_their_join_timeout(tmp_path, sft_cache, script, config):
    """Slurm starts only node 0 of two: each shipped script hands its JOIN_TIMEOUT to the launcher's
    rendezvous, which stops then instead of waiting forever, saying how many nodes joined."""
    fake_slurm(tmp_path / "bin")
    env = {**slurm_env(tmp_path, config), "SRUN_SKIP_NODES": "1", "JOIN_TIMEOUT": "5"}
    t0 = time.time()
    p = run_cmd(["bash", f"launch/{script}", "--output_dir", str(tmp_path / "o"), "--max_steps", "1"], sft_cache,
                check=False, env_extra=env, timeout=300)
    log = (tmp_path / "node0.log").read_text()
    assert p.returncode != 0 and time.time() - t0 < 120, log[-3000:]
    assert "1/2 clients joined" in log, log[-3000:]
    assert not (tmp_path / "node1.log").exists()


def fake_slurm(bin_dir):
    """`srun` running its command once per node with the variables Slurm sets for that task, and
    `scontrol show hostnames` naming two nodes at this machine's address."""
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("""#!/bin/bash
[[ "$1" == --* ]] && shift   # --kill-on-bad-exit=1
pids=()
for node in $(seq 0 $((SLURM_NNODES - 1))); do
  [[ " $SRUN_SKIP_NODES " == *" $node "* ]] && continue   # a node that never starts
  SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" > "$SRUN_LOGS/node$node.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait $pid || status=$?; done
exit $status
""")
    (bin_dir / "scontrol").write_text('#!/bin/bash\nfor i in $(seq 1 $SLURM_NNODES); do echo 127.0.0.1; done\n')
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)


def slurm_env(tmp_path, config):
    """What Slurm sets for a two-node job, with the fake srun and scontrol first on PATH."""
    return {"PATH": f"{tmp_path / 'bin'}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_NNODES": "2", "SLURM_NTASKS": "2",
            "GPUS_PER_NODE": "1", "MAIN_PORT": str(free_port()), "SRUN_LOGS": str(tmp_path),
            **({"CONFIG": config} if config else {})}


@pytest.mark.parametrize("script, config", [("slurm.sbatch", "configs/cpu_ddp.yaml"), ("slurm_torchrun.sbatch", None)])
def test_slurm_scripts_launch_two_nodes_as_shipped(tmp_path, sft_cache, script, config):
    """The shipped batch scripts, run as Slurm runs them on two nodes (srun: one task per node)."""
    fake_slurm(tmp_path / "bin")
    out = tmp_path / "o"
    env = slurm_env(tmp_path, config)
    p = run_cmd(["bash", f"launch/{script}", "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2",
                 "--max_eval_generations", "0"], sft_cache, check=False, env_extra=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:] + "".join(
        f.read_text()[-3000:] for f in tmp_path.glob("node*.log"))
    logs = [(tmp_path / f"node{n}.log").read_text() for n in (0, 1)]
    assert "2 processes on 2 nodes, DDP over gloo" in logs[0]
    assert (out / "model.safetensors").is_file() and (out / "checkpoint-2" / "checkpoint_complete").is_file()
