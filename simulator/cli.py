"""`simulate`: the command line.

    simulate --hw fpga_8core.yaml --model 1.3b [--phase decode|prefill] [--format json]
    simulate schema                 JSON Schema of the hardware format
    simulate trace --model M -o F   write a model's op trace for inspection
    simulate list                   shipped machines and model presets
    simulate validate               published reference cases: paper vs simulated
    simulate op gemm|attention ...  one kernel: latency_s, flops, bytes_moved, tflops
    simulate check --hw HW --model tiny   the simulated dataflow computes the right numbers
    simulate regress [--update]     projected throughput against reports/baseline.csv
    simulate sweep SPEC.yaml --out DIR   a design-space sweep (resumable; Dask with --scheduler)
    simulate help [COMMAND]         the same as simulate [COMMAND] --help
    simulate --version              the installed package version

A first word that is not a flag must be a command (an unknown one gets "did you mean").
Every bad input ends in one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import yaml

from simulator.errors import UserError

#: Every sub-command with the one line `simulate --help` gives it (in the order shown).
COMMANDS = {
    "schema": "print the JSON Schema of the hardware YAML format (for editors)",
    "trace": "write a model's captured op trace as JSON",
    "list": "list the shipped machines and model presets",
    "validate": "compare the simulator with published reference results",
    "op": "time one kernel (gemm or attention) on a machine",
    "check": "run a small model through the hardware kernels; compare with PyTorch",
    "regress": "compare projected throughput with the baseline table",
    "sweep": "run a design-space sweep from a YAML spec (resumable)",
    "serve": "serve a request stream (Poisson, trace, …) with a batching scheduler",
    "help": "show this help, or a command's: simulate help COMMAND",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (exit 2 via UserError)."""

    def error(self, message: str) -> NoReturn:
        raise UserError(self.prog, message)


def _pairs(values: Sequence[str], flag: str, parse_value: bool) -> dict[str, Any]:
    pairs: dict[str, Any] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} {item}", "expected KEY=VALUE, e.g. clock=\"54 MHz\"")
        if parse_value:
            try:
                pairs[key.strip()] = yaml.safe_load(value) if value.strip() else value
            except yaml.YAMLError:
                pairs[key.strip()] = value
        else:
            pairs[key.strip()] = value
    return pairs


def _add_model(parser: argparse.ArgumentParser, train: bool = False) -> None:
    parser.add_argument("--model", required=True,
                        help="preset or catalog name (simulate list: 1.3b, llama3-8b, "
                             "mixtral-8x7b, …), its HF id (mistralai/Mistral-7B-v0.1), a "
                             "config.json/YAML path, or python:module:factory (an nn.Module)")
    parser.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. torch_dtype=float32")
    phases = ("decode", "prefill", "forward", *(("train",) if train else ()))
    parser.add_argument("--phase", default=None, choices=phases,
                        help="one new token per sequence (decode, a causal LM's default), "
                             "the whole prompt (prefill), or one pass of an encoder or vision "
                             "model (forward, its default)"
                             + ("; a training step (train)" if train else ""))
    parser.add_argument("--batch", type=int, default=None if train else 1,
                        help="sequences, or images for a vision model (default 1)"
                             + ("; train: the global batch of sequences per step (default: "
                                "one per --dp replica)" if train else ""))
    parser.add_argument("--moe-routing", default=None, metavar="POLICY",
                        help="MoE models: tokens per expert: balanced (default), random:SEED, "
                             "zipf:S[:SEED] or file:PATH (per-layer histogram)")
    parser.add_argument("--quant", default=None, metavar="SCHEME",
                        help="quantize the blocks' linears: w8a8, w8a16, w4a16 (w4a16:g32: "
                             "groups of 32), w4a8, w4a4, w4a4-quarot, w4a4-flatquant, fp8 or "
                             "w2a8 (kernels it adds, weights and KV bytes: "
                             "simulator.workload.quant)")
    parser.add_argument("--context", type=int, default=None,
                        help="decode: tokens already in the KV cache/state (default 2048, "
                             "or the model's positions − 1 if fewer)")
    parser.add_argument("--prompt", *(("--seq-len",) if train else ()), type=int, default=None,
                        dest="prompt",
                        help="prefill: prompt tokens (default 2048, or the model's positions "
                             "if fewer)" + ("; train: the sequence length (--seq-len)"
                                            if train else ""))


def _version() -> str:
    """The installed package's version ("unknown" when run from a bare checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llm-hwsim")
    except PackageNotFoundError:
        return "unknown"


def _commands_help() -> str:
    """The sub-command list shown at the end of `simulate --help`."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, summary in COMMANDS.items()]
    return "\n".join(["commands (simulate COMMAND --help for each one's flags):", *lines])


