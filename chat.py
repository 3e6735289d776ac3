"""Talk with a saved model in the terminal, rendered with the chat template it was trained with.

    python chat.py output/                       # greedy
    python chat.py output/ --temperature 0.7 --top_p 0.9 --max_new_tokens 256
    python chat.py output/ --tools tools.json    # the model may call these functions

Type a message and press Enter; the reply streams as it is generated and stops at the end-of-turn
token. A line that ends with a backslash continues the message on the next line (for a task whose
words go on a line of their own: "Reverse the words:\" Enter "stone paper sun" Enter). /reset starts
a new conversation, /exit (or Ctrl-D) quits. Piped input works the same way, a message per line.

With --tools (a JSON list of function schemas, as in the training data's `tools`), the template
renders them, each tool call the model makes is shown as `call> name {arguments}`, and `/tool TEXT`
answers with the function's result (a tool turn), after which the model goes on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sftloop import generation


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", help="a directory written by train_loop.py (or any HF chat model directory); "
                    "a LoRA adapter directory loads its base model from the path in its adapter_config.json")
    ap.add_argument("--system_prompt", default=None,
                    help="system prompt (default: the one the model was trained with, as its chat template says)")
    ap.add_argument("--max_new_tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--trust_remote_code", action="store_true")
    ap.add_argument("--tools", default=None, help="a JSON file holding a list of function schemas the model may call")
    args = ap.parse_args(argv)
    tools = read_tools(args.tools) if args.tools else None

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer, logging

    logging.set_verbosity_error()
    d = Path(args.model_dir)
    if not (d / "config.json").is_file() and not (d / "adapter_config.json").is_file():
        raise SystemExit(f"error: {args.model_dir} is not a model directory (no config.json) nor a LoRA adapter "
                         "directory (no adapter_config.json)")
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, trust_remote_code=args.trust_remote_code)
    if not tokenizer.chat_template:
        raise SystemExit(f"error: the tokenizer in {args.model_dir} has no chat template")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, use_safetensors=True,
                                                 trust_remote_code=args.trust_remote_code).to(device).eval()
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt is not None else []
    history = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Enter sends; end a line with \\ to go on on the next line; /reset starts over, /exit quits.")
    while True:
        line = read_message(interactive)
        if line is None or line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = list(system)
            continue
        if not line.strip():
            continue
        if line.startswith("/tool "):
            if not history or not (history[-1].get("tool_calls") or history[-1]["role"] == "tool"):
                print("(no tool call to answer)")
                continue
            history.append({"role": "tool", "content": line[len("/tool "):]})
        else:
            history.append({"role": "user", "content": line})
        print("model> ", end="", flush=True)
        answer, = generation.generate(model, tokenizer, [generation.prompt_ids(tokenizer, history, tools)],
                                      args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                      streamer=streamer)
        history.append(generation.parse_reply(answer))
        for call in history[-1].get("tool_calls", []):
            print(f"call> {call['function']['name']} {json.dumps(call['function']['arguments'], ensure_ascii=False)}")


def read_tools(path: str) -> list:
    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --tools {path}: {e}") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise SystemExit(f"error: --tools {path}: expected a JSON list of function schemas (objects)")
    return tools


def read_message(interactive: bool) -> str | None:
    """One message: a line, continued on the next while it ends with a backslash; None at the end of input."""
    lines: list[str] = []
    while True:
        try:
            line = input(("you> " if not lines else "...> ") if interactive else "")
        except EOFError:
            return "\n".join(lines) if lines else None
        if not line.endswith("\\"):
            return "\n".join(lines + [line])
        lines.append(line[:-1])


if __name__ == "__main__":
    main()
