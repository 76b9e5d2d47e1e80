"""``seal-jax bench --preset NAME --random-weights``: the command line of the SEAL-workload suite.

:mod:`seal_jax.throughput` measures (the suite's shapes, rows, peaks, useful FLOPs and rooflines); this
module turns ``seal-jax bench`` arguments into a run of it: the suite's options (:func:`add_arguments`, and
:func:`wants_suite`, which tells them from the CPU comparison's of :mod:`seal_jax.bench`), the architecture
and weights (a preset or a checkpoint's ``config.json``, random weights or real ones), the attention
implementation (the platform's fused kernel, checked on this machine first: :func:`choose_attention`), the
PyTorch reference where its stack is installed, and the report: JSON written as each row finishes, a
Markdown table (:func:`format_table`) printed last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

import seal_jax as sj
from seal_jax import kernel_check, provenance
from seal_jax.lm import attention as attn
from seal_jax.lm import sharding as shd
from seal_jax.lm import weights
from seal_jax.lm.config import ConfigError, ModelConfig, from_hf, preset
from seal_jax.throughput import (
    SPLIT_K_OFF,
    BenchError,
    Row,
    Suite,
    SuiteShapes,
    device_peaks,
    measure_ceilings,
)
from seal_jax.torch_reference import Reference


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The suite's options of ``seal-jax bench`` (the rest are :mod:`seal_jax.bench`'s)."""
    parser.add_argument("--preset", default=None, help="run the SEAL-workload suite on this preset's architecture "
                        "(qwen3-8b, ...; with --random-weights)")
    parser.add_argument("--random-weights", action="store_true",
                        help="random weights (in --dtype) created in their shards on the devices (no checkpoint "
                             "needed); with --model DIR, that folder's config.json gives the architecture")
    parser.add_argument("--mesh", default=None, help="mesh spec over this machine's devices, e.g. data=8 "
                        "(default: data = number of devices)")
    parser.add_argument("--candidates", type=int, default=None, help="K self-edits per passage (default 5, SEAL)")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default on GPU/TPU) or float32 (default on CPU)")
    parser.add_argument("--attention", default=None, choices=attn.IMPLEMENTATIONS,
                        help="attention implementation, used as given (default: the platform's, causal_blocks on CPU, "
                             "and on TPU / GPU its fused kernel, splash / triton, checked first against the einsum "
                             "on this machine: chunked runs where it fails)")
    parser.add_argument("--no-roofline", action="store_true",
                        help="skip compiling each program again for its roofline (saves compile time)")
    parser.add_argument("--split-k-ab", action="store_true",
                        help="also time (and compile for its roofline) each decode row and the training row with "
                             "XLA's split-K rewrite of GPU matmuls off (xla_gpu_experimental_force_split_k=1): the "
                             "row's detail.variants.split_k_off (not on TPUs)")


def wants_suite(args: argparse.Namespace) -> bool:
    """Whether ``seal-jax bench`` arguments ask for this suite rather than the CPU comparison."""
    return bool(getattr(args, "preset", None) or getattr(args, "random_weights", False)
                or getattr(args, "candidates", None) is not None or getattr(args, "mesh", None))


def _config(args: argparse.Namespace) -> ModelConfig:
    """The architecture the suite runs: the preset's, or the model folder's ``config.json``."""
    if args.preset and not args.random_weights:
        raise BenchError(f"--preset {args.preset} has no weights: add --random-weights, or pass --model DIR")
    try:
        if args.preset:
            return preset(args.preset)
        return from_hf(args.model if args.random_weights else weights.resolve_checkpoint(args.model))
    except ConfigError as error:
        raise BenchError(str(error)) from None


def _load(args: argparse.Namespace, config: ModelConfig, dtype: str, mesh: Any, attention: str | None) -> tuple[Any, str]:
    if args.random_weights:
        what = f"preset {args.preset}" if args.preset else f"{args.model}/config.json"
        return sj.LM.random(config, mesh=mesh, dtype=dtype, attention=attention), f"{what}, random weights"
    return sj.load(args.model, dtype=dtype, mesh=mesh, attention=attention), f"{args.model}"


def kernel_checker(config: ModelConfig, dtype: str, device: Any) -> Callable[[str], str | None]:
    """``check(kernel)`` for :func:`choose_attention`: :func:`~seal_jax.lm.attention.check_kernel` at the
    model's head group and head size on ``device``, in a child process on a GPU (:mod:`seal_jax.kernel_check`:
    a kernel compiler that aborts or hangs must not end the suite), in this one elsewhere (a TPU serves one
    process at a time)."""
    shape = {"heads": config.num_heads, "kv_heads": config.num_kv_heads, "head_dim": config.head_dim}

    def check(kernel: str) -> str | None:
        if device.platform == "gpu":
            print(f"attention: checking the {kernel} kernel in a process of its own (at most "
                  f"{kernel_check.CHECK_SECONDS:g} s)", flush=True)
            return kernel_check.isolated(kernel, dtype=dtype, gpu=getattr(device, "local_hardware_id", None), **shape)
        return attn.check_kernel(kernel, dtype=dtype, device=device, **shape)

    return check


