"""Which config for which hardware: the memory of the model states (weights, gradients, AdamW state)
per GPU and in CPU memory, for Qwen2.5-1.5B and 7B full fine-tuning in bf16, computed with
DeepSpeed's own estimators (deepspeed.runtime.zero.*.estimate_zero*_model_states_mem_needs) from
the models' exact parameter counts (built on the meta device: nothing downloaded, no memory used).

    python -m bench.memory_plan          # prints a Markdown table (docs/distributed.md, "Which config")

Activations come on top and depend on batch and sequence length (--gradient_checkpointing cuts them).
FSDP2 (configs/fsdp2.yaml) shards like ZeRO-3: the same per-GPU figure.
"""

from __future__ import annotations



# Qwen2.5's published configurations (config.json of Qwen/Qwen2.5-1.5B and Qwen/Qwen2.5-7B).
MODELS = {
    "Qwen2.5-1.5B": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "Qwen2.5-7B": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}

# (name, config, GPUs per node, nodes, ZeRO stage, optimizer offloaded, parameters offloaded)
SETTINGS = [
    ("1 GPU, DDP (no sharding)", "python train_loop.py / any config", 1, 1, 2, False, False),
    ("1 GPU, ZeRO-2 + optimizer offload", "configs/zero2_offload.yaml", 1, 1, 2, True, False),
    ("1 GPU, ZeRO-3 + optimizer and parameter offload", "configs/zero3_offload.yaml", 1, 1, 3, True, True),
    ("1 node x 8 GPUs, ZeRO-2", "configs/multi_node_zero2.yaml with num_machines 1", 8, 1, 2, False, False),
    ("1 node x 8 GPUs, ZeRO-3 or FSDP2", "configs/zero3.yaml, configs/fsdp2.yaml", 8, 1, 3, False, False),
    ("2 nodes x 8 GPUs, ZeRO-2", "configs/multi_node_zero2.yaml", 8, 2, 2, False, False),
    ("2 nodes x 8 GPUs, ZeRO-3", "configs/multi_node_zero2.yaml with zero_stage 3", 8, 2, 3, False, False),
]


def counts(shape: dict) -> tuple[int, int]:
    """(parameters, largest layer's parameters) of a Qwen2 model of this shape."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape))
    total = sum(dict((id(p), p.numel()) for p in model.parameters()).values())  # tied weights once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def main() -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    sizes = {name: counts(shape) for name, shape in MODELS.items()}
    print("| setting | config | " + " | ".join(f"{n} ({sizes[n][0] / 1e9:.2f}B): per GPU / CPU" for n in MODELS) + " |")
    print("|---|---|" + "---|" * len(MODELS))
    for name, config, gpus, nodes, stage, off_opt, off_param in SETTINGS:
        cells = []
        for model in MODELS:
            total, largest = sizes[model]
            if stage == 2:
                cpu, gpu = estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=off_opt)
            else:  # zero3_init_flag false in our configs: each process first builds the whole model in CPU memory
                cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload=off_opt,
                                                                    cpu_offload_params=off_param, zero_init=False)
            cells.append(f"{gpu / 2**30:.1f} GB / {cpu / 2**30:.0f} GB")
        print(f"| {name} | {config} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
