"""ReST-EM: train the self-edit generator on its own best self-edits, round after round.

A round (SEAL's outer loop, arXiv 2506.10943 §3):

1. **E-step.** The current generator writes K self-edits with the run's strategy for each of the round's
   training passages; each self-edit is scored ``repeats`` times by the inner loop (a LoRA adapter trained
   on it, the passage's questions answered without the passage). This is an ordinary knowledge run
   (:func:`~seal_jax.selfedit.knowledge.run_knowledge`) into ``round-N/results.jsonl``, with the same row
   schema and the same resume.
2. **Selection.** Per passage, the self-edit with the highest mean reward over its repeats is kept
   (:func:`select_best`); optionally only if it beats the generator's accuracy before the update.
   ``round-N/sft_rows.jsonl`` holds ``{passage_id, prompt, completion, reward}``; ``prompt`` is the text
   the generator saw (chat template applied), so the SFT step trains exactly that mapping.
3. **M-step.** Supervised fine-tuning of the generator with LoRA (SEAL: r=64, alpha=128 on all
   projections, lr 3e-4, 2 epochs, loss on the completion only) through the engine's train step, merged
   into the base weights and exported in Hugging Face format to ``round-N/generator/``.
4. **Evaluation.** The new generator runs the knowledge experiment on held-out passages
   (``round-N/eval/``); ``round-0/eval/`` is the starting model, so the summary shows accuracy per round.

Round N+1 uses the round-N generator both to write self-edits and as the model they update (the model
adapts itself), on fresh passages: round N takes training passages ``[start + (N-1)·P, start + N·P)`` of
the selection. A killed run resumes inside a round: the E-step resumes after its last finished passage, the
selection is recomputed from the rows, and a finished generator (marked by ``round-N/round.json``, written
last) is not trained again. Seeds derive from the run's seed, never from the order of work, so a resumed
run gives the same rows and the same generator as an uninterrupted one. ``round.json`` names the run's
generators relative to the run folder (``round-N/generator``), so a folder that was moved or copied, or is
resumed from another working directory, still finds them. The SFT, merge and export between rounds show no
bar: with ``progress`` each is announced on stderr before it starts and when it ends.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from seal_jax.lm.tokenizer import format_chat
from seal_jax.lm.types import LoraSpec, TrainSpec
from seal_jax.selfedit.data import Passage
from seal_jax.selfedit.engine import LanguageModel
from seal_jax.selfedit.generator import (
    GeneratorError,
    Models,
    SftResult,
    resolved_generator_path,
    sft_spec,
    stored_generator_path,
    train_and_export,
)
from seal_jax.selfedit.knowledge import run_knowledge
from seal_jax.selfedit.multihost import agree, is_writer, say
from seal_jax.selfedit.results import (
    RUN_CONFIG_REMEDY,
    number_cell,
    passages_done,
    read_rows,
    read_state,
    summarize,
    write_json,
    write_jsonl,
    write_text,
)
from seal_jax.selfedit.resume import check_run_config, config_differences
from seal_jax.selfedit.run_config import (
    ExtendedConfig,
    RunConfig,
    RunConfigError,
    check_data_table,
    pool_passages,
    select_data,
)
from seal_jax.selfedit.strategies import get_strategy, self_edit_prompt

SFT_ROW_FIELDS = ("passage_id", "prompt", "completion", "reward")
ROUND_FILE = "round.json"
# What to do about a damaged state file of a ReST-EM run folder (see results.read_state).
ROUND_REMEDY = ("delete it and resume: the round's E-step rows are kept, and its selection and SFT are done again "
                "from them (the same seeds give the same generator)")
EVAL_SUMMARY_REMEDY = "delete it and resume: the run writes it again from the results.jsonl beside it (no model loads)"


class RestemError(GeneratorError):
    """A ReST-EM round that cannot go on (e.g. the generator's SFT diverged)."""


@dataclasses.dataclass(frozen=True)
class RestemConfig(ExtendedConfig):
    """A ReST-EM run: a knowledge-run config (the inner loop) plus a ``[restem]`` table.

    Attributes:
      knowledge: the inner loop's :class:`~seal_jax.selfedit.knowledge.RunConfig`; its ``data`` is the pool
        of training passages and its conditions are ``("base", strategy)``.
      strategy: the self-edit strategy whose prompt the generator learns to answer (e.g. ``implications``).
      rounds: outer-loop rounds; passages_per_round: fresh training passages per round.
      positive_gain_only: keep a passage's best self-edit only if its reward beats the accuracy before.
      eval_data: held-out passages each round's generator is evaluated on (a data table, see
        :func:`~seal_jax.selfedit.knowledge.select_data`: ``{source, n, start, shuffle, seed}``, or
        ``subset = "selfedits"`` with ``selfedits`` for SEAL's 200 evaluation passages), or ``None`` for no
        evaluation; the training pool skips them.
      sft_lora, sft_train: the generator's SFT (:class:`~seal_jax.LoraSpec`/:class:`~seal_jax.TrainSpec`
        fields over SEAL's defaults: r=64, alpha=128, all projections, lr 3e-4, 2 epochs, batch 1).
    """

    knowledge: RunConfig
    strategy: str = "implications"
    rounds: int = 2
    passages_per_round: int = 50
    positive_gain_only: bool = False
    eval_data: dict[str, Any] | None = None
    sft_lora: dict[str, Any] = dataclasses.field(default_factory=dict)
    sft_train: dict[str, Any] = dataclasses.field(default_factory=dict)

    TABLE = "restem"
    KIND = "ReST-EM"
    CONDITIONS_NOTE = "sets restem.strategy, not conditions (its conditions are always base and the strategy)"
    GROUPS_PASSAGES = True  # its E-steps and evaluations are knowledge runs
    POOL_HINT = "set restem.passages_per_round instead of data.n (round N takes the N-th block of passages from data.start)"

    def __post_init__(self) -> None:
        strategy = get_strategy(self.strategy)
        if strategy.source != "generate":
            raise RunConfigError(f"restem.strategy {self.strategy!r} does not generate self-edits; choose one of "
                                 "implications, implications_long, implications_very_long, rewrite, self_qa")
        if self.rounds < 1 or self.passages_per_round < 1:
            raise RunConfigError(f"restem.rounds and restem.passages_per_round must be >= 1, got "
                                 f"{self.rounds} and {self.passages_per_round}")
        check_data_table(self.eval_data, "restem.eval_data")
        self.sft_lora_spec()
        self.sft_train_spec()

    def sft_lora_spec(self) -> LoraSpec:
        """The generator's SFT :class:`~seal_jax.LoraSpec` (see :func:`sft_spec`; an invalid table is a
        :class:`RunConfigError` naming ``restem.sft_lora``)."""
        spec = sft_spec("restem", "sft_lora", self.sft_lora)
        assert isinstance(spec, LoraSpec)
        return spec

    def sft_train_spec(self) -> TrainSpec:
        """The generator's SFT :class:`~seal_jax.TrainSpec` (see :func:`sft_spec`; an invalid table is a
        :class:`RunConfigError` naming ``restem.sft_train``)."""
        spec = sft_spec("restem", "sft_train", self.sft_train)
        assert isinstance(spec, TrainSpec)
        return spec

    def round_config(self, model: str, passages: Sequence[Passage] = (), *, data: dict[str, Any] | None = None,
                     name: str | None = None) -> RunConfig:
        """The knowledge config of one E-step or evaluation: ``model`` as the generator, and as its
        ``data`` either the selection ``data`` or these ``passages`` of the pool (``{"source", "ids"}``)."""
        if data is None:
            data = {"source": self.knowledge.data.get("source", "demo"), "ids": [p.id for p in passages]}
        return dataclasses.replace(self.knowledge, model=model, data=dict(data), conditions=("base", self.strategy),
                                   name=name or self.knowledge.name)

    @classmethod
    def conditions_of(cls, table: dict[str, Any]) -> list[str]:
        return list(dict.fromkeys(["base", table.get("strategy", cls.strategy)]))  # ("base": refused by the table's check)


# ----------------------------------------------------------------------------------------------------
# Selection


def select_best(rows: Sequence[dict[str, Any]], strategy: str, *, positive_gain_only: bool = False,
                reward: str = "accuracy") -> list[dict[str, Any]]:
    """The best self-edit of every passage among knowledge-run ``rows``.

    A candidate's reward is the mean row ``reward`` over its repeats (``accuracy_after``, or the gold
    answers' log-likelihood after the update with ``reward = "gold_loglik"``); candidates with a failed
    repeat or no self-edit text are skipped. The highest reward wins; ties go to the lowest candidate
    index. With ``positive_gain_only`` a passage is dropped unless its winner's reward is above the same
    measure before the update.

    Returns one dict per kept passage, in order of first appearance:
    ``{passage_id, candidate, self_edit, reward, accuracy_before}``.
    """
    reward_kind = reward
    per_candidate: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for r in rows:
        if r["condition"] == strategy:
            per_candidate.setdefault(r["passage_id"], {}).setdefault(r["candidate"], []).append(r)
    best = []
    for passage_id, candidates in per_candidate.items():
        scored = []
        for c, reps in sorted(candidates.items()):
            if any(x.get("failure") for x in reps) or not reps[0].get("self_edit"):
                continue
            scored.append((float(np.mean([x["reward"] for x in reps])), c, reps[0]))
        if not scored:
            continue
        reward, c, row = max(scored, key=lambda t: (t[0], -t[1]))
        before = float(row["accuracy_before"])
        if positive_gain_only and not reward > (before if reward_kind == "accuracy" else row["gold_loglik_before"]):
            continue
        best.append({"passage_id": passage_id, "candidate": c, "self_edit": row["self_edit"], "reward": reward,
                     "accuracy_before": before})
    return best


def sft_rows(best: Sequence[dict[str, Any]], passages: dict[str, Passage], strategy: str, *, chat: bool,
             tokenizer: Any = None, enable_thinking: bool = False) -> list[dict[str, Any]]:
    """``{passage_id, prompt, completion, reward}`` rows for the generator's SFT.

    ``prompt`` is the exact text the generator was given: the strategy's prompt for the passage, wrapped in
    the tokenizer's chat template with the generation prompt when ``chat`` (``tokenizer`` is then needed).
    """
    strat = get_strategy(strategy)
    out = []
    for b in best:
        prompt = self_edit_prompt(strat, passages[b["passage_id"]], chat=chat)
        if chat:
            prompt = format_chat(tokenizer, prompt, enable_thinking=enable_thinking)
        out.append({"passage_id": b["passage_id"], "prompt": prompt, "completion": b["self_edit"],
                    "reward": b["reward"]})
    return out


# ----------------------------------------------------------------------------------------------------
# The run


def eval_passages(config: RestemConfig) -> list[Passage]:
    """The held-out evaluation passages (``restem.eval_data``, see :func:`select_data`; none without it)."""
    if config.eval_data is None:
        return []
    return select_data(config.eval_data, where="restem.eval_data")[0]


def round_passages(config: RestemConfig, held_out: Sequence[Passage] = ()) -> list[list[Passage]]:
    """The training passages of every round: ``rounds`` blocks of ``passages_per_round`` taken in order
    from the pool (``data``: its source from ``data.start``, shuffled if asked), skipping the
    ``held_out`` evaluation passages, so training never sees one."""
    d = config.knowledge.data
    pool = pool_passages(d, held_out)
    p = config.passages_per_round
    blocks = [pool[i * p:(i + 1) * p] for i in range(config.rounds)]
    if any(len(b) < p for b in blocks):
        raise RunConfigError(f"the training pool has {len(pool)} passages from data.start={d.get('start', 0)}"
                             f"{' besides the evaluation passages' if held_out else ''}; {config.rounds} rounds x {p} "
                             f"passages need {config.rounds * p}")
    return blocks


def _finished(folder: Path, passages: Sequence[Passage]) -> bool:
    done = set(agree(lambda: passages_done(folder / "results.jsonl")))
    return all(p.id in done for p in passages)


def _passages_done(folder: Path) -> int:
    return agree(lambda: len(passages_done(folder / "results.jsonl")))


def _summary_of(folder: Path) -> dict[str, Any] | None:
    return read_state(folder / "summary.json", EVAL_SUMMARY_REMEDY, keys=("conditions",))


def _round_info(folder: Path) -> dict[str, Any] | None:
    """A round's ``round.json`` (None before its SFT has finished)."""
    return read_state(folder / ROUND_FILE, ROUND_REMEDY, keys=("generator",))


def _check_state_files(out: Path) -> None:
    """Read every state file a resumed run reads back, so that a damaged one is an error naming it (and what
    to do) before any model loads."""
    for folder in sorted(out.glob("round-*")):
        for config_file in (folder / "run_config.json", folder / "eval" / "run_config.json"):
            read_state(config_file, RUN_CONFIG_REMEDY)
        _round_info(folder)
        _summary_of(folder / "eval")


def train_generator(lm: LanguageModel, rows: Sequence[dict[str, Any]], config: RestemConfig, target: Path, *,
                    progress: bool = True, label: str | None = None) -> SftResult:
    """SFT of ``lm`` on ``(prompt, completion)`` rows with the run's SFT specs, merged and exported to
    ``target`` (see :func:`~seal_jax.selfedit.generator.train_and_export`; with ``progress`` each step is
    announced on stderr, its lines starting with ``label``)."""
    return train_and_export(lm, rows, config.sft_lora_spec(), config.sft_train_spec(), seed=config.knowledge.seed,
                            target=target, table="restem", error=RestemError, label=label, progress=progress)


def _adopt_id_selection(folder: Path, cfg: RunConfig) -> None:
    """A round folder started by an older seal-jax saved its passages as ``{source, start, n}``; when that
    selects exactly ``cfg``'s ``ids``, save the ids instead, so the round resumes (process 0 writes)."""
    path = folder / "run_config.json"
    if "ids" not in cfg.data:
        return
    saved = read_state(path, RUN_CONFIG_REMEDY)
    if saved is None:
        return
    data = saved.get("data") or {}
    if "ids" in data or [p.id for p in select_data(data)[0]] != cfg.data["ids"]:
        return
    if is_writer():
        write_json(path, {**saved, "data": cfg.to_json()["data"]}, ensure_ascii=True)


def _adopt_moved_generator(folder: Path, cfg: RunConfig, out: Path) -> None:
    """An E-step or evaluation folder saved its generator's path as it was then (``model``); when the run
    folder ``out`` has since moved (or is resumed with ``--out`` written another way), that path names this
    run's ``round-N/generator`` where it is now, ``cfg.model``: save the new path, so the part-done step
    resumes instead of refusing a config that did not change (process 0 writes)."""
    path = folder / "run_config.json"
    saved = read_state(path, RUN_CONFIG_REMEDY)
    if saved is None:
        return
    model = saved.get("model")
    if isinstance(model, str) and model != cfg.model and resolved_generator_path(out, model, "round") == cfg.model \
            and is_writer():
        write_json(path, {**saved, "model": cfg.model}, ensure_ascii=True)


def changes_only_sft_settings(out: Path, config_json: dict[str, Any]) -> bool:
    """Whether resuming ``out`` with ``config_json`` changes nothing but ``restem.sft_lora``/``sft_train``
    while no round's SFT has finished (no ``round-N/round.json``): such a change cannot alter any row
    written so far, so the run may go on with the new SFT settings (e.g. a larger ``sft_train.max_len``
    after the SFT could not start)."""
    path = out / "run_config.json"
    if any(out.glob(f"round-*/{ROUND_FILE}")):
        return False
    saved = read_state(path, RUN_CONFIG_REMEDY)
    if saved is None:
        return False
    restem = dict(saved.get("restem") or {})
    for key in ("sft_lora", "sft_train"):
        restem[key] = config_json.get("restem", {}).get(key)
    return not config_differences({**saved, "restem": restem}, config_json)


@dataclasses.dataclass
class _Rounds:
    """A ReST-EM run under way: its folder, models, passages and what is left of ``stop_after``."""

    config: RestemConfig
    out: Path
    models: Models
    held_out: list[Passage]
    training: list[list[Passage]]
    budget: int | None
    progress: bool

    def knowledge(self, cfg: RunConfig, folder: Path, passages: Sequence[Passage]) -> bool:
        """Run (or resume) one E-step or evaluation into ``folder``; False when ``stop_after`` ran out first.
        A finished one is left alone, unless its ``summary.json`` is missing: that is written again (no
        model loads)."""
        finished = _finished(folder, passages)
        if finished and agree((folder / "summary.json").is_file):
            return True
        if not finished and self.budget is not None and self.budget <= 0:
            return False
        lm = None if finished else self.models(cfg.model)
        agree(lambda: _adopt_id_selection(folder, cfg))
        agree(lambda: _adopt_moved_generator(folder, cfg, self.out))
        before = _passages_done(folder)
        run_knowledge(cfg, folder, resume=True, lm=lm, progress=self.progress, stop_after=self.budget)
        if self.budget is not None:
            self.budget -= _passages_done(folder) - before
        return _finished(folder, passages)

    def evaluate(self, r: int, generator: str) -> bool:
        """Round ``r``'s generator on the held-out passages (``round-r/eval/``)."""
        if not self.held_out:
            return True
        cfg = self.config.round_config(generator, data=self.config.eval_data or {},
                                       name=f"{self.config.name}-eval-{r}")
        return self.knowledge(cfg, self.out / f"round-{r}" / "eval", self.held_out)

    def train_round(self, r: int, generator: str) -> bool:
        """Round ``r``: E-step, selection, M-step; writes ``round-r/round.json`` last. False when
        ``stop_after`` ran out during the E-step."""
        config, k, folder = self.config, self.config.knowledge, self.out / f"round-{r}"
        passages = self.training[r - 1]
        if not self.knowledge(config.round_config(generator, passages, name=f"{k.name}-round-{r}"), folder, passages):
            return False
        lm = self.models(generator)
        best = select_best(agree(lambda: read_rows(folder / "results.jsonl")), config.strategy,
                           positive_gain_only=config.positive_gain_only, reward=k.reward)
        rows = sft_rows(best, {p.id: p for p in passages}, config.strategy, chat=k.chat, tokenizer=lm.tokenizer)
        if is_writer():
            write_jsonl(folder / "sft_rows.jsonl", rows)
        info: dict[str, Any] = {"round": r, "trained_from": stored_generator_path(self.out, generator, "round"),
                                "sft_rows": len(rows),
                                "mean_sft_reward": float(np.mean([x["reward"] for x in rows])) if rows else None}
        label = f"{config.name} ReST-EM round {r}"
        if rows:
            target = folder / "generator"
            if self.progress:
                say(f"{label}: {len(rows)} of {len(passages)} passages kept their best self-edit; the generator "
                    f"learns them (SFT, merge, export to {target}) ...")
            t0 = time.perf_counter()
            sft = train_generator(lm, rows, config, target, progress=self.progress, label=label)
            if self.progress:
                say(f"{label}: new generator in {sft.generator} (SFT, merge and export took "
                    f"{time.perf_counter() - t0:.0f}s)")
            info.update(generator=stored_generator_path(self.out, sft.generator, "round"), sft_loss=sft.sft_loss)
        else:  # nothing to learn from: the generator carries over unchanged
            if self.progress:
                say(f"{label}: no self-edit was kept; no SFT, the generator carries over unchanged")
            info.update(generator=stored_generator_path(self.out, generator, "round"), sft_loss=None,
                        note="no self-edit was kept; the generator is unchanged")
        if is_writer():
            write_json(folder / ROUND_FILE, info, ensure_ascii=True)
        return True


def run_restem(config: RestemConfig, out_dir: str | Path, *, resume: bool = False, lm: LanguageModel | None = None,
               progress: bool = True, stop_after: int | None = None) -> dict[str, Any]:
    """Run (or resume) ReST-EM into ``out_dir``; returns the summary (see the module docstring).

    ``lm`` is the loaded starting model (reused for round 1 and the round-0 evaluation); later rounds load
    their generator from ``round-N/generator/`` onto the config's mesh (else ``lm``'s). ``stop_after`` stops
    after that many newly finished E-step passages (to test resumption). Writes ``run_config.json``,
    ``round-N/…``, ``summary.json`` and ``summary.md``. In a multi-host run only process 0 writes and every
    process follows process 0's folder (:mod:`seal_jax.selfedit.multihost`); the folder must be shared,
    since every process loads the round's generator from it.
    """
    out = Path(out_dir)
    held_out = eval_passages(config)  # the data first: a refused selection writes no folder
    training = round_passages(config, held_out)
    if not resume and agree(lambda: any(out.glob("round-*"))):
        raise FileExistsError(f"{out} already holds a ReST-EM run; pass --resume to continue it or choose another --out")
    config_json = config.to_json()

    def check_folder() -> None:  # the saved config (or only the SFT settings changed); every state file read back
        if resume:
            read_state(out / "run_config.json", RUN_CONFIG_REMEDY)
            _check_state_files(out)
        sft_only = resume and changes_only_sft_settings(out, config_json)
        check_run_config(out, config_json, resume=resume and not sft_only)

    agree(check_folder)
    if is_writer():
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "run_config.json", config_json, ensure_ascii=True)
    run = _Rounds(config, out, Models(config.knowledge, lm, what="the ReST-EM generator", progress=progress),
                  held_out, training, stop_after, progress)
    generator = config.knowledge.model
    if not run.evaluate(0, generator):
        return _write_summary(config, out)
    for r in range(1, config.rounds + 1):
        marker = out / f"round-{r}" / ROUND_FILE
        if not agree(marker.is_file) and not run.train_round(r, generator):
            return _write_summary(config, out)
        info = agree(lambda f=marker.parent: _round_info(f))  # (also waits for process 0's generator export)
        trained = resolved_generator_path(out, info["generator"], "round")
        if trained != generator:
            generator = trained
            run.models.keep()  # the next use loads the new generator
        if not run.evaluate(r, generator):
            return _write_summary(config, out)
    return _write_summary(config, out)


