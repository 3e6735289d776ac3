"""Builds DeepSpeed's two CPU ops for this environment, once: CPU Adam (what ZeRO with an offloaded
optimizer steps with) and the shared-memory communication op (which DeepSpeed loads in every CPU
process it starts). DeepSpeed otherwise compiles each on first use, inside a run, a minute or more
each on 2 cores; this is the same JIT build done ahead, into the same cache (~/.cache/torch_extensions
or $TORCH_EXTENSIONS_DIR), as DeepSpeed's docs advise with DS_BUILD_OPS at install time.

    python -m tools.build_ops
"""

import time


def main() -> None:
    from deepspeed.accelerator import get_accelerator

    for name in ("CPUAdamBuilder", "ShareMemCommBuilder"):
        began = time.perf_counter()
        get_accelerator().create_op_builder(name).load(verbose=False)
        print(f"{name}: ready ({time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    main()