def choose_attention(requested: str | None, platform_: str, check: Callable[[str], str | None]
                     ) -> tuple[str | None, str | None]:
    """The attention implementation the suite builds its model with, and why it is not the platform's
    default (or None): the one ``requested``; else, on a TPU or GPU, the platform's fused kernel if
    ``check(kernel)`` (:func:`~seal_jax.lm.attention.check_kernel` on this machine) finds nothing wrong, and
    ``"chunked"`` if it does, so that one run on a machine whose JAX rejects the kernel still measures
    everything."""
    if requested is not None or platform_ not in ("tpu", "gpu"):
        return requested, None
    kernel = attn.implementation_for(platform_)
    reason = check(kernel)
    if reason is None:
        return None, None
    return "chunked", f"the {kernel} kernel failed its check on this machine ({reason}); ran chunked"


def format_table(report: dict[str, Any]) -> str:
    """The rows as a Markdown table, with the machine and the evaluations per hour."""
    m = report["machine"]
    lines = [f"{report['model']} on {m['devices']} × {m['device_kind']} ({m['platform']}, mesh {report['mesh']}, "
             f"{report['dtype']}, attention {report.get('attention')}); peaks per device {m['peak_flops'] / 1e12:.3g} TFLOP/s, "
             f"{m['peak_bandwidth'] / 1e9:.4g} GB/s ({m['peak_source'].split(':')[0]}); measured: matmul "
             f"{m['ceilings']['matmul_flops'] / 1e12:.3g} TFLOP/s, read {m['ceilings']['read_bandwidth'] / 1e9:.4g} "
             f"GB/s, copy {m['ceilings']['copy_bandwidth'] / 1e9:.4g} GB/s",
             "", "| piece | seconds | rate | MFU | bandwidth | roofline s | measured/roofline | reference s | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def pct(x: float | None) -> str:
        return "" if x is None else f"{100 * x:.1f}%"

    def num(x: float | None, fmt: str = ".3g", suffix: str = "") -> str:
        return "" if x is None else format(x, fmt) + suffix

    for r in report["rows"]:
        lines.append(f"| {r['name']} | {r['seconds']:.4g} | {r['rate']:.4g} {r['unit']} | {pct(r['mfu'])} | "
                     f"{pct(r['bandwidth_fraction'])} | {num(r['roofline_s'])} | {num(r['vs_roofline'], '.2f')} | "
                     f"{num(r['reference_s'])} | {num(r['ratio'], '.2f', '×')} |")
    summary = report.get("summary") or {}
    if report.get("attention_note"):
        lines.append(f"\nattention: {report['attention_note']}")
    if report.get("roofline_note"):
        lines.append(f"\nroofline: {report['roofline_note']}")
    for r in report["rows"]:
        for name, v in (r["detail"].get("variants") or {}).items():
            if "error" in v:
                lines.append(f"\n{r['name']} with {name}: failed ({v['error']})")
                continue
            roof = "" if v.get("roofline_s") is None else f"; roofline {v['roofline_s']:.3g} s"
            lines.append(f"\n{r['name']} with {name}: {v['seconds']:.4g} s against {r['seconds']:.4g} s "
                         f"({v['speedup']:.2f}× its speed{roof})")
    if summary.get("evaluations_per_hour"):
        lines.append(f"\none passage (K = {summary['candidates']}): {summary['evaluation_seconds']:.3g} s → "
                     f"{summary['evaluations_per_hour']:.4g} self-edit evaluations per hour on this machine")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Run the suite; print a table last; write the JSON report to ``args.out`` as rows finish."""
    code = provenance.code()  # before the run: the tree as it was measured
    if not getattr(args, "no_reference", False):  # before JAX starts: leave half of a GPU to the PyTorch reference
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    devices = jax.devices()
    platform_ = devices[0].platform
    dtype = args.dtype or ("float32" if platform_ == "cpu" else "bfloat16")
    if dtype not in ("float32", "bfloat16"):
        raise BenchError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    quick = bool(getattr(args, "quick", False) or getattr(args, "smoke", False))
    k = 5 if args.candidates is None else args.candidates
    if k < 1:
        raise BenchError(f"--candidates must be at least 1 (K self-edits per passage), got {k}")
    shapes = SuiteShapes.quick(k) if quick else SuiteShapes(candidates=k)
    only = [name.strip() for name in (getattr(args, "only", None) or "").split(",") if name.strip()] or None
    if only is not None and set(only) - set(shapes.row_names()):
        raise BenchError(f"unknown row(s) {sorted(set(only) - set(shapes.row_names()))} in --only; the SEAL-workload "
                         f"suite's rows are {', '.join(shapes.row_names())}")
    spec = args.mesh or f"data={len(devices)}"
    try:
        mesh = shd.make_mesh(spec) if len(devices) > 1 or args.mesh else None
    except shd.MeshError as error:
        raise BenchError(f"--mesh {spec}: {error}") from None
    config = _config(args)
    first = list(mesh.devices.flat)[0] if mesh is not None else devices[0]
    attention, fallback = choose_attention(args.attention, platform_, kernel_checker(config, dtype, first))
    if fallback:
        print(f"attention: {fallback}", flush=True)
    lm, source = _load(args, config, dtype, mesh, attention)
    weight_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in lm.param_structs().values())
    ceilings = measure_ceilings(platform_, dtype, quick, working_set=weight_bytes)
    peaks = device_peaks(list(mesh.devices.flat) if mesh is not None else devices[:1], ceilings, dtype)
    shapes.check(lm.config.max_position_embeddings)
    reference = None
    if not getattr(args, "no_reference", False) and platform_ in ("cpu", "gpu"):
        try:
            import peft  # noqa: F401  (deferred: optional reference stack)
            import torch  # deferred: optional reference stack, as peft
            import transformers  # noqa: F401  (deferred: ~1 s to import, only the reference needs it)
        except ImportError as error:
            print(f"no PyTorch reference: {error}")
        else:
            if platform_ == "gpu" and not torch.cuda.is_available():
                print("no PyTorch reference: torch sees no CUDA device")
            else:
                try:
                    reference = Reference(lm.config, dtype, "cuda" if platform_ == "gpu" else "cpu",
                                          threads=getattr(args, "threads", None) if platform_ == "cpu" else None)
                except Exception as error:  # any failure of the PyTorch stack leaves the seal-jax rows to run
                    print(f"no PyTorch reference: {type(error).__name__}: {str(error).strip()[:300]}")
    machine = {"platform": platform_, "device_kind": peaks.device_kind, "devices": peaks.devices,
               "peak_flops": peaks.flops, "peak_bandwidth": peaks.bandwidth, "peak_source": peaks.source,
               "ceilings": ceilings, "host": platform.node(), "cpu": platform.processor() or platform.machine(),
               "cores": os.cpu_count(), "jax": jax.__version__}
    report: dict[str, Any] = {"code": code, "suite": "seal-workload", "model": source, "mesh": spec if mesh is not None else "one device",
                              "dtype": dtype, "attention": lm.model.attention_impl, "attention_note": fallback,
                              "roofline_note": None,
                              "shapes": dataclasses.asdict(shapes), "machine": machine,
                              "reference": None if reference is None else f"transformers on {reference.device}",
                              "rows": [], "summary": None}

    def write() -> None:
        if args.out:  # written beside, then renamed: a kill never leaves a half-written file
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps(report, indent=2, default=float))
            tmp.replace(out)

    def emit(row: Row) -> None:
        report["rows"].append(dataclasses.asdict(row))
        report["roofline_note"] = suite.roofline_error  # in every report written, a killed run's too
        extra = "" if row.mfu is None else f", MFU {100 * row.mfu:.1f}%"
        if row.bandwidth_fraction is not None:
            extra += f", bandwidth {100 * row.bandwidth_fraction:.1f}%"
        print(f"{row.name}: {row.rate:.4g} {row.unit} ({row.seconds:.3g} s{extra})", flush=True)
        write()

    split_k_ab = getattr(args, "split_k_ab", False) and platform_ != "tpu"  # CPUs run it: the path is tested
    if getattr(args, "split_k_ab", False) and not split_k_ab:
        print("--split-k-ab: not on a TPU (split-K is a GPU compiler's rewrite)", flush=True)
    suite = Suite(lm, shapes, peaks, repeats=1 if quick else 3, reference=reference,
                  rooflines=not getattr(args, "no_roofline", False),
                  variants={"split_k_off": SPLIT_K_OFF} if split_k_ab else None, only=only)
    report["only"] = only  # None: every row of the suite
    report["summary"] = suite.run(emit)
    write()
    print()
    print(format_table(report))
    per_hour = report["summary"]["evaluations_per_hour"]
    if per_hour is not None and not math.isfinite(per_hour):
        return 1
    return 0
