"""Tokenize once per node: the blocks build_datasets makes, cached in one file keyed by everything they depend on.

The key digests the dataset's identity (a local file's path, size and mtime; every file of a folder;
a hub dataset's datasets fingerprint), the tokenizer's content (its tokenizers JSON, special tokens
and chat template), every DataConfig field (seq_len, seed, format, packing, ...) and the source of
the data code, so any change that could change a block is a new file. Each node's local rank 0
loads the file or builds it and writes it whole (temp file, then rename); the other ranks poll the
file system until it is there. They poll instead of waiting in a barrier: a collective times out
($MEGASPEC_DIST_TIMEOUT_S, 600 s) while a large dataset tokenizes, a file-system wait never does.
A failed build leaves an error file tagged with the run's nonce, so the waiting ranks stop with the
builder's line instead of waiting forever. A file that does not load or fails its checksum (cut
short, overwritten) is ignored by the waiters and rebuilt by the builder.

`python -m megaspec.train.data_cache --dataset F --tokenizer T --seq_len N` fills the cache ahead of a
run (on a login node, say) and prints how long building and loading took.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megaspec.train.data import BlockDataset, DataConfig, DataError, build_datasets, load_records
from megaspec.train.embedded import cache_root

CACHE_FORMAT = 2  # bump when the file layout changes (2: position_ids of isolated packing)
POLL_S = 0.5
NOTE_EVERY_S = 60.0
FIELDS = ("input_ids", "labels", "attention_mask")
OPTIONAL = ("position_ids",)  # isolated packing only
STORED = {"input_ids": torch.int32, "labels": torch.int32, "attention_mask": torch.uint8,  # 9 bytes a token, not 24
          "position_ids": torch.int32}

Blocks = tuple[BlockDataset, BlockDataset]


def cache_dir(option: str | None) -> Path | None:
    """The folder --data_cache names (default $MEGASPEC_CACHE/tokenized), or None for 'none' (no cache)."""
    if option is not None and option.strip().lower() == "none":
        return None
    return Path(option).expanduser() if option else cache_root() / "tokenized"


def dataset_fingerprint(dataset: str | None) -> Any:
    """What identifies the records: 'embedded', a file's path + size + mtime, a folder's files, a hub dataset's fingerprint."""
    if dataset is None:
        return "embedded"
    path = Path(dataset).expanduser()
    if path.is_file():
        stat = path.stat()
        return {"file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return {"folder": str(path.resolve()),
                "files": [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}
    return {"hub": dataset, "fingerprint": load_records(dataset)._fingerprint}  # datasets' own, revision included


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of what the tokenizer does: its full tokenizers JSON (or vocabulary), special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = {"class": type(tokenizer).__name__, "special": tokenizer.special_tokens_map, "bos": tokenizer.bos_token_id,
             "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
             "chat_template": getattr(tokenizer, "chat_template", None)}
    return hashlib.sha256((body + json.dumps(extra, sort_keys=True, default=str)).encode()).hexdigest()


def _code_digest() -> str:
    """The source of the code that makes blocks: an edit to it is a new cache file."""
    here = Path(__file__).parent
    return hashlib.sha256(b"".join((here / name).read_bytes() for name in ("data.py", "chat.py", "embedded.py"))).hexdigest()


def template_fingerprint(cfg: DataConfig, tokenizer: Any) -> str | None:
    """A digest of the chat template the data is rendered with (a --chat_template file's content, not just its name)."""
    from megaspec.train.chat import ChatError, resolve_template

    try:
        template = resolve_template(tokenizer, cfg.chat_template)
    except ChatError:
        return None  # build_datasets raises the same error
    return hashlib.sha256(template.encode()).hexdigest() if template else None


def cache_key(cfg: DataConfig, tokenizer: Any) -> str:
    """The cache file's name: a digest of the dataset, the tokenizer, every DataConfig field and the data code."""
    data = {**dataclasses.asdict(cfg), "dataset": dataset_fingerprint(cfg.dataset)}
    if cfg.eval_dataset is not None:
        data["eval_dataset"] = dataset_fingerprint(cfg.eval_dataset)
    parts = {"format": CACHE_FORMAT, "data": data,
             "tokenizer": tokenizer_fingerprint(tokenizer), "template": template_fingerprint(cfg, tokenizer),
             "code": _code_digest()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:40]


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """A checksum of the stored tensors' bytes (catches a file overwritten in place, which safetensors does not)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().data if tensors[name].numel() else b"")
    return h.hexdigest()


def save_blocks(file: Path, key: str, blocks: Blocks) -> None:
    """Write (train, eval) blocks to `file` whole: a temp file in the same folder, then an atomic rename."""
    from safetensors.torch import save_file

    tensors = {f"{split}.{name}": getattr(ds, name).to(STORED[name]).contiguous()
               for split, ds in zip(("train", "eval"), blocks, strict=True) for name in FIELDS + OPTIONAL
               if getattr(ds, name) is not None}
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{os.uname().nodename}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={"key": key, "digest": _digest(tensors), "format": str(CACHE_FORMAT)})
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


def load_blocks(file: Path, key: str) -> Blocks | None:
    """The (train, eval) blocks in `file`, or None when it is missing, unreadable, cut short or fails its checksum."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception:  # missing, cut short, not safetensors: a miss
        return None
    names = FIELDS + tuple(n for n in OPTIONAL if f"train.{n}" in tensors)
    wanted = {f"{split}.{name}" for split in ("train", "eval") for name in names}
    if meta.get("key") != key or set(tensors) != wanted or meta.get("digest") != _digest(tensors):
        return None
    return tuple(BlockDataset(*(tensors[f"{split}.{name}"].long() for name in names)) for split in ("train", "eval"))


def cached_datasets(
    cfg: DataConfig, tokenizer: Any, folder: Path | None, *, builder: bool, nonce: str = "",
    build: Callable[[DataConfig, Any], Blocks] = build_datasets, poll_s: float = POLL_S,
    log: Callable[[str], None] | None = None,
) -> Blocks:
    """build(cfg, tokenizer), done once per node through the cache in `folder` (None: no cache, every caller builds).

    The builder (a node's local rank 0) loads the file or builds and writes it; the others wait for
    it on the file system, however long that takes, or stop with the builder's error of this run (`nonce`).
    """
    if folder is None:
        return build(cfg, tokenizer)
    key = cache_key(cfg, tokenizer)
    file, error_file = folder / f"{key}.safetensors", folder / f"{key}.error.json"
    if builder:
        return _load_or_build(cfg, tokenizer, file, error_file, key, nonce, build, log)
    return _wait_for(file, error_file, key, nonce, poll_s, log)


def _load_or_build(cfg: DataConfig, tokenizer: Any, file: Path, error_file: Path, key: str, nonce: str,
                   build: Callable[[DataConfig, Any], Blocks], log: Callable[[str], None] | None) -> Blocks:
    """The builder's side: a valid cache file, or build, write it whole, and leave an error file if that fails."""
    found = load_blocks(file, key)
    if found is not None:
        _note(log, f"tokenized data: loaded {file} ({len(found[0])} train, {len(found[1])} eval blocks)")
        return found
    error_file.unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        blocks = build(cfg, tokenizer)
    except Exception as e:
        _write_error(error_file, nonce, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        raise
    tokenized = time.perf_counter() - t0
    try:
        save_blocks(file, key, blocks)
    except OSError as e:
        message = (f"cannot write the tokenized-data cache {file} ({e.strerror or e}); free space there, pass "
                   "--data_cache FOLDER elsewhere, or --data_cache none")
        _write_error(error_file, nonce, message)
        raise DataError(message) from e
    _note(log, f"tokenized data: built in {tokenized:.1f} s, cached as {file}")
    return blocks


def _write_error(error_file: Path, nonce: str, message: str) -> None:
    """Tell this run's waiting ranks the build failed (best effort: the builder's own error is raised anyway)."""
    try:
        error_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = error_file.with_name(f".{error_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"nonce": nonce, "message": message}))
        os.replace(tmp, error_file)
    except OSError:
        pass


def _wait_for(file: Path, error_file: Path, key: str, nonce: str, poll_s: float, log: Callable[[str], None] | None) -> Blocks:
    """A waiting rank's side: poll until the file loads, or the builder of this run reports an error."""
    start, seen, noted = time.monotonic(), None, 0
    while True:
        stat = _stat(file)
        if stat is not None and stat != seen:  # a file that failed to load is read again only once it changes
            found = load_blocks(file, key)
            if found is not None:
                return found
            seen = stat
        message = _error_of(error_file, nonce)
        if message is not None:
            raise DataError(message)
        waited = time.monotonic() - start
        if waited >= (noted + 1) * NOTE_EVERY_S:
            noted += 1
            _note(log, f"waiting {waited:.0f} s for local rank 0 to tokenize the data into {file}")
        time.sleep(poll_s)


def _stat(file: Path) -> tuple[int, int, int] | None:
    try:
        s = file.stat()
    except OSError:
        return None
    return s.st_ino, s.st_size, s.st_mtime_ns


def _error_of(error_file: Path, nonce: str) -> str | None:
    """The builder's error message when it is this run's (an old run's error file is not ours)."""
    try:
        record = json.loads(error_file.read_text())
    except (OSError, ValueError):
        return None
    return record.get("message") if isinstance(record, dict) and record.get("nonce") == nonce else None


def _note(log: Callable[[str], None] | None, line: str) -> None:
    if log is not None:
        log(line)


def run_data_config(dataset: str | None, seq_len: int, seed: int, packing: str = "isolated",
                    chat_template: str | None = "auto", eval_dataset: str | None = None, eval_fraction: float = 0.05,
                    split_seed: int | None = None) -> DataConfig:
    """The DataConfig of a training run (the embedded default fine-tunes on the instruction task)."""
    return DataConfig(dataset=dataset, seq_len=seq_len, seed=seed, format="auto" if dataset else "instruction",
                      packing=packing, chat_template=chat_template, eval_dataset=eval_dataset,
                      eval_fraction=eval_fraction, split_seed=split_seed)


def node_datasets(cfg: DataConfig, tokenizer: Any, option: str | None, nonce: str,
                  log: Callable[[str], None] | None = None) -> Blocks:
    """The run's (train, eval) blocks: this node's local rank 0 builds or loads the cache, the other ranks wait for it."""
    builder = int(os.environ.get("LOCAL_RANK", "0")) == 0
    return cached_datasets(cfg, tokenizer, cache_dir(option), builder=builder, nonce=nonce, log=log)


def check_cache_dir(option: str | None) -> str | None:
    """Why the cache folder cannot be written (then no waiting rank could ever finish), or None; writes nothing."""
    import tempfile

    folder = cache_dir(option)
    if folder is None:
        return None
    base = folder.absolute()
    while not base.exists() and base != base.parent:
        base = base.parent
    try:
        if not base.is_dir():
            raise NotADirectoryError(20, "a file is in the way", str(base))
        fd, probe = tempfile.mkstemp(dir=base, prefix=".megaspec-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return (f"--data_cache {folder} cannot be written ({e.strerror or e} in {base}); pass --data_cache FOLDER you "
                "can write to, or --data_cache none")
    return None


def main(argv: list[str] | None = None) -> int:
    """Build (or load) a run's tokenized blocks into the cache; print the time each took."""
    import argparse

    from megaspec import cli
    from megaspec.train.data import load_tokenizer

    class Parser(cli.Parser):
        tool = "data_cache"

    p = Parser(prog="python -m megaspec.train.data_cache", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=None, help="as launch/train.py --dataset (default: the embedded task)")
    p.add_argument("--tokenizer", default=None, help="as launch/train.py --tokenizer (a model folder works)")
    p.add_argument("--seq_len", type=int, default=128, help="as launch/train.py --seq_len")
    p.add_argument("--seed", type=int, default=42, help="as launch/train.py --seed (it picks the eval split unless --split_seed does)")
    p.add_argument("--data_cache", default=None, help="as launch/train.py --data_cache")
    p.add_argument("--packing", default="isolated", choices=["none", "naive", "isolated"], help="as launch/train.py --packing")
    p.add_argument("--chat_template", default="auto", help="as launch/train.py --chat_template")
    p.add_argument("--eval_dataset", default=None, help="as launch/train.py --eval_dataset")
    p.add_argument("--eval_fraction", type=float, default=0.05, help="as launch/train.py --eval_fraction")
    p.add_argument("--split_seed", type=int, default=None, help="as launch/train.py --split_seed")
    args = p.parse_args(argv)
    folder = cache_dir(args.data_cache)
    if folder is None:
        p.error("--data_cache none: there is no cache to fill")
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        cfg = run_data_config(args.dataset, args.seq_len, args.seed, args.packing, args.chat_template,
                              args.eval_dataset, args.eval_fraction, args.split_seed)
        for _ in range(2):  # the first call builds unless the file is there; the second loads it
            t0 = time.perf_counter()
            train, _ = cached_datasets(cfg, tokenizer, folder, builder=True, log=print)
            print(f"{time.perf_counter() - t0:.2f} s for {len(train)} train blocks of {args.seq_len} tokens", flush=True)
    except (DataError, OSError) as e:
        p.error(str(e).splitlines()[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
