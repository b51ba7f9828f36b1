"""Benchmarks: `python launch/bench.py <overhead|crossover|params|memory|checkpointing|selection|quality|throughput|load|host_memory|merge_base|events|packing> [--json]`.

Each prints a table to stdout (or, with --json, one JSON object: command, machine, date, result)
and asserts nothing; the machine line goes to stderr. Measured numbers live in BENCHMARKS.md.

    python launch/bench.py overhead --shapes 4096x4096,4096x14336 --tokens 2048
    python launch/bench.py crossover
    python launch/bench.py params
    python launch/bench.py memory [--validate]
    python launch/bench.py checkpointing [--models small,8b-2layers] [--seq_len 512] [--s2ft]
    python launch/bench.py selection
    python launch/bench.py quality
    python launch/bench.py quality --real --methods ssh,lora --seeds 0 --lrs 0.03 --steps 200   # SmolLM2 on BoolQ
    python launch/bench.py quality --real --methods ssh --results quality.jsonl   # in pieces: rows kept, reused next time
    python launch/bench.py throughput --layers 4          # CUDA only; the ZeRO-3 engine (--engine plain: PyTorch)
    python launch/bench.py load                           # per-rank peak of loading bf16/nf4/int8 under ZeRO-3, 1 and 2 CPU ranks
    python launch/bench.py host_memory                    # per-rank peak RSS of megaspec vs HF Trainer + peft on SmolLM2, 2 CPU ranks
    python launch/bench.py events                         # TensorBoard event-file and report.html size of an 80-layer model, 1,000 steps
    python launch/bench.py merge_base                     # SmolLM2 perplexity: fp32, nf4, an nf4-trained adapter merged onto each base
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megaspec import cli
from megaspec.benchmarks.common import LLAMA_CONFIGS, machine, parse_methods, registered_methods, table
from megaspec.train.dsconfig import ConfigError

REPO = Path(__file__).resolve().parents[1]


class Parser(cli.Parser):
    """One-line errors prefixed `bench:` (megaspec.cli).

    Flags are --snake_case like every megaspec tool; the --kebab-case spelling of earlier releases
    is still accepted (not shown in --help), so old benchmark commands keep working.
    """

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([snake_case_flag(a) for a in args], namespace)

    tool = "bench"


def snake_case_flag(arg: str) -> str:
    """`--world-sizes=1,2` -> `--world_sizes=1,2`; any other argument unchanged."""
    if not arg.startswith("--"):
        return arg
    flag, eq, value = arg.partition("=")
    return "--" + flag[2:].replace("-", "_") + eq + value


def count(low: int) -> Callable[[str], int]:
    """argparse type: a whole number of at least `low`."""
    def integer(text: str) -> int:
        value = int(text)  # ValueError: argparse says "invalid integer value"
        if value < low:
            raise argparse.ArgumentTypeError(f"{text} must be at least {low}")
        return value
    return integer


def counts(low: int) -> Callable[[str], tuple[int, ...]]:
    """argparse type: comma-separated whole numbers, each at least `low`."""
    one = count(low)

    def integers(text: str) -> tuple[int, ...]:
        return tuple(one(v) for v in text.split(","))
    return integers


def positive(text: str) -> float:
    """argparse type: a finite number above 0."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number above 0")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = float(text)
    if not 0 <= value <= 1:  # also false for nan
        raise argparse.ArgumentTypeError(f"{text} must be in [0, 1]")
    return value


def shapes(text: str) -> list[tuple[int, int]]:
    """argparse type: comma-separated OUTxIN layer shapes such as 4096x4096,4096x14336."""
    out = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or min(int(p) for p in parts) < 1:
            raise argparse.ArgumentTypeError(f"{item!r} is not a layer shape; write OUTxIN with both at least 1, e.g. 4096x4096")
        out.append((int(parts[0]), int(parts[1])))
    return out


def one_of(valid: Callable[[], list[str]], what: str) -> Callable[[str], list[str] | None]:
    """argparse type: a comma-separated subset of valid(); 'all' gives None (no filter)."""
    def names(text: str) -> list[str] | None:
        chosen = parse_methods(text)
        unknown = [n for n in chosen or () if n not in valid()]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown[0]!r}; choose from {', '.join(valid())}")
        return chosen
    return names


