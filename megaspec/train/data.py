"""Records -> token blocks -> resumable, rank-sharded batches; and the tokenizer that goes with them."""

import csv
import json
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from pathlib import Path

import datasets
import torch
from sentencepiece import sentencepiece_model_pb2
from torch.utils.data import Dataset
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase

from megaspec.train.chat import (
    CHAT_FIELDS,
    ChatError,
    chat_field,
    pair_messages,
    resolve_template,
    to_messages,
    tokenize_chats,
)
from megaspec.train.embedded import embedded_corpus, embedded_instructions, embedded_tokenizer

IGNORE = -100  # label value the HF causal-LM loss skips
FORMATS = ("auto", "text", "instruction", "chat")
PACKING = ("none", "naive", "isolated")  # one block per record | concatenated | concatenated, documents kept apart
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
ALPACA_FIELDS = ("instruction", "input", "output")
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"

Example = tuple[list[int], list[int]]  # (input_ids, labels) of one record, before packing


class DataError(ValueError):
    """A dataset or tokenizer problem, stated in one line with its fix."""


@dataclass
class DataConfig:
    """Where the training text comes from and how it becomes fixed-length blocks."""

    dataset: str | None = None  # None: embedded corpus, or embedded instructions if format="instruction"
    seq_len: int = 128
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    eval_fraction: float = 0.05  # of records; at least one record (hence one block) when > 0
    eval_dataset: str | None = None  # held-out records of their own: then every record of `dataset` trains
    split_seed: int | None = None  # seeds which records eval_fraction holds out (None: `seed`)
    packing: str = "naive"  # PACKING; the trainer's --packing defaults to isolated
    seed: int = 0
    format: str = "auto"  # "auto" | "text" | "instruction" | "chat"
    chat_template: str | None = "none"  # "auto": the tokenizer's; "none"; or a .jinja file (the trainer's default is auto)
    add_bos: bool = True  # prepend BOS to every record, as LLaMA pretraining did
    embedded_records: int = 2000  # size of the embedded default dataset


class BlockDataset(Dataset):
    """Fixed-length token blocks held as [n_blocks, seq_len] LongTensors.

    position_ids (isolated packing) restart at 0 at every document and block start; a batch that
    carries them goes to the model without attention_mask (see `collate`).
    """

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None):
        self.input_ids, self.labels, self.attention_mask = input_ids, labels, attention_mask
        self.position_ids = position_ids

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"input_ids": self.input_ids[i], "labels": self.labels[i], "attention_mask": self.attention_mask[i]}
        if self.position_ids is not None:
            item["position_ids"] = self.position_ids[i]
        return item


def _looks_like_path(name: str) -> bool:
    """True for strings that cannot be a hub id ('org/name'), so a missing path is reported as missing."""
    return (
        name.startswith((".", "/", "~"))
        or "\\" in name
        or name.count("/") > 1
        or Path(name).suffix in FILE_BUILDERS
    )


