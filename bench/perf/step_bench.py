"""Step benchmark: training-step time and peak memory of SNELL-8 against LoRA-8, the public code's
layout and the matmul floor, on CPU-sized ViTs; and of SNELL-32 against LoRA-32 and its floor on a few
LLaMA decoder layers at LLaMA-2-7B width (4096 x 11008 matrices, short sequences).

One process, a timm ViT (embed 384, depth 6, 6 heads, patch 8), qkv/proj/fc1/fc2 adapted in every block,
rank 8, s = 0.9, AdamW, in each setting (batch, image size, threads: tokens per step). Each SNELL row is
compared with the LoRA-8 row of the same branch regularisation: both off (SNELL's merged one-matmul
layer), or as in the paper (dropout 0.1 on the branch input for both; drop-path 0.1 for SNELL); and with
full fine-tuning (every weight trained, the dense weight gradients and AdamW on all of them). Every
variant is warmed up, then the variants take turns step by step, so that the machine's drift hits all of
them alike; times are medians. Peak memory is the tensor-level peak of one real step (MemTracker,
``bench.run.measure``); ViT-B/16 rows come from the fake-tensor simulator (``bench.memory.estimate``).

The "matmul floor" row is LoRA-8's step plus the dense matmuls that an exact SNELL step needs beyond
LoRA's, at the same shapes: the gradient of the update (g^T x) for every adapted layer, and where the
branch input is dropped, the branch's forward and input-gradient matmuls (its input differs from the
frozen layer's, so the two cannot share one matmul). No exact SNELL on dense matmuls runs faster.

The LLaMA setting (``--llama-model``, default ``llama_7b_width``: two decoder layers at 7B width, the
7B vocabulary) adapts q, k, v, o, gate, up and down of every layer at rank 32 with the branch
regularisation off, token-id batches of ``--llama-batch`` x ``--llama-seq-len``, the next-token loss.

Writes the record ``perf-step.json``; ``bench.report.measurements`` renders ``perf_step.md`` from it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import pandas as pd
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from bench import step
from bench.memory.estimate import step_memory
from bench.methods import preset_config
from bench.perf.variants import Variant, apply_variant
from bench.records.measurements import write_measurement
from bench.run.measure import tracked_step_memory
from snell.tuners.snell.layer import SnellLinear

PATCH_SIZE = 8


VARIANTS = (
    Variant("full", "full", "off"),
    Variant("lora-8", "lora-8 (no branch dropout)", "off"),
    Variant("snell-8", "snell-8 (no branch dropout)", "off"),
    Variant("reference-8", "snell-8 (no branch dropout)", "off", reference=True),
    Variant("matmul floor", "lora-8 (no branch dropout)", "off", floor="snell-8 (no branch dropout)"),
    Variant("lora-8", "lora-8", "paper"),
    Variant("snell-8", "snell-8", "paper"),
    Variant("reference-8", "snell-8", "paper", reference=True),
    Variant("matmul floor", "lora-8", "paper", floor="snell-8"),
)


LLAMA_VARIANTS = (
    Variant("lora-32", "lora-32 (no branch dropout)", "off"),
    Variant("snell-32", "snell-32 (no branch dropout)", "off"),
    Variant("matmul floor", "lora-32 (no branch dropout)", "off", floor="snell-32 (no branch dropout)"),
)


@dataclass(frozen=True)
class Workload:
    """What every variant of a setting trains on: a fresh backbone (same seed, so the same frozen
    weights), one batch and its loss, and the tokens per step (the floor's matmul shapes)."""

    backbone: Callable[[], nn.Module]
    inputs: Tensor
    labels: Tensor
    tokens: int
    loss_fn: Callable[[object, Tensor], Tensor] = F.cross_entropy


@dataclass(frozen=True)
class Setting:
    batch_size: int
    image_size: int
    threads: int

    @property
    def tokens(self) -> int:
        return self.batch_size * ((self.image_size // PATCH_SIZE) ** 2 + 1)  # patches + cls token

    @property
    def name(self) -> str:
        return f"{self.tokens} tokens, {self.threads} thread{'s' * (self.threads > 1)}"


@dataclass
class Setup:
    variant: Variant
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    step: Callable[[], None]


def cpu_vit(image_size: int, seed: int = 0) -> VisionTransformer:
    """The CPU-sized ViT of the step benchmark (random frozen weights: values do not change the cost)."""
    torch.manual_seed(seed)
    return VisionTransformer(
        img_size=image_size,
        patch_size=PATCH_SIZE,
        embed_dim=384,
        depth=6,
        num_heads=6,
        num_classes=10,
        drop_path_rate=0.0,
    )


def vit_workload(setting: Setting) -> Workload:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(setting.batch_size, 3, setting.image_size, setting.image_size, generator=generator)
    labels = torch.randint(10, (setting.batch_size,), generator=generator)
    return Workload(lambda: cpu_vit(setting.image_size), images, labels, setting.tokens)


def llama_workload(name: str, batch: int, seq_len: int) -> Workload:
    """Random token ids (their own next-token labels) for the named LLaMA shape, random frozen weights."""
    from bench.llm.models import causal_lm_config, create_causal_lm

    vocab = causal_lm_config(name).vocab_size
    ids = torch.randint(vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))

    def backbone() -> nn.Module:
        torch.manual_seed(0)
        return create_causal_lm(name)

    return Workload(backbone, ids, ids, batch * seq_len, step.next_token_loss)


def tuned(variant: Variant, workload: Workload) -> nn.Module:
    model = workload.backbone()
    torch.manual_seed(1)
    return apply_variant(model, variant).train()


def extra_matmuls(snell_model: nn.Module, tokens: int) -> Callable[[], None]:
    """The dense matmuls an exact SNELL step needs beyond LoRA's, at the adapted layers' shapes."""
    work = []
    for layer in snell_model.modules():
        if isinstance(layer, SnellLinear):
            x, g = torch.randn(tokens, layer.in_features), torch.randn(tokens, layer.out_features)
            update = torch.randn(layer.out_features, layer.in_features)
            work.append((x, g, update, not isinstance(layer.dropout, nn.Identity)))

    def run() -> None:
        for x, g, update, branch in work:
            torch.mm(g.T, x)  # the update's gradient
            if branch:  # a dropped input needs the branch's own forward and input-gradient matmuls
                torch.mm(x, update.T)
                torch.mm(g, update)

    return run


def build(variant: Variant, workload: Workload) -> Setup:
    """The model tuned by ``variant`` (same backbone and, for SNELL, same factors in every variant)."""
    if variant.floor is not None:
        lora = build(replace(variant, floor=None), workload)
        snell_model = tuned(replace(variant, preset=variant.floor, floor=None), workload)
        extra = extra_matmuls(snell_model, workload.tokens)
        del snell_model  # only the shapes were needed
        return Setup(variant, lora.model, None, lambda: (lora.step(), extra()))
    model = tuned(variant, workload)
    # one group, torch's default decay (0.01): the optimizer the committed records were timed with
    optimizer = step.build_optimizer(model, lr=1e-3, weight_decay=0.01, decay_groups=False, foreach=True)
    inputs, labels, loss_fn = workload.inputs, workload.labels, workload.loss_fn
    return Setup(
        variant, model, optimizer, lambda: step.train_step(model, optimizer, inputs, labels, loss_fn=loss_fn)
    )


def time_steps(setups: list[Setup], warmup: int, rounds: int, budget_s: float) -> dict[int, dict[str, list]]:
    """Seconds per step, wall-clock and process CPU time, by position in ``setups``: ``warmup`` steps
    each, then up to ``rounds`` rounds in which every variant takes one step in turn, stopping early
    (after 3 rounds) once ``budget_s`` is spent."""
    for setup in setups:
        for _ in range(warmup):
            setup.step()
    times = {i: {"wall": [], "cpu": []} for i in range(len(setups))}
    start = time.perf_counter()
    for done in range(rounds):
        if done >= 3 and time.perf_counter() - start > budget_s:
            break
        for i, setup in enumerate(setups):
            wall, cpu = time.perf_counter(), time.process_time()
            setup.step()
            times[i]["wall"].append(time.perf_counter() - wall)
            times[i]["cpu"].append(time.process_time() - cpu)
    return times


def measure(
    variants: tuple[Variant, ...],
    workload: Workload,
    args: argparse.Namespace,
    *,
    name: str,
    threads: int,
    rounds: int,
) -> list[dict]:
    """One row per variant: median step times and (but for the floor) the MemTracker peak."""
    torch.set_num_threads(threads)
    setups = [build(variant, workload) for variant in variants]
    times = time_steps(setups, args.warmup, rounds, args.budget)
    rows = []
    for i, setup in enumerate(setups):
        memory = (
            None if setup.optimizer is None else tracked_step_memory(setup.model, setup.optimizer, setup.step)
        )
        rows.append({
            "setting": name,
            "tokens": workload.tokens,
            "threads": threads,
            "branch": setup.variant.branch,
            "variant": setup.variant.name,
            "steps": len(times[i]["wall"]),
            "step_s": statistics.median(times[i]["wall"]),
            "cpu_s": statistics.median(times[i]["cpu"]),
            "peak_mib": None if memory is None else memory["peak_mib"],
        })  # fmt: skip
    return rows


def measure_setting(setting: Setting, args: argparse.Namespace) -> list[dict]:
    """The ViT variants in one (batch, image size, threads) setting."""
    return measure(
        VARIANTS, vit_workload(setting), args, name=setting.name, threads=setting.threads, rounds=args.rounds
    )


def measure_llama(args: argparse.Namespace) -> list[dict]:
    """LoRA-32, SNELL-32 and the floor on ``args.llama_model`` (a named LLaMA shape), ``args.llama_rounds``
    timed rounds (a SNELL-32 step at 7B width takes about a minute on a 2-core CPU: its threshold and
    kernel work scale with the 4096 x 11008 matrices, not with the tokens)."""
    workload = llama_workload(args.llama_model, args.llama_batch, args.llama_seq_len)
    threads = f"{args.llama_threads} thread{'s' * (args.llama_threads > 1)}"
    name = f"{args.llama_model}, {workload.tokens} tokens, {threads}"
    return measure(
        LLAMA_VARIANTS, workload, args, name=name, threads=args.llama_threads, rounds=args.llama_rounds
    )


def vit_b16_memory(batches: list[int]) -> pd.DataFrame:
    """Simulated ViT-B/16 step peaks (fake tensors) of LoRA-8 and SNELL-8, with and without dropout."""
    rows = []
    for batch in batches:
        for variant in VARIANTS:
            if variant.reference or variant.floor is not None:
                continue
            estimate = step_memory("vit_base_patch16_224", preset_config(variant.preset), batch)
            rows.append({
                "batch": batch, "branch": variant.branch, "variant": variant.name,
                "peak_mib": estimate.peak_bytes / 2**20,
            })  # fmt: skip
    return pd.DataFrame(rows)


def settings(args: argparse.Namespace) -> list[Setting]:
    """The (batch, image size, threads) settings, one per position of the three lists (checked equal
    in length when the arguments are parsed)."""
    return [Setting(*values) for values in zip(args.batch_sizes, args.image_sizes, args.threads, strict=True)]


def run(args: argparse.Namespace) -> None:
    rows = [row for setting in settings(args) for row in measure_setting(setting, args)]
    tables = {"steps": pd.DataFrame(rows)}
    if args.llama_model:
        tables["llama"] = pd.DataFrame(measure_llama(args))
    if args.vit_b_batch_sizes:
        tables["vit_b16"] = vit_b16_memory(args.vit_b_batch_sizes)
    write_measurement(
        args.results,
        kind="perf-step",
        argv=args.argv,
        settings={"model": "ViT embed 384, depth 6, 6 heads, patch 8", "rank": 8, "sparsity": 0.9},
        tables=tables,
        device=torch.device("cpu"),
    )
