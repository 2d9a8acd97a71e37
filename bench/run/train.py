"""Train and evaluate one run: backbone + tuning method + task, with measurements along the way.

Two kinds of task go through the same loop and measurements (``train_run``): image classification (a timm
backbone: cross-entropy, top-1 accuracy) and commonsense reasoning (a causal LM: next-token loss, answers
generated and extracted). ``Model`` and ``CausalLmModel`` hold what differs: batches, loss and accuracy.
"""

from __future__ import annotations

import functools
import itertools
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.scheduler import CosineLRScheduler, PolyLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import snell
from bench import step
from bench.backbones import create_backbone, input_size
from bench.data import Task, build_task
from bench.llm.commonsense import (
    ALL_ANSWERS,
    COMMONSENSE_TASKS,
    CommonsenseTask,
    Example,
    build_commonsense,
    collate_causal,
    encode_for_training,
    is_commonsense_task,
    load_tokenizer,
    train_tokenizer,
    training_text,
)
from bench.llm.generate import commonsense_accuracy, fold_adapters
from bench.llm.models import causal_lm_config, create_causal_lm, enable_gradient_checkpointing
from bench.run.config import RunConfig, TrainConfig
from bench.run.measure import median_step_time, tracked_step_memory
from bench.run.retention import pretraining_logits, retention_task


class DivergedError(RuntimeError):
    """The training loss became NaN, infinite or larger than ``TrainConfig.diverge_loss``."""


@dataclass
class Model:
    """A classifier with a tuning method applied, ready to train on an image task: batches of images and
    class labels, cross-entropy, top-1 accuracy (``CausalLmModel``: the same for a commonsense task)."""

    net: nn.Module
    task: Task | CommonsenseTask
    device: torch.device
    method_config: snell.TuningConfig | None = None

    def train_loader(self, cfg: TrainConfig, seed: int) -> DataLoader:
        """The training batches, (inputs, labels), shuffled with ``seed``."""
        return loader(self.task.train, cfg.batch_size, seed, cfg)

    def loss_fn(self, cfg: TrainConfig) -> Callable[[Any, Tensor], Tensor]:
        """The training loss of the model's output and the labels of a batch."""
        return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    def accuracy(self, cfg: TrainConfig) -> dict[str, Any]:
        """The accuracy metrics of the trained model: ``val_acc`` and ``test_acc`` (%), and
        ``retention_acc`` (%, ``bench.run.retention``; None without a retention task). The last use of the
        model in a run (``CausalLmModel`` merges its adapters)."""
        retention = retention_task(cfg)
        return {
            "val_acc": evaluate(self, self.task.val, cfg),
            "test_acc": evaluate(self, self.task.test, cfg),
            "retention_acc": retention and evaluate(self, retention.data, cfg, head=retention.head),
        }


