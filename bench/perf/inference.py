"""Inference after merge: images per second of the merged model against the frozen backbone and the
unmerged adapter, side by side (the paper's claim: SNELL, like LoRA, adds no inference cost once merged).

Each adapter's factors are set to random values first (a freshly initialised LoRA-8 has a zero update,
which would make its merge trivial); ``snell.merge`` then folds them into plain ``nn.Linear`` weights.
The models are warmed up, then take turns batch by batch under ``torch.inference_mode`` (``rounds``
rounds, in a new random order each; each model's time is the median of its rounds), so drift on the
machine and what ran just before hit them alike. The table also gives each merged model's largest
output difference from its unmerged adapter.

On the CPU (``make perf``): the step benchmark's ViT (embed 384, depth 6, patch 8) at 64 px, batch 32,
one thread (its first setting, 2080 tokens); ``bench.perf.gpu_check`` adds the same table for
ViT-B/16 on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from collections.abc import Callable

import pandas as pd
import torch
from torch import Tensor, nn

import snell
from bench.methods import preset_config
from bench.perf.step_bench import cpu_vit
from bench.records.measurements import write_measurement

PRESETS = ("snell-8", "lora-8")
"""The adapters timed merged and unmerged (labels of ``bench.methods.METHOD_PRESETS``)."""


def with_random_update(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every trainable adapter parameter set to small random values (an update to fold in), in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "head" not in name:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator).to(param))
    return model


def inference_models(
    backbone: Callable[[], nn.Module], presets: tuple[str, ...] = PRESETS
) -> dict[str, nn.Module]:
    """The frozen backbone, then per preset the unmerged adapter and its merged copy, all in eval mode."""
    models = {"frozen": backbone()}
    for preset in presets:
        unmerged = backbone()
        snell.apply_method(unmerged, preset_config(preset))
        with_random_update(unmerged)
        models[f"{preset} unmerged"] = unmerged
        models[f"{preset} merged"] = snell.merge(copy.deepcopy(unmerged))
    return {name: model.eval() for name, model in models.items()}


def _forward(model: nn.Module, images: Tensor) -> float:
    """Seconds of one synchronised forward pass."""
    tic = time.perf_counter()
    model(images)
    if images.is_cuda:
        torch.cuda.synchronize(images.device)
    return time.perf_counter() - tic


@torch.inference_mode()
def images_per_second(models: dict[str, nn.Module], images: Tensor, warmup: int, rounds: int) -> pd.DataFrame:
    """Per model: median forward time over ``rounds`` interleaved rounds, images per second, the ratio to
    the frozen backbone's, and (merged models) the largest output difference from the unmerged adapter."""
    for model in models.values():
        for _ in range(warmup):
            _forward(model, images)
    times = {name: [] for name in models}
    order = random.Random(0)
    for _ in range(rounds):  # a new order each round: no model always goes first or follows another
        for name in order.sample(list(models), len(models)):
            times[name].append(_forward(models[name], images))
    outputs = {name: model(images).float() for name, model in models.items()}
    frozen = statistics.median(times["frozen"])
    rows = []
    for name, seconds in times.items():
        median = statistics.median(seconds)
        unmerged = name.replace(" merged", " unmerged")
        rows.append({
            "model": name,
            "rounds": len(seconds),
            "forward_s": median,
            "images_per_s": len(images) / median,
            "vs_frozen": frozen / median,
            "max_abs_diff": (
                (outputs[name] - outputs[unmerged]).abs().max().item() if name.endswith(" merged") else None
            ),
        })  # fmt: skip
    return pd.DataFrame(rows)


def run(args: argparse.Namespace) -> None:
    """Time the CPU models and write the record ``perf-inference.json``."""
    torch.set_num_threads(args.threads)
    images = torch.randn(
        args.batch_size, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0)
    )
    models = inference_models(lambda: cpu_vit(args.image_size))
    table = images_per_second(models, images, args.warmup, args.rounds)
    table.insert(0, "threads", args.threads)
    table.insert(0, "batch", args.batch_size)
    write_measurement(
        args.results,
        kind="perf-inference",
        argv=args.argv,
        settings={"image_size": args.image_size, "warmup": args.warmup, "presets": list(PRESETS)},
        tables={"inference": table},
        device=torch.device("cpu"),
    )
