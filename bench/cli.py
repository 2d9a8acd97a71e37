"""``python -m bench <command>``: one entry point, each command implemented by its own module."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "sweep": ("bench.runner", "run a sweep file (YAML): train, measure and record every run, then report"),
    "report": ("bench.report", "rebuild tables and figures from existing records"),
    "pretrain": ("bench.pretrain", "pretrain the embedded ViT backbone on MNIST (the committed asset)"),
    "memory": ("bench.memory", "estimate the peak memory of one training step without allocating it"),
    "memory-sweep": ("bench.memory_sweep", "memory estimates over models x batches x methods, with figures"),
    "perf-step": ("bench.perf_step", "step time and memory ratios: snell vs lora vs the reference SNELL"),
    "gpu-check": (
        "bench.gpu_check",
        "real CUDA peak memory and step time of full / LoRA / SNELL on ViT-B/16",
    ),
    "notebooks": ("bench.notebooks", "execute the ablation notebooks"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "usage: python -m bench <command> [options]\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        sys.exit(f"unknown command {command!r}; allowed: {', '.join(COMMANDS)}\n\n{usage()}")
    importlib.import_module(COMMANDS[command][0]).main(rest)
