"""Data formats with prompt masking checked token by token, packing equivalence, bad data files."""

import json

import pytest
import torch

from scalora.builtin import build_tokenizer
from scalora.config import DataConfig
from scalora.data import (IGNORE, DataError, build_datasets, collate, pack, read_records, tokenize_record)
from scalora.loss import token_loss_sum

from tolerance import assert_rounding_close, loss_rtol


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _tokens(tok, ids):
    return tok.convert_ids_to_tokens(ids)


def test_instruction_masks_the_prompt(tok):
    rec = {"instruction": "Which topic is this sentence about?", "input": "the band played", "output": "music"}
    ids, labels = tokenize_record(rec, "instruction", tok, DataConfig())
    words = _tokens(tok, ids)
    assert words[0] == "<s>" and words[-2:] == ["music", "</s>"]
    assert words[-5:-2] == ["###", "Response", ":"]
    assert labels[:-2] == [IGNORE] * (len(ids) - 2) and labels[-2:] == ids[-2:]
    _, all_labels = tokenize_record(rec, "instruction", tok, DataConfig(train_on_prompt=True))
    assert all_labels == ids


def test_chat_masks_everything_but_assistant_turns(tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the band played"},
            {"role": "assistant", "content": "music"}, {"role": "user", "content": "the chef baked"},
            {"role": "assistant", "content": "food"}]
    ids, labels = tokenize_record({"messages": msgs}, "chat", tok, DataConfig())
    kept = [t for t, lab in zip(_tokens(tok, ids), labels) if lab != IGNORE]
    assert kept == ["music", "<|end|>", "food", "<|end|>"]


def test_instruction_records_through_the_chat_template(tok):
    """data.instruction_template=chat: the same tokens as the conversation user (instruction, input) -> assistant
    (output) in chat format, and exact match prompts the model with the template's generation prompt."""
    from scalora.config import load_config
    from scalora.evaluate import answer_prompt

    rec = {"instruction": "Which topic is this sentence about?", "input": "the band played", "output": "music"}
    cfg = DataConfig(instruction_template="chat")
    msgs = [{"role": "user", "content": "Which topic is this sentence about?\nthe band played"},
            {"role": "assistant", "content": "music"}]
    ids, labels = tokenize_record(rec, "instruction", tok, cfg)
    assert (ids, labels) == tokenize_record({"messages": msgs}, "chat", tok, cfg)
    assert [t for t, lab in zip(_tokens(tok, ids), labels) if lab != IGNORE] == ["music", "<|end|>"]
    assert "###" not in _tokens(tok, ids)  # not alpaca's template
    run_cfg = load_config(None, ["data.instruction_template=chat"])
    prompt, ref = answer_prompt(rec, "instruction", tok, run_cfg)
    expected = tok(tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]
    assert prompt == expected and ref == "music" and ids[:len(prompt)] == prompt


def test_chat_without_template_is_refused(tok):
    tok2 = build_tokenizer()
    tok2.chat_template = None
    with pytest.raises(DataError, match="has no chat template"):
        tokenize_record({"messages": [{"role": "user", "content": "hi"}]}, "chat", tok2, DataConfig())


def test_text_trains_on_every_token(tok):
    ids, labels = tokenize_record({"text": "the band played"}, "text", tok, DataConfig())
    assert _tokens(tok, ids) == ["<s>", "the", "band", "played", "</s>"] and labels == ids


@pytest.mark.numerics
def test_packing_gives_the_same_per_token_loss(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=len(tok),
                                         initializer_range=0.2)).eval()  # sharp attention: masks show
    model.config.use_cache = False  # as scalora trains (transformers splits packed rows only without a cache)
    cfg = DataConfig()
    recs = [{"instruction": "Which topic ?", "input": " ".join(["the band played"] * k), "output": "music"}
            for k in (1, 3, 2, 5)]
    examples = [dict(zip(("input_ids", "labels"), tokenize_record(r, "instruction", tok, cfg))) for r in recs]
    rows = pack(examples, max_length=128)
    assert len(rows) < len(examples)  # really packed
    with torch.no_grad():
        packed = token_loss_sum(model, collate(rows, tok.pad_token_id))
        unpacked = token_loss_sum(model, collate(examples, tok.pad_token_id))
        by_position = collate(rows, tok.pad_token_id, block_mask=False)  # what flash / flex attention get
        assert "attention_mask" not in by_position
        split = token_loss_sum(model, by_position)  # transformers splits SDPA's mask by the position ids
        one_sequence = {**by_position, "attention_mask": (by_position["input_ids"] != tok.pad_token_id).long()}
        cross = token_loss_sum(model, one_sequence)  # a 2D padding mask: a row is one sequence
    # the same sums in another order (attention over a packed row's keys, the tokens' sum); without the block mask
    # examples would see each other: far outside
    rtol = loss_rtol(model)
    assert_rounding_close(packed.reshape(1), unpacked.reshape(1), rtol, wrong=cross.reshape(1), what="packed")
    assert_rounding_close(split.reshape(1), unpacked.reshape(1), rtol, wrong=cross.reshape(1), what="split")


def test_files_of_every_kind(tmp_path, tok):
    rows = [{"text": f"the band played {i}"} for i in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"), index=False)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for name in ("d.jsonl", "d.json", "d.parquet", "d.csv", "saved"):
        assert len(read_records(str(tmp_path / name))) == 20, name
    d = build_datasets(DataConfig(train_file=str(tmp_path / "d.jsonl"), validation_fraction=0.25), tok, seed=1)
    assert d.format == "text" and d.stats["train_examples"] == 15 and d.stats["validation_examples"] == 5
    again = build_datasets(DataConfig(train_file=str(tmp_path / "d.jsonl"), validation_fraction=0.25), tok, seed=1)
    assert again.validation == d.validation  # fixed seed


def test_bad_data_files(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 3: not valid JSON"):
        read_records(str(bad))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="is empty"):
        read_records(str(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        read_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "fields.jsonl").write_text('{"question": "a", "answer": "b"}\n')
    with pytest.raises(DataError, match=r"cannot tell the format from fields \['question', 'answer'\]"):
        build_datasets(DataConfig(train_file=str(tmp_path / "fields.jsonl")), tok, 0)


def test_too_long_examples_are_counted(tmp_path, tok):
    rows = [{"text": " ".join(["the band played"] * n)} for n in (2, 30, 3, 40)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    d = build_datasets(DataConfig(train_file=str(tmp_path / "d.jsonl"), validation_fraction=0, max_length=32),
                       tok, 0)
    assert d.stats["truncated"] == 2 and all(len(r["input_ids"]) <= 32 for r in d.train)
    d = build_datasets(DataConfig(train_file=str(tmp_path / "d.jsonl"), validation_fraction=0, max_length=32,
                                  too_long="drop"), tok, 0)
    assert d.stats["dropped"] == 2 and d.stats["train_examples"] == 2


def test_shipped_data_is_what_the_generator_writes():
    from scalora.builtin import TOPICS_DIR, generate_topics

    for split, rows in generate_topics().items():
        shipped = [json.loads(line) for line in open(TOPICS_DIR / f"{split}.jsonl")]
        assert shipped == rows
    train_inputs = {r["input"] for r in generate_topics()["train"]}
    assert not train_inputs & {r["input"] for r in generate_topics()["validation"]}