def _first_line(e: Exception) -> str:
    """An exception as 'Type: first line of its message'."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def load_records(path_or_id: str) -> datasets.Dataset:
    """Load a local .json/.jsonl/.parquet/.csv/.txt file, a saved `datasets` directory, or a hub dataset id."""
    path = Path(path_or_id).expanduser()
    try:
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(
                    f"dataset file {path} has unsupported type '{path.suffix}'; use one of {', '.join(FILE_BUILDERS)}"
                )
            ds = datasets.load_dataset(builder, data_files=str(path))
        elif path.is_dir():
            saved = any((path / f).exists() for f in ("state.json", "dataset_dict.json"))
            ds = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(str(path))
        elif _looks_like_path(path_or_id):
            raise DataError(
                f"dataset path {path_or_id} does not exist; pass an existing .jsonl/.json/.parquet/.csv/.txt file, "
                "a directory saved by datasets.save_to_disk, or a hub id such as 'tatsu-lab/alpaca'"
            )
        else:
            ds = datasets.load_dataset(path_or_id)
    except DataError:
        raise
    except Exception as e:
        if path.is_file():
            check_dataset_file(path)  # names the file and the record, when a record is the problem
        raise DataError(
            f"could not load dataset {path_or_id!r} ({_first_line(e)}); check the file's format, "
            "or for a hub id check the name and that the hub is reachable"
        ) from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds and len(ds) != 1:
            raise DataError(
                f"dataset {path_or_id!r} has splits {list(ds)} but no 'train' split; save one as 'train'"
            )
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return ds


def detect_format(columns: Sequence[str], cfg: DataConfig) -> str:
    """'chat' (messages/conversations), 'instruction' (prompt/response or alpaca) or 'text', honouring cfg.format."""
    if cfg.format not in FORMATS:
        raise DataError(f"unknown data format {cfg.format!r}; use one of {', '.join(FORMATS)}")
    if cfg.format in ("auto", "chat") and chat_field(columns):
        return "chat"
    has_pair = cfg.prompt_field in columns and cfg.response_field in columns
    has_alpaca = "instruction" in columns and "output" in columns
    if cfg.format in ("auto", "instruction") and (has_pair or has_alpaca):
        return "instruction"
    if cfg.format in ("auto", "text") and cfg.text_field in columns:
        return "text"
    wanted = {
        "auto": f"'messages' or 'conversations' (chat), '{cfg.text_field}' (text), '{cfg.prompt_field}'+"
                f"'{cfg.response_field}' or 'instruction'+'output'",
        "chat": "'messages' or 'conversations'",
        "text": f"'{cfg.text_field}'",
        "instruction": f"'{cfg.prompt_field}'+'{cfg.response_field}' or 'instruction'+'output'",
    }[cfg.format]
    raise DataError(
        f"dataset has fields {sorted(columns)} but format={cfg.format!r} needs {wanted}; "
        "rename the fields or set text_field/prompt_field/response_field"
    )


def format_fields(columns: Sequence[str], cfg: DataConfig) -> list[str]:
    """The fields the loop reads (as text, or a chat's turns) for the format detect_format picks from `columns`."""
    fmt = detect_format(columns, cfg)
    if fmt == "chat":
        return [chat_field(columns)]
    if fmt == "text":
        return [cfg.text_field]
    if cfg.prompt_field in columns and cfg.response_field in columns:
        return [cfg.prompt_field, cfg.response_field]
    return [f for f in ALPACA_FIELDS if f in columns]


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) of a text file; DataError at the first binary or non-UTF-8 line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if b"\0" in raw:
                raise DataError(f"dataset file {path} line {number} holds binary data (a NUL byte); "
                                "pass a text .jsonl/.json/.csv/.txt file or a .parquet file")
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"dataset file {path} is not UTF-8 (line {number}, byte 0x{raw[e.start]:02x}); convert it, "
                                f"e.g. iconv -f latin1 -t utf-8 {path} > {path.with_suffix('.utf8' + path.suffix)}") from None


