"""Fine-tune MiniCPM-Llama3-V-2.5 or MiniCPM-V 2.6 (LoRA or full) on JSON conversations with images.

Launch (what users run; the launcher reads MODEL, DATA, EVAL_DATA, LLM_TYPE, OUTPUT_DIR, GPUS_PER_NODE, ...):

    cd finetune && sh finetune_lora.sh                        # LoRA, DeepSpeed ZeRO-2, every GPU of the node
    bash finetune/finetune_lora.sh --max_steps 100            # from the repository root; extra flags pass through
    torchrun --nproc_per_node 8 finetune/finetune.py --model_name_or_path openbmb/MiniCPM-Llama3-V-2_5 \\
        --data_path train.json --use_lora true --deepspeed finetune/ds_config_zero2.json --output_dir out

Then load the adapter: `PeftModel.from_pretrained(AutoModel.from_pretrained(base), out_dir)`.

Tested on: CPU with the tiny model (CI: in-process, torchrun DDP, DeepSpeed ZeRO-2/3 over gloo, two nodes on
one host) and 1-2 NVIDIA H200 with the full-size architecture (see bench/).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def _become_the_package() -> None:
    """`import finetune` run from inside finetune/ (upstream's habit: `cd finetune && sh finetune_lora.sh`, then
    the adapter snippet in that directory) finds this file, a top-level module named `finetune`, before the
    package: load the package from this file's folder instead and put it in sys.modules, which is what the
    import statement returns, so `import finetune` and `from finetune.check_data import ...` work there too."""
    import importlib.util

    folder = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location(
        "finetune", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules["finetune"] = package  # before it runs: its own relative imports need it
    try:
        spec.loader.exec_module(package)
    except BaseException:
        del sys.modules["finetune"]
        raise


# Imported as a top-level module through the current directory; or run as a script (`torchrun finetune/finetune.py`,
# finetune/ first on sys.path), where `import finetune` would find this file too: either way the package of this
# file's folder is what `finetune` means from here on, installed or not.
if __name__ == "finetune" or (__package__ in (None, "") and "finetune" not in sys.modules):
    _become_the_package()

from finetune.arguments import UsageError  # noqa: E402
from finetune.distributed import stop_with_launcher  # noqa: E402

PREFLIGHT = "--preflight"


def main() -> None:
    """Train with the command line; or, with --preflight first, only check it (finetune.preflight) and exit 0."""
    stop_with_launcher()  # a worker must not train on, orphaned, after torchrun is killed
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        if sys.argv[1:2] == [PREFLIGHT]:
            from finetune.preflight import preflight

            preflight(sys.argv[2:])
            return
        # The model's modules are imported only here: the preflight does not need them.
        from finetune.train import train

        train(sys.argv[1:])
    except UsageError as error:
        print(f"finetune.py: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
