"""Train and evaluate one run: backbone + tuning method + task, with measurements along the way."""

from __future__ import annotations

import functools
import itertools
import math
import tempfile
import time
from dataclasses import dataclass

import torch
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import snell
from bench import step
from bench.backbones import create_backbone
from bench.data import Task, build_task
from bench.run.config import RunConfig, TrainConfig
from bench.run.measure import median_step_time, tracked_step_memory


class DivergedError(RuntimeError):
    """The training loss became NaN, infinite or larger than ``TrainConfig.diverge_loss``."""


@dataclass
class Model:
    """A backbone with a tuning method applied, ready to train on a task."""

    net: nn.Module
    task: Task
    device: torch.device
    method_config: snell.TuningConfig


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here; use device: cpu or auto")
    return device


def loader(dataset: Dataset, batch_size: int, seed: int | None, cfg: TrainConfig) -> DataLoader:
    """Shuffled with its own seeded generator when ``seed`` is given (data order independent of init)."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=seed is not None,
        generator=generator,
        num_workers=cfg.num_workers,
        drop_last=False,
    )


def make_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    total_steps: int,
    warmup_steps: int,
    warmup_lr: float,
    min_lr: float = 0.0,
) -> tuple[torch.optim.Optimizer, CosineLRScheduler]:
    """timm's AdamW over the trainable parameters (no decay on biases, norms, tokens, nor on what the
    method excludes: ``snell.no_weight_decay``), with a per-step linear warmup from ``warmup_lr`` then
    cosine decay to ``min_lr`` (timm's scheduler)."""
    model_exclusions = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    excluded = set(model_exclusions) | snell.no_weight_decay(model)
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=excluded)
    optimizer = create_optimizer_v2(groups, "adamw", lr=lr, weight_decay=weight_decay)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=max(total_steps - warmup_steps, 1),
        lr_min=min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=warmup_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    return optimizer, scheduler


def precision(device: torch.device, amp: bool) -> str:
    """'bf16' (autocast) on CUDA when ``amp`` is asked, else 'fp32': CPU runs stay in full precision."""
    return "bf16" if amp and device.type == "cuda" else "fp32"


@torch.no_grad()
def evaluate(model: Model, dataset: Dataset, cfg: TrainConfig) -> float:
    """Top-1 accuracy (%) on a dataset (its first ``limit_eval_batches`` batches if set: for smoke tests)."""
    model.net.eval()
    correct = total = 0
    batches = loader(dataset, cfg.eval_batch_size, None, cfg)
    for images, labels in itertools.islice(batches, cfg.limit_eval_batches):
        with step.autocast(model.device.type, precision(model.device, cfg.amp)):
            logits = model.net(images.to(model.device))
        correct += (logits.argmax(1).cpu() == labels).sum().item()
        total += len(labels)
    return 100.0 * correct / total


def build_model(run: RunConfig) -> Model:
    """Task data, backbone and tuning method for a run (calibration batches for methods that need them)."""
    cfg = run.train
    device = resolve_device(cfg.device)
    task = build_task(run.task, cfg.data_root, cfg.img_size, protocol=cfg.protocol)
    torch.manual_seed(run.seed)
    net = create_backbone(
        cfg.backbone, task.num_classes, cfg.checkpoint, cfg.pretrained, drop_path_rate=cfg.drop_path_rate
    ).to(device)
    calibration = (
        (x.to(device), y.to(device)) for x, y in loader(task.train, cfg.batch_size, run.seed + 10_000, cfg)
    )
    snell.apply_method(net, run.method_config, calibration=calibration)
    return Model(net.to(device), task, device, net.tuning_config)


