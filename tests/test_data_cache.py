"""megaspec.train.data_cache: tokenize once, load after; any input that changes a block changes the key; ranks wait on files."""

from __future__ import annotations

import datetime
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from megaspec.train.data import DataConfig, DataError, build_datasets
from megaspec.train.data_cache import cache_dir, cache_key, cached_datasets, check_cache_dir, load_blocks
from megaspec.train.embedded import embedded_tokenizer

FIELDS = ("input_ids", "labels", "attention_mask")


def write_records(path: Path, n: int = 120, tag: str = "") -> Path:
    path.write_text("".join(json.dumps({"prompt": f"Q{tag}{i}: 1+{i}? ", "response": f"{i + 1}"}) + "\n" for i in range(n)))
    return path


class Counting:
    """build_datasets, counting its calls (a call is a tokenization)."""

    def __init__(self, delay: float = 0.0, fail: str | None = None) -> None:
        self.calls, self.delay, self.fail = 0, delay, fail

    def __call__(self, cfg: DataConfig, tokenizer):
        self.calls += 1
        time.sleep(self.delay)
        if self.fail:
            raise DataError(self.fail)
        return build_datasets(cfg, tokenizer)


def assert_same_blocks(got, want) -> None:
    for g, w in zip(got, want, strict=True):
        for name in FIELDS:
            assert getattr(g, name).dtype == torch.long
            assert torch.equal(getattr(g, name), getattr(w, name)), name


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer()


def test_second_call_loads_the_blocks_without_tokenizing(tmp_path, tokenizer) -> None:
    cfg = DataConfig(dataset=str(write_records(tmp_path / "d.jsonl")), seq_len=32)
    want = build_datasets(cfg, tokenizer)
    build = Counting()
    first = cached_datasets(cfg, tokenizer, tmp_path / "cache", builder=True, build=build)
    second = cached_datasets(cfg, tokenizer, tmp_path / "cache", builder=True, build=build)
    waiter = cached_datasets(cfg, tokenizer, tmp_path / "cache", builder=False, build=build)
    assert build.calls == 1
    for got in (first, second, waiter):
        assert_same_blocks(got, want)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"{cache_key(cfg, tokenizer)}.safetensors"]


def test_no_cache_tokenizes_every_time(tmp_path, tokenizer, monkeypatch) -> None:
    monkeypatch.setenv("MEGASPEC_CACHE", str(tmp_path / "root"))
    assert cache_dir(None) == tmp_path / "root" / "tokenized"
    assert cache_dir("~/x") == Path.home() / "x"
    assert cache_dir("none") is None and cache_dir("None") is None
    cfg, build = DataConfig(dataset=str(write_records(tmp_path / "d.jsonl")), seq_len=32), Counting()
    for _ in range(2):
        cached_datasets(cfg, tokenizer, cache_dir("none"), builder=True, build=build)
    assert build.calls == 2


def test_the_key_follows_the_file_seq_len_every_data_option_and_the_tokenizer(tmp_path, tokenizer) -> None:
    data = write_records(tmp_path / "d.jsonl")
    cfg = DataConfig(dataset=str(data), seq_len=32)
    key = cache_key(cfg, tokenizer)
    assert cache_key(DataConfig(dataset=str(data), seq_len=32), embedded_tokenizer()) == key  # same inputs, same key
    assert cache_key(DataConfig(dataset=str(data), seq_len=64), tokenizer) != key
    assert cache_key(DataConfig(dataset=str(data), seq_len=32, seed=1), tokenizer) != key
    assert cache_key(DataConfig(dataset=str(data), seq_len=32, packing="none"), tokenizer) != key
    assert cache_key(DataConfig(dataset=str(data), seq_len=32, packing="isolated"), tokenizer) != key
    assert cache_key(DataConfig(dataset=str(data), seq_len=32, add_bos=False), tokenizer) != key
    other = embedded_tokenizer()
    other.add_tokens(["<extra>"])
    assert cache_key(cfg, other) != key
    write_records(data, tag="x")  # new content (size and mtime)
    assert cache_key(cfg, tokenizer) != key
    changed = cache_key(cfg, tokenizer)
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(data.read_bytes())
    assert cache_key(DataConfig(dataset=str(copy), seq_len=32), tokenizer) != changed  # another file


