"""Data: local files read with `datasets`, three record formats, prompt masking, packing, batching.

Every example becomes `input_ids` and `labels` (-100 on tokens that carry no loss). Packed rows also carry
`position_ids` restarting at 0 for each example, and the collator turns them into a block-diagonal causal mask,
so that a packed batch gives the same per-token loss as the same examples unpacked.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .config import BUILTIN_DATA, DataConfig
from .core.errors import UserError

IGNORE = -100
TOPICS_DIR = Path(__file__).parent / "assets" / "topics"  # builtin:topics (scalora/builtin.py writes it)
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class DataError(UserError):
    pass


# --- reading ---------------------------------------------------------------------------------------------------
def _builtin_file(split: str) -> str:
    return str(TOPICS_DIR / f"{split}.jsonl")


def _check_jsonl(path: str) -> None:
    """Name the first malformed line: `datasets` alone reports a byte offset deep in pyarrow."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}, line {i}: not UTF-8 text ({e.reason} at byte {e.start}); a .jsonl file is "
                                "UTF-8 JSON, one object per line: re-save it as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {i}: not valid JSON ({e.msg} at column {e.colno}); "
                                "each line of a .jsonl file must be one JSON object") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {i}: a JSON {type(row).__name__}, expected an object with fields")


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def read_records(path: str):
    """A `datasets.Dataset` from a jsonl / json / parquet / csv file or a `save_to_disk` folder."""
    import datasets

    if path == BUILTIN_DATA:
        path = _builtin_file("train")
    if not os.path.exists(path):
        raise DataError(f"data file {path!r} does not exist; give a .jsonl/.json/.parquet/.csv file, a folder "
                        f"written by datasets' save_to_disk, or {BUILTIN_DATA}")
    if os.path.isdir(path):
        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:
            raise DataError(f"{path} is a folder but not one written by datasets' save_to_disk "
                            f"({_first_line(e)}); give a data file or a save_to_disk folder") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{path} holds splits {list(ds)}; point at one split's folder")
            ds = ds["train"]
    else:
        ext = os.path.splitext(path)[1].lower()
        builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(ext)
        if builder is None:
            raise DataError(f"{path}: unknown data file type {ext!r}; use .jsonl, .json, .parquet or .csv")
        if os.path.getsize(path) == 0:
            raise DataError(f"{path} is empty")
        if ext == ".jsonl":
            _check_jsonl(path)
        try:
            ds = datasets.load_dataset(builder, data_files=path, split="train")
        except Exception as e:  # pyarrow's messages are long: keep the cause's first line
            raise DataError(f"{path} could not be read as {builder}: {_first_line(e)}") from None
    if len(ds) == 0:
        raise DataError(f"{path} holds no records")
    return ds


def detect_format(columns: list[str], cfg: DataConfig, source: str) -> str:
    if cfg.format != "auto":
        needed = {"text": [cfg.text_field], "instruction": [cfg.instruction_field, cfg.output_field],
                  "chat": [cfg.messages_field]}[cfg.format]
        missing = [f for f in needed if f not in columns]
        if missing:
            raise DataError(f"{source}: format {cfg.format!r} needs field(s) {missing}, but records have {columns}; "
                            f"set data.{cfg.format if cfg.format != 'instruction' else 'output'}_field or fix the "
                            "data")
        return cfg.format
    if cfg.messages_field in columns:
        return "chat"
    if cfg.instruction_field in columns and cfg.output_field in columns:
        return "instruction"
    if cfg.text_field in columns:
        return "text"
    raise DataError(f"{source}: cannot tell the format from fields {columns}. Expected '{cfg.text_field}' (text), "
                    f"'{cfg.instruction_field}' + '{cfg.output_field}' (instruction) or '{cfg.messages_field}' "
                    "(chat); set data.format and the data.*_field names")


_TEXT = ("string", "large_string")
_NUMBER = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64")


