"""Commonsense reasoning for causal LMs in the LLM-Adapters layout: data files, their validation, the
recipe's prompt template, answer extraction, training batches and the tokenizer of a run.

The recipe is NVlabs/DoRA's ``commonsense_reasoning`` (finetune.py, commonsense_evaluate.py, after
LLM-Adapters), which the SNELL paper's LLaMA-2-7B appendix follows: train on ``commonsense_170k.json``
(with ``val_examples`` of it held out, seed 42), evaluate on each task's ``test.json`` by generating a
response and taking the first word of the task's answer vocabulary in it. Task names in sweeps:
``commonsense`` (all 8 test sets) or ``commonsense/<task>+<task>`` (a subset: ``commonsense/boolq+piqa``).
``bench.llm.generate`` is the model side (generation, accuracy). Importing this module imports neither
torch nor transformers (the report reads its names).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PREFIX = "commonsense"
TRAIN_FILE = "commonsense_170k.json"
DEFAULT_COMMONSENSE_ROOT = Path("data/commonsense")
FIELDS = ("instruction", "input", "output", "answer")
"""The fields of every entry, in the training file and in the test sets alike."""

_CHOICES = tuple(f"answer{i}" for i in range(1, 6))
COMMONSENSE_TASKS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": _CHOICES,
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
    "ARC-Challenge": _CHOICES,
    "ARC-Easy": _CHOICES,
    "openbookqa": _CHOICES,
}
"""The 8 test sets (the evaluation script's order) and the answer vocabulary of each: the words its
``extract_answer`` searches for, in the order of its regular expressions."""

ALL_ANSWERS = tuple(dict.fromkeys(word for words in COMMONSENSE_TASKS.values() for word in words))
"""Every task's answer words: the vocabulary of the validation examples, which mix the tasks."""

VAL_SPLIT_SEED = 42
"""The recipe holds out its validation examples with seed 42 whatever the run's seed."""

COMMONSENSE_LAYOUT = f"""\
<data_root>/                  (default {DEFAULT_COMMONSENSE_ROOT}; LLM-Adapters' dataset/ folder + the json)
  {TRAIN_FILE}       a JSON list of {{"instruction", "input", "output", "answer"}} (strings)
  <task>/test.json            the same fields; <task> in boolq, piqa, social_i_qa, hellaswag,
                              winogrande, ARC-Challenge, ARC-Easy, openbookqa; "answer" is one of the
                              task's words (boolq: true / false, piqa: solution1 / solution2, hellaswag:
                              ending1-4, winogrande: option1 / option2, the others: answer1-5)"""

SHOWN_ENTRIES = 5
"""Bad entries named per file; the rest are counted."""


@dataclass(frozen=True)
class Example:
    """One entry of a commonsense file."""

    instruction: str
    input: str
    output: str
    answer: str


@dataclass(frozen=True)
class CommonsenseTask:
    """A commonsense run's data: training examples, held-out validation examples and the selected test
    sets (task -> examples), from the files under ``root``."""

    name: str
    kind: str
    root: Path
    train: list[Example]
    val: list[Example]
    test: dict[str, list[Example]]
    description: str


class CommonsenseDataError(ValueError):
    """Missing or malformed commonsense files; ``problems`` names each file (and entry) at fault."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def is_commonsense_task(name: str) -> bool:
    """Whether a task name is a commonsense one (``commonsense`` or ``commonsense/<task>+...``)."""
    return name == PREFIX or name.startswith(f"{PREFIX}/")


def commonsense_tasks(name: str) -> tuple[str, ...]:
    """The test sets a task name selects, in the evaluation script's order; ValueError naming the allowed
    ones for an unknown or empty selection."""
    if name == PREFIX:
        return tuple(COMMONSENSE_TASKS)
    selected = name.removeprefix(f"{PREFIX}/").split("+")
    unknown = [t for t in selected if t not in COMMONSENSE_TASKS]
    if unknown or not is_commonsense_task(name):
        raise ValueError(
            f"unknown commonsense task(s) {unknown or [name]} in {name!r}; use 'commonsense' (all 8) or "
            f"'commonsense/<task>+<task>' with tasks from: {', '.join(COMMONSENSE_TASKS)}"
        )
    return tuple(t for t in COMMONSENSE_TASKS if t in selected)


def data_files(root: str | Path | None, tasks: Sequence[str]) -> dict[str, Path]:
    """The files a run reads: ``"train"`` and each task's test set, by task name."""
    root = Path(root or DEFAULT_COMMONSENSE_ROOT)
    return {"train": root / TRAIN_FILE, **{task: root / task / "test.json" for task in tasks}}


def check_files(root: str | Path | None, tasks: Sequence[str], *, val_examples: int = 0) -> list[str]:
    """Every problem with the files of ``tasks`` under ``root`` (missing, not JSON, not a list of entries
    with the four string fields, a test answer outside its task's words, a training file with no more than
    ``val_examples`` entries), each naming its file (and the entry index); empty when all can be read."""
    folder = Path(root or DEFAULT_COMMONSENSE_ROOT)
    if not folder.is_dir():
        return [f"commonsense data folder {folder} not found\nExpected layout:\n{COMMONSENSE_LAYOUT}"]
    problems = []
    for task, path in data_files(folder, tasks).items():
        examples, found = _read(path, None if task == "train" else COMMONSENSE_TASKS[task])
        problems += found
        if task == "train" and not found and len(examples) <= val_examples:
            problems.append(
                f"{path} has {len(examples)} entries: too few to hold out val_examples={val_examples}"
            )
    if problems:
        problems.append(f"expected layout:\n{COMMONSENSE_LAYOUT}")
    return problems


def load_examples(path: Path, answers: Sequence[str] | None = None) -> list[Example]:
    """The entries of one file; CommonsenseDataError listing its problems if it has any."""
    examples, problems = _read(path, tuple(answers) if answers is not None else None)
    if problems:
        raise CommonsenseDataError(problems)
    return examples


def _read(path: Path, answers: tuple[str, ...] | None) -> tuple[list[Example], list[str]]:
    """(examples, problems) of a file; read once per version of the file (its size and mtime)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return [], [f"{path} not found"]
    return _read_version(path.resolve(), stat.st_mtime_ns, stat.st_size, answers)


@functools.lru_cache(maxsize=16)
def _read_version(
    path: Path, mtime_ns: int, size: int, answers: tuple[str, ...] | None
) -> tuple[list[Example], list[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return [], [f"{path} is not valid JSON: {err}"]
    if not isinstance(data, list) or not data:
        return [], [f"{path} must hold a non-empty JSON list of entries, got {type(data).__name__}"]
    examples, bad = [], []
    for index, entry in enumerate(data):
        fault = _entry_fault(entry, answers)
        if fault:
            bad.append(f"{path}: entry {index}: {fault}")
        else:
            examples.append(Example(*(entry[f] for f in FIELDS)))
    if len(bad) > SHOWN_ENTRIES:
        bad = [*bad[:SHOWN_ENTRIES], f"{path}: {len(bad) - SHOWN_ENTRIES} more bad entries"]
    return examples, bad


def _entry_fault(entry: Any, answers: tuple[str, ...] | None) -> str | None:
    if not isinstance(entry, dict):
        return f"expected an object with fields {', '.join(FIELDS)}, got {type(entry).__name__}"
    missing = [f for f in FIELDS if not isinstance(entry.get(f), str)]
    if missing:
        return f"field(s) {', '.join(missing)} missing or not a string"
    if not entry["instruction"].strip():
        return "empty instruction"
    if answers is not None and entry["answer"] not in answers:
        return f"answer {entry['answer']!r} is not one of {', '.join(answers)}"
    return None


def build_commonsense(
    name: str, data_root: str | Path | None = None, *, val_examples: int = 120
) -> CommonsenseTask:
    """The data of task ``name`` from ``data_root`` (``COMMONSENSE_LAYOUT``): ``val_examples`` entries of
    the training file held out (``split_val``), the selected test sets. CommonsenseDataError lists every
    problem with the files; ValueError for an unknown task name."""
    tasks = commonsense_tasks(name)
    problems = check_files(data_root, tasks, val_examples=val_examples)
    if problems:
        raise CommonsenseDataError(problems)
    files = data_files(data_root, tasks)
    train, val = split_val(load_examples(files["train"]), val_examples)
    test = {task: load_examples(files[task], COMMONSENSE_TASKS[task]) for task in tasks}
    sizes = ", ".join(f"{task} {len(examples)}" for task, examples in test.items())
    return CommonsenseTask(
        name=name,
        kind=PREFIX,
        root=files["train"].parent,
        train=train,
        val=val,
        test=test,
        description=f"commonsense reasoning: train {len(train)}, val {len(val)} (held out of {TRAIN_FILE}), "
        f"test {sizes}",
    )


def split_val(examples: Sequence[Example], n: int) -> tuple[list[Example], list[Example]]:
    """(train, val): ``n`` examples drawn with seed ``VAL_SPLIT_SEED``, the rest in file order. The recipe
    draws with ``datasets``' ``train_test_split(seed=42)``, not installed here: same size and seed, other
    examples."""
    import torch

    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(VAL_SPLIT_SEED)).tolist()
    held_out = set(order[:n])
    train = [e for i, e in enumerate(examples) if i not in held_out]
    return train, [examples[i] for i in sorted(held_out)]


def prompt(instruction: str, input: str = "", output: str = "") -> str:
    """The recipe's Alpaca-style prompt (finetune.py ``generate_prompt``); ``output=""`` leaves the response
    empty, the evaluation prompt. The scripts' f-strings also carry their source indentation (16 spaces
    before each section, trailing spaces after the first line); this is the clean form of the same text."""
    if input:
        return (
            "Below is an instruction that describes a task, paired with an input that provides further "
            "context. Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
        )
    return (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        f"request.\n\n### Instruction:\n{instruction}\n\n### Response:\n{output}"
    )


def training_text(example: Example) -> str:
    """The text a model trains on: the full prompt with the example's output (train_on_inputs=True)."""
    return prompt(example.instruction, example.input, example.output)