@pytest.mark.parametrize("damage", ["cut_short", "bytes_overwritten", "not_safetensors", "empty"])
def test_a_damaged_cache_file_is_ignored_and_rebuilt(tmp_path, tokenizer, damage: str) -> None:
    cfg = DataConfig(dataset=str(write_records(tmp_path / "d.jsonl")), seq_len=32)
    want, build, folder = build_datasets(cfg, tokenizer), Counting(), tmp_path / "cache"
    cached_datasets(cfg, tokenizer, folder, builder=True, build=build)
    file = folder / f"{cache_key(cfg, tokenizer)}.safetensors"
    raw = file.read_bytes()
    damaged = {"cut_short": raw[: len(raw) // 2], "bytes_overwritten": raw[:-40] + bytes(range(40)),
               "not_safetensors": b"PK\x03\x04 a zip, not blocks" * 10, "empty": b""}[damage]
    file.write_bytes(damaged)
    assert load_blocks(file, cache_key(cfg, tokenizer)) is None
    got = cached_datasets(cfg, tokenizer, folder, builder=True, build=build)
    assert build.calls == 2
    assert_same_blocks(got, want)
    assert_same_blocks(load_blocks(file, cache_key(cfg, tokenizer)), want)


def test_a_waiting_rank_stops_with_the_builders_error_of_this_run_only(tmp_path, tokenizer) -> None:
    cfg, folder = DataConfig(dataset=str(write_records(tmp_path / "d.jsonl")), seq_len=32), tmp_path / "cache"
    folder.mkdir()
    (folder / f"{cache_key(cfg, tokenizer)}.error.json").write_text(json.dumps({"nonce": "old run", "message": "stale"}))
    outcome: dict[str, object] = {}

    def wait(name: str) -> None:
        try:
            outcome[name] = cached_datasets(cfg, tokenizer, folder, builder=False, nonce=name, poll_s=0.02)
        except DataError as e:
            outcome[name] = str(e)

    waiter = threading.Thread(target=wait, args=("run 1",))
    waiter.start()
    with pytest.raises(DataError, match="train split is empty"):
        cached_datasets(cfg, tokenizer, folder, builder=True, nonce="run 1", build=Counting(delay=0.3, fail="train split is empty"))
    waiter.join(timeout=10)
    assert outcome["run 1"] == "train split is empty"  # the stale error of another run was not taken for this one's

    waiter = threading.Thread(target=wait, args=("run 2",))
    waiter.start()
    built = cached_datasets(cfg, tokenizer, folder, builder=True, nonce="run 2", build=Counting(delay=0.3))
    waiter.join(timeout=10)
    assert_same_blocks(outcome["run 2"], built)


def test_an_unwritable_cache_folder_is_refused_before_the_run(tmp_path) -> None:
    (tmp_path / "file").write_text("")
    problem = check_cache_dir(str(tmp_path / "file" / "cache"))
    assert problem is not None and problem.startswith(f"--data_cache {tmp_path / 'file' / 'cache'} cannot be written")
    assert check_cache_dir(str(tmp_path / "new" / "cache")) is None and not (tmp_path / "new").exists()
    assert check_cache_dir("none") is None


TIMEOUT_S, BUILD_S = 2, 5  # the process group's collective timeout, and a build that outlasts it


def _rank(data: str, folder: str) -> dict[str, float]:
    """One rank: rank 0 builds for BUILD_S, rank 1 waits; then a collective on a group that times out after TIMEOUT_S."""
    import torch.distributed as dist

    cfg, tok = DataConfig(dataset=data, seq_len=32), embedded_tokenizer()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    short = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
    dist.barrier()  # both start waiting together
    t0, rank = time.monotonic(), dist.get_rank()
    train, evals = cached_datasets(cfg, tok, Path(folder), builder=rank == 0, nonce="n", build=Counting(delay=BUILD_S),
                                   poll_s=0.05)
    waited = time.monotonic() - t0
    mine = float(train.input_ids.sum() + evals.input_ids.sum())
    total = torch.tensor([mine], dtype=torch.float64)
    dist.all_reduce(total, group=short)  # a barrier during the wait would have timed out on this group
    return {"waited": waited, "sum": mine, "all": float(total)}


@pytest.mark.slow
def test_the_other_rank_waits_on_the_file_past_the_collective_timeout(tmp_path, tokenizer) -> None:
    from tests.distributed import run_ranks

    data = write_records(tmp_path / "d.jsonl")
    builder, waiter = (r.value for r in run_ranks(_rank, 2, args=(str(data), str(tmp_path / "cache")), init=None, timeout=120))
    assert waiter["waited"] >= BUILD_S > TIMEOUT_S
    assert waiter["sum"] == builder["sum"] == builder["all"] / 2
    want = build_datasets(DataConfig(dataset=str(data), seq_len=32), tokenizer)
    assert builder["sum"] == float(want[0].input_ids.sum() + want[1].input_ids.sum())


def test_a_cache_that_cannot_be_written_stops_builder_and_waiters_in_one_line(tmp_path, tokenizer, monkeypatch) -> None:
    import errno

    import megaspec.train.data_cache as data_cache

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data_cache, "save_blocks", full)
    cfg, folder = DataConfig(dataset=str(write_records(tmp_path / "d.jsonl")), seq_len=32), tmp_path / "cache"
    with pytest.raises(DataError) as built:
        cached_datasets(cfg, tokenizer, folder, builder=True, nonce="n")
    with pytest.raises(DataError) as waited:
        cached_datasets(cfg, tokenizer, folder, builder=False, nonce="n", poll_s=0.01)
    assert str(built.value) == str(waited.value)
    assert str(built.value).startswith(f"cannot write the tokenized-data cache {folder}/")
    assert "(No space left on device); free space there" in str(built.value)


