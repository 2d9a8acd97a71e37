"""The commonsense harness on test fixtures in the LLM-Adapters layout: a sweep trains a tiny LLaMA and
records per-task accuracy; missing and corrupt files are named before anything trains; the prompt
template, answer extraction, batches and tokenizer.

No commonsense corpus ships in any installable wheel, so the files here are written by the tests from
templates (in the real files' formats), small enough to train on in seconds: they are fixtures, not data.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import snell
from bench import step
from bench.llm.commonsense import (
    ALL_ANSWERS,
    COMMONSENSE_TASKS,
    Example,
    build_commonsense,
    check_files,
    collate_causal,
    commonsense_tasks,
    encode_for_training,
    evaluation_prompt,
    extract_answer,
    load_tokenizer,
    prompt,
    train_tokenizer,
    training_text,
)
from bench.llm.generate import answer_accuracy, commonsense_accuracy
from bench.llm.models import create_causal_lm
from bench.records.records import load_records
from bench.report.build import build_report, commonsense_table, records_frame
from bench.run.runner import run_sweep
from bench.run.sweep import SweepError, parse_sweep
from bench.run.train import enable_gradient_checkpointing, train_run

SUBJECTS = ["the kettle", "a river", "the moon", "my bicycle", "an oak tree", "the ocean", "a candle", "snow"]
TRAITS = ["hot", "wet", "bright", "heavy", "green", "salty", "tall", "cold"]
GOALS = ["open a jar", "dry a towel", "cool soup", "light a room", "fix a tire", "plant a seed"]
METHODS = [
    "twist the lid",
    "hang it in the sun",
    "blow on it",
    "switch on a lamp",
    "patch the tube",
    "dig a hole",
]


def boolq_entry(i: int) -> dict[str, str]:
    subject, trait = SUBJECTS[i % len(SUBJECTS)], TRAITS[(3 * i) % len(TRAITS)]
    answer = "true" if i % 2 == 0 else "false"
    return {
        "instruction": f"Please answer the following question with true or false, question: is {subject} "
        f"{trait} on day {i}?\n\nAnswer format: true/false",
        "input": "",
        "output": f"the correct answer is {answer}",
        "answer": answer,
    }


def piqa_entry(i: int) -> dict[str, str]:
    goal, right, wrong = GOALS[i % len(GOALS)], METHODS[i % len(METHODS)], METHODS[(i + 1) % len(METHODS)]
    first = i % 2 == 0
    solutions = (right, wrong) if first else (wrong, right)
    answer = "solution1" if first else "solution2"
    return {
        "instruction": f"Please choose the correct solution to the question: How to {goal} at step {i}?\n\n"
        f"Solution1: {solutions[0]}\n\nSolution2: {solutions[1]}\n\nAnswer format: solution1/solution2",
        "input": "",
        "output": f"the correct answer is {answer}",
        "answer": answer,
    }


def write_fixtures(root: Path, tasks=("boolq", "piqa"), n_train: int = 32, n_test: int = 8) -> Path:
    """``<root>/commonsense_170k.json`` mixing boolq and piqa entries, and ``<root>/<task>/test.json``."""
    makers = {"boolq": boolq_entry, "piqa": piqa_entry}
    train = [makers[("boolq", "piqa")[i % 2]](i) for i in range(n_train)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "commonsense_170k.json").write_text(json.dumps(train, indent=1))
    for task in tasks:
        (root / task).mkdir(exist_ok=True)
        entries = [makers[task](1000 + i) for i in range(n_test)]
        (root / task / "test.json").write_text(json.dumps(entries, indent=1))
    return root


TINY_TRAIN = {
    "backbone": "llama_tiny",
    "pretrained": False,
    "epochs": 1,
    "batch_size": 8,
    "eval_batch_size": 8,
    "lr": 1e-3,
    "warmup_steps": 1,
    "schedule": "linear",
    "max_length": 64,
    "limit_train_batches": 2,
    "max_new_tokens": 6,
    "num_beams": 2,
    "val_examples": 4,
    "device": "cpu",
}


def commonsense_sweep(root: Path, tasks: str = "commonsense/boolq+piqa") -> dict:
    return {
        "name": "commonsense_fixture",
        "train": {**TINY_TRAIN, "data_root": str(root)},
        "tasks": [tasks],
        "seeds": [0],
        "grid": [
            {"method": "lora", "rank": 4},
            {"method": "snell", "rank": 4, "train": {"gradient_checkpointing": True}},
        ],
    }


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    """Records of LoRA-4 and SNELL-4 trained on the boolq + piqa fixtures, and their report."""
    folder = tmp_path_factory.mktemp("commonsense")
    root = write_fixtures(folder / "data")
    runs = parse_sweep(commonsense_sweep(root)).runs
    statuses = run_sweep(runs, folder / "results", workers=1, progress=False)
    assert sorted(statuses.values()) == ["ok", "ok"], [r["error"] for r in load_records(folder / "results")]
    build_report(folder / "results")
    return folder / "results"


@pytest.mark.slow
def test_sweep_records_per_task_accuracy(swept):
    records = load_records(swept)
    assert sorted(r["label"] for r in records) == ["lora-4", "snell-4 piecewise_linear s=0.9"]
    for r in records:
        m = r["metrics"]
        assert set(m["task_acc"]) == {"boolq", "piqa"}
        assert all(0 <= acc <= 100 for acc in m["task_acc"].values())
        assert m["test_acc"] == pytest.approx(sum(m["task_acc"].values()) / 2)
        assert 0 <= m["val_acc"] <= 100
        assert len(m["loss_curve"]) == 1 and m["loss_curve"][0] > 0
        assert m["peak_memory_mib"] > 0 and m["trainable_params"] > 0 and m["adapter_bytes"] > 0
        assert m["update_rank"] is not None and m["update_rank"] > 0
        assert r["config"]["task"] == "commonsense/boolq+piqa"
        assert r["config"]["train"]["backbone"] == "llama_tiny"
        assert r["config"]["train"]["gradient_checkpointing"] == (r["config"]["method"] == "snell")


@pytest.mark.slow
def test_report_has_a_per_task_table_and_the_pareto_figure(swept):
    tables = (swept / "tables" / "results.md").read_text()
    assert "## Commonsense reasoning" in tables
    section = tables.split("## Commonsense reasoning")[1]
    header = section.splitlines()[2]
    assert "boolq" in header and "piqa" in header and "average" in header
    records = load_records(swept)
    table = commonsense_table(records, records_frame(records))
    assert list(table.columns) == ["boolq", "piqa", "average"] and len(table) == 2
    config = {**records[0]["config"], "method": "full", "method_options": {}}
    oom = {**records[0], "run_id": "oom-run", "label": "full", "config": config, "status": "oom"}
    oom |= {"metrics": {}, "method_config": None}
    with_oom = records + [oom]
    assert list(commonsense_table(with_oom, records_frame(with_oom)).loc["full"]) == ["OOM"] * 3
    assert (swept / "figures" / "commonsense_memory_vs_accuracy.png").stat().st_size > 10_000


def test_a_local_checkpoint_folder_brings_its_weights_and_tokenizer(tmp_path):
    """The real path (``checkpoint:`` a Hugging Face folder) on a tiny LLaMA saved with its tokenizer."""
    root = write_fixtures(tmp_path / "data")
    texts = [training_text(Example(**boolq_entry(i))) for i in range(16)]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    torch.manual_seed(0)
    folder = tmp_path / "llama_tiny_hf"
    create_causal_lm("llama_tiny", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    loaded = load_tokenizer(folder)
    assert (loaded.pad_token_id, loaded.padding_side) == (0, "left")
    assert loaded(texts[0])["input_ids"] == tokenizer(texts[0])["input_ids"]
    data = commonsense_sweep(root)
    data["train"] |= {"checkpoint": str(folder), "pretrained": True, "limit_train_batches": 1}
    data["grid"] = [{"method": "lora", "rank": 2}]
    (run,) = parse_sweep(data).runs
    metrics = train_run(run, progress=False)["metrics"]
    assert set(metrics["task_acc"]) == {"boolq", "piqa"} and metrics["total_params"] > 0
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(SweepError, match="has no weights"):
        parse_sweep(data)


def test_missing_and_corrupt_test_files_are_named_before_training(tmp_path):
    root = write_fixtures(tmp_path / "data", tasks=("boolq",))
    (root / "boolq" / "test.json").write_text(json.dumps([boolq_entry(0)])[:-20])  # truncated
    with pytest.raises(SweepError) as info:
        parse_sweep(commonsense_sweep(root))
    text = str(info.value)
    assert str(root / "boolq" / "test.json") in text and "is not valid JSON" in text
    assert f"{root / 'piqa' / 'test.json'} not found" in text
    assert "Expected layout" in text or "expected layout" in text
    assert not (tmp_path / "results").exists()


def test_every_bad_entry_is_named_with_its_file_and_index(tmp_path):
    root = write_fixtures(tmp_path / "data")
    entries = [boolq_entry(i) for i in range(4)]
    entries[1]["answer"] = "yes"
    del entries[3]["output"]
    (root / "boolq" / "test.json").write_text(json.dumps(entries))
    (root / "commonsense_170k.json").write_text(json.dumps({"not": "a list"}))
    problems = check_files(root, ["boolq", "piqa"])
    text = "\n".join(problems)
    assert f"{root / 'boolq' / 'test.json'}: entry 1: answer 'yes' is not one of true, false" in text
    assert f"{root / 'boolq' / 'test.json'}: entry 3: field(s) output missing" in text
    assert f"{root / 'commonsense_170k.json'} must hold a non-empty JSON list" in text
    assert check_files(tmp_path / "nowhere", ["boolq"])[0].startswith("commonsense data folder")


def test_task_names_and_family_mismatches_are_errors(tmp_path):
    assert commonsense_tasks("commonsense") == tuple(COMMONSENSE_TASKS)
    assert commonsense_tasks("commonsense/piqa+boolq") == ("boolq", "piqa")
    with pytest.raises(ValueError, match="boolq, piqa, social_i_qa"):
        commonsense_tasks("commonsense/boolq+siqa")
    root = write_fixtures(tmp_path / "data")
    data = commonsense_sweep(root, tasks="commonsense/boolq+siqa")
    data["grid"] += [{"method": "lora", "tasks": ["digits"]}]
    with pytest.raises(SweepError) as info:
        parse_sweep(data)
    text = str(info.value)
    assert "unknown commonsense task(s) ['siqa']" in text
    assert "task 'digits': backbone 'llama_tiny' is a causal LM, which runs commonsense tasks" in text
    vision = {"train": {"epochs": 1}, "tasks": ["commonsense"], "grid": [{"method": "lora"}]}
    with pytest.raises(SweepError, match="a commonsense task needs a causal LM backbone .*llama_tiny"):
        parse_sweep(vision)
    pretrained = {**commonsense_sweep(root), "train": {**TINY_TRAIN, "pretrained": True}}
    with pytest.raises(SweepError, match="needs checkpoint: a local Hugging Face model folder"):
        parse_sweep(pretrained)


def test_prompt_template():
    assert prompt("Is snow cold?", output="true") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nIs snow cold?\n\n### Response:\ntrue"
    )
    assert prompt("Add them.", "2 and 3", "5") == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n### Instruction:\nAdd them."
        "\n\n### Input:\n2 and 3\n\n### Response:\n5"
    )
    example = Example("Is snow cold?", "", "the correct answer is true", "true")
    assert training_text(example).endswith("### Response:\nthe correct answer is true")
    assert evaluation_prompt(example).endswith("### Instruction:\nIs snow cold?\n\n### Response:\n")


@pytest.mark.parametrize(
    ("generated", "words", "expected"),
    [
        ("...### Response:\nthe correct answer is false", COMMONSENSE_TASKS["boolq"], "false"),
        (
            "### Response:\ntrue? ### Response:\nsolution2 or solution1",
            COMMONSENSE_TASKS["piqa"],
            "solution2",
        ),
        ("### Response:\nThe answer is answer3", COMMONSENSE_TASKS["openbookqa"], "answer3"),
        ("### Response:\nending5 then ending2", COMMONSENSE_TASKS["hellaswag"], "ending2"),
        ("### Response:\nI cannot tell", COMMONSENSE_TASKS["winogrande"], ""),
        ("### Response:\nTrue", COMMONSENSE_TASKS["boolq"], ""),  # case-sensitive, as the script
        ("### Response:\noption2", ALL_ANSWERS, "option2"),
    ],
)
def test_answer_extraction(generated, words, expected):
    assert extract_answer(generated, words) == expected


class FixedResponse(nn.Module):
    """Stands in for a causal LM: its ``generate`` appends the same response to every prompt."""

    def __init__(self, response_ids: list[int]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # where generation finds the device
        self.response = torch.tensor(response_ids)

    def generate(self, input_ids, attention_mask, generation_config):
        assert attention_mask.shape == input_ids.shape and generation_config.num_beams == 2
        return torch.cat([input_ids, self.response.expand(len(input_ids), -1)], dim=1)


def test_accuracy_decodes_extracts_and_scores_generations():
    examples = [Example(**boolq_entry(i)) for i in range(8)]  # answers alternate true, false
    tokenizer = train_tokenizer(map(training_text, examples), vocab_size=400)
    model = FixedResponse(tokenizer("the correct answer is true", add_special_tokens=False)["input_ids"])
    words = COMMONSENSE_TASKS["boolq"]
    kwargs = {"batch_size": 3, "num_beams": 2, "max_new_tokens": 8}
    assert commonsense_accuracy(model, tokenizer, examples, words, **kwargs) == 50.0
    assert commonsense_accuracy(
        model, tokenizer, examples, words, **kwargs, limit_batches=1
    ) == pytest.approx(200 / 3)  # true, false, true
    assert answer_accuracy(["### Response:\nfalse", "### Response:\n"], examples[:2], words) == 0.0


def test_tokenizer_is_deterministic_and_batches_are_right_padded():
    texts = [training_text(Example(**boolq_entry(i))) for i in range(12)]
    first, second = train_tokenizer(texts, vocab_size=300), train_tokenizer(texts, vocab_size=300)
    assert first.get_vocab() == second.get_vocab() and len(first) <= 300
    examples = [Example(**boolq_entry(i)) for i in range(3)]
    ids = encode_for_training(first, examples, max_length=512)
    assert ids == encode_for_training(second, examples, max_length=512)
    assert all(seq[0] == first.bos_token_id and seq[-1] == first.eos_token_id for seq in ids)
    assert first.decode(ids[0], skip_special_tokens=True) == texts[0]
    cut = encode_for_training(first, examples, max_length=10)
    assert all(len(seq) == 10 and seq[-1] != first.eos_token_id for seq in cut)  # truncated: no EOS
    inputs, labels = collate_causal([[1, 5, 6, 2], [1, 7, 2]], pad_id=0)
    assert inputs.shape == (2, 8)
    assert inputs[1].tolist() == [1, 7, 2, 0, 0, 0, 0, 0]
    assert labels[1].tolist() == [1, 7, 2, -100, -100, -100, -100, -100]
    assert torch.equal(labels[0, :4], inputs[0, :4])


def test_validation_examples_are_held_out_of_training(tmp_path):
    root = write_fixtures(tmp_path / "data")
    task = build_commonsense("commonsense/boolq+piqa", root, val_examples=5)
    assert (len(task.train), len(task.val)) == (27, 5)
    assert not {training_text(e) for e in task.val} & {training_text(e) for e in task.train}
    again = build_commonsense("commonsense/boolq+piqa", root, val_examples=5)
    assert again.val == task.val  # the split's seed is fixed (42), whatever the run's seed
    assert list(task.test) == ["boolq", "piqa"] and len(task.test["piqa"]) == 8
    problems = check_files(root, ["boolq"], val_examples=32)
    assert (
        problems[0] == f"{root / 'commonsense_170k.json'} has 32 entries: too few to hold out val_examples=32"
    )


def test_gradient_checkpointing_gives_the_same_gradients():
    """SNELL's own autograd function and its branch dropout under transformers' checkpointing: the
    recomputed layers replay the dropout masks, so every gradient matches the plain step's."""
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        net = create_causal_lm("llama_tiny", vocab_size=200)
        snell.apply_method(net, snell.method_config("snell", rank=4, dropout=0.1))
        if checkpointing:
            enable_gradient_checkpointing(net)
        calls = []
        net.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *args, calls=calls: calls.append(1))
        net.train()
        torch.manual_seed(1)
        step.next_token_loss(net(ids), ids).backward()
        assert len(calls) == 1 + checkpointing  # the layer ran again in backward
        grads.append({n: p.grad for n, p in net.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
