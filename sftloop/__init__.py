"""The infrastructure beneath train_loop.py, one job a module. What a researcher edits stays at the top
level (train_loop.py, batches.py, collate.py, templates.py, chat.py); nothing here imports those
files except the leaf modules templates.py and collate.py (and preflight, which measures the run's
own batches from batches.py).

    args          the flags: dataclasses parsed by HfArgumentParser, YAML/JSON run files
    runtime       the accelerator (DDP, DeepSpeed, FSDP2), cross-process sums, SIGTERM, lost peers
    storage       directories every node must share (output_dir, the token cache)
    sources       what the user named, read and checked, each error with its file and line
    sft_data      records to tokens, cached once per file; the corpus and its mixture plan
    lm_logits     logits at the target positions (whole or chunk by chunk), target counts
    packing       whether packed samples stay apart in a model: refused, or probed before the first step
    router        a mixture-of-experts model's balancing loss over the global batch, and its experts' load
    evaluation    held-out loss, exact match, sample replies
    generation    a reply from a model (evaluation and chat.py)
    loading       the tokenizer and a pretrained model, fitted to each other
    adapters      LoRA/QLoRA through peft: wrap, check, merge (writes nothing)
    checkpoints   the one writer of model directories; checkpoints, resume, the output directory
    logs          metrics.jsonl, trackers, progress lines, MFU
    plot_metrics  the loss and evaluation curves of a run (python -m sftloop.plot_metrics RUN_DIR)
    preflight     --check: the run's set-up and first steps measured, findings before a long run
"""