def _write_summary(config: RestemConfig, out: Path) -> dict[str, Any]:
    summary = agree(lambda: summarize_restem(out, config.knowledge.model, config.strategy, config.rounds,
                                             reward=config.knowledge.reward))
    if is_writer():
        write_json(out / "summary.json", summary, ensure_ascii=True)
        write_text(out / "summary.md", restem_markdown(summary))
    return summary


def _gold_of(conditions: dict[str, Any]) -> dict[str, dict[str, float | None]] | None:
    """Per condition of a knowledge summary, its gold log-likelihood after the update and the mean change
    over the base model (``None`` when the rows did not measure it)."""
    gold = {name: {"gold_loglik": c.get("gold_loglik"), "gold_loglik_change": c.get("gold_loglik_change")}
            for name, c in conditions.items() if "gold_loglik" in c}
    return gold or None


def _rows_summary(folder: Path, model: str, strategy: str) -> dict[str, Any] | None:
    """The knowledge summary of ``folder/results.jsonl`` as it is now (the run may still be writing it: a
    torn last line is left out), ``None`` without rows."""
    rows = read_rows(folder / "results.jsonl", repair=False)
    return summarize(rows, model, conditions=("base", strategy)) if rows else None


def _part(summary: dict[str, Any] | None) -> tuple[dict[str, Any] | None, Any]:
    """A round's part of :func:`summarize_restem` from a knowledge summary: ``{condition: accuracy,
    "passages": n}`` and its gold log-likelihoods (:func:`_gold_of`); ``(None, None)`` without one."""
    if summary is None:
        return None, None
    conditions = summary["conditions"]
    accuracy = {name: c["accuracy"] for name, c in conditions.items()}
    return {**accuracy, "passages": conditions.get("base", {}).get("n_passages", 0)}, _gold_of(conditions)