def _run_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="simulate", usage="%(prog)s --hw HW --model MODEL [options]\n"
                     "       %(prog)s COMMAND [flags]   (commands listed below)",
                     description="Project latency, tokens/s, watts and memory of a language "
                     "model\non a YAML-described machine.", epilog=_commands_help(),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--hw", required=True,
                        help="hardware YAML: a path, or a shipped file name (simulate list)")
    parser.add_argument("--hw-set", action="append", default=[], metavar="PATH=VALUE",
                        help="override a dotted YAML path, e.g. clock=\"54 MHz\"")
    _add_model(parser, train=True)
    _add_training(parser)
    parser.add_argument("--mapping", default="tensor", choices=("tensor", "batch"),
                        help="split every op across the cores (tensor, default) or give each "
                             "core its own sequences (batch)")
    parser.add_argument("--runtime", default=None, choices=("eager", "cuda_graphs"),
                        help="GPU host runtime: a launch per kernel (eager) or one CUDA-graph "
                             "launch per step (default: the file's overheads.runtime)")
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor-parallel devices (Megatron splits; --hw a system)")
    parser.add_argument("--tp-sp", action="store_true",
                        help="Megatron-LM sequence parallelism in the --tp group: reduce-"
                             "scatter and all-gather instead of all-reduce, norms on 1/tp "
                             "of the tokens")
    parser.add_argument("--tp-overlap", type=int, default=1, metavar="TILES",
                        help="prefill: cut attention and its output projection into query "
                             "tiles whose all-reduces overlap the next tile (FastAttention)")
    parser.add_argument("--pp", type=int, default=1,
                        help="pipeline stages of equal depth (--hw a system)")
    parser.add_argument("--micro-batches", type=int, default=1,
                        help="micro-batches the batch flows through the pipeline in")
    parser.add_argument("--pp-interleave", type=int, default=1, metavar="V",
                        help="virtual stages per pipeline stage (Megatron-LM's interleaved "
                             "schedule; --micro-batches a multiple of --pp)")
    parser.add_argument("--dp", type=int, default=1,
                        help="data-parallel replicas, each on an equal share of --batch "
                             "(--hw a system)")
    parser.add_argument("--sp", type=int, default=1,
                        help="sequence-parallel devices: each sequence's tokens split, "
                             "all-to-alls around attention (DeepSpeed-Ulysses; prefill)")
    parser.add_argument("--ep", type=int, default=1,
                        help="expert-parallel devices: an MoE model's experts spread over "
                             "them, the rest data-parallel (--hw a system)")
    parser.add_argument("--placement", metavar="FILE", default=None,
                        help="--ep: experts' devices: contiguous (default, as DeepSpeed-"
                             "MoE), an ExFlow solution CSV, or a placement YAML (shipped: "
                             "exflow_mixtral_8gpu.yaml, exflow_mixtral_4gpu.yaml)")
    parser.add_argument("--ep-mode", default="combine", choices=("combine", "coherent"),
                        help="--ep: dispatch and combine all-to-alls per MoE block (combine, "
                             "default) or ExFlow's context-coherent one (coherent, decode)")
    parser.add_argument("--format", default="table", choices=("table", "json", "csv"),
                        help="a table (default), the JSON contract, or CSV per layer")
    parser.add_argument("--granularity", type=int, default=None,
                        help="max coalesced chunks per op and core (default 64)")
    parser.add_argument("--no-cache", action="store_true", help="recapture the trace")
    parser.add_argument("--trace", metavar="FILE.json",
                        help="write a Chrome/Perfetto timeline (open at ui.perfetto.dev)")
    parser.add_argument("--plot", metavar="DIR",
                        help="write layers.png (per-layer breakdown) and roofline.png")
    return parser


