"""The SEAL workload's throughput on this machine's devices: ``seal-jax bench --preset NAME --random-weights``.

Where :mod:`seal_jax.bench` compares the bundled CPU model with transformers, this suite answers the
accelerator user's questions for any preset (random weights, created in their shards on the devices) or
checkpoint (``--model DIR``), at the shapes of one SEAL passage with K candidates:

* ``prefill`` — the K self-edit prompts' prefill;
* ``decode_b1``, ``decode_b8`` — greedy answers of the base model for 1 and 8 questions;
* ``decode_k{K}x8`` — the 8 answers under K stacked adapters (``vmap`` over K);
* ``self_edit`` — generating the K self-edits (prefill + decode);
* ``train_k{K}`` — the K-candidate LoRA training program (SEAL's inner loop: q/v rank 32, AdamW, batch 1);
* ``evaluation`` — one whole self-edit evaluation of a passage (generate K self-edits → train K adapters →
  answer the questions under the K adapters), in seconds, and the self-edit evaluations per hour that gives
  (K per passage, for the whole mesh).

Every row carries tokens/s and seconds; **MFU** (useful FLOPs / (seconds × peak FLOP/s)) for compute-bound
work and the **fraction of memory bandwidth** (the bytes a decode step must read at least / (seconds × peak
bandwidth)) for decoding; the roofline time of the same compiled program on this device kind
(:mod:`seal_jax.hlo` counts FLOPs and bytes of the optimised HLO; ``max(FLOPs / peak, bytes / bandwidth,
collective bytes / link)``), and measured / roofline. *Useful* FLOPs count what the workload needs, not
what the program does: the matmuls of every real (not padded) row, attention over the causal context, the
output head where its logits are used; LoRA on a frozen base runs the base forward and its input gradients
(4 FLOPs per parameter and token, not the 6 of full fine-tuning: no weight gradients of the base) and the
adapters forward and backward (6 per adapter parameter and token).

Peaks: the published figures of :data:`seal_jax.plan.HARDWARE` for GPUs and TPUs (by the devices' kind);
on a CPU, the ceilings this run measures (a large matmul in the run's dtype, a large copy). The measured
ceilings are reported on every platform. Where PyTorch, transformers and PEFT are installed (CPU, or a CUDA
GPU), reference rows run the same shapes with random weights (:mod:`seal_jax.torch_reference`): ``generate``
and PEFT + AdamW training (one candidate after another, as that stack trains them). Not on TPU: there the
roofline is the reference. ``--split-k-ab`` times each decode row and the training row a second time with
XLA's split-K rewrite of GPU matmuls off (``LM.compiler_options``), which only a GPU can judge.

This module measures; :mod:`seal_jax.throughput_cli` is the command line that runs it (options, model,
attention, reference, the JSON report and the table).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Collection
from typing import Any

import jax
import numpy as np

import seal_jax as sj
from seal_jax import hlo, plan
from seal_jax.ceilings import best_time, copy_bandwidth, matmul_flops, read_bandwidth
from seal_jax.selfedit.run_config import SELFEDIT_SAMPLING
from seal_jax.torch_reference import Reference

# SEAL samples its self-edits (temperature 1, top-p 0.95): the suite's self-edit rows do, with the reference's
# generate alike (its own number of new tokens); answers are greedy
SELF_EDIT_SAMPLING = {k: v for k, v in SELFEDIT_SAMPLING.items() if k != "max_new_tokens"}
# XLA's split-K rewrite of a GPU's matmuls of few rows, turned off (BENCHMARKS.md, twenty-second and
# twenty-sixth sessions): `--split-k-ab` times the decode and training rows again with the programs compiled so
SPLIT_K_OFF = {"xla_gpu_experimental_force_split_k": 1}


class BenchError(ValueError):
    """A benchmark request that cannot run (unknown preset, shapes beyond the model's context, bad mesh)."""


@dataclasses.dataclass(frozen=True)
class SuiteShapes:
    """The shapes of one SEAL passage (defaults: SQuAD passages, SEAL's inner loop with K = 5).

    Attributes:
      candidates: K self-edits per passage (trained together, answered under K stacked adapters).
      questions: questions per passage (the answer batch); question_len: tokens of a question prompt.
      answer_tokens: new tokens of an answer.
      passage_len: tokens of a self-edit prompt; self_edit_tokens: new tokens of a self-edit.
      sequences: training sequences per candidate; seq_len: tokens per sequence; epochs: passes over them.
      lora_rank: adapter rank (alpha = 2 × rank, q/v projections, as SEAL).
    """

    candidates: int = 5
    questions: int = 8
    question_len: int = 128
    answer_tokens: int = 64
    passage_len: int = 512
    self_edit_tokens: int = 256
    sequences: int = 16
    seq_len: int = 256
    epochs: int = 10
    lora_rank: int = 32

    @classmethod
    def quick(cls, candidates: int = 5) -> SuiteShapes:
        """Small shapes for a fast check (and for models with a short context)."""
        return cls(candidates=candidates, question_len=64, answer_tokens=16, passage_len=128, self_edit_tokens=32,
                   sequences=4, seq_len=64, epochs=2)

    def row_names(self) -> tuple[str, ...]:
        """The names of the suite's rows at these shapes, in the order it runs them (what ``--only`` picks from)."""
        k, q = self.candidates, self.questions
        return tuple(dict.fromkeys(("decode_b1", f"decode_b{q}", "prefill", "self_edit", f"train_k{k}",
                                    f"decode_k{k}x{q}", "evaluation")))

    def check(self, context: int) -> None:
        """Raise :class:`BenchError` for a non-positive size or prompts that do not fit ``context`` tokens."""
        for f in dataclasses.fields(self):
            if not isinstance(getattr(self, f.name), int) or getattr(self, f.name) < 1:
                raise BenchError(f"{f.name} must be a positive integer, got {getattr(self, f.name)!r}")
        for what, need in (("passage_len + self_edit_tokens", self.passage_len + self.self_edit_tokens),
                           ("question_len + answer_tokens", self.question_len + self.answer_tokens),
                           ("seq_len", self.seq_len)):
            if need > context:
                tokens = "token" if context == 1 else "tokens"
                raise BenchError(f"{what} = {need} exceeds the model's context of {context} {tokens}; use --quick "
                                 "or a preset with a longer context")


@dataclasses.dataclass
class Row:
    """One measured piece of the workload.

    ``seconds`` is the wall time of one call (best of the repeats); ``rate`` its tokens/s; ``mfu`` and
    ``bandwidth_fraction`` are ``None`` where they do not apply; ``roofline_s`` is the compiled program's
    roofline on this device kind and ``vs_roofline = seconds / roofline_s`` (≥ 1 when the count is right);
    ``reference_s`` the same work on PyTorch (``ratio = reference_s / seconds``, > 1: seal-jax is faster).
    """

    name: str
    seconds: float
    tokens: int
    rate: float
    unit: str = "tok/s"
    useful_flops: float | None = None
    mfu: float | None = None
    min_bytes: float | None = None
    bandwidth_fraction: float | None = None
    roofline_s: float | None = None
    vs_roofline: float | None = None
    reference_s: float | None = None
    ratio: float | None = None
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Peaks and measured ceilings


@dataclasses.dataclass(frozen=True)
class Peaks:
    """What this run's devices can do at most, per device, and where the figures come from."""

    platform: str
    device_kind: str
    devices: int
    flops: float
    bandwidth: float
    link_bandwidth: float
    source: str


def hardware_for(device_kind: str) -> plan.Hardware | None:
    """The :data:`~seal_jax.plan.HARDWARE` entry of a JAX device kind (``"NVIDIA H200"``, ``"TPU v5 lite"``),
    or ``None`` for a chip the table does not know."""
    kind = device_kind.lower()
    for needle, key in (("h200", "h200"), ("h100", "h100"), ("a100", "a100-80g"), ("v5 lite", "tpu-v5e"),
                        ("v5e", "tpu-v5e"), ("v5p", "tpu-v5p"), ("v6", "tpu-v6e")):
        if needle in kind:
            return plan.HARDWARE[key]
    if kind.strip() == "tpu v5":
        return plan.HARDWARE["tpu-v5p"]
    return None


def measure_ceilings(platform_: str, dtype: str, quick: bool, working_set: int = 0) -> dict[str, float]:
    """A large matmul (FLOP/s, in ``dtype``), a large read and a large copy (bytes/s) on the default device.

    ``memory_bandwidth`` is the faster of the read and the copy; on a CPU the read is also measured at
    ``working_set`` bytes (the model's weights) and counts too: a small model decodes from the caches, at
    more than the DRAM bandwidth (read over and over in one call, as a decode's steps are: one read of a
    cache-sized array takes less time than the call).
    """
    big = platform_ != "cpu"
    repeats = 3 if quick else 5
    sizes = (4096, 8192) if big else (512, 1024) if quick else (1024, 2048)
    megabytes = 2048 if big else 64 if quick else 512
    out = {"matmul_flops": matmul_flops(dtype, sizes, repeats=repeats),
           "read_bandwidth": read_bandwidth(megabytes, repeats=repeats),
           "copy_bandwidth": copy_bandwidth(megabytes, "float32", repeats=repeats)}
    if not big and working_set:
        mb = max(1, working_set // 2**20)
        out["read_bandwidth_working_set"] = read_bandwidth(mb, repeats=repeats, passes=max(1, 256 // mb))
    out["memory_bandwidth"] = max(v for k, v in out.items() if k.endswith("bandwidth") or k.endswith("working_set"))
    return out


def device_peaks(devices: list[Any], ceilings: dict[str, float], dtype: str = "bfloat16") -> Peaks:
    """Peaks per device: the published table for a GPU/TPU kind it knows (the matmul peak for ``dtype``, as
    ``seal-jax compile`` takes it), else (CPU, unknown chips) the measured ceilings. CPU "devices" (``--xla_force_host_platform_device_count``) share the same cores,
    so the measured ceilings are divided among them."""
    kind = devices[0].device_kind
    hw = hardware_for(kind) if devices[0].platform != "cpu" else None
    if hw is not None:
        return Peaks(devices[0].platform, kind, len(devices), hw.matmul_flops(dtype), hw.hbm_bandwidth,
                     hw.link_bandwidth / 2,
                     f"published ({hw.name}): {hw.source}")
    share = len(devices) if devices[0].platform == "cpu" else 1
    return Peaks(devices[0].platform, kind, len(devices), ceilings["matmul_flops"] / share,
                 ceilings["memory_bandwidth"] / share, ceilings["memory_bandwidth"] / share,
                 "measured in this run (large matmul; the faster of a large read and a large copy)")


# ----------------------------------------------------------------------------------------------------
# Useful work (the workload's FLOPs and bytes, not the program's)


def _head_params(config: Any) -> int:
    return config.vocab_size * config.hidden_size


def _lora_params(config: Any, rank: int) -> int:
    return plan.lora_parameters(config, rank, ("q_proj", "v_proj"))


def prefill_flops(config: Any, rows: int, prompt: int, lora_rank: int = 0) -> float:
    """Useful FLOPs of prefilling ``rows`` prompts of ``prompt`` tokens: projections (and adapters) at every
    position, causal attention, the head at the last position only."""
    body = plan.matmul_parameters(config) - _head_params(config) + (_lora_params(config, lora_rank) if lora_rank else 0)
    attention = 2 * prompt * prompt * config.q_dim * config.num_layers  # causal: half of 4 T² q_dim per layer
    return rows * (2 * body * prompt + attention + 2 * _head_params(config))


def decode_flops(config: Any, rows: int, prompt: int, steps: int, lora_rank: int = 0) -> float:
    """Useful FLOPs of ``steps`` decode steps of ``rows`` rows after a ``prompt``-token prompt."""
    per_token = 2 * (plan.matmul_parameters(config) + (_lora_params(config, lora_rank) if lora_rank else 0))
    context = steps * prompt + steps * (steps + 1) / 2  # summed over the steps
    return rows * (steps * per_token + 4 * context * config.q_dim * config.num_layers)


def train_flops(config: Any, sequences: int, seq_len: int, lora_rank: int) -> float:
    """Useful FLOPs of LoRA training on ``sequences`` sequences of ``seq_len`` tokens over a frozen base:
    the base forward and its input gradients (4 per parameter and token, head included: the loss uses every
    position), the adapters forward and backward (6 per parameter and token), causal attention forward and
    backward (3 × 2 T² q_dim per layer and sequence)."""
    per_token = 4 * plan.matmul_parameters(config) + 6 * _lora_params(config, lora_rank)
    attention = 3 * 2 * seq_len * seq_len * config.q_dim * config.num_layers
    return sequences * (seq_len * per_token + attention)


def decode_min_bytes(config: Any, weight_bytes: int, rows: int, context: float, act_bytes: int, adapters: int = 0,
                     lora_rank: int = 0) -> float:
    """Bytes one decode step must read at least: the weights once, the adapters once (in the compute dtype,
    readied as the loop answers with them: ``LM.ready_adapters``) and the filled part of the KV cache of
    every row."""
    kv = rows * context * 2 * config.kv_dim * config.num_layers * act_bytes
    return weight_bytes + adapters * _lora_params(config, lora_rank) * act_bytes + kv


# ----------------------------------------------------------------------------------------------------
# Rooflines of the compiled programs


def roofline(lowered: Any, peaks: Peaks, unknown_trips: int = 1) -> dict[str, Any]:
    """Compile ``lowered`` and return its roofline seconds on one of ``peaks``'s devices, its bound, FLOPs,
    bytes and collective bytes per device (from :func:`seal_jax.hlo.analyze`) and the compile seconds."""
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    stats = hlo.analyze(compiled.as_text(), unknown_trips=unknown_trips)
    times = {"compute": stats.flops / peaks.flops, "memory": stats.bytes / peaks.bandwidth,
             "collectives": stats.collective_bytes / peaks.link_bandwidth}
    bound = max(times, key=lambda k: times[k])
    return {"roofline_s": times[bound], "bound": bound, "flops": stats.flops, "bytes": stats.bytes,
            "collective_bytes": stats.collective_bytes, "compile_s": compile_s}


def _sum_rooflines(*parts: dict[str, Any] | None) -> float | None:
    return None if any(p is None for p in parts) else sum(p["roofline_s"] for p in parts)  # type: ignore[index]


def _timed(fn: Callable[[], Any], repeats: int) -> float:
    return best_time(fn, repeats, warmup=1)


# ----------------------------------------------------------------------------------------------------
# The suite


def _tokens(rng: np.random.Generator, vocab: int, rows: int, length: int) -> list[list[int]]:
    low = min(100, vocab // 2)  # clear of the special ids at the start of the vocabularies we know
    return rng.integers(low, vocab, (rows, length)).tolist()


class Suite:
    """Runs the pieces on an LM and returns :class:`Row`s (see the module docstring)."""

    def __init__(self, lm: Any, shapes: SuiteShapes, peaks: Peaks, *, repeats: int, reference: Reference | None,
                 rooflines: bool = True, variants: dict[str, dict[str, Any]] | None = None,
                 only: Collection[str] | None = None):
        self.sj = sj
        self.only = set(shapes.row_names() if only is None else only)  # the rows to run (default: all)
        self.variants = dict(variants or {})  # name -> XLA options the decode and training rows are also timed with
        self.lm, self.shapes, self.peaks, self.repeats = lm, shapes, peaks, repeats
        self.reference, self.rooflines = reference, rooflines
        self.config = lm.config
        self.rng = np.random.default_rng(0)
        self.act_bytes = int(np.dtype(lm.dtype).itemsize)
        self.weight_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in lm.param_structs().values())
        self.lora = sj.LoraSpec(rank=shapes.lora_rank, alpha=2.0 * shapes.lora_rank)
        self.total_flops = peaks.flops * peaks.devices
        self.total_bandwidth = peaks.bandwidth * peaks.devices
        self.adapters: Any = None
        self.ready_s = 0.0  # the last readying of the trained adapters (LM.ready_adapters)
        self.train_data = [_tokens(self.rng, self.config.vocab_size, shapes.sequences, shapes.seq_len - 1)
                           for _ in range(shapes.candidates)]  # training appends EOS: seq_len tokens each
        self.reference_parts: dict[str, float] = {}
        self.reference_errors: dict[str, str] = {}
        self.roofline_error: str | None = None

    # -- pieces ------------------------------------------------------------------------------------

    def _reference(self, name: str, measure: Callable[[], float]) -> float | None:
        """``measure()``'s seconds, or ``None`` without a reference or when the PyTorch stack fails (the error
        is kept in :attr:`reference_errors`: a broken reference must not cost the seal-jax rows)."""
        if self.reference is None:
            return None
        try:
            return measure()
        except Exception as error:  # torch / transformers / PEFT errors of any kind (OOM, version skew)
            self.reference_errors[name] = f"{type(error).__name__}: {str(error).strip()[:300]}"
            print(f"reference {name} failed: {self.reference_errors[name]}", flush=True)
            return None

    def _sampling(self, new: int, sampled: bool) -> Any:
        knobs = SELF_EDIT_SAMPLING if sampled else {"temperature": 0.0}
        return self.sj.SamplingParams(max_new_tokens=new, ignore_eos=True, **knobs)

    def _generate(self, rows: list[list[int]], new: int, adapters: Any = None, sampled: bool = False) -> dict[str, float]:
        params = self._sampling(new, sampled)
        best: dict[str, float] = {}
        self.lm.generate_ids(rows, params, adapters)  # compile
        for _ in range(self.repeats):
            timings: dict[str, float] = {}
            start = time.perf_counter()
            self.lm.generate_ids(rows, params, adapters, timings=timings)
            timings["total_s"] = time.perf_counter() - start
            if not best or timings["total_s"] < best["total_s"]:
                best = timings
        return best

    def _rooflines_of(self, make: Callable[[], Any]) -> Any:
        """``make()`` (a piece's rooflines), or None without them: not asked for (``--no-roofline``), or this
        JAX's compiled HLO is text :mod:`seal_jax.hlo` cannot read. The rows keep their measurements; the run
        says so once (and in the report's ``roofline_note``) and compiles no more rooflines."""
        if not self.rooflines:
            return None
        try:
            return make()
        except hlo.HloParseError as error:
            self.rooflines, self.roofline_error = False, f"seal_jax.hlo cannot read this JAX's compiled HLO ({error})"
            print(f"roofline: none from here on: {self.roofline_error}", flush=True)
            return None

    def _generate_rooflines(self, batch: int, prompt: int, new: int, k: int = 0,
                            sampled: bool = False) -> dict[str, dict[str, Any]] | None:
        def make() -> dict[str, dict[str, Any]]:
            adapters = self.lm.abstract_adapters(k, self.lora, ready=True) if k else None
            lowered = self.lm.lower_generate(batch, prompt, new, adapters=adapters, greedy=not sampled)
            return {"prefill": roofline(lowered["prefill"], self.peaks),
                    "decode": roofline(lowered["decode"], self.peaks, unknown_trips=max(1, new - 1))}

        return self._rooflines_of(make)

    def _decode_row(self, name: str, rows: list[list[int]], new: int, k: int = 0,
                    reference_s: float | None = None) -> tuple[Row, dict[str, float]]:
        batch, prompt = len(rows), len(rows[0])
        adapters = self.adapters if k else None
        t = self._generate(rows, new, adapters)
        lines = max(1, k) * batch
        steps = max(1, new - 1)
        flops = decode_flops(self.config, lines, prompt, steps, self.shapes.lora_rank if k else 0)
        per_step = decode_min_bytes(self.config, self.weight_bytes, lines, prompt + new / 2, self.act_bytes,
                                    adapters=k, lora_rank=self.shapes.lora_rank)
        step_s = t["decode_s"] / steps
        roof = self._generate_rooflines(batch, prompt, new, k)
        row = Row(name=name, seconds=t["decode_s"], tokens=lines * new, rate=lines * new / t["decode_s"],
                  useful_flops=flops, mfu=flops / t["decode_s"] / self.total_flops, min_bytes=per_step,
                  bandwidth_fraction=per_step / step_s / self.total_bandwidth,
                  detail={"batch": batch, "adapters": k, "prompt_len": prompt, "new_tokens": new,
                          "step_s": step_s, "prefill_s": t["prefill_s"], "generate_s": t["total_s"],
                          "limit": "bandwidth: weights, adapters and the filled KV cache read once per step"})
        if roof is not None:
            row.roofline_s = roof["decode"]["roofline_s"]
            row.vs_roofline = row.seconds / row.roofline_s
            row.detail["roofline"] = roof
        if reference_s is not None:
            row.reference_s, row.ratio = reference_s, reference_s / t["total_s"]
            row.detail["reference"] = "transformers generate, same prompts and new tokens (prefill + decode)"

        def decode() -> tuple[float, float | None]:
            again = self._generate_rooflines(batch, prompt, new, k)
            return self._generate(rows, new, adapters)["decode_s"], None if again is None else again["decode"]["roofline_s"]

        for variant, options in self.variants.items():
            row.detail.setdefault("variants", {})[variant] = self._variant(options, decode, row.seconds)
        return row, t

    def _variant(self, options: dict[str, Any], measure: Callable[[], tuple[float, float | None]],
                 seconds: float) -> dict[str, Any]:
        """``measure()`` (a piece's seconds and roofline) again with the model's programs compiled with the
        XLA ``options`` (``LM.compiler_options``); ``speedup`` > 1: faster than the row's ``seconds``."""
        kept = self.lm.compiler_options
        self.lm.compiler_options = options
        try:
            took, roofline_s = measure()
        except Exception as error:  # an option this JAX rejects, or no memory for it: the row keeps its figures
            print(f"with {options}: {type(error).__name__}: {str(error).strip()[:300]}", flush=True)
            return {"options": dict(options), "error": f"{type(error).__name__}: {str(error).strip()[:300]}"}
        finally:
            self.lm.compiler_options = kept
        out = {"options": dict(options), "seconds": took, "speedup": seconds / took}
        if roofline_s is not None:
            out["roofline_s"], out["vs_roofline"] = roofline_s, took / roofline_s
        return out

    def run(self, emit: Callable[[Row], None]) -> dict[str, Any]:
        """Run every piece (or those :attr:`only` names), handing each finished row to ``emit``; returns the
        summary, with the same keys in either case (its evaluation seconds and evaluations per hour ``None``
        when the ``evaluation`` row did not run)."""
        s, c, ref, wanted = self.shapes, self.config, self.reference, self.only
        k = s.candidates
        questions = _tokens(self.rng, c.vocab_size, s.questions, s.question_len)
        passages = _tokens(self.rng, c.vocab_size, k, s.passage_len)

        # decode of the base model: 1 and 8 questions
        one_adapter_reference = None
        for batch in (1, s.questions):
            if f"decode_b{batch}" not in wanted:
                continue
            ref_s = self._reference(f"decode_b{batch}", lambda b=batch: _timed(
                lambda: ref.generate(questions[:b], s.answer_tokens), self.repeats))
            row, _ = self._decode_row(f"decode_b{batch}", questions[:batch], s.answer_tokens, reference_s=ref_s)
            emit(row)
            if batch == s.questions:
                one_adapter_reference = ref_s

        if wanted & {"prefill", "self_edit"}:
            self._self_edit_rows(passages, emit)
        if f"train_k{k}" in wanted:  # the K-candidate training program
            emit(self._train_row())
        if f"decode_k{k}x{s.questions}" in wanted:  # answers under the K adapters
            if self.adapters is None:  # (the training row did not run: adapters to answer with, untimed)
                self._train_once()
            ref_s = None
            if one_adapter_reference is not None:  # PyTorch answers under one adapter at a time: K generates
                ref_s = self.reference_parts["answer"] = k * one_adapter_reference
            row, _ = self._decode_row(f"decode_k{k}x{s.questions}", questions, s.answer_tokens, k=k, reference_s=ref_s)
            if ref_s is not None:
                row.detail["reference"] = "K × transformers generate of the questions (one adapter at a time)"
            emit(row)
        evaluation = self._evaluation_row(passages, questions) if "evaluation" in wanted else None
        if evaluation is not None:
            emit(evaluation)
        return {"evaluation_seconds": None if evaluation is None else evaluation.seconds,
                "evaluations_per_hour": None if evaluation is None else evaluation.rate, "candidates": k,
                "reference_errors": self.reference_errors}

    def _evaluation_row(self, passages: list[list[int]], questions: list[list[int]]) -> Row:
        """One whole self-edit evaluation of a passage, timed again in sequence (the ``evaluation`` row).

        ``seconds`` is the sum of its parts (each generate's best of the repeats, the training once with the
        readying of its adapters); ``wall_s`` the section that times them, end to end. Its programs are compiled
        before that section in either kind of run: a full run's earlier rows compiled them, a partial one
        (``--only``) compiles here, untimed, those that no row it ran did (:meth:`_compile_evaluation`).
        """
        k = self.shapes.candidates
        self._compile_evaluation(passages, questions)
        start = time.perf_counter()
        parts = self._evaluation_parts(passages, questions)
        wall = time.perf_counter() - start
        seconds = sum(parts.values())
        per_hour = 3600 * k / seconds
        row = Row(name="evaluation", seconds=seconds, tokens=0, rate=per_hour, unit="evaluations/h",
                  detail={"parts_s": parts, "wall_s": wall, "candidates": k,
                          "what": "generate K self-edits, train K adapters, answer the questions under the K "
                                  "adapters; evaluations/h = 3600 × K / seconds; wall_s: the section that times "
                                  "the parts, end to end, its programs compiled before it (each generate: a "
                                  "warm-up call, then the repeats, the fastest its part; the training once)"})
        if all(p in self.reference_parts for p in ("self_edit", "train", "answer")):
            ref_seconds = sum(self.reference_parts[p] for p in ("self_edit", "train", "answer"))
            row.reference_s, row.ratio = ref_seconds, ref_seconds / seconds
            row.detail["reference_parts_s"] = dict(self.reference_parts)
            row.detail["reference_evaluations_per_hour"] = 3600 * k / ref_seconds
        return row

    def _compile_evaluation(self, passages: list[list[int]], questions: list[list[int]]) -> None:
        """Compile, by one untimed call each, the evaluation's programs that no row of this run compiled: the
        training and the readying of its adapters (the ``train_k{K}`` or ``decode_k{K}x{Q}`` row trains), the
        K self-edits' generate (the ``prefill`` and ``self_edit`` rows), the answers under the K adapters (the
        ``decode_k{K}x{Q}`` row). A full run compiles nothing here."""
        s = self.shapes
        if self.adapters is None:
            self._train_once()
        if not self.only & {"prefill", "self_edit"}:
            self.lm.generate_ids(passages, self._sampling(s.self_edit_tokens, sampled=True))
        if f"decode_k{s.candidates}x{s.questions}" not in self.only:
            self.lm.generate_ids(questions, self._sampling(s.answer_tokens, sampled=False), self.adapters)

    def _evaluation_parts(self, passages: list[list[int]], questions: list[list[int]]) -> dict[str, float]:
        """The evaluation's parts in sequence, in seconds (what the ``evaluation`` row's ``wall_s`` times)."""
        s = self.shapes
        parts = {"self_edit": self._generate(passages, s.self_edit_tokens, sampled=True)["total_s"]}
        parts["train"] = self._train_once() + self.ready_s  # (and the adapters readied, as the loop does)
        parts["answer_k"] = self._generate(questions, s.answer_tokens, self.adapters)["total_s"]
        return parts

    def _self_edit_rows(self, passages: list[list[int]], emit: Callable[[Row], None]) -> None:
        """The K self-edits: the ``prefill`` row, then the whole generation (``self_edit``), as :attr:`only` asks."""
        s, c, ref = self.shapes, self.config, self.reference
        k = s.candidates
        t = self._generate(passages, s.self_edit_tokens, sampled=True)
        roof = self._generate_rooflines(k, s.passage_len, s.self_edit_tokens, sampled=True)
        flops = prefill_flops(c, k, s.passage_len)
        row = Row(name="prefill", seconds=t["prefill_s"], tokens=k * s.passage_len,
                  rate=k * s.passage_len / t["prefill_s"], useful_flops=flops,
                  mfu=flops / t["prefill_s"] / self.total_flops,
                  detail={"batch": k, "prompt_len": s.passage_len, "limit": "compute: peak FLOP/s"})
        if roof is not None:
            row.roofline_s = roof["prefill"]["roofline_s"]
            row.vs_roofline = row.seconds / row.roofline_s
            row.detail["roofline"] = roof["prefill"]
        if "prefill" in self.only:
            emit(row)
        if "self_edit" not in self.only:
            return
        ref_s = self._reference("self_edit", lambda: _timed(lambda: ref.generate(passages, s.self_edit_tokens, SELF_EDIT_SAMPLING),
                                                              self.repeats))
        if ref_s is not None:
            self.reference_parts["self_edit"] = ref_s
        steps = max(1, s.self_edit_tokens - 1)
        dflops = decode_flops(c, k, s.passage_len, steps)
        row = Row(name="self_edit", seconds=t["total_s"], tokens=k * s.self_edit_tokens,
                  rate=k * s.self_edit_tokens / t["total_s"], useful_flops=flops + dflops,
                  mfu=(flops + dflops) / t["total_s"] / self.total_flops,
                  min_bytes=decode_min_bytes(c, self.weight_bytes, k, s.passage_len + s.self_edit_tokens / 2,
                                             self.act_bytes),
                  roofline_s=_sum_rooflines(*(roof or {}).values()) if roof else None,
                  detail={"batch": k, "prompt_len": s.passage_len, "new_tokens": s.self_edit_tokens, **t})
        row.bandwidth_fraction = row.min_bytes * steps / t["decode_s"] / self.total_bandwidth
        if row.roofline_s:
            row.vs_roofline = row.seconds / row.roofline_s
        if ref_s is not None:
            row.reference_s, row.ratio = ref_s, ref_s / t["total_s"]
        emit(row)

    def _train_once(self) -> float:
        s = self.shapes
        spec = self.sj.TrainSpec.seal(epochs=s.epochs, max_len=s.seq_len)
        start = time.perf_counter()
        adapters = self.lm.train_adapters(self.train_data, self.lora, spec)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        self.adapters = self.lm.ready_adapters(adapters)  # as the loop answers with them
        jax.block_until_ready(self.adapters.weights)
        self.ready_s = time.perf_counter() - start
        return seconds

    def _timed_training(self) -> tuple[float, dict[str, Any] | None]:
        """The K-candidate training's seconds (best of the repeats after a compiling call) and its roofline."""
        s = self.shapes
        self._train_once()  # compile
        seconds = min(self._train_once() for _ in range(max(1, self.repeats - 1)))
        spec = self.sj.TrainSpec.seal(epochs=s.epochs, max_len=s.seq_len)
        return seconds, self._rooflines_of(lambda: roofline(
            self.lm.lower_train(s.candidates, s.sequences, s.seq_len, self.lora, spec), self.peaks))

    def _train_row(self) -> Row:
        s, c = self.shapes, self.config
        seconds, roof = self._timed_training()
        n_seq = s.candidates * s.sequences * s.epochs
        flops = train_flops(c, n_seq, s.seq_len, s.lora_rank)
        row = Row(name=f"train_k{s.candidates}", seconds=seconds, tokens=n_seq * s.seq_len,
                  rate=n_seq * s.seq_len / seconds, useful_flops=flops, mfu=flops / seconds / self.total_flops,
                  detail={"candidates": s.candidates, "sequences": s.sequences, "seq_len": s.seq_len,
                          "epochs": s.epochs, "lora": f"q/v rank {s.lora_rank}", "limit": "compute: peak FLOP/s"})
        if roof is not None:
            row.roofline_s, row.vs_roofline = roof["roofline_s"], seconds / roof["roofline_s"]
            row.detail["roofline"] = roof

        def train() -> tuple[float, float | None]:
            kept = self.adapters  # the row's own adapters answer later
            try:
                took, again = self._timed_training()
            finally:
                self.adapters = kept
            return took, None if again is None else again["roofline_s"]

        for variant, options in self.variants.items():
            row.detail.setdefault("variants", {})[variant] = self._variant(options, train, seconds)
        eos = self.config.eos_token_ids[0] if self.config.eos_token_ids else 0
        one = self._reference("train", lambda: self.reference.train_seconds(
            [x + [eos] for x in self.train_data[0]], s.epochs, s.lora_rank))
        if one is not None:
            row.reference_s = s.candidates * one
            row.ratio = row.reference_s / seconds
            row.detail["reference"] = ("transformers + PEFT (q/v) + torch AdamW, batch 1: one candidate timed, "
                                       f"× K = {s.candidates} (that stack trains one adapter at a time)")
            self.reference_parts["train"] = row.reference_s
        return row