def target_sets(text: str) -> tuple[str, ...]:
    """argparse type: comma-separated target sets of quality --real, qv (q_proj, v_proj) and all (every linear)."""
    chosen = tuple(v.strip() for v in text.split(","))
    for name in chosen:
        if name not in ("qv", "all"):
            raise argparse.ArgumentTypeError(f"unknown target set {name!r}; choose from qv, all")
    return chosen


def device(text: str) -> str:
    """argparse type: cpu, or cuda / cuda:N when this machine has a CUDA GPU."""
    try:
        kind = torch.device(text).type
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu or cuda") from None
    if kind not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: the benchmarks run on cpu or cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA GPU; use --device cpu")
    return text


def megaspec_methods() -> list[str]:
    """The registered methods (params, memory, throughput run only these)."""
    return registered_methods()


def compared_methods() -> list[str]:
    """Registered methods and the peft baselines that overhead and quality also run."""
    return [*registered_methods(), "peft_lora", "peft_fourierft"]


def model_names() -> list[str]:
    """The model shapes the benchmarks know (LLAMA_CONFIGS)."""
    return list(LLAMA_CONFIGS)


def precisions() -> list[str]:
    """The frozen-base precisions bench memory computes."""
    from megaspec.benchmarks.memory import PRECISIONS

    return list(PRECISIONS)


def _modes(text: str) -> str:
    modes = text.split(",")
    if not modes or set(modes) - {"full", "branch"}:
        raise argparse.ArgumentTypeError(f"{text!r}: use full, branch or full,branch")
    return text


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular expression: {err}") from None
    return text


def overhead(args: argparse.Namespace) -> tuple[Any, str]:
    from megaspec.benchmarks import overhead as bench

    rows = []
    for m, n in args.shapes:
        if args.device == "cpu" and "full" in args.modes and 4 * m * n * args.tokens > 1e12:
            print(f"note: {m}x{n} at {args.tokens} tokens is {4 * m * n * args.tokens / 1e12:.1f} TFLOP per frozen "
                  "step; on a CPU pass a smaller --tokens", file=sys.stderr)
        rows += bench.run((m, n), args.tokens, args.reps, args.warmup, args.device, getattr(torch, args.dtype),
                          args.methods, synthetic=not args.real_svd, settle=args.settle,
                          modes=tuple(args.modes.split(",")), only=args.variants)
    return rows, bench.format_table(rows)


def crossover(args: argparse.Namespace) -> tuple[Any, str]:
    from megaspec.benchmarks import crossover as bench

    rows = bench.run(args.shapes, args.n, args.tokens, args.reps, args.threads)
    return rows, bench.format_table(rows)


def params(args: argparse.Namespace) -> tuple[Any, str]:
    from megaspec.benchmarks import params as bench

    rows = bench.run(args.models, args.methods)
    return rows, table(rows, bench.COLUMNS)


def memory(args: argparse.Namespace) -> tuple[Any, str]:
    from megaspec.benchmarks import memory as bench

    if args.validate:
        rows = bench.validate()
        return rows, table(rows, bench.VALIDATE_COLUMNS)
    result = bench.run(args.models, tuple(args.precisions), args.world_sizes, args.micro_batch, args.seq_len, args.methods,
                       args.gradient_checkpointing)
    return result, bench.format_table(result)


def checkpointing(args: argparse.Namespace) -> tuple[Any, str]:
    from megaspec.benchmarks import checkpointing as bench

    dtype = getattr(torch, args.dtype)
    rows = bench.run([m for m in args.models.split(",") if m], args.batch, args.seq_len, args.steps, args.warmup, dtype)
    result: dict[str, Any] = {"steps": rows}
    text = table(rows, bench.COLUMNS) if rows else ""
    if args.s2ft:
        budgets = tuple(mb * 2**20 for mb in args.s2ft_budgets_mb)
        result["s2ft_estimate"] = bench.s2ft_estimate(args.s2ft_model, budgets, args.batch, args.s2ft_seq_len, dtype)
        result["s2ft_extrapolated"] = bench.extrapolate_estimate()
        text += "\n\n" if text else ""
        text += "S2FT gradient estimate, peak bytes of the passes by layer-group budget (measured)\n"
        text += table(result["s2ft_estimate"], bench.ESTIMATE_COLUMNS)
        text += "\n\nS2FT fp32 estimate buffers held at once per rank, from the layer shapes\n"
        text += table(result["s2ft_extrapolated"], bench.extrapolate_columns())
    return result, text