def test_the_fill_command_builds_then_loads_and_refuses_none(tmp_path, capsys) -> None:
    from megaspec.train.data_cache import main

    data = write_records(tmp_path / "d.jsonl")
    assert main(["--dataset", str(data), "--seq_len", "32", "--data_cache", str(tmp_path / "cache")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("tokenized data: built in ") and lines[2].startswith("tokenized data: loaded ")
    want = build_datasets(DataConfig(dataset=str(data), seq_len=32, seed=42, format="auto"), embedded_tokenizer())
    assert lines[1].endswith(f" s for {len(want[0])} train blocks of 32 tokens")
    with pytest.raises(SystemExit) as exit_:
        main(["--data_cache", "none"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "data_cache: error: --data_cache none: there is no cache to fill\n"


def test_isolated_blocks_keep_their_positions_and_a_template_file_edit_is_a_new_key(tmp_path, tokenizer) -> None:
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n" for i in range(40)))
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    cfg = DataConfig(dataset=str(data), seq_len=32, packing="isolated", chat_template=str(template))
    want = build_datasets(cfg, tokenizer)
    got = cached_datasets(cfg, tokenizer, tmp_path / "cache", builder=True, build=Counting())
    loaded = load_blocks(tmp_path / "cache" / f"{cache_key(cfg, tokenizer)}.safetensors", cache_key(cfg, tokenizer))
    for blocks in (got, loaded):
        assert_same_blocks(blocks, want)
        for g, w in zip(blocks, want, strict=True):
            assert torch.equal(g.position_ids, w.position_ids)
    key = cache_key(cfg, tokenizer)
    template.write_text(template.read_text().replace(": ", ":: "))
    assert cache_key(cfg, tokenizer) != key