def _add_training(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training (--phase train)")
    group.add_argument("--micro-batch", type=int, default=None,
                       help="sequences per micro-batch; gradient accumulation runs the rest "
                            "of --batch (default: all of it at once)")
    group.add_argument("--recompute", default=None, choices=("none", "selective", "full"),
                       help="activation checkpointing: none (default), selective (the "
                            "attention kernel) or full (every block from its input)")
    group.add_argument("--optimizer", default=None, choices=("adamw", "sgd"),
                       help="AdamW (default) or SGD with momentum, over fp32 master weights")
    group.add_argument("--zero", type=int, default=None, choices=(0, 1, 2, 3),
                       help="ZeRO stage over the --dp replicas: 1 partitions the optimizer, "
                            "2 also the gradients, 3 also the weights (default 0)")
    group.add_argument("--lora", default=None, metavar="rank=R,modules=q,v[,shared_down=true]",
                       help="low-rank adapters on those linears, the base frozen (shared_down: "
                            "Block-LoRA's shared down-projection, blocks=N, default 4)")
    group.add_argument("--offload", default=None, metavar="activations",
                       help="copy the activation checkpoints to host memory and prefetch "
                            "them for the backward (needs --recompute full; optimizer "
                            "offload is not modelled yet: refused)")
    group.add_argument("--chunk", default=None, metavar="TOKENS",
                       help="FPDT: run each sequence in chunks of TOKENS (needs --recompute "
                            "full; with --sp for Ulysses)")
    group.add_argument("--classes", type=int, default=None, metavar="N",
                       help="CLIP: few-shot classification over N classes, every class's "
                            "prompt through the text tower each step (default: contrastive, "
                            "one caption an image)")


#: Training flags and what an inference run has instead; inference flags a training step
#: does not take yet, with their neutral values.
_TRAIN_ONLY = ("micro_batch", "recompute", "optimizer", "zero", "offload", "lora", "chunk",
               "classes")
_NOT_IN_TRAINING = {"context": None, "quant": None, "moe_routing": None, "mapping": "tensor",
                    "runtime": None, "tp_sp": False, "tp_overlap": 1, "micro_batches": 1,
                    "ep": 1, "placement": None,
                    "ep_mode": "combine", "granularity": None}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _run_training(args: argparse.Namespace) -> int:
    from simulator.training import simulate_training

    for dest, neutral in _NOT_IN_TRAINING.items():
        if getattr(args, dest) != neutral:
            raise UserError(_flag(dest), "is not modelled for --phase train yet (data, "
                            "tensor, pipeline and sequence parallelism and ZeRO are: --dp, --tp, "
                            "--pp, --sp, --zero); expected it left out")
    result = simulate_training(
        args.hw, args.model, batch=args.dp if args.batch is None else args.batch,
        seq_len=args.prompt, micro_batch=args.micro_batch,
        recompute=args.recompute or "none", optimizer=args.optimizer or "adamw",
        dp=args.dp, tp=args.tp, pp=args.pp, sp=args.sp, zero=args.zero or 0, lora=args.lora,
        offload=args.offload, chunk=args.chunk, pp_interleave=args.pp_interleave,
        classes=args.classes, hw_set=_pairs(args.hw_set, "--hw-set", True),
        model_set=_pairs(args.model_set, "--model-set", False), trace_file=args.trace,
        plot_dir=args.plot, use_cache=not args.no_cache)
    if args.format == "csv":
        raise UserError("--format csv", "a training step has no per-layer rows yet; expected "
                        "table or json")
    if args.format == "json":
        print(result.to_json())
    else:
        from simulator.table import render_training

        render_training(result)
    if result.out_of_memory:
        print(f"simulate: --hw {args.hw}: {result.out_of_memory}", file=sys.stderr)
        return 2
    return 0


def _run(argv: Sequence[str]) -> int:
    from simulator.api import simulate
    from simulator.files import check_output_file, check_output_folder
    from simulator.mapping import DEFAULT_GRANULARITY

    args = _run_parser().parse_args(argv)
    if args.trace is not None:  # refused before a possibly long simulation
        check_output_file(args.trace, "--trace")
    if args.plot is not None:
        check_output_folder(args.plot, "--plot")
    if args.phase == "train":
        return _run_training(args)
    args.batch = 1 if args.batch is None else args.batch
    for dest in _TRAIN_ONLY:
        if getattr(args, dest) is not None:
            raise UserError(_flag(dest), "applies to --phase train; expected it left out")
    result = simulate(
        args.hw, args.model, phase=args.phase, batch=args.batch,
        context=args.context, prompt=args.prompt, mapping=args.mapping,
        hw_set=_pairs(args.hw_set, "--hw-set", True),
        model_set=_pairs(args.model_set, "--model-set", False),
        granularity=DEFAULT_GRANULARITY if args.granularity is None else args.granularity,
        use_cache=not args.no_cache,
        trace_file=args.trace, plot_dir=args.plot, runtime=args.runtime,
        moe_routing=args.moe_routing, quant=args.quant, tp=args.tp, pp=args.pp,
        micro_batches=args.micro_batches, ep=args.ep, placement=args.placement,
        ep_mode=args.ep_mode, dp=args.dp, pp_interleave=args.pp_interleave, sp=args.sp,
        tp_overlap=args.tp_overlap, tp_sp=args.tp_sp)
    if args.format == "json":
        print(result.to_json())
    elif args.format == "csv":
        sys.stdout.write(result.to_csv())
    else:
        from simulator.table import render

        render(result)
    return 0


def _schema(argv: Sequence[str]) -> int:
    _Parser(prog="simulate schema", description="Print the hardware JSON Schema.").parse_args(argv)
    from simulator.hardware import schema_json

    print(schema_json())
    return 0


def _trace(argv: Sequence[str]) -> int:
    parser = _Parser(prog="simulate trace", description="Write a model's op trace (JSON).")
    _add_model(parser)
    parser.add_argument("-o", "--output", required=True, help="file to write")
    args = parser.parse_args(argv)
    from simulator.api import step_shape
    from simulator.files import write_atomic
    from simulator.workload.cache import get_trace
    from workloads.config import resolve_model

    cfg = resolve_model(args.model, _pairs(args.model_set, "--model-set", False),
                        args.moe_routing)
    phase, context, prompt = step_shape(cfg, args.phase, args.batch, args.context, args.prompt)
    trace = get_trace(cfg, phase, args.batch, context, prompt)
    if args.quant is not None:
        from simulator.workload.quant import quantize

        trace = quantize(trace, args.quant)
    write_atomic(args.output, trace.to_json(), "-o")
    print(f"{len(trace.ops)} ops of {trace.model} ({trace.phase}) written to {args.output}")
    return 0


def _list(argv: Sequence[str]) -> int:
    _Parser(prog="simulate list", description="Shipped machines and model presets.").parse_args(
        argv)
    from simulator.hardware import shipped
    from simulator.hardware.loader import shipped_systems
    from workloads.config import ALIASES, catalog, model_names, resolve_model

    def count(n: int) -> str:
        for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
            if n >= scale:
                return f"{n / scale:.2f} {unit}"
        return str(n)

    print("hardware:", " ".join(shipped()))
    print("systems (simulate op allreduce|allgather|… --hw SYSTEM):", " ".join(shipped_systems()))
    print("models (params: closed form from the config, embeddings included; context: "
          "max_position_embeddings):")
    row = "  {:<19}{:>9} {:<7}{:>7}{:>7}{:>9}{:>8}{:>8}  {:<9} {}"
    print(row.format("name", "params", "embed", "layers", "hidden", "heads/kv", "experts",
                     "context", "dtype", "HF id"))
    entries = catalog()
    for name in model_names():
        cfg = resolve_model(name)
        if cfg.model_type == "python":  # an nn.Module: sized only when built
            print(row.format(name, "—", "—", "—", "—", "—", "—", "—", "—",
                             f"python:{cfg.module}:{cfg.factory}"))
            continue
        kv = "—" if cfg.model_type == "hgrn_bit" else cfg.kv_heads
        print(row.format(name, count(cfg.param_count),
                         "tied" if cfg.tie_word_embeddings else "untied", cfg.num_hidden_layers,
                         cfg.hidden_size, f"{cfg.num_attention_heads}/{kv}", cfg.experts,
                         cfg.position_limit or "—", cfg.torch_dtype,
                         (entries[name].hf_id if name in entries else None) or "—"))
    print("aliases: ", ", ".join(f"{alias} = {name}" for alias, name in ALIASES.items()))
    print("Any catalog entry's HF id (any case) names it too; other models: --model "
          "path/to/config.json")
    return 0


def _validate(argv: Sequence[str]) -> int:
    parser = _Parser(prog="simulate validate",
                     description="Compare the simulator with published reference values.")
    parser.add_argument("files", nargs="*", help="case files (default: every shipped one)")
    parser.add_argument("--case", action="append", default=[], help="only these case ids")
    parser.add_argument("--format", default="table", choices=("table", "json"))
    parser.add_argument("--jobs", type=int, default=1,
                        help="processes to spread the cases over (default 1; same results)")
    args = parser.parse_args(argv)
    from simulator.validation.cases import load_case_file, run_cases, shipped_case_files
    from simulator.validation.render import render_table, to_json

    read = [load_case_file(path) for path in args.files or shipped_case_files()]
    cases = [case for found, _ in read for case in found]
    empirical = [term for _, terms in read for term in terms]
    if args.case:
        unknown = set(args.case) - {case.id for case in cases}
        if unknown:
            raise UserError("--case", f"unknown case id(s): {', '.join(sorted(unknown))}")
        cases = [case for case in cases if case.id in args.case]
    outcomes = run_cases(cases, args.jobs)
    if args.format == "json":
        print(to_json(outcomes, empirical))
    else:
        render_table(outcomes, empirical=empirical)
    return 0 if all(outcome.passed for outcome in outcomes) else 1


def _op(argv: Sequence[str]) -> int:
    from simulator.oprun import MODES, gemm_op, run_attention, run_op

    parser = _Parser(prog="simulate op", description="Time one kernel on a machine: a table "
                     "of latency, FLOPs, TFLOP/s, DRAM bytes and arithmetic intensity.")
    kernels = parser.add_subparsers(dest="kernel", required=True, parser_class=_Parser)
    gemm = kernels.add_parser("gemm", help="C = A·B", description="C (M×N) = A (M×K) · B (K×N)")
    for name in ("m", "n", "k"):
        gemm.add_argument(f"--{name}", type=int, required=True)
    gemm.add_argument("--batch", type=int, default=1)
    gemm.add_argument("--dtype", default="bf16", help="activation dtype (default bf16)")
    gemm.add_argument("--weight-dtype", default="",
                      help="dtype B is stored in (default: --dtype): int4 with fp16/bf16 is a "
                           "W4A16 kernel, int2 or ternary with int8 a W2A8 one; the machine's "
                           "cores.units.*.kernels lists the pairs it runs")
    attention = kernels.add_parser("attention", help="scaled dot-product attention",
                                   description="scaled dot-product attention, FlashAttention-2 "
                                               "FLOP convention")
    attention.add_argument("--batch", type=int, required=True)
    attention.add_argument("--heads", type=int, required=True)
    attention.add_argument("--seq", type=int, required=True)
    attention.add_argument("--head-dim", type=int, required=True)
    attention.add_argument("--causal", action="store_true")
    attention.add_argument("--mode", default=None, choices=MODES,
                           help="what is timed: forward (default), backward, or both; flops "
                                "are 1×, 2.5×, 3.5× 4·B·S²·H·D (÷2 causal), as FlashAttention-2's "
                                "benchmark counts them")
    attention.add_argument("--backward", action="store_true",
                           help="the same as --mode fwd_bwd (kept for old scripts)")
    attention.add_argument("--unfused", action="store_true",
                           help="materialised scores even where fused kernels exist")
    attention.add_argument("--dtype", default="bf16")
    from simulator.collective import ALGORITHMS, KINDS

    collectives = []
    for kind in KINDS:
        sub = kernels.add_parser(kind, help=f"{kind} over a system's links (nccl-tests "
                                 "busbw)", description=f"one {kind} over a system's links, "
                                 "timed on idle links; algbw and busbw as nccl-tests defines "
                                 "them")
        sub.add_argument("--bytes", required=True, help="nccl-tests size, e.g. 1GiB or 64MB")
        sub.add_argument("--devices", type=int, default=None,
                         help="ranks taking part (default: every device of the system)")
        sub.add_argument("--algorithm", default="ring", help=f"one of {', '.join(ALGORITHMS)}")
        collectives.append(sub)
    for sub in (gemm, attention, *collectives):
        sub.add_argument("--hw", required=True)
        sub.add_argument("--hw-set", action="append", default=[], metavar="PATH=VALUE")
        sub.add_argument("--format", default="table", choices=("table", "json"))
    args = parser.parse_args(argv)
    from simulator.hardware import load_hardware

    overrides = _pairs(args.hw_set, "--hw-set", True)
    if args.kernel in KINDS:
        return _collective(args, overrides)
    if args.kernel == "attention" and args.unfused:
        overrides["scheduling.fused_attention"] = False
    hw = load_hardware(args.hw, overrides)
    if args.kernel == "gemm":
        result = run_op(hw, gemm_op(args.m, args.n, args.k, args.dtype, args.batch,
                                    args.weight_dtype))
    else:
        if args.backward and args.mode not in (None, "fwd_bwd"):
            raise UserError("--backward",
                            f"means --mode fwd_bwd; it contradicts --mode {args.mode}")
        mode = "fwd_bwd" if args.backward else args.mode or "fwd"
        result = run_attention(hw, args.batch, args.heads, args.seq, args.head_dim, args.causal,
                               mode, args.dtype)
    if args.format == "json":
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    else:
        from simulator.table import render_kernel

        weight = getattr(args, "weight_dtype", "") or args.dtype
        render_kernel(result, dtype=args.dtype if weight == args.dtype else
                      f"{args.dtype} activations × {weight} weights")
    return 0


def _collective(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from simulator.collective import run_collective
    from simulator.hardware.system import load_system
    from simulator.units import UnitError, parse

    try:
        size = parse(args.bytes.replace(" ", ""), "size")
    except UnitError as exc:
        raise UserError("--bytes", f"expected a size with its unit, e.g. 1GiB ({exc})") from None
    system, _ = load_system(args.hw, overrides)
    result = run_collective(system, args.kernel, size, args.devices, args.algorithm)
    if args.format == "json":
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    else:
        print(f"{result.kind} ({result.algorithm}) of {size:.6g} B over {result.devices} "
              f"devices of {result.system}: {result.latency_s * 1e6:.4g} us, algbw "
              f"{result.algbw_bytes_per_s / 1e9:.4g} GB/s, busbw "
              f"{result.busbw_bytes_per_s / 1e9:.4g} GB/s")
    return 0


def _check(argv: Sequence[str]) -> int:
    parser = _Parser(prog="simulate check", description="Run a small model through the "
                     "hardware kernels along the simulated schedule; compare with PyTorch.")
    parser.add_argument("--hw", required=True)
    parser.add_argument("--hw-set", action="append", default=[], metavar="PATH=VALUE")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--mapping", default="tensor", choices=("tensor", "batch"))
    parser.add_argument("--phase", default="decode", choices=("decode", "prefill"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=8)
    parser.add_argument("--format", default="table", choices=("table", "json"))
    args = parser.parse_args(argv)
    from simulator.api import _check_shape
    from simulator.hardware import load_hardware
    from simulator.kernels.check import run_check
    from simulator.kernels.functional import counts
    from workloads.config import ModelConfig, resolve_model

    _check_shape(args.phase, args.batch, args.context, args.prompt)
    hw = load_hardware(args.hw, _pairs(args.hw_set, "--hw-set", True))
    cfg = resolve_model(args.model, _pairs(args.model_set, "--model-set", False))
    if not isinstance(cfg, ModelConfig):
        raise UserError("--model", f"{cfg.name} is built by {cfg.model_type}'s own code; the "
                        "functional check runs our modules only (llama, hgrn_bit)")
    result = run_check(hw, cfg, mapping=args.mapping, batch=args.batch, phase=args.phase,
                       context=args.context, prompt=args.prompt)
    if args.format == "json":
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    else:
        print(f"{result.model} on {result.hardware}, {args.phase}, batch {args.batch}, "
              f"mapping {result.mapping}; tolerance {result.tolerance:g} (relative)")
        print(f"{'layer':<12}{'max abs error':>16}{'max rel error':>16}  result")
        for layer in result.layers:
            print(f"{layer.name:<12}{layer.max_abs:>16.4g}{layer.max_rel:>16.4g}  "
                  f"{'PASS' if layer.passed else 'FAIL'}")
        by_kernel, by_reference = counts(result.ops)
        print("computed by hardware kernels: "
              + ", ".join(f"{n} {k}" for k, n in sorted(by_kernel.items())))
        print("computed by the PyTorch reference (no kernel for these): "
              + ", ".join(f"{n} {k}" for k, n in sorted(by_reference.items())))
        print(f"schedule: the timed one\n{'kernel':<16}{'ops':>6}{'tiles timed':>14}"
              f"{'tiles checked':>15}{'max rel error':>16}")
        for kind, (ops, timed, checked, worst) in result.by_kind().items():
            print(f"{kind:<16}{ops:>6}{timed:>14}{checked:>15}{worst:>16.4g}")
        for op in result.unchecked:
            print(f"not all timed tiles checked: op {op.index} {op.name} ({op.kind}): "
                  f"{op.tiles_checked} of {op.tiles_timed}")
        for op in result.kernel_failures:
            print(f"kernel mismatch: op {op.index} {op.name} ({op.kind}): max abs error "
                  f"{op.max_abs:.4g}")
        print("PASS" if result.passed else "FAIL")
    return 0 if result.passed else 1


def _regress(argv: Sequence[str]) -> int:
    from pathlib import Path

    from simulator.regress import DEFAULT_BASELINE, regress

    parser = _Parser(prog="simulate regress",
                     description="Compare projected throughput with the baseline table.")
    parser.add_argument("--baseline", type=Path, default=DEFAULT_BASELINE)
    parser.add_argument("--hw-dir", type=Path, default=None,
                        help="hardware files to run instead of the shipped ones")
    parser.add_argument("--tolerance", type=float, default=0.01, help="fraction (0.01 = 1 %%)")
    parser.add_argument("--update", action="store_true", help="rewrite the baseline")
    args = parser.parse_args(argv)
    return regress(args.baseline, args.hw_dir, args.tolerance, args.update)


def _sweep(argv: Sequence[str]) -> int:
    parser = _Parser(prog="simulate sweep", description="Run a design-space sweep.")
    parser.add_argument("spec", help="sweep spec (YAML)")
    parser.add_argument("--out", required=True, help="folder for points.jsonl and results.csv")
    parser.add_argument("--scheduler", default=None, help="Dask scheduler address")
    parser.add_argument("--workers", type=int, default=None, help="local processes")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--plot", action="store_true",
                        help="write DIR/pareto.png (a serving sweep: DIR/serving_rate.png)")
    args = parser.parse_args(argv)
    from simulator.sweep import load, load_spec, run_sweep

    table = run_sweep(args.spec, args.out, args.scheduler, args.workers,
                      progress=not args.no_progress)
    print(f"results: {table}")
    if args.plot and load_spec(args.spec).serve is not None:
        from simulator.serving.figures import save_rate_curve

        print(f"plot: {save_rate_curve(load(args.out), args.out)}")
    elif args.plot:
        from simulator.plots import save_pareto

        print(f"plot: {save_pareto(load(args.out), args.out)}")
    return 0


def _help(argv: Sequence[str]) -> int:
    parser = _Parser(prog="simulate help", description=COMMANDS["help"])
    parser.add_argument("command", nargs="*", help="a command (and, for op, a kernel)")
    args = parser.parse_args(argv)
    if not args.command:
        _run_parser().print_help()
        return 0
    name, *rest = args.command
    if name == "help":
        parser.print_help()
        return 0
    return _handler(name)([*rest, "--help"])


def _serve(argv: Sequence[str]) -> int:
    from simulator.serving.loop import ROUTERS, Options
    from simulator.serving.schedulers import SCHEDULERS

    parser = _Parser(prog="simulate serve", description="Serve a stream of requests with a "
                     "batching scheduler; step times come from the engine. Prints TTFT, TPOT, "
                     "end-to-end and queueing percentiles, throughput and energy.")
    parser.add_argument("--hw", required=True, help="a chip or a system file")
    parser.add_argument("--model", required=True)
    parser.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--requests", metavar="SPEC.yaml", default=None,
                        help="workload spec (simulator/serving/requests.py); flags override")
    parser.add_argument("--arrival", default=None,
                        choices=("poisson", "gamma", "fixed", "burst", "trace"))
    parser.add_argument("--rate", default=None,
                        help="arrivals per second (a number), or with a unit: '240 /min'")
    parser.add_argument("--cv", type=float, default=None, help="gamma arrivals' CV")
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (fixed)")
    parser.add_argument("--output", type=int, default=None, help="output tokens (fixed)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--trace-file", default=None, metavar="CSV",
                        help="Azure or Vidur request trace (arrival and lengths)")
    parser.add_argument("--scheduler", default="vllm", choices=tuple(SCHEDULERS))
    parser.add_argument("--max-sequences", type=int, default=256,
                        help="most sequences in a step (vLLM max_num_seqs)")
    parser.add_argument("--max-tokens", type=int, default=8192,
                        help="most prompt tokens a step prefills (max_num_batched_tokens)")
    parser.add_argument("--token-budget", type=int, default=512,
                        help="sarathi: tokens a step feeds, decodes and prompt chunks")
    parser.add_argument("--block-size", type=int, default=16, help="KV block, tokens")
    parser.add_argument("--kv-blocks", type=int, default=None,
                        help="pin the KV cache's blocks (default: what memory leaves)")
    parser.add_argument("--memory-fraction", type=float, default=0.9,
                        help="share of a device's memory the server uses (default 0.9)")
    parser.add_argument("--bucket", type=int, default=16,
                        help="step lengths rounded up to this many tokens (1: exact)")
    parser.add_argument("--reject", action="store_true",
                        help="count requests that can never fit as rejected, not an error")
    parser.add_argument("--slo-ttft", type=float, default=None, metavar="SECONDS")
    parser.add_argument("--slo-tpot", type=float, default=None, metavar="SECONDS")
    parser.add_argument("--hw-set", action="append", default=[], metavar="PATH=VALUE",
                        help="override a hardware field (e.g. overheads.instances.contention=0)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--replicas", type=int, default=1,
                        help="copies of the model, each on its own tp × pp devices")
    parser.add_argument("--router", default="round_robin", choices=ROUTERS,
                        help="how arrivals are spread over replicas")
    parser.add_argument("--runtime", default=None, choices=("eager", "cuda_graphs"))
    parser.add_argument("--format", default="table", choices=("table", "json", "csv"))
    parser.add_argument("--perfetto", metavar="FILE.json", default=None,
                        help="write a Perfetto trace: a track per replica and per request")
    parser.add_argument("--plot", metavar="DIR", default=None,
                        help="write DIR/serving_cdf.png and DIR/serving_over_time.png")
    args = parser.parse_args(argv)
    for flag, value, low in (("--max-sequences", args.max_sequences, 1),
                             ("--replicas", args.replicas, 1),
                             ("--max-tokens", args.max_tokens, 1),
                             ("--token-budget", args.token_budget, 1),
                             ("--block-size", args.block_size, 1),
                             ("--bucket", args.bucket, 1),
                             ("--kv-blocks", args.kv_blocks, 1)):
        if value is not None and value < low:
            raise UserError(flag, f"expected a whole number ≥ {low}, not {value}")
    if not 0 < args.memory_fraction <= 1:
        raise UserError("--memory-fraction", f"expected a share in (0, 1], not "
                                             f"{args.memory_fraction}")
    from simulator.files import check_output_file, check_output_folder, write_atomic
    from simulator.serving.requests import load_spec
    from simulator.serving.serve import rows, run_serving, to_csv, to_json
    from simulator.yamlfile import load_yaml

    data: dict[str, Any] = {}
    if args.requests is not None:
        try:
            with open(args.requests, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            raise UserError(f"--requests {args.requests}", f"cannot read it "
                                                           f"({exc.strerror})") from None
        data = load_yaml(text, f"--requests {args.requests}") or {}
        if not isinstance(data, dict):
            raise UserError(f"--requests {args.requests}", "expected a mapping")
    rate = args.rate
    if rate is not None and rate.replace(".", "", 1).replace("-", "", 1).isdigit():
        rate = f"{rate} /s"  # a bare number: requests per second
    for key, value in (("arrival", args.arrival), ("rate", rate), ("cv", args.cv),
                       ("num_requests", args.num_requests), ("prompt", args.prompt),
                       ("output", args.output), ("seed", args.seed),
                       ("trace", args.trace_file)):
        if value is not None:
            data[key] = value
    if args.trace_file is not None:
        data.setdefault("arrival", "trace")
        data.setdefault("prompt", "trace")
        data.setdefault("output", "trace")
    spec = load_spec(data, f"--requests {args.requests}" if args.requests else "requests")
    if args.perfetto is not None:
        check_output_file(args.perfetto, "--perfetto")
    if args.plot is not None:
        check_output_folder(args.plot, "--plot")
    options = Options(scheduler=args.scheduler, max_sequences=args.max_sequences,
                      max_tokens=args.max_tokens, token_budget=args.token_budget,
                      block_size=args.block_size, kv_blocks=args.kv_blocks,
                      memory_fraction=args.memory_fraction, bucket=args.bucket,
                      reject=args.reject, slo_ttft_s=args.slo_ttft, slo_tpot_s=args.slo_tpot,
                      replicas=args.replicas, router=args.router,
                      record_steps=bool(args.perfetto or args.plot))
    result = run_serving(args.hw, args.model, spec, options,
                         model_set=_pairs(args.model_set, "--model-set", False), tp=args.tp,
                         pp=args.pp, runtime=args.runtime,
                         hw_set=_pairs(args.hw_set, "--hw-set", True))
    interrupted = bool(result.summary.get("interrupted"))
    if not interrupted:  # an interrupted run writes no files: only its partial summary
        title = (f"{result.summary['model']}, {result.summary['scheduler']} on "
                 f"{result.summary['machine']}")
        if args.perfetto is not None:
            from simulator.serving.perfetto import to_json as trace_json

            write_atomic(args.perfetto, trace_json(result, title), "--perfetto")
        if args.plot is not None:
            from simulator.serving.figures import save_serving_plots

            for path in save_serving_plots(result, args.plot, title):
                print(f"plot: {path}", file=sys.stderr)
    if args.format == "json":
        print(to_json(result))
    elif args.format == "csv":
        sys.stdout.write(to_csv(result))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(show_header=False, box=None, title="serving", title_justify="left")
        for name, value in rows(result):
            table.add_row(name, value)
        Console().print(table)
    if interrupted:
        print(f"simulate serve: interrupted; {result.summary['unfinished']} requests "
              "unfinished, no files written", file=sys.stderr)
        return 130
    return 0


_HANDLERS: dict[str, Callable[[Sequence[str]], int]] = {
    "schema": _schema, "trace": _trace, "list": _list, "validate": _validate, "op": _op,
    "serve": _serve,
    "check": _check, "regress": _regress, "sweep": _sweep, "help": _help}
_MAIN_RUN = "simulate --hw HW --model MODEL"


def _handler(word: str) -> Callable[[Sequence[str]], int]:
    """The sub-command `word` names, or a UserError that suggests the nearest one."""
    if word in _HANDLERS:
        return _HANDLERS[word]
    near = difflib.get_close_matches(word, list(_HANDLERS), n=1)
    hint = f"did you mean {near[0]}? " if near else ""
    raise UserError(word or "''", f"unknown command; {hint}expected one of "
                                  f"{', '.join(_HANDLERS)}, or the main run: {_MAIN_RUN}")


def _dispatch(argv: list[str]) -> tuple[Callable[[Sequence[str]], int], list[str]]:
    """(handler, its arguments): a first word that is not a flag must name a command."""
    if not argv:
        raise UserError("simulate", f"expected {_MAIN_RUN} [options], or a command "
                                    "(simulate --help lists them)")
    if argv[0].startswith("-"):
        return _run, argv
    return _handler(argv[0]), argv[1:]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `simulate` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        handler, args = _dispatch(argv)
        return handler(args)
    except SystemExit as exc:  # --help and --version: argparse exits after printing
        return exc.code if isinstance(exc.code, int) else 0
    except UserError as exc:
        message = " ".join(str(exc).split())  # one line, whatever a library put in it
        print(f"simulate: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("simulate: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