def check_fields(ds, fmt: str, cfg: DataConfig, source: str) -> None:
    """Refuse records whose fields cannot be tokenized (wrong types, missing values), naming the field."""
    if fmt == "chat":
        bad = [i for i, m in enumerate(ds[cfg.messages_field][:1000]) if not isinstance(m, list) or not all(
            isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str) for t in m)]
        if bad:
            raise DataError(f"{source}, record {bad[0] + 1}: '{cfg.messages_field}' must be a list of "
                            "{\"role\": ..., \"content\": ...} messages with text in both")
        return
    wanted = {cfg.text_field: _TEXT} if fmt == "text" else {cfg.instruction_field: _TEXT,
                                                             cfg.output_field: _TEXT + _NUMBER}
    if fmt == "instruction" and cfg.input_field in ds.column_names:
        wanted[cfg.input_field] = _TEXT + ("null",)
    for field, types in wanted.items():
        dtype = getattr(ds.features[field], "dtype", type(ds.features[field]).__name__)
        if dtype not in types:
            raise DataError(f"{source}: field '{field}' holds {dtype} values, expected text; fix the data or point "
                            f"data.{'text' if fmt == 'text' else field}_field at the right field")
        nulls = ds.data.column(field).null_count if "null" not in types else 0
        if nulls:
            raise DataError(f"{source}: {nulls} record(s) have no '{field}' (null or missing); every record needs one")


# --- tokenizing ------------------------------------------------------------------------------------------------
def instruction_prompt(record: dict, cfg: DataConfig) -> str:
    inp = record.get(cfg.input_field) or ""
    template = ALPACA_PROMPT if inp else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=record[cfg.instruction_field], input=inp)