def _json_records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) of a JSON lines file, or of a file holding one JSON array (a pretty-printed object: none)."""
    lines = _text_lines(path)
    first = next(((n, line) for n, line in lines if line.strip()), None)
    if first is None:
        return
    head = first[1].strip()
    if head.startswith("[") or head == "{":  # one JSON value over the whole file, as datasets reads it
        text = first[1] + "".join(line for _, line in lines)
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"dataset file {path} line {first[0] + e.lineno - 1} is not valid JSON ({e.msg}); fix the file") from None
        if isinstance(value, list):  # datasets reads a list of strings as 'text' records
            yield from ((f"record {i + 1}", {"text": r} if isinstance(r, str) else r) for i, r in enumerate(value))
        return
    for number, line in chain([first], lines):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line.rstrip("\r\n"))  # columns then count within the line
        except json.JSONDecodeError as e:
            raise DataError(f"dataset file {path} line {number} is not valid JSON ({e.msg} at column {e.colno}); "
                            "fix or remove that line") from None


def _check_json_records(path: Path, records: Iterable[tuple[str, object]], cfg: DataConfig) -> None:
    """Every record is an object holding the format's fields: strings (or null), or a chat with an assistant turn."""
    fields: list[str] | None = None
    for where, record in chain(records, [("", None)]):
        if where == "":
            if fields is None:
                raise DataError(f"dataset file {path} is empty (no records); add records, one JSON object per line")
            return
        if not isinstance(record, dict):
            raise DataError(f"dataset file {path} {where} is a JSON {type(record).__name__}, not an object; "
                            "write one object per record")
        if fields is None:
            try:
                fields = format_fields(list(record), cfg)
            except DataError as e:
                raise DataError(f"dataset file {path} {where}: {e}") from None
        if not any(name in record for name in fields):
            raise DataError(f"dataset file {path} {where} has fields {sorted(record)} but none of {fields} that the "
                            "records before it have; give every record the same fields")
        if fields[0] in CHAT_FIELDS:
            try:
                to_messages(record.get(fields[0]))
            except ChatError as e:
                raise DataError(f"dataset file {path} {where}: {e}") from None
            continue
        for name in fields:
            value = record.get(name)
            if value is not None and not isinstance(value, str):
                raise DataError(f"dataset file {path} {where}: field '{name}' holds a {type(value).__name__}, not a string; "
                                "make it text")


def _check_csv(path: Path, cfg: DataConfig) -> None:
    """A header naming the text fields, and no row with more fields than the header."""
    reader = csv.reader(line for _, line in _text_lines(path))
    header = next(reader, None)
    if header is None:
        raise DataError(f"dataset file {path} is empty; add a header and records")
    format_fields(header, cfg)
    for row in reader:
        if len(row) > len(header):
            raise DataError(f"dataset file {path} line {reader.line_num} has {len(row)} fields but the header has "
                            f"{len(header)}; quote fields that hold commas")


