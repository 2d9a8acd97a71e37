"""Every ``python -m bench`` command's arguments, in a module that imports nothing heavy.

``python -m bench <command>`` parses here first, so ``--help`` and a bad option answer at once
(well under a second), before torch, timm or pandas are imported; the command's module then runs on the
parsed arguments (``run(args)``), and ``bench.cli`` renders the report its ``Command`` names. Only
``bench.cli`` imports this module; the constants the parsers show (model names, notebook names) live in
``bench.settings``, where the command modules import them from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.records.records import check_results_folder
from bench.settings import (
    ATTENTIONS,
    CHECKPOINTING,
    EMBEDDED_BACKBONE,
    EMBEDDED_WEIGHTS,
    FROZEN_DTYPES,
    GPU_CHECK_RECORD,
    LLM_MEMORY_BATCH_SIZE,
    LLM_MEMORY_METHODS,
    LLM_MEMORY_MODELS,
    LLM_MEMORY_SEQ_LEN,
    MEMORY_BATCH_SIZES,
    MEMORY_MODELS,
    NOTEBOOK_RESULTS_ENV,
    NOTEBOOK_SMALL_ENV,
    NOTEBOOKS,
    PRECISIONS,
    SLURM_KEYS,
    TIMELINE_METHODS,
)


def positive(text: str) -> int:
    """An integer >= 1 (sizes, counts of steps, threads, seconds); argparse names the bad value."""
    return _at_least(text, 1)


def count(text: str) -> int:
    """An integer >= 0 (warm-up steps)."""
    return _at_least(text, 0)


def _at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"{text!r}: give an integer >= {low}")
    return value


def seconds(text: str) -> float:
    """A number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds > 0")
    return value


def device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``."""
    if text in ("cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: allowed: cpu, cuda, cuda:N")


def workers(text: str) -> int:
    """``--workers``: 1 runs in this process, N > 1 that many worker processes; 0 or less is an error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give 1 (run in this process) or more (that many worker processes)"
        )
    return value


