"""Scaling sweeps of the inner loop and of compilation: ``seal-jax bench --scaling DIR``.

Three sweeps, each row appended to ``DIR/scaling.jsonl`` as it is measured, then one PNG per sweep:

* ``candidates`` — ``LM.train_adapters`` on the bundled model with K = 1, 2, 4, 8, 16 candidates (same
  data size per candidate): wall seconds after compilation, compile seconds, tokens/s;
* ``seq_len`` — one candidate, sequences of T = 32 … 512 tokens;
* ``depth`` — random decoders of the same width with L = 2 … 32 layers: compile seconds of the forward
  (``jit(...).lower(...).compile()``) and of the K-candidate training program. On a CPU (and a TPU) the
  decoder scans over a stacked layer axis, so compile time should stay about flat as L grows; GPUs store
  the layers split and unroll them (``model.LayerStack``), where it grows with L.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

import seal_jax as sj
from seal_jax.lm.api import LM
from seal_jax.lm.config import preset
from seal_jax.lm.model import Decoder
from seal_jax.selfedit.data import load_passages

CANDIDATES = (1, 2, 4, 8, 16)
SEQ_LENS = (32, 64, 128, 256, 512)
DEPTHS = (2, 4, 8, 16, 32)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Sizes of the three sweeps (``quick`` shrinks them)."""

    candidates: tuple[int, ...] = CANDIDATES
    seq_lens: tuple[int, ...] = SEQ_LENS
    depths: tuple[int, ...] = DEPTHS
    sequences: int = 2  # training sequences per candidate
    length: int = 64  # tokens per sequence in the candidates sweep
    repeats: int = 2

    @classmethod
    def quick(cls) -> Sweep:
        """Smaller sweeps for a fast look (a couple of minutes on a 2-core CPU)."""
        return cls(candidates=(1, 2, 4, 8), seq_lens=(32, 64, 128, 256), depths=(2, 4, 8, 16), repeats=1)


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON row to ``path`` (JSONL)."""
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def text_chunks(lm: Any, count: int, length: int) -> list[str]:
    """``count`` strings cut from the built-in demo passages, each at most ``length - 1`` tokens long when
    tokenised again (so at most ``length`` with the EOS that training appends; in practice exactly).
    Shared with :mod:`seal_jax.bench`."""

    def encode(text: str) -> list[int]:
        return lm.tokenizer(text, add_special_tokens=False)["input_ids"]

    ids: list[int] = []
    for p in load_passages("demo"):
        ids += encode(p.text + "\n\n")
    while len(ids) < count * length:
        ids = ids + ids
    out = []
    for i in range(count):
        piece = ids[i * length:(i + 1) * length - 1]
        text = lm.tokenizer.decode(piece)
        while len(encode(text)) > length - 1:  # a cut mid-word can tokenise into more pieces
            piece = piece[:-1]
            text = lm.tokenizer.decode(piece)
        out.append(text)
    return out


def timed_train(lm: Any, data: Sequence[Sequence[str]], length: int, repeats: int) -> tuple[float, float]:
    """``(first call seconds, best later call seconds)`` of ``lm.train_adapters(data)`` (rank 32 q/v, 1 epoch)."""
    lora = sj.LoraSpec(rank=32, alpha=64.0)
    specs = [sj.TrainSpec(learning_rate=1e-3, epochs=1, max_len=length + 8, seed=i) for i in range(len(data))]
    t0 = time.perf_counter()
    lm.train_adapters(data, lora, specs)
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        lm.train_adapters(data, lora, specs)
        best = min(best, time.perf_counter() - t0)
    return first, best


def _tokens(lm: Any, texts: Sequence[str]) -> int:
    return sum(len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)


def sweep_candidates(lm: Any, sweep: Sweep, out: Path) -> list[dict[str, Any]]:
    """Train K candidates (``sweep.sequences`` × ``sweep.length`` tokens each) for every K; one row per K."""
    rows = []
    texts = text_chunks(lm, max(sweep.candidates) * sweep.sequences, sweep.length)
    for k in tqdm(sweep.candidates, desc="scaling: candidates", unit="K"):
        data = [texts[i * sweep.sequences:(i + 1) * sweep.sequences] for i in range(k)]
        first, best = timed_train(lm, data, sweep.length, sweep.repeats)
        tokens = _tokens(lm, [t for d in data for t in d])
        row = {"sweep": "candidates", "k": k, "seq_len": sweep.length, "sequences": sweep.sequences,
               "seconds": best, "compile_seconds": max(0.0, first - best), "tokens": tokens,
               "tokens_per_s": tokens / best, "seconds_per_candidate": best / k}
        append_row(out, row)
        rows.append(row)
    return rows


def sweep_seq_len(lm: Any, sweep: Sweep, out: Path) -> list[dict[str, Any]]:
    """Train one candidate on ``sweep.sequences`` sequences of T tokens for every T; one row per T."""
    rows = []
    for t in tqdm(sweep.seq_lens, desc="scaling: seq_len", unit="T"):
        data = [text_chunks(lm, sweep.sequences, t)]
        first, best = timed_train(lm, data, t, sweep.repeats)
        tokens = _tokens(lm, data[0])
        row = {"sweep": "seq_len", "k": 1, "seq_len": t, "sequences": sweep.sequences, "seconds": best,
               "compile_seconds": max(0.0, first - best), "tokens": tokens, "tokens_per_s": tokens / best}
        append_row(out, row)
        rows.append(row)
    return rows


def sweep_depth(lm: Any, sweep: Sweep, out: Path) -> list[dict[str, Any]]:
    """Compile seconds of the forward and of a 2-candidate training call for random decoders of L layers.

    The decoders have the bundled model's vocabulary (so its tokenizer works) and the ``tiny`` preset's
    width; their weights are random (compile time does not depend on the values).
    """
    rows = []
    texts = text_chunks(lm, 2 * sweep.sequences, 32)
    data = [texts[:sweep.sequences], texts[sweep.sequences:]]
    ids = jnp.asarray(np.random.default_rng(0).integers(0, lm.config.vocab_size, (2, 64)), jnp.int32)
    for depth in tqdm(sweep.depths, desc="scaling: depth", unit="L"):
        config = preset("tiny").replace(vocab_size=lm.config.vocab_size, num_layers=depth)
        small = LM(Decoder(config, dtype=jnp.float32, rngs=nnx.Rngs(depth)), lm.tokenizer)
        graphdef = small.graphdef

        def forward(state: Any, ids: jax.Array, graphdef: Any = graphdef) -> jax.Array:
            return nnx.merge(graphdef, state)(ids)[0]

        lowered = jax.jit(forward).lower(small.state, ids)
        t0 = time.perf_counter()
        lowered.compile()
        forward_compile = time.perf_counter() - t0
        first, best = timed_train(small, data, 32, 1)
        row = {"sweep": "depth", "layers": depth, "hidden_size": config.hidden_size,
               "parameters": config.num_parameters(), "forward_compile_seconds": forward_compile,
               "train_compile_seconds": max(0.0, first - best), "train_seconds": best}
        append_row(out, row)
        rows.append(row)
    return rows


def plot(rows: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per sweep present in ``rows``; returns the files written."""
    import matplotlib  # deferred: matplotlib takes ~0.5 s to import and only the charts need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: as matplotlib, once the Agg backend is chosen

    written = []
    by = {name: [r for r in rows if r["sweep"] == name] for name in ("candidates", "seq_len", "depth")}
    if by["candidates"]:
        r = by["candidates"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([x["k"] for x in r], [x["seconds"] for x in r], "o-", label="train (after compile)")
        ax.plot([x["k"] for x in r], [x["compile_seconds"] for x in r], "s--", label="compile")
        ax.set(xlabel="candidates K", ylabel="seconds",
               title=f"train_adapters, {r[0]['sequences']} × {r[0]['seq_len']} tokens per candidate")
        _log2_ticks(ax, [x["k"] for x in r])
        ax.legend()
        written.append(_save(fig, out_dir / "scaling_candidates.png"))
    if by["seq_len"]:
        r = by["seq_len"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([x["seq_len"] for x in r], [x["seconds"] for x in r], "o-", label="train (after compile)")
        ax.plot([x["seq_len"] for x in r], [x["compile_seconds"] for x in r], "s--", label="compile")
        ax.set(xlabel="sequence length T", ylabel="seconds", ylim=(0, None),
               title=f"train_adapters, 1 candidate, {r[0]['sequences']} sequences")
        _log2_ticks(ax, [x["seq_len"] for x in r])
        ax.legend()
        written.append(_save(fig, out_dir / "scaling_seq_len.png"))
    if by["depth"]:
        r = by["depth"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([x["layers"] for x in r], [x["forward_compile_seconds"] for x in r], "o-", label="forward")
        ax.plot([x["layers"] for x in r], [x["train_compile_seconds"] for x in r], "s-", label="K=2 training")
        ax.set(xlabel="layers L", ylabel="compile seconds", ylim=(0, None),
               title="compile time vs depth (scanned layers)")
        _log2_ticks(ax, [x["layers"] for x in r])
        ax.legend()
        written.append(_save(fig, out_dir / "scaling_depth.png"))
    return written


def _log2_ticks(ax: Any, values: Sequence[int]) -> None:
    """A base-2 log x axis labelled exactly at ``values`` (no minor ticks)."""
    from matplotlib.ticker import NullLocator  # deferred: matplotlib is heavy and only the charts need it

    ax.set_xscale("log", base=2)
    ax.set_xticks(list(values), [str(v) for v in values])
    ax.xaxis.set_minor_locator(NullLocator())


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt  # deferred: matplotlib is heavy and only the charts need it

    plt.close(fig)
    return path


def _compile(seconds: float) -> str:
    return "reused" if seconds < 0.05 else f"{seconds:.1f}"


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The sweeps as Markdown tables (for BENCHMARKS.md)."""
    out = []
    r = [x for x in rows if x["sweep"] == "candidates"]
    if r:
        out += ["| K | train s | compile s | s per candidate | tok/s |", "|---:|---:|---:|---:|---:|"]
        out += [f"| {x['k']} | {x['seconds']:.2f} | {_compile(x['compile_seconds'])} | {x['seconds_per_candidate']:.2f} | "
                f"{x['tokens_per_s']:.0f} |" for x in r]
        out.append("")
    r = [x for x in rows if x["sweep"] == "seq_len"]
    if r:
        out += ["| T | train s | compile s | tok/s |", "|---:|---:|---:|---:|"]
        out += [f"| {x['seq_len']} | {x['seconds']:.2f} | {_compile(x['compile_seconds'])} | {x['tokens_per_s']:.0f} |"
                for x in r]
        out.append("")
    r = [x for x in rows if x["sweep"] == "depth"]
    if r:
        out += ["| L | parameters | forward compile s | training compile s |", "|---:|---:|---:|---:|"]
        out += [f"| {x['layers']} | {x['parameters']:,} | {x['forward_compile_seconds']:.2f} | "
                f"{x['train_compile_seconds']:.1f} |" for x in r]
    return "\n".join(out)


SWEEPS = ("candidates", "seq_len", "depth")


def main(args: argparse.Namespace) -> int:
    """Run the sweeps on ``args.model`` into ``args.scaling`` (JSONL rows, PNGs, ``scaling.md``)."""
    only = set(args.only.split(",")) if args.only else set(SWEEPS)
    if only - set(SWEEPS):
        raise ValueError(f"unknown sweep(s) in --only: {sorted(only - set(SWEEPS))}; the sweeps are {', '.join(SWEEPS)}")
    out_dir = Path(args.scaling)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "scaling.jsonl"
    out.write_text("")
    sweep = Sweep.quick() if args.quick else Sweep()
    lm = sj.load(args.model, dtype="float32")
    rows: list[dict[str, Any]] = []
    if "candidates" in only:
        rows += sweep_candidates(lm, sweep, out)
    if "seq_len" in only:
        rows += sweep_seq_len(lm, sweep, out)
    if "depth" in only:
        rows += sweep_depth(lm, sweep, out)
    pngs = plot(rows, out_dir)
    text = markdown(rows)
    (out_dir / "scaling.md").write_text(text + "\n")
    print(text)
    print(f"\nrows in {out}; figures: {', '.join(p.name for p in pngs)}")
    return 0
