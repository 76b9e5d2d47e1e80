"""``seal-jax compile``: the command line of :mod:`seal_jax.aot` (compile a run's programs for a target) and
:mod:`seal_jax.layout_search` (``--search``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

from seal_jax.aot import (
    EXIT_DOES_NOT_FIT,
    CompileError,
    Shapes,
    check_context,
    compile_workload,
    format_rows,
    workload_from_config,
    workload_from_flags,
)
from seal_jax.layout_search import format_search, search_layouts
from seal_jax.lm.config import ConfigError
from seal_jax.lm.types import (
    ATTENTION_IMPLEMENTATIONS,
    REMAT_POLICIES,
    TRAIN_WEIGHTS,
    MeshError,
    mesh_lays_out,
    parse_mesh_spec,
)
from seal_jax.targets import TARGETS, TargetError, get_target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``seal-jax compile``."""
    parser.add_argument("config", nargs="?", default=None, help="a run config TOML (e.g. experiments/seal-qwen3-8b.toml)")
    names = ", ".join(f"{t.name} ({t.chips})" for t in TARGETS.values())
    parser.add_argument("--target", required=True,
                        help=f"one of: {names} (devices in brackets; TPU names are Cloud accelerator types, and a "
                        "v5p's counts TensorCores, two per chip)")
    parser.add_argument("--mesh", default=None, help="mesh sizes (default: the config's, or data=<chips>)")
    parser.add_argument("--model", default=None, help="a preset (e.g. qwen3-8b) or HF folder; overrides the config's")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--only", default=None, help="comma-separated program names (answer, self_edit, train, …)")
    parser.add_argument("--search", action="store_true",
                        help="compile on every sensible mesh layout of the target, each with the training "
                             "programs on every training layout, and rank those that fit by roofline time; with "
                             "--mesh, that generation mesh only (its training layouts searched)")
    parser.add_argument("--passages-per-program", type=int, default=None, metavar="P",
                        help="passages that share each program (overrides a knowledge or ReST-EM config's "
                             "passages_per_program; the base answers, self-edits and training then count 1/P "
                             "per passage)")
    parser.add_argument("--train-mesh", default=None, metavar="MESH",
                        help="another layout of the target's devices for the training programs (e.g. data=8; "
                             "overrides the config's train_mesh, '' for none); each training call adds a "
                             "<program>.placement row (the all-gather that places the weights)")
    parser.add_argument("--train-weights", default=None, choices=TRAIN_WEIGHTS,
                        help="how the base weights lie on the train mesh (overrides the config's train_weights): "
                             "replicated, or fsdp (each layer's weights split over its data axis and gathered "
                             "as the layer runs)")
    parser.add_argument("--attention", default=None, choices=ATTENTION_IMPLEMENTATIONS,
                        help="attention implementation (overrides the config's; default: the target platform's "
                             "fused kernel)")
    parser.add_argument("--candidates", "-k", type=int, default=5, help="K (without a config)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="(without a config)")
    parser.add_argument("--remat", default="minimal", choices=REMAT_POLICIES,
                        help="what training keeps per layer for the backward pass (without a config; default "
                             "minimal)")
    parser.add_argument("--lora-rank", type=int, default=32, help="(without a config)")
    parser.add_argument("--new-tokens", type=int, default=1024, help="self-edit length (without a config)")
    for f in dataclasses.fields(Shapes):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default,
                            help=f"workload shape (default {f.default})")


def main(args: argparse.Namespace) -> int:
    """Run ``seal-jax compile``; exit code 3 when a program does not fit its device."""
    import jax  # deferred: only this command pins JAX to the host CPU (the targets' compilers do the rest)

    jax.config.update("jax_platforms", "cpu")
    try:
        shapes = Shapes(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Shapes)})
        if args.config is not None:
            workload = workload_from_config(args.config, shapes, model=args.model, mesh=args.mesh,
                                            passages=args.passages_per_program, train_mesh=args.train_mesh,
                                            train_weights=args.train_weights, target=args.target)
        else:
            if args.passages_per_program is not None:
                raise CompileError("--passages-per-program needs a run config (its K candidates per passage)")
            if args.train_mesh or args.train_weights:
                raise CompileError("--train-mesh and --train-weights need a run config")
            workload = workload_from_flags(args.model or "qwen3-8b", shapes, candidates=args.candidates,
                                           dtype=args.dtype, mesh=args.mesh, remat=args.remat,
                                           lora_rank=args.lora_rank, new_tokens=args.new_tokens)
        if args.attention:
            workload = dataclasses.replace(workload, attention=args.attention)
        only = [s.strip() for s in args.only.split(",")] if args.only else None
        known = {p.name for p in workload.programs}
        if only and set(only) - known:
            raise CompileError(f"unknown program(s) {sorted(set(only) - known)} in --only; this run has {sorted(known)}")

        def show(row: dict[str, Any]) -> None:
            verdict = "fits" if row.get("fits") else "DOES NOT FIT"
            print(f"  compiled {row['program']} for {row['target']} (mesh {row['mesh']}) in {row['compile_s']} s: "
                  f"{verdict}", file=sys.stderr, flush=True)

        if args.search and args.mesh and not mesh_lays_out(parse_mesh_spec(args.mesh), get_target(args.target).chips):
            raise CompileError(f"--mesh {args.mesh!r} does not lay out {args.target}'s {get_target(args.target).chips} "
                               "devices (sizes whose product is that count); leave it out to search every mesh")
        if args.search:
            get_target(args.target)  # (an unknown target first)
            check_context(workload, only)  # once here: the search would give it for every layout
            def save(entries: list[dict[str, Any]]) -> None:  # after each layout: a killed search keeps its rows
                print(f"  {len(entries)} layouts compiled", file=sys.stderr, flush=True)
                if args.json:
                    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.json).write_text(json.dumps(entries, indent=1, default=_json_default))

            entries = search_layouts(workload, args.target, only=only, meshes=[args.mesh] if args.mesh else None,
                                     on_row=show, on_entry=save)
        else:
            report = compile_workload(workload, args.target, only=only, on_row=show)
    except (CompileError, TargetError, ConfigError, MeshError, FileNotFoundError, ValueError) as error:
        print(f"seal-jax compile: {error}", file=sys.stderr)
        return 2
    if args.search:
        print(format_search(entries, args.target, workload.name))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(entries, indent=1, default=_json_default))
        return 0 if any(e["fits"] for e in entries) else EXIT_DOES_NOT_FIT
    print(format_rows(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1, default=_json_default))
    bad = [r for r in report["rows"] if not r.get("fits")]
    for r in bad:
        peak = r.get("peak_bytes")
        what = f"needs {peak / 1e9:.2f} GB of {r['hbm_bytes'] / 1e9:.2f} GB" if peak else r.get("error", "")
        print(f"seal-jax compile: {r['program']} does not fit one {r['target']} device: {what}", file=sys.stderr)
    return EXIT_DOES_NOT_FIT if bad else 0


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)