def summarize_restem(out: str | Path, model: str, strategy: str, rounds: int, *, reward: str = "accuracy"
                     ) -> dict[str, Any]:
    """Accuracy and gold log-likelihood per round from a run folder, finished or not; never changes the folder.

    ``train`` is the accuracy per condition over the rows of ``round-N/results.jsonl`` present now (with
    ``passages``, how many passages they cover: fewer than ``passages_per_round`` while the round's E-step
    is unfinished, e.g. after ``stop_after``; a torn last passage is left out); ``eval`` is
    ``round-N/eval/summary.json``, which the evaluation writes also when it stops early (or, where a killed
    evaluation left none, its ``results.jsonl`` as it is), so it may cover only part of the held-out
    passages (``passages`` again says how many); ``train_gold`` and ``eval_gold``
    are the same parts' ``{condition: {gold_loglik, gold_loglik_change}}``: the gold answers' mean
    log-likelihood after the update and its mean change over the base model, in nats per token (``None``
    where the rows do not measure it; see :func:`~seal_jax.selfedit.results.summarize`). ``generator``,
    ``sft_rows``, ``mean_sft_reward`` and ``sft_loss`` come from ``round.json`` and stay ``None`` until the
    round's SFT has finished; ``generator`` is as ``round.json`` stores it (the run's own generators
    relative to the run folder, e.g. ``round-1/generator``). A part that has not started is ``None``.

    Returns ``{"model", "strategy", "reward", "rounds": [{"round", "generator", "train": {...} | None,
    "train_gold", "sft_rows", "mean_sft_reward", "sft_loss", "eval": {condition: accuracy} | None,
    "eval_gold"}]}``; round 0 is the starting model (evaluation only).
    """
    out = Path(out)
    table = []
    for r in range(rounds + 1):
        folder = out / f"round-{r}"
        entry: dict[str, Any] = {"round": r, "generator": model if r == 0 else None, "train": None,
                                 "train_gold": None, "sft_rows": None, "mean_sft_reward": None, "sft_loss": None,
                                 "eval": None, "eval_gold": None}
        if r > 0:
            entry["train"], entry["train_gold"] = _part(_rows_summary(folder, model, strategy))
            info = _round_info(folder)
            if info is not None:
                entry.update(generator=info["generator"], sft_rows=info["sft_rows"],
                             mean_sft_reward=info["mean_sft_reward"], sft_loss=info.get("sft_loss"))
        evaluation = _summary_of(folder / "eval")
        if evaluation is None:  # an evaluation killed before its summary: its rows so far
            evaluation = _rows_summary(folder / "eval", model, strategy)
        entry["eval"], entry["eval_gold"] = _part(evaluation)
        table.append(entry)
    return {"model": model, "strategy": strategy, "reward": reward, "rounds": table}