def evaluation_prompt(example: Example) -> str:
    """What a model answers: commonsense_evaluate.py prompts with the instruction alone (the test sets'
    inputs are empty) and an empty response."""
    return prompt(example.instruction)


def extract_answer(generated: str, words: Sequence[str]) -> str:
    """The answer in a decoded generation: the text after its last "### Response:", then the first
    occurrence of any of ``words`` (the task's answer vocabulary); "" when none occurs (counted wrong)."""
    response = generated.split("### Response:")[-1].strip()
    found = re.search("|".join(re.escape(word) for word in words), response)
    return found.group(0) if found else ""


def encode_for_training(
    tokenizer: PreTrainedTokenizerBase, examples: Iterable[Example], max_length: int
) -> list[list[int]]:
    """Token ids of each example's training text: cut at ``max_length`` tokens, with EOS appended when
    there is room and it is not already last (finetune.py's ``tokenize``). Labels are the ids themselves."""
    texts = [training_text(e) for e in examples]
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    eos = tokenizer.eos_token_id
    return [ids + [eos] if len(ids) < max_length and ids[-1:] != [eos] else ids for ids in encoded]


def collate_causal(
    batch: Sequence[Sequence[int]], pad_id: int, multiple_of: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of a batch: padded on the right with ``pad_id`` to the longest sequence
    (rounded up to ``multiple_of``, as the recipe's collator), labels -100 on the padding. Right padding
    needs no attention mask: causal attention never looks ahead at the pads."""
    import torch

    from snell.core.families import IGNORE_INDEX

    length = -(-max(map(len, batch)) // multiple_of) * multiple_of
    inputs = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    for row, ids in enumerate(batch):
        inputs[row, : len(ids)] = labels[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return inputs, labels


SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
"""Ids 0, 1, 2 as in LLaMA's tokenizer: pad = unk (0, as the scripts set), BOS, EOS."""


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer learnt from ``texts`` (``tokenizers``; deterministic), for models built
    from a config without a checkpoint: LLaMA's special-token ids, BOS prepended, pad = unk = 0, padding on
    the left for batched generation. At most ``vocab_size`` tokens (fewer when the texts have few pairs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    unk, bos, eos = SPECIAL_TOKENS
    bpe = Tokenizer(models.BPE(unk_token=unk))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    bpe.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=unk, padding_side="left"
    )


def load_tokenizer(checkpoint: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a local checkpoint folder (never downloaded), set up as the scripts do: pad = id 0
    (LLaMA's unk, unlike EOS), padding on the left for batched generation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    tokenizer.padding_side = "left"
    return tokenizer