def selection(args: argparse.Namespace) -> tuple[Any, str]:
    from megaspec.benchmarks import selection as bench

    result = bench.run(args.model, args.dtype, args.n_coeffs, args.energy_ratio, args.world_sizes, args.threads,
                       args.ranks, args.rank_layers, args.rank_width, combine=not args.no_combine)
    return result, bench.format_table(result)


def quality(args: argparse.Namespace) -> tuple[Any, str]:
    from megaspec.benchmarks import quality as bench

    if args.real:
        return real_quality(args)
    rows = bench.run(args.steps, args.seeds, args.methods, args.lrs, args.jobs, args.threads,
                     log=lambda line: print(line, file=sys.stderr, flush=True))
    return rows, bench.format_table(rows)


def real_quality(args: argparse.Namespace) -> tuple[Any, str]:
    from megaspec.benchmarks import real_quality as bench

    try:
        rows = bench.run(args.model, args.dataset, args.test, args.methods, args.seeds, args.lrs, args.steps, args.batch, args.seq_len,
                         args.eval_limit, args.budgets, args.targets, args.ds_config, args.eval_batches,
                         log=lambda line: print(line, file=sys.stderr, flush=True), results=args.results)
    except bench.BenchError as err:  # a run failed: the message names its log, kept beside --results or in the cwd
        print(f"bench: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the temp folder is gone, the finished rows are in --results
        kept = f"the rows finished so far are in {args.results}: run the same command to go on" if args.results else \
            "nothing was kept (pass --results FILE to keep each finished row)"
        print(f"bench: interrupted; {kept}", file=sys.stderr)
        raise SystemExit(130) from None
    return rows, bench.format_table(rows)


def quality_inputs(args: argparse.Namespace) -> None:
    """--real: the --results file can be read and written, the real model and data can be had (real_inputs)."""
    if args.results is not None:
        results_file(args)
    if args.real:
        real_inputs(args)


def results_file(args: argparse.Namespace) -> None:
    """--results: only with --real; a file bench quality --real wrote (or a new one) in a folder it can write in."""
    from megaspec.benchmarks import real_quality as bench

    if not args.real:
        raise ConfigError("--results needs --real (the tiny quality bench runs in one go); add --real or drop --results")
    path = Path(args.results).expanduser()
    folder = path.resolve().parent
    if not folder.is_dir():
        raise ConfigError(f"--results {args.results}: the folder {folder} does not exist; create it or pick another file")
    try:
        bench.read_results(args.results)
    except bench.ResultsError as err:
        raise ConfigError(str(err)) from None
    if not os.access(path if path.exists() else folder, os.W_OK):
        raise ConfigError(f"--results {args.results}: cannot write {'it' if path.exists() else f'in {folder}'}; pick another file")


def real_inputs(args: argparse.Namespace) -> None:
    """The data files exist and the model can be had (a .gguf is checked from its header): ConfigError if not."""
    from megaspec.benchmarks import real_quality as bench

    problem = bench.check_files(args.dataset, getattr(args, "test", None))
    if problem:
        raise ConfigError(problem)
    if getattr(args, "ds_config", None) is not None:  # quality --real trains through the trainer with it
        from megaspec.train.dsconfig import check_ds_numbers, read_ds_config

        check_ds_numbers(read_ds_config(args.ds_config), args.ds_config)
    if args.model is None:
        from megaspec.assets import AssetError

        try:
            args.model = bench.default_model()
        except AssetError as e:
            raise ConfigError(f"{e}; or pass --model") from None
    if args.model.lower().endswith(".gguf"):
        from megaspec.gguf import check_gguf

        check_gguf(Path(args.model).expanduser())
    elif not (Path(args.model).expanduser() / "config.json").is_file():
        raise ConfigError(f"--model {args.model} is neither a .gguf file nor an HF model folder with config.json")


def throughput_inputs(args: argparse.Namespace) -> None:
    """Read --ds_config and make sure there is a GPU, before the machine line: ConfigError if not."""
    from megaspec.benchmarks import throughput as bench

    args.ds = None
    if args.engine == "deepspeed":  # read first: a bad config is reported on any machine
        from megaspec.train.dsconfig import check_ds_numbers, read_ds_config

        args.ds = read_ds_config(args.ds_config)
        check_ds_numbers(args.ds, args.ds_config)
    if not torch.cuda.is_available():
        raise ConfigError(f"{bench.NO_CUDA} (run it on a GPU machine; the other subcommands run on CPU)")


def throughput(args: argparse.Namespace) -> tuple[Any, str]:
    from megaspec.benchmarks import throughput as bench

    settings = None
    if args.methods:
        from megaspec.benchmarks.common import paper_settings

        settings = [bench.FROZEN, *paper_settings(args.methods)]
    rows = bench.run(args.layers, args.batch, args.seq_len, args.steps, args.warmup, "cuda", getattr(torch, args.dtype),
                     settings, args.peak_tflops, ds_config=args.ds)
    return rows, bench.format_table(rows)


def load(args: argparse.Namespace) -> tuple[Any, str]:
    from megaspec.benchmarks import load as bench

    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    precisions, paths = tuple(args.precisions or ("bf16", "nf4", "int8")), tuple(args.paths or ("whole", "stream"))
    result = bench.run(args.world_sizes, precisions, paths, overrides, args.folder)
    return result, bench.format_table(result)


def real_model(model: str) -> str:
    """--model (checked by real_inputs; SmolLM2-135M's GGUF by default) as an HF folder: a .gguf is converted once."""
    from megaspec.gguf import resolve_model

    return resolve_model(model, torch.float32)


def host_memory(args: argparse.Namespace) -> tuple[Any, str]:
    from megaspec.benchmarks import host_memory as bench

    rows = bench.run(real_model(args.model), args.dataset, args.ds_config, args.ranks, args.steps, args.seq_len,
                     log=lambda line: print(line, file=sys.stderr, flush=True))
    return rows, bench.format_table(rows)


def merge_base(args: argparse.Namespace) -> tuple[Any, str]:
    from megaspec.benchmarks import merge_base as bench

    result = bench.run(real_model(args.model), args.dataset, args.quantize, args.steps, args.seq_len, args.n_coeffs, args.lr,
                       args.eval_blocks, log=lambda line: print(line, file=sys.stderr, flush=True))
    return result, bench.format_table(result)


def events(args: argparse.Namespace) -> tuple[Any, str]:
    from megaspec.benchmarks import events as bench

    result = bench.run(args.layers, args.hidden, args.steps, args.image_every, args.n_coeffs, args.folder)
    return result, bench.format_table(result)


def packing(args: argparse.Namespace) -> tuple[Any, str]:
    from megaspec.benchmarks import packing as bench

    model = real_model(args.model) if args.model else None
    result = bench.run(model, args.seq_len, args.batch, args.steps, args.attn, args.records)
    return result, bench.format_table(result)


def main(argv: list[str] | None = None) -> int:
    from megaspec.distributed.comm import prefer_cpu_accelerator

    prefer_cpu_accelerator()
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="one JSON object (command, machine, date, result) instead of a table")
    models = ",".join(LLAMA_CONFIGS)
    methods_help = "comma-separated registered methods (and peft_lora, peft_fourierft where they apply); default all"
    methods, with_peft = one_of(megaspec_methods, "method"), one_of(compared_methods, "method")
    model_list = one_of(model_names, "model")

    p = sub.add_parser("overhead", parents=[common], help="forward+backward of a frozen linear alone and with each adapter")
    p.add_argument("--shapes", default="4096x4096,4096x14336,8192x28672", type=shapes, help="comma-separated out x in shapes")
    p.add_argument("--tokens", type=count(1), default=2048, help="B tokens per step (on CPU use fewer for 8192x28672)")
    p.add_argument("--reps", type=count(1), default=5)
    p.add_argument("--warmup", type=count(0), default=2)
    p.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--methods", type=with_peft, default=None, help=methods_help)
    p.add_argument("--real_svd", action="store_true", help="plan SVD-based methods with the real SVD (slow on CPU)")
    p.add_argument("--settle", type=count(0), default=1, help="untimed steps of a variant right before each timed one")
    p.add_argument("--modes", default="full,branch", type=_modes,
                   help="full (frozen matmul + adapter), branch (the adapter alone: frozen matmul swapped for zeros), or both")
    p.add_argument("--variants", default=None, type=_regex, metavar="REGEX",
                   help="only the rows whose name matches REGEX (and the frozen base), e.g. 'ssh n=750 \\(fast|peft lora r=16'")
    p.set_defaults(func=overhead)

    p = sub.add_parser("crossover", parents=[common], help="sparse-spectrum forward: FFT path vs building dW, by layer size")
    p.add_argument("--shapes", default="64x64,128x128,256x256,512x512,1024x1024", type=shapes)
    p.add_argument("--n", default="8,100,1000", type=counts(1), help="comma-separated coefficient counts")
    p.add_argument("--tokens", default="64,2048", type=counts(1), help="comma-separated token counts B")
    p.add_argument("--reps", type=count(1), default=7)
    p.add_argument("--threads", type=count(1), default=1)
    p.set_defaults(func=crossover)

    p = sub.add_parser("params", parents=[common], help="trainable parameters per method at its paper setting (meta device)")
    p.add_argument("--models", default=models, type=model_list)
    p.add_argument("--methods", type=methods, default=None, help=methods_help)
    p.set_defaults(func=params)

    p = sub.add_parser("memory", parents=[common], help="per-rank bytes: frozen base, activations, adapter state")
    p.add_argument("--models", default=models, type=model_list)
    p.add_argument("--precisions", default="bf16,nf4,nf4-dq,int8", type=one_of(precisions, "precision"))
    p.add_argument("--world_sizes", default="1,2,8,16,64", type=counts(1))
    p.add_argument("--micro_batch", type=count(1), default=1)
    p.add_argument("--seq_len", type=count(1), default=4096)
    p.add_argument("--methods", type=methods, default=None, help=methods_help)
    p.add_argument("--gradient_checkpointing", default="auto", choices=["auto", "on", "off"],
                   help="activations with or without checkpointing; auto: the trainer's rule (on above 1B parameters)")
    p.add_argument("--validate", action="store_true", help="formula vs measured bytes on tiny real models")
    p.set_defaults(func=memory)

    p = sub.add_parser("checkpointing", parents=[common],
                       help="peak memory and step time with and without gradient checkpointing (CPU); --s2ft: S2FT estimate peak")
    p.add_argument("--models", default="small,8b-2layers", help="comma-separated: small (12 layers, h 768), 8b-2layers, tiny; '' for none (--s2ft alone)")
    p.add_argument("--batch", type=count(1), default=1)
    p.add_argument("--seq_len", type=count(1), default=512)
    p.add_argument("--steps", type=count(1), default=3, help="timed forward+backward steps per setting")
    p.add_argument("--warmup", type=count(0), default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--s2ft", action="store_true", help="also the peak of S2FT's gradient estimate by layer-group budget")
    p.add_argument("--s2ft_model", default="8b-2layers", help="model of the measured S2FT estimate")
    p.add_argument("--s2ft_budgets_mb", default="1024,80,16", type=counts(1), help="comma-separated layer-group budgets in MiB")
    p.add_argument("--s2ft_seq_len", type=count(1), default=256)
    p.set_defaults(func=checkpointing)

    p = sub.add_parser("selection", parents=[common], help="time and peak memory of SSH planning, per layer and extrapolated")
    p.add_argument("--model", default="llama-3-70b", choices=sorted(LLAMA_CONFIGS))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the gathered weight")
    p.add_argument("--n_coeffs", type=count(1), default=750)
    p.add_argument("--energy_ratio", type=fraction, default=0.5)
    p.add_argument("--world_sizes", default="1,8,16,64", type=counts(1))
    p.add_argument("--threads", type=count(1), default=2)
    p.add_argument("--ranks", default="1,2", type=counts(1), help="CPU rank counts of the measured ZeRO-3 run")
    p.add_argument("--rank_layers", type=count(1), default=4)
    p.add_argument("--rank_width", type=count(1), default=2048)
    p.add_argument("--no_combine", action="store_true", help="skip the combine-step measurement")
    p.set_defaults(func=selection)

    p = sub.add_parser("quality", parents=[common], help="fine-tune the tiny pretrained LLaMA with every method at matched budgets")
    p.add_argument("--steps", type=count(1), default=150)
    p.add_argument("--seeds", default="0,1,2", type=counts(0))
    p.add_argument("--methods", type=with_peft, default=None, help=methods_help)
    p.add_argument("--lrs", default=None, type=lambda text: tuple(positive(v) for v in text.split(",")),
                   help="a fixed lr list for every row instead of the sweep rule")
    p.add_argument("--jobs", type=count(1), default=2, help="rows run in this many worker processes")
    p.add_argument("--threads", type=count(1), default=1, help="torch threads per worker")
    p.add_argument("--real", action="store_true",
                   help="a real model on real data (megaspec.benchmarks.real_quality): exact match on held-out records")
    p.add_argument("--model", default=None, help="--real: a .gguf file or HF folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dataset", default="data/boolq.jsonl", help="--real: prompt/response training file")
    p.add_argument("--test", default=None, help="--real: held-out jsonl with answers (default: DATASET's .test.jsonl)")
    p.add_argument("--budgets", default="100,30,10,1", type=counts(1),
                   help="--real: SSH (and FourierFT) at 1/k of LoRA r=8's parameters on the same layers, for each k")
    p.add_argument("--targets", default="qv,all", type=target_sets,
                   help="--real: q,v and/or every linear layer of the blocks, for the SSH and LoRA budget rows")
    p.add_argument("--batch", type=count(1), default=8, help="--real: blocks per step")
    p.add_argument("--seq_len", type=count(2), default=256, help="--real: tokens per block")
    p.add_argument("--eval_limit", type=count(1), default=500, help="--real: test records scored")
    p.add_argument("--eval_batches", type=count(1), default=None, help="--real: micro-batches of the eval split evaluated (default all)")
    p.add_argument("--ds_config", default=str(REPO / "ds_configs" / "zero3.json"),
                   help="--real: the trainer's DeepSpeed config (its micro-batch becomes --batch, one rank)")
    p.add_argument("--results", default=None, metavar="FILE",
                   help="--real: JSON-lines file; each finished row is appended, rows it holds under the same setup are "
                        "not run again but shown (run the sweep in pieces)")
    p.set_defaults(func=quality, inputs=quality_inputs)

    p = sub.add_parser("throughput", parents=[common], help="tokens/s and MFU of a LLaMA-3.1-8B-shaped model on one GPU")
    p.add_argument("--layers", type=count(2), default=None, help="decoder layers to build (default all 32)")
    p.add_argument("--batch", type=count(1), default=1)
    p.add_argument("--seq_len", type=count(1), default=4096)
    p.add_argument("--steps", type=count(1), default=10)
    p.add_argument("--warmup", type=count(0), default=3)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--methods", type=methods, default=None, help="registered methods at their paper settings (default ssh, lora r=16)")
    p.add_argument("--peak_tflops", type=positive, default=None, help="peak dense TFLOP/s of the GPU (default: by name)")
    p.add_argument("--engine", default="deepspeed", choices=["deepspeed", "plain"],
                   help="deepspeed: the trainer's ZeRO-3 engine on one rank (default); plain: PyTorch and AdamW alone")
    p.add_argument("--ds_config", default=str(REPO / "ds_configs" / "zero3.json"), help="DeepSpeed config of --engine deepspeed")
    p.set_defaults(func=throughput, inputs=throughput_inputs)

    p = sub.add_parser("load", parents=[common], help="per-rank peak memory and time of loading the base under ZeRO-3, whole vs quantize on load")
    p.add_argument("--world_sizes", default="1,2", type=counts(1), help="CPU rank counts")
    p.add_argument("--precisions", default="bf16,nf4,int8", type=one_of(lambda: ["bf16", "nf4", "int8"], "precision"))
    p.add_argument("--paths", default="whole,stream", type=one_of(lambda: ["whole", "stream"], "path"),
                   help="whole (from_pretrained on every rank), stream (quantize on load)")
    p.add_argument("--layers", type=count(1), default=None, help="decoder layers of the synthetic model (default 16: 0.55B parameters)")
    p.add_argument("--folder", default=None, help="write (or reuse) the synthetic checkpoint here instead of a temporary folder")
    p.set_defaults(func=load)

    p = sub.add_parser("host_memory", parents=[common],
                       help="per-rank peak resident memory of megaspec (SSH, LoRA) and HF Trainer + peft LoRA on the same ZeRO-3 job")
    p.add_argument("--model", default=None, help="HF folder or .gguf (default SmolLM2-135M-Instruct, python -m megaspec.assets smollm2)")
    p.add_argument("--dataset", default="data/boolq.jsonl", help="training file (python -m megaspec.assets boolq)")
    p.add_argument("--ds_config", default="ds_configs/zero3.json", help="DeepSpeed config of every job")
    p.add_argument("--ranks", type=count(1), default=2, help="CPU ranks")
    p.add_argument("--steps", type=count(1), default=3)
    p.add_argument("--seq_len", type=count(8), default=256)
    p.set_defaults(func=host_memory, inputs=real_inputs)

    p = sub.add_parser("events", parents=[common], help="TensorBoard event-file and report.html size of a deep model's monitoring")
    p.add_argument("--layers", type=count(1), default=80)
    p.add_argument("--hidden", type=count(64), default=512)
    p.add_argument("--steps", type=count(1), default=1000)
    p.add_argument("--image_every", type=count(1), default=50)
    p.add_argument("--n_coeffs", type=count(1), default=750)
    p.add_argument("--folder", default=None, help="keep the run folder here instead of a temporary one")
    p.set_defaults(func=events)

    p = sub.add_parser("merge_base", parents=[common],
                       help="held-out perplexity of the fp32 base, its quantized copy, and an adapter trained on it merged onto each")
    p.add_argument("--model", default=None, help="HF folder or .gguf (default SmolLM2-135M-Instruct, python -m megaspec.assets smollm2)")
    p.add_argument("--dataset", default="data/boolq.jsonl", help="training file (python -m megaspec.assets boolq); its test file is held out")
    p.add_argument("--quantize", default="nf4", choices=["nf4", "fp4", "int8"])
    p.add_argument("--steps", type=count(1), default=12)
    p.add_argument("--seq_len", type=count(8), default=256)
    p.add_argument("--n_coeffs", type=count(1), default=750)
    p.add_argument("--lr", type=positive, default=None, help="peak learning rate (default: SSH's own)")
    p.add_argument("--eval_blocks", type=count(1), default=32, help="held-out blocks of --seq_len tokens")
    p.set_defaults(func=merge_base, inputs=real_inputs)

    p = sub.add_parser("packing", parents=[common], help="tokens/s of forward+backward with isolated vs naive packing")
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: the embedded tiny LLaMA)")
    p.add_argument("--seq_len", type=count(8), default=512)
    p.add_argument("--batch", type=count(1), default=4)
    p.add_argument("--steps", type=count(1), default=4)
    p.add_argument("--attn", default="sdpa", choices=["eager", "sdpa"])
    p.add_argument("--records", type=count(10), default=400, help="embedded corpus documents to pack")
    p.set_defaults(func=packing)

    args = parser.parse_args(argv)
    try:
        if hasattr(args, "inputs"):
            args.inputs(args)
    except ConfigError as err:  # bad input: one line naming the problem and the fix
        print(f"bench: error: {err}", file=sys.stderr)
        return 2
    header = machine()
    print(f"# {header}", file=sys.stderr)
    date = time.strftime("%Y-%m-%d")
    result, text = args.func(args)
    if args.json:
        argv = sys.argv[1:] if argv is None else argv
        print(json.dumps({"command": ["python", "launch/bench.py", *argv], "machine": header, "date": date,
                          "result": result}, indent=1, default=str))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