def _check_parquet(path: Path, cfg: DataConfig) -> None:
    """The text fields are string columns, and every row group of them can be read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"dataset file {path} is not a readable parquet file ({_first_line(e)}); re-write it") from None
    schema = table.schema_arrow
    fields = format_fields(schema.names, cfg)
    for name in [f for f in fields if f not in CHAT_FIELDS]:
        kind = schema.field(name).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
            raise DataError(f"dataset file {path}: field '{name}' holds {kind} values, not strings; make it text")
    first = 0
    for group in range(table.num_row_groups):
        rows = table.metadata.row_group(group).num_rows
        try:
            table.read_row_group(group, columns=fields)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"dataset file {path}: records {first + 1}..{first + rows} cannot be read "
                            f"({_first_line(e)}); re-write the file") from None
        first += rows


def check_dataset_file(path: str | Path, cfg: DataConfig | None = None) -> None:
    """Read a local dataset file once, record by record, without tokenizing: DataError naming the file and record.

    datasets reports a bad line as "An error occurred while generating the dataset", and a bad
    text field only surfaces after the model is loaded; this pass costs a read of the file.
    """
    path = Path(path).expanduser()
    cfg = cfg or DataConfig(dataset=str(path))
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        _check_json_records(path, _json_records(path), cfg)
    elif suffix == ".txt":
        if not any(line.strip() for _, line in _text_lines(path)):
            raise DataError(f"dataset file {path} is empty (no text lines); add records, one per line")
    elif suffix == ".csv":
        _check_csv(path, cfg)
    elif suffix == ".parquet":
        _check_parquet(path, cfg)


def _strings(ds: datasets.Dataset, field: str) -> list[str]:
    """One column as strings (None -> ''); DataError for non-string values such as chat message lists."""
    values = list(ds[field])
    bad = next((v for v in values if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        raise DataError(
            f"field '{field}' holds {type(bad).__name__} values, not strings; flatten it to text first"
        )
    return ["" if v is None else v for v in values]


def _instruction_pairs(ds: datasets.Dataset, cfg: DataConfig, chat: bool = False) -> tuple[list[str], list[str]]:
    """(prompts, responses), mapping alpaca instruction/input/output onto a fixed prompt (chat: the user turn)."""
    if cfg.prompt_field in ds.column_names and cfg.response_field in ds.column_names:
        return _strings(ds, cfg.prompt_field), _strings(ds, cfg.response_field)
    inputs = _strings(ds, "input") if "input" in ds.column_names else [""] * len(ds)
    if chat:
        return ([f"{ins}\n\n{inp}" if inp.strip() else ins for ins, inp in zip(_strings(ds, "instruction"), inputs, strict=True)],
                _strings(ds, "output"))
    prompts = [
        (ALPACA_PROMPT_INPUT if inp.strip() else ALPACA_PROMPT).format(instruction=ins, input=inp)
        for ins, inp in zip(_strings(ds, "instruction"), inputs, strict=True)
    ]
    return prompts, _strings(ds, "output")


def tokenize_texts(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, add_bos: bool = True
) -> list[Example]:
    """Causal LM examples: [BOS] text EOS, every token a label."""
    if not texts:  # transformers 5 fast tokenizers raise IndexError on an empty batch
        return []
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    out = []
    for t in ids:
        tokens = bos + t + [tokenizer.eos_token_id]
        out.append((tokens, list(tokens)))
    return out


def tokenize_instructions(
    prompts: Sequence[str], responses: Sequence[str], tokenizer: PreTrainedTokenizerBase, add_bos: bool = True
) -> list[Example]:
    """Instruction examples: [BOS] prompt response EOS, with BOS and prompt labels masked to -100."""
    if not prompts:  # transformers 5 fast tokenizers raise IndexError on an empty batch
        return []
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    p_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    out = []
    for p, r in zip(p_ids, r_ids, strict=True):
        head, tail = bos + p, r + [tokenizer.eos_token_id]
        out.append((head + tail, [IGNORE] * len(head) + tail))
    return out


def _keep_trained(blocks: BlockDataset) -> BlockDataset:
    """Drop blocks with no label to predict (HF shifts labels, so position 0 is never a target): they give NaN loss."""
    keep = (blocks.labels[:, 1:] != IGNORE).any(dim=1)
    positions = None if blocks.position_ids is None else blocks.position_ids[keep]
    return BlockDataset(blocks.input_ids[keep], blocks.labels[keep], blocks.attention_mask[keep], positions)


def document_positions(lengths: Sequence[int], n_blocks: int, seq_len: int) -> torch.Tensor:
    """[n_blocks, seq_len] positions that restart at 0 at every document and every block start (padding: one more document)."""
    total = n_blocks * seq_len
    starts = torch.zeros(total, dtype=torch.bool)
    offsets = torch.tensor([0, *lengths], dtype=torch.long).cumsum(0)
    starts[offsets[offsets < total]] = True
    starts[::seq_len] = True
    index = torch.arange(total)
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(0).values
    return (index - first).view(n_blocks, seq_len)


def pack_examples(examples: Sequence[Example], seq_len: int, pad_id: int, isolate: bool = False) -> BlockDataset:
    """Concatenate examples and cut into seq_len blocks; the last block is right-padded (label -100, mask 0).

    isolate: also store per-document position_ids, so documents sharing a block do not attend to each other.
    """
    ids = list(chain.from_iterable(e[0] for e in examples))
    labels = list(chain.from_iterable(e[1] for e in examples))
    n_blocks = -(-len(ids) // seq_len)
    pad = n_blocks * seq_len - len(ids)
    mask = [1] * len(ids) + [0] * pad
    positions = document_positions([len(e[0]) for e in examples], n_blocks, seq_len) if isolate else None
    return _keep_trained(
        BlockDataset(
            torch.tensor(ids + [pad_id] * pad, dtype=torch.long).view(n_blocks, seq_len),
            torch.tensor(labels + [IGNORE] * pad, dtype=torch.long).view(n_blocks, seq_len),
            torch.tensor(mask, dtype=torch.long).view(n_blocks, seq_len),
            positions,
        )
    )


def pad_examples(examples: Sequence[Example], seq_len: int, pad_id: int) -> BlockDataset:
    """One block per example: truncated to seq_len, right-padded with pad_id (label -100, mask 0)."""
    input_ids = torch.full((len(examples), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), seq_len), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), seq_len), dtype=torch.long)
    for i, (tokens, labs) in enumerate(examples):
        n = min(len(tokens), seq_len)
        input_ids[i, :n] = torch.tensor(tokens[:n])
        labels[i, :n] = torch.tensor(labs[:n])
        mask[i, :n] = 1
    return _keep_trained(BlockDataset(input_ids, labels, mask))


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded permutation of range(n) cut into (train, eval); eval has max(1, round(n * fraction)) items."""
    if not 0 <= eval_fraction < 1:
        raise DataError(f"eval_fraction={eval_fraction} must be in [0, 1)")
    n_eval = max(1, round(n * eval_fraction)) if eval_fraction > 0 else 0
    if n - n_eval < 1:
        raise DataError(
            f"{n} record(s) leave nothing to train on after the eval split; add data or lower eval_fraction"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[n_eval:], perm[:n_eval]


def _embedded_records(cfg: DataConfig) -> datasets.Dataset:
    """The embedded corpus, or the embedded instructions when cfg.format is 'instruction'."""
    if cfg.format == "instruction":
        records = [
            {cfg.prompt_field: r["prompt"], cfg.response_field: r["response"]}
            for r in embedded_instructions(cfg.embedded_records, cfg.seed)
        ]
    else:
        records = [{cfg.text_field: t} for t in embedded_corpus(cfg.embedded_records, cfg.seed)]
    return datasets.Dataset.from_list(records)


def _chat_examples(
    conversations: Sequence[list[dict[str, str]]], rows: Sequence[int], tokenizer: PreTrainedTokenizerBase,
    template: str, name: str,
) -> list[Example]:
    """Template-rendered examples (megaspec.train.chat), errors naming the dataset and record."""
    try:
        return tokenize_chats(conversations, tokenizer, template, [f"dataset {name} record {r + 1}" for r in rows])
    except ChatError as e:
        raise DataError(str(e)) from None


def _conversations(ds: datasets.Dataset, field: str, name: str) -> list[list[dict[str, str]]]:
    """Every record's turns as role/content messages; DataError naming the record for a malformed one."""
    out = []
    for row, turns in enumerate(ds[field]):
        try:
            out.append(to_messages(turns))
        except ChatError as e:
            raise DataError(f"dataset {name} record {row + 1}: {e}") from None
    return out


def build_examples(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[Example], list[Example], str]:
    """(train, eval) examples (one per record, formatted and masked, before packing) and the dataset's name.

    The eval examples are cfg.eval_dataset's records when it is given (then every record of
    cfg.dataset trains), else cfg.eval_fraction of cfg.dataset's records, drawn with cfg.split_seed.
    """
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise DataError("tokenizer has no eos/pad token; load it with megaspec.train.data.load_tokenizer")
    if cfg.packing not in PACKING:
        raise DataError(f"unknown packing {cfg.packing!r}; use one of {', '.join(PACKING)}")
    if cfg.dataset is None:
        ds, name = _embedded_records(cfg), "embedded default"
    else:
        ds, name = load_records(cfg.dataset), cfg.dataset
    n, examples_of, fmt = _formatted(ds, name, cfg, tokenizer)
    split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    if cfg.eval_dataset is None:
        train_idx, eval_idx = split_indices(n, cfg.eval_fraction, split_seed)
        return examples_of(train_idx), examples_of(eval_idx), name
    held = load_records(cfg.eval_dataset)
    n_held, held_examples_of, held_fmt = _formatted(held, cfg.eval_dataset, cfg, tokenizer)
    if held_fmt != fmt:
        raise DataError(f"eval dataset {cfg.eval_dataset!r} holds {held_fmt} records but dataset {name!r} holds {fmt} "
                        "records; give --eval_dataset records in the training data's format")
    train_idx, _ = split_indices(n, 0.0, split_seed)
    return examples_of(train_idx), held_examples_of(list(range(n_held))), name


def _formatted(
    ds: datasets.Dataset, name: str, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[int, Callable[[Sequence[int]], list[Example]], str]:
    """(number of usable records, a function making the examples of some of them, the records' format) of `ds`."""
    if len(ds) == 0:
        raise DataError(f"dataset {name!r} is empty (no records); add records")
    fmt = detect_format(ds.column_names, cfg)
    try:
        template = resolve_template(tokenizer, cfg.chat_template) if fmt != "text" else None
    except ChatError as e:
        raise DataError(str(e)) from None
    chats: list[list[dict[str, str]]] = []
    if fmt == "chat":
        if template is None:
            raise DataError(f"dataset {name!r} holds chat records but the tokenizer has no chat template; "
                            "pass --chat_template FILE.jinja")
        chats = _conversations(ds, chat_field(ds.column_names), name)
        keep, what = list(range(len(chats))), "an assistant turn"
    elif fmt == "instruction":
        prompts, responses = _instruction_pairs(ds, cfg, chat=template is not None)
        keep = [i for i, r in enumerate(responses) if r.strip()]
        what = "a non-empty response"
        chats = [pair_messages(p, r) for p, r in zip(prompts, responses, strict=True)] if template else []
    else:
        texts = _strings(ds, cfg.text_field)
        keep = [i for i, t in enumerate(texts) if t.strip()]
        what = f"non-empty '{cfg.text_field}'"
    if not keep:
        raise DataError(
            f"dataset {name!r} has no record with {what} ({len(ds)} records read); check the fields"
        )

    def examples_of(idx: Sequence[int]) -> list[Example]:
        rows = [keep[i] for i in idx]
        if chats:
            return _chat_examples([chats[i] for i in rows], rows, tokenizer, template, name)
        if fmt == "instruction":
            return tokenize_instructions([prompts[i] for i in rows], [responses[i] for i in rows], tokenizer, cfg.add_bos)
        return tokenize_texts([texts[i] for i in rows], tokenizer, cfg.add_bos)

    return len(keep), examples_of, fmt


def to_blocks(examples: Sequence[Example], cfg: DataConfig, pad_id: int) -> BlockDataset:
    """Examples as seq_len blocks, by cfg.packing."""
    if cfg.packing == "none":
        return pad_examples(examples, cfg.seq_len, pad_id)
    return pack_examples(examples, cfg.seq_len, pad_id, isolate=cfg.packing == "isolated")


def build_datasets(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[BlockDataset, BlockDataset]:
    """(train, eval) datasets of fixed-length blocks; items are dict(input_ids, labels, attention_mask[, position_ids])."""
    if cfg.seq_len < 2:
        raise DataError(f"seq_len={cfg.seq_len} is too short; use at least 2 tokens")
    train_examples, eval_examples, name = build_examples(cfg, tokenizer)
    train, evals = (to_blocks(e, cfg, tokenizer.pad_token_id) for e in (train_examples, eval_examples))
    if len(train) == 0 or (eval_examples and len(evals) == 0):
        split = "train" if len(train) == 0 else "eval"
        raise DataError(
            f"{split} split of {name!r} is empty after tokenising: no block has a label to train on "
            f"(prompts longer than seq_len={cfg.seq_len}?); raise seq_len or use --packing isolated"
        )
    return train, evals


def collate(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack per-item tensors into a model-ready batch.

    With position_ids (isolated packing) the 2-D attention_mask is left out: transformers then
    reads document boundaries from the position resets (a block-diagonal causal mask for eager and
    sdpa, varlen kernels for flash attention), built per micro-batch. It does so only when the
    forward has no KV cache: the loop sets model.config.use_cache = False (tests/test_chat.py
    checks the losses against each document alone); megaspec.train.validate refuses a
    transformers without packed-sequence masks.
    """
    batch = {k: torch.stack([item[k] for item in items]) for k in items[0]}
    if "position_ids" in batch:
        del batch["attention_mask"]
    return batch


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Input tokens of a batch (padding excluded where the batch carries its attention_mask)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def batch_iterator(
    dataset: Dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start_step: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless rank-local batches: step s's global batch is stream items [s*G, (s+1)*G), G = batch_size*world_size.

    The stream is epoch 0's permutation (seed + 0), then epoch 1's (seed + 1), ...; rank r takes slice
    [r*batch_size, (r+1)*batch_size) of each global batch. So the global batch depends only on G, not on how
    it is split over ranks, and resuming at start_step is index arithmetic: no tokenising, no replay.
    """
    n = len(dataset)
    if n == 0:
        raise DataError("cannot iterate over an empty dataset; add data")
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or start_step < 0:
        raise DataError(
            f"bad batch layout batch_size={batch_size} rank={rank} world_size={world_size} start_step={start_step}"
        )

    @lru_cache(maxsize=2)
    def order(epoch: int) -> list[int]:
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()

    global_batch = batch_size * world_size
    step = start_step
    while True:
        first = step * global_batch + rank * batch_size
        yield collate([dataset[order(p // n)[p % n]] for p in range(first, first + batch_size)])
        step += 1


def _sentencepiece_tokenizer(model_file: Path) -> PreTrainedTokenizerBase:
    """LlamaTokenizer from a sentencepiece .model (transformers 5 converts it to a tokenizers BPE backend)."""
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as e:
        raise DataError(
            f"{model_file} is not a sentencepiece model ({_first_line(e)}); pass a valid .model"
        ) from e
    kind = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
    if kind != "BPE":
        raise DataError(
            f"{model_file} is a {kind} sentencepiece model; LLaMA tokenizers are BPE: pass a directory with "
            "tokenizer.json/tokenizer_config.json instead"
        )
    if not proto.trainer_spec.byte_fallback:
        warnings.warn(
            f"{model_file} has no byte fallback: characters outside its vocabulary are dropped", stacklevel=3
        )
    # vocab_file= alone gives a 3-token tokenizer in transformers 5; from_pretrained on the folder converts it.
    return LlamaTokenizer.from_pretrained(str(model_file.parent), vocab_file=str(model_file))


def load_tokenizer(path_or_none: str | None) -> PreTrainedTokenizerBase:
    """None -> embedded tokenizer; HF tokenizer folder, sentencepiece tokenizer.model (or its folder), or hub id."""
    if path_or_none is None:
        return embedded_tokenizer()
    path = Path(path_or_none).expanduser()
    try:
        if path.is_file() and path.suffix == ".model":
            tok = _sentencepiece_tokenizer(path)
        elif path.is_file():
            raise DataError(
                f"tokenizer file {path} is not a sentencepiece .model; pass the folder that holds it"
            )
        elif path.is_dir() and any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            tok = AutoTokenizer.from_pretrained(str(path))
        elif path.is_dir() and (path / "tokenizer.model").exists():
            tok = _sentencepiece_tokenizer(path / "tokenizer.model")
        elif path.is_dir():
            raise DataError(
                f"{path} has no tokenizer.json, tokenizer_config.json or tokenizer.model; "
                "save the tokenizer there with tokenizer.save_pretrained"
            )
        elif _looks_like_path(path_or_none):
            raise DataError(
                f"tokenizer path {path_or_none} does not exist; pass an existing folder or .model file"
            )
        else:
            tok = AutoTokenizer.from_pretrained(path_or_none)
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"could not load tokenizer {path_or_none!r} ({_first_line(e)}); check the path or hub id"
        ) from e
    if tok.eos_token_id is None:
        raise DataError(
            f"tokenizer {path_or_none!r} has no eos token; set eos_token in its tokenizer_config.json"
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