def train_run(run: RunConfig, progress: bool = True) -> dict:
    """Train one run to the end and return its metrics; raises DivergedError on a non-finite loss."""
    start = time.perf_counter()
    model = build_model(run)
    cfg, device, net = run.train, model.device, model.net
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_loader = loader(model.task.train, cfg.batch_size, run.seed, cfg)
    steps_per_epoch = min(len(train_loader), cfg.limit_train_batches or len(train_loader))
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = math.ceil(cfg.warmup_epochs * steps_per_epoch)
    warmup_lr = cfg.lr * 1e-3 if cfg.warmup_lr is None else cfg.warmup_lr
    optimizer, scheduler = make_optimizer(
        net,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        warmup_lr=warmup_lr,
        min_lr=cfg.min_lr,
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    step_precision = precision(device, cfg.amp)

    def record_step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        loss = step.train_step(net, optimizer, *batch, precision=step_precision, loss_fn=criterion)
        epoch_losses.append(loss)

    loss_curve, step_times, step_cpu_times, memory = [], [], [], None
    bar = tqdm(total=total_steps, desc=run.label, unit="step", disable=not progress, leave=False)
    for epoch in range(cfg.epochs):
        net.train()
        epoch_losses = []
        for images, labels in itertools.islice(train_loader, steps_per_epoch):
            batch = (images.to(device), labels.to(device))
            if memory is None and epoch_losses and device.type == "cpu":  # optimizer state exists now
                memory = tracked_step_memory(net, optimizer, functools.partial(record_step, batch))
            else:
                tic, cpu_tic = time.perf_counter(), time.process_time()
                record_step(batch)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                step_times.append(time.perf_counter() - tic)
                step_cpu_times.append(time.process_time() - cpu_tic)
            scheduler.step_update(epoch * steps_per_epoch + len(epoch_losses))
            bar.update()
        losses = torch.stack(epoch_losses).float()
        worst = losses.max().item() if losses.isfinite().all() else float("nan")
        if not worst <= cfg.diverge_loss:
            raise DivergedError(
                f"training loss reached {worst:.4g} in epoch {epoch + 1} (diverge_loss={cfg.diverge_loss:g})"
            )
        for callback in snell.training_callbacks(net):
            callback.on_epoch_end(epoch, cfg.epochs)
        mean_loss = losses.mean().item()
        loss_curve.append(mean_loss)
        bar.set_postfix(epoch=epoch + 1, loss=f"{mean_loss:.3f}")
    bar.close()

    median = median_step_time(step_times)
    metrics = {
        "val_acc": evaluate(model, model.task.val, cfg),
        "test_acc": evaluate(model, model.task.test, cfg),
        "loss_curve": loss_curve,
        "trainable_params": snell.count_trainable(net),
        "tuned_params": snell.count_tuned(net),
        "total_params": sum(p.numel() for p in net.parameters()),
        "adapter_bytes": adapter_bytes(net),
        "step_time_s": median,
        "step_cpu_s": median_step_time(step_cpu_times),
        "cpu_per_wall": sum(step_cpu_times) / sum(step_times) if step_times else None,
        "images_per_s": cfg.batch_size / median if median else None,
        "update_rank": mean_update_rank(net),
    }
    for callback in snell.training_callbacks(net):
        metrics |= callback.record()
    if memory is not None:
        metrics["peak_memory_mib"] = memory["peak_mib"]
        metrics["memory_breakdown_mib"] = memory["breakdown_mib"]
    if device.type == "cuda":
        metrics["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        metrics["cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
        metrics["peak_memory_mib"] = metrics["cuda_max_allocated_mib"]
    metrics["wall_time_s"] = time.perf_counter() - start
    return {"metrics": metrics, "method_config": model.method_config.to_dict()}


def adapter_bytes(net: nn.Module) -> int:
    """Size on disk of what the method trained (saved as safetensors + config, then measured)."""
    with tempfile.TemporaryDirectory() as tmp:
        return snell.adapter_size_bytes(snell.save_adapter(net, tmp))


@torch.no_grad()
def mean_update_rank(net: nn.Module) -> float | None:
    """Mean numerical rank of the applied updates over adapted layers (how much a kernel lifts rank)."""
    ranks = [
        torch.linalg.matrix_rank(m.delta_weight().float()).item()
        for m in net.modules()
        if isinstance(m, snell.AdaptedLinear)
    ]
    return sum(ranks) / len(ranks) if ranks else None
