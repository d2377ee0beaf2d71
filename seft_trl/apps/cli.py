"""``seft-trl``: prune, repair, evaluate and report on sparse causal LMs from one command.

    seft-trl prune  --model_name_or_path DENSE --prune_method wanda --prune_calibration c4.txt --output_dir PRUNED
    seft-trl repair --model_name_or_path PRUNED --dataset_name alpaca.jsonl --output_dir REPAIRED [--config r.yaml]
    seft-trl eval   --model_name_or_path REPAIRED --eval_text wikitext2_test.txt [--eval_tasks boolq rte]
    seft-trl report --model_name_or_path REPAIRED/checkpoint-200
    seft-trl memory --model_name_or_path meta-llama/Llama-2-7b-hf --gpu_memory_gb 24

Each subcommand parses its options with ``TrlParser`` (command line and ``--config`` YAML alike)
from the classes of :mod:`seft_trl.apps.options`, TRL's ``ModelConfig`` and ``SEFTConfig``:
``seft-trl SUBCOMMAND --help`` lists them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from importlib import import_module
from typing import Callable

from .noise import silence_import_noise


@dataclass(frozen=True)
class Command:
    """A subcommand's help line, and where its option classes and its function live.

    The module is imported only when the subcommand runs: it imports torch, transformers and TRL,
    which take seconds, so ``seft-trl --help`` and a mistyped name answer without them.
    """

    help: str
    module: str  # relative to this package
    arguments: str  # the module's tuple of option classes, parsed by TrlParser
    function: str  # the module's function, called with the parsed options

    def load(self) -> tuple[tuple[type, ...], Callable[..., object]]:
        module = import_module(self.module, __package__)
        return getattr(module, self.arguments), getattr(module, self.function)


COMMANDS: dict[str, Command] = {
    "prune": Command("prune a causal LM one-shot (Wanda, SparseGPT, magnitude) into a plain checkpoint",
                     ".prune", "PRUNE_ARGUMENTS", "prune_checkpoint"),
    "repair": Command("prune optionally, repair with SEFT on instruction data, save merged, report",
                      ".recipes", "REPAIR_ARGUMENTS", "repair"),
    "eval": Command("perplexity on a local text and the zero-shot suite of the pruning papers",
                    ".evaluate", "EVAL_ARGUMENTS", "evaluate_checkpoint"),
    "report": Command("sparsity report of a checkpoint folder (merged, pruned or a SEFT checkpoint-N)",
                      ".report", "REPORT_ARGUMENTS", "report_command"),
    "memory": Command("training memory of each repair method for a model and a GPU, and the SEFT density that fits",
                      ".budget", "MEMORY_ARGUMENTS", "memory_command"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {command.help}" for name, command in COMMANDS.items()]
    return "usage: seft-trl {" + ",".join(COMMANDS) + "} [options] [--config FILE.yaml] [--debug]\n\n" + "\n".join(lines) + (
        "\n\nseft-trl SUBCOMMAND --help lists the subcommand's options. An error prints one line; --debug (or "
        f"{DEBUG_ENV}=1) prints its traceback."
    )


# What a user's mistake raises (a bad value, a missing or damaged file): one line and exit status 2.
USER_ERRORS = (ValueError, OSError)
DEBUG_ENV = "SEFT_TRL_DEBUG"


def one_line(error: BaseException) -> str:
    """The error's message on one line (library messages often run over several)."""
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return text or type(error).__name__


def main(argv: list[str] | None = None) -> None:
    """Run a subcommand. An error prints one line (``--debug`` or SEFT_TRL_DEBUG=1: the traceback): exit status 2
    for a user's mistake, 1 for anything else."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.exit(f"seft-trl: unknown subcommand {name!r}\n\n{usage()}")
    silence_import_noise()  # before the subcommand's module imports transformers
    from trl import TrlParser

    chosen = COMMANDS[name]
    classes, command = chosen.load()
    parser = TrlParser(classes, prog=f"seft-trl {name}", description=chosen.help[0].upper() + chosen.help[1:] + ".")
    try:
        command(*parser.parse_args_and_config(rest))
    except Exception as error:  # noqa: BLE001 - every failure ends in one line unless asked for the traceback
        if debug:
            raise
        user = isinstance(error, USER_ERRORS)
        hint = "" if user else f" ({type(error).__name__}; --debug or {DEBUG_ENV}=1 shows the traceback)"
        print(f"seft-trl {name}: error: {one_line(error)}{hint}", file=sys.stderr)
        sys.exit(2 if user else 1)


if __name__ == "__main__":
    main()