@dataclass
class CausalLmModel(Model):
    """A causal LM with a tuning method applied, ready to train on a commonsense task: batches of token
    ids (``train_ids``, right-padded; labels the ids themselves), the next-token loss, accuracy of answers
    generated from the evaluation prompts (``bench.llm.commonsense``)."""

    tokenizer: Any = None
    train_ids: list[list[int]] = field(default_factory=list)

    def train_loader(self, cfg: TrainConfig, seed: int) -> DataLoader:
        collate = functools.partial(collate_causal, pad_id=self.tokenizer.pad_token_id)
        return loader(self.train_ids, cfg.batch_size, seed, cfg, collate_fn=collate)

    def loss_fn(self, cfg: TrainConfig) -> Callable[[Any, Tensor], Tensor]:
        return step.next_token_loss

    def accuracy(self, cfg: TrainConfig) -> dict[str, Any]:
        """``task_acc``: accuracy (%) per test set; ``test_acc``: their plain mean (the paper's average);
        ``val_acc``: accuracy on the held-out training examples (any task's answer words; None if none).
        The adapters are folded in first (``fold_adapters``): the model holds none afterwards."""
        fold_adapters(self.net)
        per_task = {
            task: self._score(examples, COMMONSENSE_TASKS[task], cfg)
            for task, examples in self.task.test.items()
        }
        val = self._score(self.task.val, ALL_ANSWERS, cfg) if self.task.val else None
        return {"val_acc": val, "test_acc": sum(per_task.values()) / len(per_task), "task_acc": per_task}

    def _score(self, examples: list[Example], words: tuple[str, ...], cfg: TrainConfig) -> float:
        return commonsense_accuracy(
            self.net,
            self.tokenizer,
            examples,
            words,
            batch_size=cfg.eval_batch_size,
            num_beams=cfg.num_beams,
            max_new_tokens=cfg.max_new_tokens,
            precision=precision(self.device, cfg.amp),
            limit_batches=cfg.limit_eval_batches,
        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here; use device: cpu or auto")
    return device


def loader(
    dataset: Dataset,
    batch_size: int,
    seed: int | None,
    cfg: TrainConfig,
    *,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """Shuffled with its own seeded generator when ``seed`` is given (data order independent of init)."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=seed is not None,
        generator=generator,
        num_workers=cfg.num_workers,
        drop_last=False,
        collate_fn=collate_fn,
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
    schedule: str = "cosine",
) -> tuple[torch.optim.Optimizer, Scheduler]:
    """AdamW over the trainable parameters (``bench.step.build_optimizer``: no decay on biases, norms,
    tokens, nor on what the method excludes: ``snell.no_weight_decay``), with a per-step linear warmup
    from ``warmup_lr`` then cosine (``schedule="cosine"``) or linear (``"linear"``: Hugging Face's linear
    schedule) decay to ``min_lr`` (timm's schedulers; linear is its polynomial one of power 1)."""
    optimizer = step.build_optimizer(model, lr=lr, weight_decay=weight_decay)
    shape = {"cosine": CosineLRScheduler, "linear": functools.partial(PolyLRScheduler, power=1.0)}
    scheduler = shape[schedule](
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
def evaluate(model: Model, dataset: Dataset, cfg: TrainConfig, head: nn.Module | None = None) -> float:
    """Top-1 accuracy (%) on a dataset (its first ``limit_eval_batches`` batches if set: for smoke tests),
    of the model's own head or of ``head`` on its pooled features (the pretraining head: retention)."""
    model.net.eval()
    if head is not None:
        head = head.to(model.device)
    correct = total = 0
    batches = loader(dataset, cfg.eval_batch_size, None, cfg)
    for images, labels in itertools.islice(batches, cfg.limit_eval_batches):
        with step.autocast(model.device.type, precision(model.device, cfg.amp)):
            inputs = images.to(model.device)
            logits = model.net(inputs) if head is None else pretraining_logits(model.net, head, inputs)
        correct += (logits.argmax(1).cpu() == labels).sum().item()
        total += len(labels)
    return 100.0 * correct / total


def build_model(run: RunConfig) -> Model:
    """Task data, backbone and tuning method for a run (calibration batches for methods that need them):
    a causal LM for a commonsense task, a timm classifier for an image task."""
    cfg = run.train
    device = resolve_device(cfg.device)
    build = build_causal_lm if is_commonsense_task(run.task) else build_classifier
    model = build(run, device)
    calibration = ((x.to(device), y.to(device)) for x, y in model.train_loader(cfg, run.seed + 10_000))
    snell.apply_method(model.net, run.method_config, calibration=calibration)
    model.net.to(device)
    model.method_config = model.net.tuning_config
    return model


def build_classifier(run: RunConfig, device: torch.device) -> Model:
    """The image task and its timm backbone (new head, random under ``run.seed``), before tuning."""
    cfg = run.train
    task = build_task(run.task, cfg.data_root, cfg.img_size, protocol=cfg.protocol)
    torch.manual_seed(run.seed)
    net = create_backbone(
        cfg.backbone,
        task.num_classes,
        cfg.checkpoint,
        cfg.pretrained,
        drop_path_rate=cfg.drop_path_rate,
        **input_size(cfg.backbone, task.img_size),
    )
    return Model(net.to(device), task, device)


def build_causal_lm(run: RunConfig, device: torch.device) -> CausalLmModel:
    """The commonsense data, its tokenizer and the causal LM, before tuning. A checkpoint folder brings its
    own tokenizer; a model built from its config (``pretrained: false``, random weights under
    ``run.seed``) gets a BPE tokenizer learnt on the training texts, its vocabulary size the model's."""
    cfg = run.train
    if cfg.checkpoint is None and cfg.pretrained:
        raise ValueError(
            f"pretrained {cfg.backbone!r} needs checkpoint: a local Hugging Face model folder (nothing is "
            "downloaded); pretrained: false builds random weights"
        )
    task = build_commonsense(run.task, cfg.data_root, val_examples=cfg.val_examples)
    if cfg.checkpoint is None:
        vocab_size = causal_lm_config(cfg.backbone).vocab_size
        tokenizer = train_tokenizer(map(training_text, task.train), vocab_size=vocab_size)
        overrides = {"vocab_size": len(tokenizer)}
    else:
        tokenizer, overrides = load_tokenizer(cfg.checkpoint), {}
    torch.manual_seed(run.seed)
    net = create_causal_lm(cfg.backbone, cfg.checkpoint, **overrides)
    net.config.use_cache = False  # training keeps no key/value cache; generation asks for one
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(net)
    train_ids = encode_for_training(tokenizer, task.train, cfg.max_length)
    return CausalLmModel(net.to(device), task, device, tokenizer=tokenizer, train_ids=train_ids)


@dataclass
class Training:
    """One run's training under way: the model, its batches, optimizer and learning-rate schedule, and what
    its steps measured (``train_run`` drives it an epoch at a time)."""

    model: Model
    cfg: TrainConfig
    batches: DataLoader
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    criterion: Callable[[Any, Tensor], Tensor]
    step_times: list[float] = field(default_factory=list)
    step_cpu_times: list[float] = field(default_factory=list)
    memory: dict[str, Any] | None = None
    """The tracked memory of one step (CPU runs: their second, once the optimizer's state exists)."""

    @classmethod
    def start(cls, model: Model, run: RunConfig) -> Training:
        """The run's batches (shuffled with its seed) and its optimizer with the warmup and decay of its
        settings over all its steps (``make_optimizer``)."""
        cfg = run.train
        batches = model.train_loader(cfg, run.seed)
        steps_per_epoch = min(len(batches), cfg.limit_train_batches or len(batches))
        warmup_steps = cfg.warmup_steps
        if warmup_steps is None:
            warmup_steps = math.ceil(cfg.warmup_epochs * steps_per_epoch)
        optimizer, scheduler = make_optimizer(
            model.net,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            total_steps=cfg.epochs * steps_per_epoch,
            warmup_steps=warmup_steps,
            warmup_lr=cfg.lr * 1e-3 if cfg.warmup_lr is None else cfg.warmup_lr,
            min_lr=cfg.min_lr,
            schedule=cfg.schedule,
        )
        return cls(model, cfg, batches, steps_per_epoch, optimizer, scheduler, model.loss_fn(cfg))

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch

    def run_epoch(self, epoch: int, bar: tqdm) -> float:
        """Train epoch ``epoch`` (each step ticks ``bar``), then run the method's epoch-end callbacks; the
        epoch's mean loss. DivergedError if a loss is not finite or above ``diverge_loss``."""
        self.model.net.train()
        losses: list[Tensor] = []
        for inputs, labels in itertools.islice(self.batches, self.steps_per_epoch):
            self.run_step((inputs.to(self.model.device), labels.to(self.model.device)), losses)
            self.scheduler.step_update(epoch * self.steps_per_epoch + len(losses))
            bar.update()
        stacked = torch.stack(losses).float()
        worst = stacked.max().item() if stacked.isfinite().all() else float("nan")
        if not worst <= self.cfg.diverge_loss:
            raise DivergedError(
                f"training loss reached {worst:.4g} in epoch {epoch + 1} "
                f"(diverge_loss={self.cfg.diverge_loss:g})"
            )
        for callback in snell.training_callbacks(self.model.net):
            callback.on_epoch_end(epoch, self.cfg.epochs)
        return stacked.mean().item()

    def run_step(self, batch: tuple[Tensor, Tensor], losses: list[Tensor]) -> None:
        """One training step (``bench.step.train_step``), its loss appended to ``losses``: a CPU run's
        memory is tracked over one step taken with optimizer state (the second of the first epoch that has
        two), every other step is timed (wall and process CPU time)."""
        device = self.model.device
        one_step = functools.partial(self._train_step, batch, losses)
        if self.memory is None and losses and device.type == "cpu":
            self.memory = tracked_step_memory(self.model.net, self.optimizer, one_step)
            return
        tic, cpu_tic = time.perf_counter(), time.process_time()
        one_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.step_times.append(time.perf_counter() - tic)
        self.step_cpu_times.append(time.process_time() - cpu_tic)

    def _train_step(self, batch: tuple[Tensor, Tensor], losses: list[Tensor]) -> None:
        net, device = self.model.net, self.model.device
        step_precision = precision(device, self.cfg.amp)
        losses.append(
            step.train_step(net, self.optimizer, *batch, precision=step_precision, loss_fn=self.criterion)
        )

    def costs(self) -> dict[str, Any]:
        """What the trained model holds and what its training cost: parameters, adapter size, step times,
        update rank, the method's callbacks' records, peak memory (CUDA: the allocator's peaks)."""
        net, device = self.model.net, self.model.device
        median = median_step_time(self.step_times)
        metrics = {
            "trainable_params": snell.count_trainable(net),
            "tuned_params": snell.count_tuned(net),
            "total_params": sum(p.numel() for p in net.parameters()),
            "adapter_bytes": adapter_bytes(net),
            "step_time_s": median,
            "step_cpu_s": median_step_time(self.step_cpu_times),
            "cpu_per_wall": sum(self.step_cpu_times) / sum(self.step_times) if self.step_times else None,
            "images_per_s": self.cfg.batch_size / median if median else None,
            "update_rank": mean_update_rank(net),
        }
        for callback in snell.training_callbacks(net):
            metrics |= callback.record()
        if self.memory is not None:
            metrics["peak_memory_mib"] = self.memory["peak_mib"]
            metrics["memory_breakdown_mib"] = self.memory["breakdown_mib"]
        if device.type == "cuda":
            metrics["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            metrics["cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
            metrics["peak_memory_mib"] = metrics["cuda_max_allocated_mib"]
        return metrics


def train_run(run: RunConfig, progress: bool = True) -> dict:
    """Train one run to the end and return its metrics; raises DivergedError on a non-finite loss."""
    start = time.perf_counter()
    model = build_model(run)
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    training = Training.start(model, run)
    loss_curve = []
    with tqdm(
        total=training.total_steps, desc=run.label, unit="step", disable=not progress, leave=False
    ) as bar:
        for epoch in range(run.train.epochs):
            loss_curve.append(training.run_epoch(epoch, bar))
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss_curve[-1]:.3f}")
    metrics = {"loss_curve": loss_curve, **training.costs()}
    # last: training's costs are measured (a causal LM merges its adapters to generate)
    metrics |= model.accuracy(run.train)
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