def restem_markdown(summary: dict[str, Any]) -> str:
    """The ReST-EM summary as a Markdown table (accuracy per round; ``–`` where a part has not run), with
    the strategy's gold log-likelihood (and its change over the base model) where the rows measured it."""
    s = summary["strategy"]

    def pct(part: dict[str, Any] | None, key: str) -> str:
        return number_cell(part.get(key) if part else None, ".1f", 100, "%")

    def gold(part: dict[str, Any] | None) -> str:
        c = (part or {}).get(s) or {}
        after, change = c.get("gold_loglik"), c.get("gold_loglik_change")
        if number_cell(after, ".3f") == "–":
            return "–"
        return f"{number_cell(after, '.3f')} ({number_cell(change, '+.3f')})"

    dense = any(e.get("train_gold") or e.get("eval_gold") for e in summary["rounds"])
    head = f" held-out gold {s} (Δ vs base) | train gold {s} (Δ vs base) |" if dense else ""
    lines = [f"Model: `{summary['model']}` · strategy `{s}`", "",
             f"| round | held-out base | held-out {s} | train base | train {s} | SFT rows | mean SFT reward |{head}",
             "|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if dense else "")]
    for e in summary["rounds"]:
        reward = "–" if e.get("mean_sft_reward") is None else (
            f"{100 * e['mean_sft_reward']:.1f}%" if summary.get("reward", "accuracy") == "accuracy"
            else f"{e['mean_sft_reward']:.3f} nats/token")
        rows = e["sft_rows"] if e.get("sft_rows") is not None else "–"
        extra = f" {gold(e.get('eval_gold'))} | {gold(e.get('train_gold'))} |" if dense else ""
        lines.append(f"| {e['round']} | {pct(e['eval'], 'base')} | {pct(e['eval'], s)} | {pct(e['train'], 'base')} | "
                     f"{pct(e['train'], s)} | {rows} | {reward} |{extra}")
    if dense:
        lines += ["", "gold: the gold answers' mean log-likelihood after the update, in nats per token (no passage in "
                  "context); Δ vs base: its mean change over the same round's model without the update."]
    return "\n".join(lines) + "\n"