def instruction_messages(record: dict, cfg: DataConfig) -> list[dict[str, str]]:
    """An instruction record as a conversation (data.instruction_template=chat): user, then assistant."""
    inp = record.get(cfg.input_field) or ""
    user = str(record[cfg.instruction_field]) + (f"\n{inp}" if inp else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": str(record[cfg.output_field])}]


def _encode(tokenizer, text: str, bos: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def tokenize_record(record: dict, fmt: str, tokenizer, cfg: DataConfig) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one record; prompt tokens are masked unless train_on_prompt."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt == "text":
        ids = _encode(tokenizer, record[cfg.text_field], bos=True) + eos
        return ids, list(ids)
    if fmt == "instruction" and cfg.instruction_template == "chat":
        return _tokenize_chat(instruction_messages(record, cfg), tokenizer, cfg)
    if fmt == "instruction":
        prompt = _encode(tokenizer, instruction_prompt(record, cfg), bos=True)
        answer = _encode(tokenizer, str(record[cfg.output_field]), bos=False) + eos
        labels = (list(prompt) if cfg.train_on_prompt else [IGNORE] * len(prompt)) + answer
        return prompt + answer, labels
    return _tokenize_chat(record[cfg.messages_field], tokenizer, cfg)


def _tokenize_chat(messages: list[dict], tokenizer, cfg: DataConfig) -> tuple[list[int], list[int]]:
    """Render with the tokenizer's chat template; only assistant turns carry loss (unless train_on_prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the data is in chat format but the tokenizer has no chat template: use a chat model's "
                        "tokenizer, or convert the records to instruction format (instruction / input / output)")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    spans = []  # character spans of assistant turns
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        after = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not text.startswith(after) or not after.startswith(before):
            raise DataError("the chat template does not render conversations as growing prefixes; cannot tell "
                            "assistant tokens apart (set data.train_on_prompt=true to train on all tokens)")
        spans.append((len(before), len(after)))
    if cfg.train_on_prompt:
        return ids, list(ids)
    labels = [t if any(s <= start < e for s, e in spans) else IGNORE for t, (start, _) in zip(ids, offsets)]
    return ids, labels


@dataclass
class TokenizedSplit:
    examples: list[dict[str, list[int]]]
    truncated: int = 0
    dropped: int = 0
    records: Optional[list[dict]] = None  # raw records, kept for the validation split's exact-match scoring


_KEPT, _TRUNCATED, _DROPPED = 0, 1, 2
_RECORDS_PER_PROCESS = 20_000  # tokenizing in parallel pays off only for large files (process start-up ~1 s)


def _encode_record(record: dict, fmt: str, tokenizer, cfg: DataConfig) -> dict[str, Any]:
    ids, labels = tokenize_record(record, fmt, tokenizer, cfg)
    status = _KEPT
    if len(ids) > cfg.max_length:
        if cfg.too_long == "drop":
            return {"input_ids": [], "labels": [], "status": _DROPPED}
        ids, labels, status = ids[: cfg.max_length], labels[: cfg.max_length], _TRUNCATED
    if all(label == IGNORE for label in labels[1:]):  # nothing to learn from (e.g. answer truncated away)
        status = _DROPPED
    return {"input_ids": ids, "labels": labels, "status": status}


def tokenize_split(ds, fmt: str, tokenizer, cfg: DataConfig, keep_records: bool = False) -> TokenizedSplit:
    """Tokenize with `datasets.map`: cached on disk beside the data (a second run with the same data, tokenizer and
    settings reads the cache), in parallel for large files."""
    num_proc = max(1, min(os.cpu_count() or 1, len(ds) // _RECORDS_PER_PROCESS)) if len(ds) else 1
    enc = ds.map(_encode_record, fn_kwargs={"fmt": fmt, "tokenizer": tokenizer, "cfg": cfg},
                 num_proc=num_proc if num_proc > 1 else None, desc="tokenizing", load_from_cache_file=True)
    status, ids, labels = (list(enc[c]) for c in ("status", "input_ids", "labels"))  # read once from arrow
    out = TokenizedSplit(examples=[], records=[] if keep_records else None,
                         truncated=status.count(_TRUNCATED), dropped=status.count(_DROPPED))
    kept = [i for i, s in enumerate(status) if s != _DROPPED]
    out.examples = [{"input_ids": ids[i], "labels": labels[i]} for i in kept]
    if keep_records:
        out.records = [ds[i] for i in kept]
    if not out.examples:
        raise DataError(f"no usable examples left after tokenizing ({out.dropped} dropped as too long or without "
                        "answer tokens): raise data.max_length or check the data")
    return out


# --- packing and batching --------------------------------------------------------------------------------------
def pack(examples: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Best-fit-decreasing packing into rows of at most max_length tokens.

    Longest examples first, each into the row with the least room that still fits it (a new row when none does):
    rows come out nearly full, so that neither the rows nor the padding of a micro-batch waste compute. Measured on
    bench/throughput.py's data: rows 92% full at max_length 256 and 96% at 512, against 72% and 83% when each row was
    closed at the first example that did not fit. Rows are shuffled by the loop like any example. Each example
    keeps its own positions (0..n-1) and its first label is masked: the row's previous example must not be used to
    predict it.
    """
    import bisect

    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    room: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    members: list[list[int]] = []
    for i in order:
        n = len(examples[i]["input_ids"])
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            free, row = room.pop(k)
        else:
            free, row = max_length, len(members)
            members.append([])
        members[row].append(i)
        if free - n > 0:
            bisect.insort(room, (free - n, row))
    rows: list[dict[str, list[int]]] = []
    for idx in members:
        cur: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
        for i in sorted(idx):  # within a row, the data set's order
            ex = examples[i]
            cur["input_ids"] += ex["input_ids"]
            cur["labels"] += [IGNORE] + ex["labels"][1:]
            cur["position_ids"] += list(range(len(ex["input_ids"])))
        rows.append(cur)
    return rows


def collate(rows: list[dict[str, list[int]]], pad_id: int, block_mask: bool = True,
            pad_to: Optional[int] = None, segment_ids: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row. Packed rows get a (B, 1, T, T) boolean mask, causal within each example; or,
    `block_mask=False`, no mask at all: the attention kernel splits the examples by their position ids (flash
    attention's variable-length path, flex attention's block mask; transformers builds the same mask for SDPA). A 2D
    padding mask there would make flash attention treat a row as one sequence, examples attending to each other.
    `segment_ids` (for `scalora.attention`): a (B, 1, 1, T) mask of example ids instead, 1, 2, ... along a row, 0 on
    padding (4D: transformers passes it through; unpacked rows keep the usual (B, T) padding mask)."""
    T = max(max(len(r["input_ids"]) for r in rows), pad_to or 0)  # pad_to: one shape for compiled layers
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        attention[i, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
    if "position_ids" in rows[0]:
        pos = torch.zeros((B, T), dtype=torch.long)
        for i, r in enumerate(rows):
            pos[i, : len(r["position_ids"])] = torch.tensor(r["position_ids"])
        batch["position_ids"] = pos
        if segment_ids:
            batch["attention_mask"] = (torch.cumsum((pos == 0).long(), dim=1) * attention)[:, None, None]
        elif block_mask:
            batch["attention_mask"] = packed_mask(pos, attention)
        else:
            del batch["attention_mask"]  # the padding's position ids restart at 0: each pad is an example of its own
    return batch


def device_batch(rows: list[dict[str, list[int]]], pad_id: int, device, block_mask: bool = True,
                 pad_to: Optional[int] = None, segment_ids: bool = False) -> dict[str, torch.Tensor]:
    """`collate`, on `device`."""
    return {k: v.to(device) for k, v in collate(rows, pad_id, block_mask=block_mask, pad_to=pad_to,
                                                segment_ids=segment_ids).items()}


def needs_block_mask(attn_implementation: Optional[str]) -> bool:
    """Packed rows need scalora's (B, 1, T, T) block mask, except with flash attention (its variable-length path) and
    flex attention (a sparse block mask), which split the examples by their position ids, and scalora's
    sdpa_segments (example ids, `collate(segment_ids=True)`): no T x T mask."""
    return not (attn_implementation or "").startswith(("flash", "flex", "sdpa_segments"))


def packed_mask(position_ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean: token i sees token j iff j <= i, both are real, and no example starts in (j, i]."""
    seg = torch.cumsum((position_ids == 0).long(), dim=1)  # (B, T) example index within the row
    T = position_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same = seg[:, :, None] == seg[:, None, :]  # (B, T, T)
    real = attention.bool()
    mask = causal[None] & same & real[:, None, :] & real[:, :, None]
    mask |= torch.eye(T, dtype=torch.bool)[None]  # padding rows attend to themselves: no all-masked softmax
    return mask[:, None]


def count_loss_tokens(rows: list[dict[str, list[int]]]) -> int:
    """Tokens that contribute to the loss after the causal shift."""
    return sum(sum(1 for t in r["labels"][1:] if t != IGNORE) for r in rows)


# --- the whole pipeline ----------------------------------------------------------------------------------------
@dataclass
class Datasets:
    train: list[dict[str, list[int]]]
    validation: list[dict[str, list[int]]]
    validation_records: list[dict]
    format: str
    stats: dict[str, Any]


def build_datasets(cfg: DataConfig, tokenizer, seed: int) -> Datasets:
    train_ds = read_records(cfg.train_file)
    fmt = detect_format(list(train_ds.column_names), cfg, cfg.train_file)
    check_fields(train_ds, fmt, cfg, cfg.train_file)
    val_file = cfg.validation_file or (_builtin_file("validation") if cfg.train_file == BUILTIN_DATA else None)
    if val_file is not None:
        val_ds = read_records(val_file)
        check_fields(val_ds, detect_format(list(val_ds.column_names), cfg, val_file), cfg, val_file)
    elif cfg.validation_fraction > 0 and len(train_ds) > 1:
        split = train_ds.train_test_split(test_size=cfg.validation_fraction, seed=seed)
        train_ds, val_ds = split["train"], split["test"]
    else:
        val_ds = None
    if val_ds is not None and 0 < cfg.max_eval_examples < len(val_ds):
        val_ds = val_ds.select(range(cfg.max_eval_examples))
    train = tokenize_split(train_ds, fmt, tokenizer, cfg)
    val = tokenize_split(val_ds, fmt, tokenizer, cfg, keep_records=True) if val_ds is not None else None
    train_rows = pack(train.examples, cfg.max_length) if cfg.packing else train.examples
    stats = {"format": fmt, "train_examples": len(train.examples), "train_rows": len(train_rows),
             "validation_examples": len(val.examples) if val else 0, "truncated": train.truncated,
             "dropped": train.dropped, "train_tokens": sum(len(r["input_ids"]) for r in train_rows)}
    return Datasets(train=train_rows, validation=val.examples if val else [],
                    validation_records=val.records if val else [], format=fmt, stats=stats)
