"""Every program a run executes, compiled ahead of time for a TPU or GPU target (``seal-jax compile``).

From a run config (or a preset and a few workload flags) this builds an abstract model on a mesh of the
target's devices (:func:`seal_jax.targets.devices`), lowers each program the run executes at the config's
shapes — answering questions (prefill + the whole decode loop), sampling self-edits, the K-candidate
training program, answering with the K trained adapters stacked, the LLM judge, and for ReST-EM / template
search the proposals, fills and the generator's SFT — compiles it with the target's real compiler and
reports, per program and device:

* compile seconds; argument / output / temporary / alias bytes and the peak (arguments + outputs +
  temporaries − aliased; for a training program on a ``train_mesh``, plus ``resident_bytes``, the weights
  left in the generation layout) against the device's memory, and whether it fits. The TPU compiler refuses a
  program that does not fit (the row says so, with the compiler's message) and is the judge there (the
  sum of the parts can exceed HBM by what it overlaps); the GPU compiler checks nothing, so the peak is
  compared with the GPU's memory here.
* whole-program matrix FLOPs and bytes accessed, counted from the optimised HLO by :mod:`seal_jax.hlo` with
  every loop's trip count (XLA's own cost analysis counts a loop body once and is ``None`` for a deviceless
  GPU compile). The decode loop stops when every row has stopped, so it is counted ``max_new_tokens − 1``
  times: the cost of a call whose rows all run to the end.
* collectives per kind (count and bytes per device, from the HLO);
* ``min_bytes``, what the program must move at least: its arguments (weights, adapters, cache, inputs) read
  once and its outputs written once (``arguments + outputs − aliased``); for a decode, ``per_step``, one
  step's FLOPs and bytes, which the table sets against that minimum (a step reads the weights, adapters
  and cache once);
* the roofline time ``max(FLOPs / peak, bytes / HBM bandwidth, collective bytes / link bandwidth)`` with
  what bounds it (link bandwidth: one direction, half the published bidirectional figure).

Shapes that a config does not fix (questions per passage, prompt and training-sequence lengths) come from
:class:`Shapes`, whose defaults describe SEAL's SQuAD passages; each is a flag of ``seal-jax compile``.

``seal-jax compile CONFIG --target T --search`` compiles the same programs on every mesh layout that makes
sense for the target and ranks those that fit (:mod:`seal_jax.layout_search`); the command itself is
:mod:`seal_jax.compile_cli`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from seal_jax import hlo
from seal_jax.lm import sharding as shd
from seal_jax.lm.config import PRESETS, ModelConfig, from_hf, preset
from seal_jax.lm.lora import LoraSpec
from seal_jax.lm.training import TrainSpec
from seal_jax.lm.types import mesh_lays_out
from seal_jax.selfedit import grading
from seal_jax.selfedit.cpt import CptConfig
from seal_jax.selfedit.judge import JUDGE_BATCH
from seal_jax.selfedit.restem import RestemConfig
from seal_jax.selfedit.run_config import SELFEDIT_SAMPLING, hardware_settings
from seal_jax.selfedit.runs import load_config
from seal_jax.selfedit.strategies import get_strategy
from seal_jax.selfedit.template_search import TemplateSearchConfig
from seal_jax.targets import Target, devices, get_target

EXIT_DOES_NOT_FIT = 3


class CompileError(ValueError):
    """A compile request that cannot be carried out (bad config, mesh or target)."""


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Sizes a run config leaves to the data, with defaults for SEAL's SQuAD passages.

    Attributes:
      questions: questions answered per passage (one batch; SQuAD passages have ~5).
      question_len: tokens of a question prompt (chat template, title, question).
      passage_len: tokens of a self-edit prompt (instruction + title + passage).
      sequences: training sequences per candidate (a self-edit's lines plus the passage).
      seq_len: tokens per training sequence.
      judge_len: tokens of an LLM-judge prompt; judge_new: tokens of its reply.
      meta_prompt_len: tokens of a template-search meta-prompt (instructions + archive entries).
      sft_sequences, sft_len: the generator's SFT set (rows and tokens per row).
    """

    questions: int = 8
    question_len: int = 128
    passage_len: int = 512
    sequences: int = 16
    seq_len: int = 256
    judge_len: int = 256
    judge_new: int = 8
    meta_prompt_len: int = 2048
    sft_sequences: int = 100
    sft_len: int = 1024

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 1:
                raise CompileError(f"Shapes.{f.name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Program:
    """One program of a run: what it is, how to lower it, and how often a passage runs it.

    ``kind`` is ``generate`` (lowered into ``<name>.prefill`` and ``<name>.decode``), ``train`` or
    ``logits``; ``args`` are the keyword arguments of the matching ``LM.lower_*`` method (``adapters`` =
    ``(K, LoraSpec)`` for stacked adapters); ``per_passage`` how many times one passage runs it (0 for
    programs that run per iteration or round; 1/P for a program P passages share)."""

    name: str
    kind: str
    args: dict[str, Any]
    per_passage: float = 1
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model, dtype, mesh and the programs of one run; ``train_mesh``: another layout of the devices that
    the training programs run on (``LM.load(train_mesh=...)``), or None, and ``train_weights`` how the base
    weights lie there (``LM.load(train_weights=...)``); ``attention`` the config's attention implementation
    (``LM.load(attention=...)``; None: the target platform's)."""

    name: str
    config: ModelConfig
    dtype: str
    mesh: str | None
    remat: str | bool
    programs: tuple[Program, ...]
    candidates: int
    source: str
    train_mesh: str | None = None
    passages: int = 1  # passages per program (passages_per_program)
    train_weights: str = "replicated"
    attention: str | None = None


# ----------------------------------------------------------------------------------------------------
# Workloads


def model_config(model: str) -> tuple[ModelConfig, str]:
    """The architecture of ``model``: a preset name, an HF folder, or (when the folder is not on this
    machine, as with a config's ``/models/Qwen3-8B``) the preset its folder name names."""
    if model in PRESETS:
        return preset(model), f"preset {model}"
    path = Path(model)
    if (path / "config.json").is_file():
        return from_hf(path), f"{path}/config.json"
    guess = path.name.lower()
    if guess in PRESETS:
        return preset(guess), f"preset {guess} (the folder {model} is not on this machine)"
    raise CompileError(f"{model!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a folder with a "
                       "config.json; pass --model PRESET")


def _generate(name: str, batch: int, prompt_len: int, new: int, adapters: tuple[int, LoraSpec] | None = None,
              per_passage: float = 1, note: str = "", greedy: bool = True) -> Program:
    args: dict[str, Any] = {"batch": batch, "prompt_len": prompt_len, "max_new_tokens": new, "greedy": greedy}
    if adapters is not None:
        args["adapters"] = adapters
    return Program(name, "generate", args, per_passage, note)


def _train(name: str, k: int, sequences: int, seq_len: int, lora: LoraSpec, train: TrainSpec, per_passage: float = 1,
           note: str = "") -> Program:
    return Program(name, "train", {"candidates": k, "sequences": sequences, "seq_len": min(seq_len, train.max_len),
                                   "lora": lora, "train": train}, per_passage, note)


def _judge(questions: int, k: int, group: int, shapes: Shapes) -> Program:
    """The LLM judge of a knowledge passage as a run calls it: the base answers of ``group`` passages in one
    grader call, then per passage the answers under its ``k`` adapters in one, each call in chunks of
    :data:`~seal_jax.selfedit.judge.JUDGE_BATCH` prompts (counted all full: an upper bound)."""
    batch = min(JUDGE_BATCH, max(questions * group, questions * k))
    calls = math.ceil(questions * group / batch) / group + math.ceil(questions * k / batch)
    return _generate("judge", batch, shapes.judge_len, shapes.judge_new, per_passage=calls,
                     note=f"the LLM judge in calls of up to {JUDGE_BATCH} answers: the base answers, then the "
                          f"{k} adapters' ({calls:g} calls per passage)")


def knowledge_programs(config: Any, shapes: Shapes, *, strategies: Sequence[str] | None = None,
                       passages: int | None = None) -> tuple[list[Program], int]:
    """The programs of one knowledge-incorporation passage (a ``RunConfig``) and its K trained candidates.
    ``passages`` (default: the config's ``passages_per_program``, P): the base model's answers, the
    self-edits and the training program hold P passages' rows and count 1/P per passage (the answers under
    the adapters stay per passage; the judge shares the base answers' call, see :func:`_judge`)."""
    group = int(passages or getattr(config, "passages_per_program", 1))
    names = list(strategies or config.conditions)
    generating = [n for n in names if get_strategy(n).source in ("generate", "template")]
    k = 0
    for n in names:
        s = get_strategy(n)
        if s.trains:
            k += (1 if s.source == "passage" else config.k) * config.repeats
    sampling = {**SELFEDIT_SAMPLING, **config.selfedit_sampling}
    q = shapes.questions
    together = "" if group == 1 else f", {group} passages in one call"
    programs = [_generate("answer", q * group, shapes.question_len, config.eval_max_new_tokens, per_passage=1 / group,
                          note=f"greedy answers of the base model{together}")]
    if generating:
        programs.append(_generate("self_edit", config.k * group, shapes.passage_len, int(sampling["max_new_tokens"]),
                                  per_passage=len(generating) / group, greedy=sampling["temperature"] == 0,
                                  note=f"{config.k} self-edits per generating condition ({', '.join(generating)})"
                                       f"{together}"))
    if k:
        programs.append(_train("train", k * group, shapes.sequences, shapes.seq_len, config.lora_spec(),
                               config.train_spec(), per_passage=1 / group,
                               note=f"{k} candidates in one program" if group == 1 else
                               f"{k} candidates of each of {group} passages in one program"))
        programs.append(_generate("answer_k", q, shapes.question_len, config.eval_max_new_tokens,
                                  adapters=(k, config.lora_spec()), note=f"answers under {k} stacked adapters"))
    if config.grader in grading.JUDGE_GRADERS:
        programs.append(_judge(q, k, group, shapes))
    return programs, k


def cpt_programs(cfg: CptConfig, shapes: Shapes) -> list[Program]:
    """The programs of a CPT run: per passage the self-edits; once per run the conditions' adapters, each
    trained on its pooled corpus (``data.n`` passages, SEAL's 200 by default, each adding its text and k
    self-edits of ``shapes.sequences - 1`` sequences); per call of ``cpt.eval_batch`` passages the base
    model's and the K stacked adapters' answers."""
    knowledge = cfg.knowledge
    generating = [c for c in cfg.conditions if get_strategy(c).source == "generate"] + list(cfg.generators)
    n = len(cfg.all_conditions)
    passages = int(knowledge.data.get("n", 200))
    corpus = passages * (1 + knowledge.k * (shapes.sequences - 1))
    questions = cfg.eval_batch * shapes.questions
    lora = knowledge.lora_spec()
    sampling = {**SELFEDIT_SAMPLING, **knowledge.selfedit_sampling}
    programs = []
    if generating:
        programs.append(_generate("self_edit", knowledge.k, shapes.passage_len, int(sampling["max_new_tokens"]),
                                  per_passage=len(generating), greedy=sampling["temperature"] == 0,
                                  note=f"{knowledge.k} self-edits per generating "
                                  f"condition ({', '.join(generating)})"))
    programs += [
        _train("train", n, corpus, shapes.seq_len, lora, knowledge.train_spec(), per_passage=0,
               note=f"{n} adapters (one per condition) on ~{corpus} pooled sequences each, once per run"),
        _generate("answer", questions, shapes.question_len, knowledge.eval_max_new_tokens, per_passage=0,
                  note=f"base answers, {cfg.eval_batch} passages per call"),
        _generate("answer_k", questions, shapes.question_len, knowledge.eval_max_new_tokens, adapters=(n, lora),
                  per_passage=0, note=f"answers under {n} stacked adapters, {cfg.eval_batch} passages per call"),
    ]
    if knowledge.grader in grading.JUDGE_GRADERS:  # one call for the base answers, one for the n adapters'
        programs.append(_generate("judge", min(JUDGE_BATCH, n * questions), shapes.judge_len, shapes.judge_new,
                                  per_passage=0,
                                  note=f"the LLM judge of the {n} adapters' answers, {cfg.eval_batch} passages "
                                       f"per grader call, sent {JUDGE_BATCH} at a time"))
    return programs


def workload_from_config(path: str | Path, shapes: Shapes, *, model: str | None = None,
                         mesh: str | None = None, passages: int | None = None,
                         train_mesh: str | None = None, train_weights: str | None = None,
                         target: str | None = None) -> Workload:
    """The :class:`Workload` of a run config of any kind (knowledge, ReST-EM, template search, CPT; a CPT
    workload has no per-passage candidates: ``candidates`` is 0 and no evaluations per hour are given), with
    the settings of its ``[hardware.<target>]`` table when it has one. ``passages`` overrides a knowledge or
    ReST-EM config's ``passages_per_program``, ``train_mesh`` its ``train_mesh`` (``""``: none),
    ``train_weights`` its ``train_weights``."""
    cfg = load_config(path)
    table = getattr(cfg, "knowledge", cfg).hardware.get(target or "")
    if table:  # the settings the run gets on that target
        print(f"  [hardware.{target}] of {path}: {hardware_settings(table)}", file=sys.stderr, flush=True)
    cfg = cfg.on_target(target)
    knowledge = getattr(cfg, "knowledge", cfg)
    if passages is not None and (passages < 1 or (knowledge is not cfg and not cfg.GROUPS_PASSAGES)):
        raise CompileError(f"--passages-per-program {passages}: a positive number, for knowledge and ReST-EM "
                           f"configs only ({path} is a {getattr(cfg, 'KIND', 'knowledge')} run)")
    config, source = model_config(model or knowledge.model)
    if isinstance(cfg, TemplateSearchConfig):
        k = cfg.templates_per_iteration * cfg.fills
        rank = 64  # templates choose ranks up to 64; the program pads every candidate to the largest
        lora = dataclasses.replace(knowledge.lora_spec(), rank=rank, alpha=2.0 * rank)
        programs = [
            _generate("proposal", cfg.templates_per_iteration, shapes.meta_prompt_len, cfg.proposal_max_new_tokens,
                      per_passage=0, greedy=False, note="templates proposed once per iteration"),
            _generate("answer", shapes.questions, shapes.question_len, knowledge.eval_max_new_tokens),
            _generate("fill", cfg.fills, shapes.passage_len, cfg.fill_max_new_tokens,
                      per_passage=cfg.templates_per_iteration,
                      greedy={**SELFEDIT_SAMPLING, **knowledge.selfedit_sampling}["temperature"] == 0,  # as self-edits
                      note=f"{cfg.fills} fills per template"),
            _train("train", k, shapes.sequences, shapes.seq_len, lora, knowledge.train_spec(),
                   note=f"{k} (template, fill) candidates, ranks padded to {rank}"),
            _generate("answer_k", shapes.questions, shapes.question_len, knowledge.eval_max_new_tokens,
                      adapters=(k, lora), note=f"answers under {k} stacked adapters"),
        ]
        if knowledge.grader in grading.JUDGE_GRADERS:
            programs.append(_judge(shapes.questions, k, 1, shapes))
        if cfg.sft:
            programs.append(_train("sft", 1, shapes.sft_sequences, shapes.sft_len, cfg.sft_lora_spec(),
                                   cfg.sft_train_spec(), per_passage=0, note="the generator's SFT, once per iteration"))
    elif isinstance(cfg, CptConfig):
        programs, k = cpt_programs(cfg, shapes), 0
    elif isinstance(cfg, RestemConfig):
        programs, k = knowledge_programs(knowledge, shapes, passages=passages)
        programs.append(_train("sft", 1, shapes.sft_sequences, shapes.sft_len, cfg.sft_lora_spec(), cfg.sft_train_spec(),
                               per_passage=0, note="the generator's SFT, once per round"))
    else:
        programs, k = knowledge_programs(knowledge, shapes, passages=passages)
    trains_on = (train_mesh if train_mesh is not None else knowledge.train_mesh) or None
    # a config's FSDP training lies on its train mesh: with none (--train-mesh ''), training is on the mesh
    weights = train_weights or (knowledge.train_weights if trains_on else "replicated")
    return Workload(Path(path).stem, config, knowledge.dtype, mesh if mesh is not None else knowledge.mesh,
                    knowledge.remat, tuple(programs), k, source, trains_on,
                    int(passages or getattr(knowledge, "passages_per_program", 1)) if k else 1, weights,
                    knowledge.attention)


def workload_from_flags(model: str, shapes: Shapes, *, candidates: int, dtype: str, mesh: str | None, remat: str | bool,
                        lora_rank: int, new_tokens: int) -> Workload:
    """A quick :class:`Workload`: SEAL's inner loop with ``candidates`` candidates on ``model``."""
    config, source = model_config(model)
    lora = dataclasses.replace(LoraSpec.seal(), rank=lora_rank, alpha=2.0 * lora_rank)
    programs = (
        _generate("answer", shapes.questions, shapes.question_len, 64),
        _generate("self_edit", candidates, shapes.passage_len, new_tokens, greedy=False),
        _train("train", candidates, shapes.sequences, shapes.seq_len, lora, TrainSpec.seal()),
        _generate("answer_k", shapes.questions, shapes.question_len, 64, adapters=(candidates, lora)),
    )
    return Workload(f"{model}-k{candidates}", config, dtype, mesh, remat, programs, candidates, source)


# ----------------------------------------------------------------------------------------------------
# Compiling and reporting


def _memory(compiled: Any) -> dict[str, int]:
    m = compiled.memory_analysis()
    out = {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
           "temp_bytes": int(m.temp_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes)}
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    return out


def _times(flops: float, bytes_: float, collective_bytes: float, target: Target,
           dtype: str = "bfloat16") -> dict[str, float]:
    hw = target.hardware  # (compute at the chip's matmul peak for dtype: TF32 for float32 on NVIDIA GPUs)
    return {"compute": flops / hw.matmul_flops(dtype), "memory": bytes_ / hw.hbm_bandwidth,
            "collectives": collective_bytes / (hw.link_bandwidth / 2)}


def roofline(flops: float, bytes_: float, collective_bytes: float, target: Target,
             dtype: str = "bfloat16") -> tuple[float, str]:
    """``(seconds, bound)``: the largest of compute, memory and communication time on one ``target`` chip
    (each hidden under the largest) for a program in ``dtype``."""
    times = _times(flops, bytes_, collective_bytes, target, dtype)
    bound = max(times, key=lambda k: times[k])
    return times[bound], bound


def no_overlap_seconds(rows: Sequence[dict[str, Any]], target: Target) -> float | None:
    """One passage's seconds if no collective overlapped the work (each program's larger of compute and
    memory time plus its communication time, weighted as :func:`~seal_jax.layout_search.layout_time`): the roofline's pessimistic
    twin, for layouts whose collectives sit on the critical path (a tensor-parallel layer's all-reduce)."""
    if not all("flops" in r for r in rows):
        return None
    total = 0.0
    for r in rows:
        t = _times(r["flops"], r["bytes"], r.get("collective_bytes", 0.0), target, r.get("dtype", "bfloat16"))
        total += (max(t["compute"], t["memory"]) + t["collectives"]) * (r["per_passage"] or 1)
    return total


_HBM_ERROR = re.compile(r"RESOURCE_EXHAUSTED|exceeds (the )?(available|capacity)|Ran out of memory", re.IGNORECASE)


def compile_row(name: str, lowered: Any, target: Target, *, unknown_trips: int = 1, note: str = "",
                per_passage: float = 1, dtype: str = "bfloat16") -> dict[str, Any]:
    """Compile one lowered program (weights and activations in ``dtype``) for ``target`` and return its report
    row (see the module docstring)."""
    row: dict[str, Any] = {"program": name, "target": target.name, "per_passage": per_passage, "note": note,
                           "hbm_bytes": target.hbm_bytes, "dtype": dtype}
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as error:  # the compiler's own errors are all this tells us (XlaRuntimeError & co.)
        message = str(error).strip().splitlines()[0][:500] if str(error).strip() else type(error).__name__
        if not _HBM_ERROR.search(str(error)):
            raise
        row.update(compile_s=round(time.perf_counter() - start, 2), fits=False, error=message)
        return row
    row["compile_s"] = round(time.perf_counter() - start, 2)
    row.update(_memory(compiled))
    # libtpu refuses a program that does not fit (handled above), so a compiled TPU program fits by the
    # compiler's own accounting (our sum of its parts can exceed HBM by what XLA overlaps); the deviceless
    # GPU compile checks nothing, so its peak is compared with the device's memory here.
    row["fits"] = target.platform == "tpu" or row["peak_bytes"] <= target.hbm_bytes
    stats = hlo.analyze(compiled.as_text(), unknown_trips=unknown_trips)
    row.update(flops=stats.flops, bytes=stats.bytes, collectives=stats.collectives,
               collective_bytes=stats.collective_bytes, custom_calls=stats.custom_calls,
               min_bytes=row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"])
    row["roofline_s"], row["bound"] = roofline(stats.flops, stats.bytes, stats.collective_bytes, target, dtype)
    data_loops = [loop for loop in stats.loops if loop.trips is None]
    if data_loops:
        loop = data_loops[0]
        row["per_step"] = {"flops": loop.flops_per_trip, "bytes": loop.bytes_per_trip, "steps": unknown_trips}
    return row


def lower_program(lm: Any, program: Program) -> dict[str, Any]:
    """``{row name: Lowered}`` for one :class:`Program` on an (abstract) ``LM``."""
    args = dict(program.args)
    if program.kind == "generate":
        adapters = args.pop("adapters", None)
        if adapters is not None:
            adapters = lm.abstract_adapters(*adapters, ready=True)  # as the loop answers with them
        lowered = lm.lower_generate(adapters=adapters, **args)
        return {f"{program.name}.prefill": lowered["prefill"], f"{program.name}.decode": lowered["decode"]}
    if program.kind == "train":
        return {program.name: lm.lower_train(**args)}
    if program.kind == "logits":
        return {program.name: lm.lower_logits(**args)}
    raise CompileError(f"unknown program kind {program.kind!r}")


def check_context(workload: Workload, only: Sequence[str] | None = None) -> None:
    """Raise a :class:`CompileError` naming the first generation program (of those ``only`` keeps) whose
    prompt and new tokens exceed the model's context, before anything compiles (:func:`compile_workload`
    checks it; ``seal-jax compile --search`` before its layouts)."""
    context = workload.config.max_position_embeddings
    for program in workload.programs:
        if program.kind != "generate" or (only and program.name not in only):
            continue
        prompt, new = program.args["prompt_len"], program.args["max_new_tokens"]
        if prompt + new > context:
            raise CompileError(
                f"{program.name}: a {prompt}-token prompt and {new} new tokens exceed the model's context of "
                f"{context} tokens; compile with shorter prompts (--passage-len, --question-len, --judge-len, "
                "--meta-prompt-len), fewer new tokens (the config's, or --new-tokens), a model with a longer "
                "context, or --only the programs that fit")


def compile_workload(workload: Workload, target_name: str, *, only: Sequence[str] | None = None,
                     on_row: Callable[[dict[str, Any]], None] | None = None,
                     cache: dict[tuple[Any, ...], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Compile every program of ``workload`` for ``target_name``; returns ``{"rows", "summary", ...}``.

    ``cache``: rows compiled before, reused where the same program ran on the same layout (a generation
    program on the same mesh; a training program on the same train mesh with the same ``train_weights``,
    whatever the generation mesh), and filled with the new ones (:func:`~seal_jax.layout_search.search_layouts` shares one)."""
    import seal_jax as sj  # deferred: the facade imports JAX, which must be told to stay on the CPU first

    target = get_target(target_name)
    devs = devices(target_name)
    spec = workload.mesh or f"data={target.chips}"
    try:
        sizes = shd.parse_mesh_spec(spec)
    except shd.MeshError as error:
        raise CompileError(f"mesh {spec!r}: {error}") from None
    if not mesh_lays_out(sizes, target.chips):
        raise CompileError(f"mesh {spec!r} does not lay out target {target.name}'s {target.chips} devices; pass "
                           f"--mesh with sizes whose product is {target.chips}")
    mesh = shd.make_mesh(sizes, devices=devs)
    try:
        lm = sj.LM.abstract(workload.config, mesh=mesh, dtype=workload.dtype, remat=workload.remat,
                            train_mesh=workload.train_mesh, train_weights=workload.train_weights,
                            attention=workload.attention)
    except shd.MeshError as error:
        raise CompileError(f"train mesh {workload.train_mesh!r} on {target.name}: {error}") from None
    check_context(workload, only)
    resident = _weight_bytes(lm.param_structs()) if workload.train_mesh else 0
    placement = None
    rows = []
    for program in workload.programs:
        if only and program.name not in only:
            continue
        trips = max(1, program.args.get("max_new_tokens", 1) - 1)
        trains_apart = program.kind == "train" and workload.train_mesh
        key = ((program.name, "train", workload.train_mesh, workload.train_weights) if trains_apart
               else (program.name, spec, workload.train_mesh if program.kind == "train" else None))
        if cache is not None and key in cache:
            lowered_rows = {name: None for name in cache[key]}
        else:
            lowered_rows = lower_program(lm, program)
        if trains_apart:  # each training call first places the weights (from this mesh: not cached)
            placement = placement or lm.lower_train_placement()
            lowered_rows[f"{program.name}.placement"] = placement
        fresh = {}  # cached once every row of the program has compiled (an error leaves no partial entry)
        for name, lowered in lowered_rows.items():
            if lowered is None:  # the same program compiled before
                row = dict(cache[key][name])
            else:
                row = compile_row(name, lowered, target, unknown_trips=trips if name.endswith(".decode") else 1,
                                  note=program.note, per_passage=program.per_passage, dtype=workload.dtype)
                if not name.endswith(".placement"):
                    fresh[name] = dict(row)
            row["mesh"] = spec
            if program.kind == "train" and workload.train_mesh and name == program.name:
                # the weights in the generation layout stay where they are while the copy trains
                row["mesh"] = workload.train_mesh
                if "peak_bytes" in row:
                    row["resident_bytes"] = resident
                    row["peak_bytes"] += resident
                    row["fits"] = row["fits"] and row["peak_bytes"] <= target.hbm_bytes
            rows.append(row)
            if on_row is not None and lowered is not None:  # (a reused row was shown when it compiled)
                on_row(row)
        if cache is not None and fresh:
            cache[key] = fresh
    return {"workload": workload.name, "model": workload.source, "target": target.name, "mesh": spec,
            "train_mesh": workload.train_mesh, "train_weights": workload.train_weights, "passages": workload.passages,
            "dtype": workload.dtype, "attention": lm.model.attention_impl, "candidates": workload.candidates,
            "rows": rows, "summary": summarize(rows, workload, only=only)}


def _weight_bytes(params: dict[str, Any]) -> int:
    """Bytes per device of an abstract model's weights (``LM.param_structs()``: each one's shard)."""
    total = 0
    for x in params.values():
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * x.dtype.itemsize
    return int(total)


def summarize(rows: Sequence[dict[str, Any]], workload: Workload, *,
              only: Sequence[str] | None = None) -> dict[str, Any]:
    """Roofline seconds of one passage (each program times how often a passage runs it) and the
    self-edit evaluations per hour that gives (K candidates per passage); ``left_out``: the programs a passage
    runs that ``only`` left out, whose rows are missing (then neither figure is given)."""
    fits = all(r.get("fits", False) for r in rows)
    left_out = [p.name for p in workload.programs if p.per_passage and only and p.name not in only]
    if left_out or not all("roofline_s" in r for r in rows):
        return {"fits": fits, "passage_seconds": None, "evaluations_per_hour": None, "left_out": left_out}
    seconds = sum(r["roofline_s"] * r["per_passage"] for r in rows)
    per_hour = workload.candidates * 3600 / seconds if seconds > 0 and workload.candidates else None
    return {"fits": fits, "passage_seconds": seconds, "evaluations_per_hour": per_hour, "left_out": []}


def _gb(x: float | None) -> str:
    return "–" if x is None else f"{x / 1e9:.2f}"


def format_rows(report: dict[str, Any]) -> str:
    """The report as a Markdown table plus its summary line."""
    training = f", training on {report['train_mesh']}" if report.get("train_mesh") else ""
    if report.get("train_weights", "replicated") != "replicated":
        training += f" (weights {report['train_weights']})"
    lines = [f"{report['workload']} on {report['target']} (mesh {report['mesh']}{training}, {report['dtype']}, "
             f"attention {report.get('attention')}, {report['model']}); per device",
             "", "| program | compile s | args GB | temp GB | peak GB | fits | GFLOP | GB accessed | min GB | "
             "GB a step (÷ min) | collectives (count, GB) | roofline ms | bound |", "|" + "---|" * 13]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['program']} | {r['compile_s']} | – | – | – | **no** | – | – | – | – | – | – | "
                         f"{r['error'][:80]} |")
            continue
        coll = ", ".join(f"{k} {int(v['count'])} {v['bytes'] / 1e9:.3f}" for k, v in r["collectives"].items()) or "none"
        step = r.get("per_step")  # a decode's step against its minimum (weights, cache and adapters read once)
        step = "–" if not step else f"{_gb(step['bytes'])} ({step['bytes'] / r['min_bytes']:.2f}×)"
        lines.append(f"| {r['program']} | {r['compile_s']} | {_gb(r['argument_bytes'])} | {_gb(r['temp_bytes'])} | "
                     f"{_gb(r['peak_bytes'])} | {'yes' if r['fits'] else '**no**'} | {r['flops'] / 1e9:.1f} | "
                     f"{_gb(r['bytes'])} | {_gb(r['min_bytes'])} | {step} | {coll} | {r['roofline_s'] * 1e3:.2f} | "
                     f"{r['bound']} |")
    s = report["summary"]
    if s.get("left_out"):
        lines += ["", f"Partial: --only left out {', '.join(s['left_out'])}, which a passage also runs, so no "
                      "passage time or evaluations per hour are given (run without --only for them)."]
    elif not s.get("passage_seconds") and s.get("evaluations_per_hour") is None:
        pass  # nothing runs once per passage (a CPT run without generated self-edits)
    elif s.get("passage_seconds") is not None and s.get("evaluations_per_hour") is None:
        lines += ["", f"One passage by roofline: {s['passage_seconds']:.2f} s per device (programs run once per "
                      "run, or once per call of several passages, are not counted in it)."]
    elif s.get("passage_seconds") is not None:
        group = report.get("passages", 1)
        how = "one passage at a time" if group == 1 else f"{group} passages per program"
        lines += ["", f"One passage by roofline: {s['passage_seconds']:.2f} s per device; "
                      f"{s['evaluations_per_hour']:,.0f} self-edit evaluations per hour on the whole mesh, {how} "
                      f"({report['candidates']} candidates per passage)."]
    return "\n".join(lines)