def _sweep(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", type=Path, help="sweep file (YAML), e.g. bench/presets/default.yaml")
    p.add_argument("--results", type=Path, default=Path("results"), help="results folder (records, tables)")
    p.add_argument(
        "--workers",
        type=workers,
        default=2,
        help="worker processes, each with cores / workers torch threads (1: in this process; default 2)",
    )
    p.add_argument(
        "--executor", choices=("local", "submitit"), default="local", help="submitit: one SLURM job per run"
    )
    p.add_argument("--retry-failed", action="store_true", help="rerun runs recorded as failed")
    p.add_argument("--no-report", action="store_true", help="skip building tables and figures")
    p.add_argument("--dry-run", action="store_true", help="validate and list the runs, run nothing")
    group = p.add_argument_group("--executor submitit", "job settings override the sweep file's slurm:")
    group.add_argument(
        "--cluster",
        choices=("slurm", "local"),
        default="slurm",
        help="local: run the jobs as local processes, all at once (to try it without SLURM)",
    )
    group.add_argument("--no-wait", action="store_true", help="submit, print the job ids and exit")
    group.add_argument("--watch", action="store_true", help="submit nothing; show a bar over the records")
    group.add_argument(
        "--steal-claims",
        action="store_true",
        help="delete claims left by killed jobs before submitting (nothing else may use --results)",
    )
    for key, kind in SLURM_KEYS.items():
        if kind is not list:
            group.add_argument(f"--{key.replace('_', '-')}", type=kind, metavar=kind.__name__.upper())


def _report(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", type=Path, default=Path("results"))


def _pretrain(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=positive, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive, default=1, help="torch CPU threads")
    p.add_argument(
        "--out", type=Path, default=EMBEDDED_WEIGHTS, help="safetensors file; recipe json beside it"
    )


def _memory(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="timm model name, e.g. vit_base_patch16_224, or a causal LM of bench.llm.models, e.g. llama2_7b "
        "(random weights)",
    )
    p.add_argument("--method", default="lora", help="a registered method (snell.list_methods())")
    p.add_argument("--options", type=json.loads, default={}, help='method options as JSON: {"rank": 8}')
    p.add_argument("--batch-size", type=positive, default=8)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16 = bf16 autocast")
    p.add_argument("--img-size", type=positive, default=None, help="override the model's input size")
    p.add_argument("--num-classes", type=positive, default=100)
    p.add_argument(
        "--attention",
        choices=ATTENTIONS,
        default="fused",
        help="fused: timm's default; explicit: softmax(q k^T) v as the public SNELL / GPS code computes it",
    )
    p.add_argument(
        "--seq-len", type=positive, default=None, help="tokens per sample (causal LMs only; required)"
    )
    p.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute each decoder layer (causal LMs only)"
    )
    p.add_argument(
        "--frozen-dtype",
        choices=FROZEN_DTYPES,
        default="fp32",
        help="storage of the frozen weights (trainable ones are float32)",
    )
    p.add_argument(
        "--measure",
        choices=("cpu", "cuda"),
        help="also run the step for real on this device and print the measured peak beside the estimate",
    )


def _llm_memory(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", type=Path, default=Path("results/memory"), help="output directory")
    p.add_argument("--models", nargs="+", choices=list(LLM_MEMORY_MODELS), default=list(LLM_MEMORY_MODELS))
    p.add_argument(
        "--methods",
        nargs="+",
        choices=LLM_MEMORY_METHODS,
        default=list(LLM_MEMORY_METHODS),
        metavar="PRESET",
        help=f"presets of bench.methods (default: all of {', '.join(LLM_MEMORY_METHODS)})",
    )
    p.add_argument("--batch-size", type=positive, default=LLM_MEMORY_BATCH_SIZE)
    p.add_argument("--seq-len", type=positive, default=LLM_MEMORY_SEQ_LEN, help="tokens per sample")
    p.add_argument("--checkpointing", nargs="+", choices=CHECKPOINTING, default=list(CHECKPOINTING))
    p.add_argument("--precision", choices=PRECISIONS, default="bf16", help="bf16 = bf16 autocast")
    p.add_argument(
        "--frozen-dtype",
        choices=FROZEN_DTYPES,
        default="bf16",
        help="storage of the frozen weights (trainable ones are float32: mixed precision's master weights)",
    )
    p.add_argument(
        "--attention",
        choices=ATTENTIONS,
        default="fused",
        help="fused: transformers' sdpa (its default); explicit: its eager softmax(q k^T) v",
    )
    p.add_argument("--workers", type=workers, default=min(2, os.cpu_count() or 1), help="processes")


def _check_gpu_check(args: argparse.Namespace) -> None:
    """The small models of a try on the CPU (``--device cpu``), unless others are named."""
    on_cpu = args.device == "cpu"
    args.model = args.model or (EMBEDDED_BACKBONE if on_cpu else "vit_base_patch16_224")
    if on_cpu and args.llama_model == "llama2_7b":
        args.llama_model = "llama_tiny"


def _check_report(args: argparse.Namespace) -> None:
    if not args.results.is_dir():
        raise ValueError(f"--results {args.results}: no such folder (run a sweep or a measurement first)")


def _memory_sweep(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", type=Path, default=Path("results/memory"), help="output directory")
    p.add_argument("--models", nargs="+", choices=list(MEMORY_MODELS), default=list(MEMORY_MODELS))
    p.add_argument("--batch-sizes", nargs="+", type=positive, default=list(MEMORY_BATCH_SIZES))
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16 = bf16 autocast")
    p.add_argument(
        "--attention",
        nargs="+",
        choices=ATTENTIONS,
        default=["explicit", "fused"],
        help="explicit: as the public SNELL / GPS code (the paper's figures); fused: timm's default",
    )
    p.add_argument("--workers", type=workers, default=min(2, os.cpu_count() or 1), help="processes")
    p.add_argument("--measure", action="store_true", help="also measure every point on the GPU (needs CUDA)")
    p.add_argument(
        "--gpu-check",
        type=Path,
        default=Path(GPU_CHECK_RECORD),
        help="a `bench gpu-check` record whose CUDA peaks the report puts beside the estimates, if it exists",
    )


def _memory_timeline(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", type=Path, default=Path("results/memory"), help="output directory")
    p.add_argument("--backbone", default="vit_base_patch16_224", help="timm model name (random weights)")
    p.add_argument("--batch-size", type=positive, default=8)
    p.add_argument(
        "--methods",
        nargs="+",
        choices=TIMELINE_METHODS,
        default=list(TIMELINE_METHODS),
        help="full; lora, snell: rank 8; gps (the presets full, lora-8, snell-8, gps of bench.methods)",
    )
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16 = bf16 autocast")
    p.add_argument(
        "--attention",
        choices=ATTENTIONS,
        default="explicit",
        help="explicit: as the public SNELL / GPS code (the paper's figures); fused: timm's default",
    )


def _check_memory_timeline(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1")


def _perf_step(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--results", type=Path, default=Path("results/perf"), help="output folder (CSV + markdown)"
    )
    p.add_argument("--batch-sizes", type=positive, nargs="+", default=[32, 16], help="one per setting")
    p.add_argument(
        "--image-sizes", type=positive, nargs="+", default=[64, 128], help="pixels, one per setting"
    )
    p.add_argument(
        "--threads", type=positive, nargs="+", default=[1, 2], help="torch intra-op threads, per setting"
    )
    p.add_argument("--warmup", type=count, default=1, help="untimed steps per variant")
    p.add_argument("--rounds", type=positive, default=9, help="timed steps per variant, at most")
    p.add_argument("--budget", type=seconds, default=150.0, help="seconds of timed rounds, after 3 rounds")
    _llama_arguments(p, "llama_7b_width", batch=1, seq_len=64, where="the LLaMA setting")
    p.add_argument("--llama-threads", type=positive, default=2, help="torch threads in the LLaMA setting")
    p.add_argument("--llama-rounds", type=positive, default=2, help="timed steps per variant, LLaMA setting")
    p.add_argument(
        "--vit-b-batch-sizes",
        type=positive,
        nargs="*",
        default=list(MEMORY_BATCH_SIZES),
        help="ViT-B/16 simulator batches (none: skip)",
    )


def _llama_arguments(p: argparse.ArgumentParser, model: str, *, batch: int, seq_len: int, where: str) -> None:
    """--llama-model (a named shape of bench.llm.models; '' skips), --llama-batch, --llama-seq-len."""
    p.add_argument("--llama-model", default=model, help=f"named LLaMA shape of {where}; '' skips it")
    p.add_argument("--llama-batch", type=positive, default=batch, help="sequences per step, LLaMA")
    p.add_argument("--llama-seq-len", type=positive, default=seq_len, help="tokens per sequence, LLaMA")


def _gpu_check(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--results", type=Path, default=Path("results/gpu"), help="output folder (record + markdown)"
    )
    p.add_argument("--batch-sizes", type=positive, nargs="+", default=list(MEMORY_BATCH_SIZES))
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--warmup", type=count, default=3, help="untimed steps per variant")
    p.add_argument("--steps", type=positive, default=20, help="timed steps per variant (median)")
    p.add_argument("--commit", help="the git commit measured (a device machine's copy has no git metadata)")
    p.add_argument(
        "--model",
        help=f"timm model (random weights); default vit_base_patch16_224, {EMBEDDED_BACKBONE} on cpu",
    )
    p.add_argument(
        "--device", type=device, default="cuda", help="cuda, or cpu for a try of the script on a small model"
    )
    _llama_arguments(
        p, "llama2_7b", batch=16, seq_len=256, where="the bf16 LLaMA rows (with --device cpu: llama_tiny)"
    )


def _perf_inference(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--results", type=Path, default=Path("results/perf"), help="output folder (record + markdown)"
    )
    p.add_argument("--batch-size", type=positive, default=32, help="images per forward pass")
    p.add_argument(
        "--image-size", type=positive, default=64, help="pixels (the step benchmark's ViT, patch 8)"
    )
    p.add_argument("--threads", type=positive, default=1, help="torch intra-op threads")
    p.add_argument("--warmup", type=count, default=2, help="untimed forward passes per model")
    p.add_argument("--rounds", type=positive, default=41, help="timed forward passes per model, taking turns")


def _gpu_smoke(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--results", type=Path, default=Path("results/gpu"), help="output folder (record + markdown)"
    )
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--commit", help="the git commit checked (a device machine's copy has no git metadata)")
    p.add_argument(
        "--device",
        type=device,
        default="cuda",
        help="cuda, or cpu: the CUDA code path on a one-block ViT, the fused ops in Triton's interpreter "
        "(TRITON_INTERPRET=1)",
    )


def _fused_compile(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--results", type=Path, default=Path("results/gpu"), help="output folder (record + markdown)"
    )
    p.add_argument("--workers", type=workers, default=2, help="compiling processes (1: in this process)")
    p.add_argument("--commit", help="the git commit compiled (default: this checkout's)")


def _notebooks(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", help=f"which notebooks (name or prefix); default: all of {NOTEBOOKS}")
    p.add_argument("--in-place", action="store_true", help="store outputs in the notebooks themselves")
    p.add_argument("--small", action="store_true", help=f"small workload ({NOTEBOOK_SMALL_ENV}=1), for tests")
    p.add_argument("--out", type=Path, help="write the executed copies to this folder")
    p.add_argument(
        "--results", type=Path, help=f"benchmark results for notebook 2 (sets {NOTEBOOK_RESULTS_ENV})"
    )
    p.add_argument("--timeout", type=positive, default=1800, help="seconds allowed per cell")


def _check_perf_step(args: argparse.Namespace) -> None:
    lengths = {len(args.batch_sizes), len(args.image_sizes), len(args.threads)}
    if len(lengths) != 1:
        raise ValueError(
            f"--batch-sizes {args.batch_sizes}, --image-sizes {args.image_sizes} and --threads "
            f"{args.threads} must have the same length (one value each per setting)"
        )


def _check_sweep(args: argparse.Namespace) -> None:
    if not args.dry_run and args.executor == "local":
        check_results_folder(args.results)


ACCURACY_REPORT = "accuracy"
"""``Command.report`` of the sweep: the accuracy report of ``<results>/records`` (tables, figures, the
results page; ``bench.report.build.build_report``) unless ``--no-report``, then a non-zero exit if any of
the sweep's runs failed. The sweep's ``run`` returns the recorded status of each of its runs, or None when
there is nothing to report yet (a dry run, jobs submitted without waiting)."""


@dataclass(frozen=True)
class Command:
    """One ``python -m bench`` command: the module that runs it, a one-line help, its arguments, the
    checks that need no heavy import (run before the module is imported) and what ``bench.cli`` renders
    from ``args.results`` once the module's ``run(args)`` has returned.

    ``report``: the measurement kinds (``bench.records.measurements.KINDS``) whose reports are rendered
    and printed, or ``(ACCURACY_REPORT,)``; ``()``: none. A measurement command's ``run`` returns None, or
    a failure message to exit with (non-zero) once its report is written.
    """

    module: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    check: Callable[[argparse.Namespace], None] | None = None
    report: tuple[str, ...] = ()


COMMANDS = {
    "sweep": Command(
        "bench.run.runner",
        "run a sweep file (YAML): train, measure and record every run, then report",
        _sweep,
        _check_sweep,
        report=(ACCURACY_REPORT,),
    ),
    "report": Command(
        "bench.report.build", "rebuild tables and figures from existing records", _report, _check_report
    ),
    "pretrain": Command(
        "bench.pretrain", "pretrain the embedded ViT backbone on MNIST (the committed asset)", _pretrain
    ),
    "memory": Command(
        "bench.memory.estimate",
        "estimate the peak memory of one training step without allocating it",
        _memory,
    ),
    "memory-sweep": Command(
        "bench.memory.sweep",
        "memory estimates over models x batches x methods, with figures",
        _memory_sweep,
        report=("memory-sweep",),
    ),
    "memory-timeline": Command(
        "bench.memory.timeline",
        "allocated memory through one training step (forward, backward, optimizer) per method, with a figure",
        _memory_timeline,
        _check_memory_timeline,
        report=("memory-timeline",),
    ),
    "llm-memory": Command(
        "bench.memory.llm_sweep",
        "memory estimates of LLaMA-2-7B / -13B under the commonsense recipe, per method and checkpointing",
        _llm_memory,
        report=("llm-memory",),
    ),
    "perf-step": Command(
        "bench.perf.step_bench",
        "step time and memory ratios: snell vs lora vs the reference SNELL",
        _perf_step,
        _check_perf_step,
        report=("perf-step",),
    ),
    "perf-inference": Command(
        "bench.perf.inference",
        "images per second of merged SNELL-8 / LoRA-8 against the frozen backbone and the unmerged adapter",
        _perf_inference,
        report=("perf-inference",),
    ),
    "gpu-check": Command(
        "bench.perf.gpu_check",
        "real CUDA peak memory and step time of full / LoRA / SNELL on ViT-B/16",
        _gpu_check,
        _check_gpu_check,
        report=("gpu-check",),
    ),
    "gpu-smoke": Command(
        "bench.perf.gpu_smoke",
        "fused ops against a reference and one LoRA-8 / SNELL-8 step on ViT-B/16: run before gpu-check",
        _gpu_smoke,
        report=("gpu-smoke",),
    ),
    "fused-compile": Command(
        "bench.perf.fused_compile",
        "compile every fused Triton kernel for sm_80 and sm_90, no GPU needed: registers, spills, shared",
        _fused_compile,
        report=("fused-compile",),
    ),
    "notebooks": Command("bench.notebooks", "execute the ablation notebooks", _notebooks),
}


def parse(command: str, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``python -m bench <command> <argv>``; ``args.argv`` keeps the arguments as given."""
    spec = COMMANDS[command]
    parser = argparse.ArgumentParser(prog=f"python -m bench {command}", description=spec.help)
    spec.arguments(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if spec.check is not None:
        try:
            spec.check(args)
        except ValueError as err:
            sys.exit(str(err))
    return args
