"""Tables and plots of finished (or running) runs: ``seal-jax report RUN_DIR``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from seal_jax.selfedit.continual import STEPS_FILE, continual_markdown, matrices
from seal_jax.selfedit.restem import restem_markdown, summarize_restem
from seal_jax.selfedit.results import RUN_CONFIG_REMEDY, read_rows, read_state, summarize, summary_markdown
from seal_jax.selfedit.run_config import RunConfig, select_data
from seal_jax.selfedit.runs import run_kind
from seal_jax.selfedit.template_search import summarize_template_search, template_markdown


def _run_config(run: Path) -> dict[str, Any]:
    """The run's ``run_config.json`` (an error naming it when it is missing or damaged)."""
    config = read_state(run / "run_config.json", RUN_CONFIG_REMEDY)
    if config is None:
        raise FileNotFoundError(f"{run} has no run_config.json: is it a seal-jax run folder?")
    return config


def _save(fig: Any, path: str | Path) -> Path:
    """Lay out ``fig``, write it as a PNG to ``path``, close it; returns the path."""
    import matplotlib.pyplot as plt  # deferred: matplotlib is heavy and only the charts need it

    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path

def load_summary(run_dir: str | Path) -> dict[str, Any]:
    """The run's summary, recomputed from ``results.jsonl`` (so a run still in progress reports too), its
    conditions in the run config's order.

    Raises:
      FileNotFoundError: no such folder, or a folder that is no run folder (neither ``run_config.json`` nor
        ``results.jsonl``).
      ValueError: a knowledge or CPT run that has not finished a passage yet (the message says how far it
        is and how to continue it).
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"no folder {run}; pass a run folder written by `seal-jax run` (e.g. checkpoints/runs/demo)")
    results = run / "results.jsonl"
    config = read_state(run / "run_config.json", RUN_CONFIG_REMEDY) or {}
    if not results.is_file() and not config:
        raise FileNotFoundError(f"{run} holds no results.jsonl; pass a run folder written by `seal-jax run`")
    rows = read_rows(results, repair=False)  # a run may still be writing: never change its file
    if not rows:
        raise ValueError(_not_started(run, config, results))
    return summarize(rows, config.get("model", "?"), conditions=config_conditions(config))


def config_conditions(config: dict[str, Any]) -> list[str]:
    """The conditions of a knowledge or CPT run's ``run_config.json``, in the order the run writes them
    (a CPT run: ``base``, ``cpt.conditions``, then ``cpt.generators``); ``[]`` when it names none."""
    if "cpt" in config:
        table = config["cpt"] or {}
        return ["base", *(c for c in table.get("conditions") or () if c != "base"), *(table.get("generators") or {})]
    return [c for c in config.get("conditions") or () if isinstance(c, str)]


def _resume(run: Path) -> str:
    """The command that continues the run in ``run``."""
    return f"`seal-jax run CONFIG --out {run} --resume` continues it"


def _passages_in(results: Path) -> int:
    """How many passages a results file holds whole (read without changing it: a run may be writing it)."""
    return len({r.get("passage_id") for r in read_rows(results, repair=False)})


def _not_started(run: Path, config: dict[str, Any], results: Path) -> str:
    """Why a knowledge or CPT run folder has no results rows yet, and how to continue it."""
    resume = _resume(run)
    state = f"{results.name} is empty" if results.is_file() else f"no {results.name} yet"
    if "cpt" in config:
        if (run / "training.json").is_file():
            phase = "its adapters are trained; the evaluation has not finished a passage"
        elif (run / "selfedits.jsonl").is_file():
            written = len(read_rows(run / "selfedits.jsonl", repair=False))
            phase = (f"it writes self-edits (for {written} passage{'s' if written != 1 else ''} so far), then trains "
                     "one adapter per condition before it evaluates any passage")
        else:
            phase = "it has not written a self-edit yet"
        return f"{run} is a CPT run that has not finished a passage yet ({state}): {phase}; {resume}"
    name = f" {config['name']!r}" if config.get("name") else ""
    return f"{run} is a knowledge run{name} that has not finished a passage yet ({state}); {resume}"


def _unfinished_note(run: Path, summary: dict[str, Any]) -> str:
    """A line saying how many of the run's passages are done, when it has not finished them all ("" when it
    has, or when its passages cannot be listed here, e.g. its data file is on another machine)."""
    try:
        config = RunConfig.from_dict(_run_config(run))
        if str(config.data.get("source", "")).startswith("hub:"):
            return ""  # a report does not go to the network to count passages
        planned = len(select_data(config.data, replay="replay" in config.conditions)[0])
    except Exception:  # a report never fails over this note
        return ""
    done = max((c["n_passages"] for c in summary["conditions"].values()), default=0)
    if done >= planned:
        return ""
    return f"\n\n{done} of {planned} passages done: the run has not finished ({_resume(run)})."


def plot_accuracy(summary: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Bar chart of accuracy per condition with error bars (std over passages); writes a PNG. A condition
    with no result (every row failed) gets no bar but a "no result" mark at its place."""
    import matplotlib  # deferred: matplotlib takes ~0.5 s to import and only the charts need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: as matplotlib, once the Agg backend is chosen

    def percent(value: Any) -> float:
        return np.nan if value is None else 100 * float(value)  # None, or NaN from an older summary

    names = list(summary["conditions"])
    acc = np.array([percent(summary["conditions"][n]["accuracy"]) for n in names])
    err = np.array([percent(summary["conditions"][n]["accuracy_std"]) for n in names])
    missing = np.isnan(acc)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 1), 3.6), dpi=120)
    bars = ax.bar(names, np.where(missing, 0.0, acc), color="#4c72b0", edgecolor="black", linewidth=0.6)
    shown = ~missing & ~np.isnan(err)
    if shown.any():
        ax.errorbar(np.arange(len(names))[shown], acc[shown], yerr=err[shown], fmt="none", ecolor="black", capsize=4,
                    linewidth=1.0)
    for bar, value, gone in zip(bars, acc, missing, strict=True):
        x = bar.get_x() + bar.get_width() / 2
        if gone:
            bar.set_visible(False)
            ax.text(x, 1, "no result\n(every row failed)", ha="center", va="bottom", fontsize=7, color="#b03030")
        else:
            ax.text(x, value + 1, f"{value:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("accuracy (%), bars: std over passages")
    top = np.nan_to_num(acc + np.nan_to_num(err), nan=0.0)
    ax.set_ylim(0, min(100, max(top, default=0) + 15))
    ax.set_title(title or f"{summary['model']}", fontsize=9)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path)


def plot_rounds(summary: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Line chart of a ReST-EM run: held-out (and training-passage) accuracy per round; writes a PNG."""
    import matplotlib  # deferred: matplotlib takes ~0.5 s to import and only the charts need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: as matplotlib, once the Agg backend is chosen

    s = summary["strategy"]
    fig, ax = plt.subplots(figsize=(5.0, 3.4), dpi=120)
    for part, key, style in (("eval", s, "-o"), ("eval", "base", "--o"), ("train", s, ":s")):
        points = [(e["round"], 100 * e[part][key]) for e in summary["rounds"]
                  if e.get(part) and e[part].get(key) is not None]
        if points:
            label = f"{'held-out' if part == 'eval' else 'training passages'}: {key}"
            ax.plot(*zip(*points, strict=True), style, label=label)
    ax.set_xlabel("round (0 = starting model)")
    ax.set_ylabel("accuracy (%)")
    ax.set_xticks([e["round"] for e in summary["rounds"]])
    if ax.get_legend_handles_labels()[0]:  # (no line, no legend: a report says first that nothing ran)
        ax.legend(fontsize=7)
    ax.set_title(title or summary["model"], fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path)


def plot_forgetting(summary: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """A continual run's mean accuracy matrix as a heatmap (rows: after step; columns: passage) beside the
    forgetting curves: accuracy on the first passage and mean accuracy on the passages seen, per step."""
    import matplotlib  # deferred: matplotlib takes ~0.5 s to import and only the charts need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: as matplotlib, once the Agg backend is chosen

    mean = np.array([[np.nan if x is None else 100 * x for x in line] for line in summary["mean_over_sequences"]])
    n = summary["passages"]
    fig, (heat, curve) = plt.subplots(1, 2, figsize=(9.0, 3.6), dpi=120)
    image = heat.imshow(mean, cmap="viridis", vmin=0, vmax=max(1.0, float(np.nanmax(mean))), aspect="auto")
    heat.set_xticks(range(n), [f"d{j}" for j in range(n)], fontsize=7)
    heat.set_yticks(range(n + 1), ["untouched", *(f"step {i}" for i in range(n))], fontsize=7)
    heat.set_xlabel("passage")
    fig.colorbar(image, ax=heat, label="accuracy (%)")
    steps = np.arange(1, n + 1)
    curve.plot(steps - 1, mean[1:, 0], "-o", label="first passage (d0)")
    curve.plot(steps - 1, [np.nanmean(mean[i, :i]) for i in steps], "--s", label="passages seen so far")
    curve.axhline(np.nanmean(mean[0]), color="grey", lw=0.8, label="untouched model")
    curve.set_xlabel("step")
    curve.set_ylabel("accuracy (%)")
    curve.legend(fontsize=7)
    curve.spines[["top", "right"]].set_visible(False)
    fig.suptitle(title or summary["model"], fontsize=9)
    return _save(fig, path)


def _continual_progress(run: Path, config: dict[str, Any]) -> tuple[int, int, str]:
    """``(finished sequences, sequences, how far the unfinished ones got)`` of a continual run folder."""
    n, total = config["continual"]["passages"], config["continual"]["sequences"]
    finished, notes = 0, []
    for s in range(total):
        rows = read_rows(run / f"sequence-{s}" / STEPS_FILE, repair=False)  # the run may be writing it
        if len(rows) == n + 1:
            finished += 1
        elif rows:  # row 0 scores the untouched model, then one row per step
            notes.append(f"sequence {s}: {len(rows) - 1} of {n} step{'s' if n != 1 else ''} done")
    if not notes and finished < total:
        notes.append(f"sequence {finished}: the untouched model not scored yet")
    return finished, total, "; ".join(notes)


def report_continual(run_dir: str | Path) -> tuple[str, Path]:
    """``report.md`` and ``forgetting.png`` of a continual-self-edit run folder; an unfinished run's report
    says how far it got and how to continue it.

    Raises:
      ValueError: no sequence has finished yet (the message says how far the run got and how to continue it).
    """
    run = Path(run_dir)
    config = _run_config(run)
    summary = matrices(run, config)
    finished, total, progress = _continual_progress(run, config)
    if summary["mean_over_sequences"] is None:
        name = f" {config['name']!r}" if config.get("name") else ""
        raise ValueError(f"{run} is a continual run{name} with no finished sequence yet ({progress}); {_resume(run)}")
    markdown = continual_markdown(summary)
    if finished < total:
        markdown += (f"\n{finished} of {total} sequences done ({progress}): the run has not finished "
                     f"({_resume(run)}).\n")
    png = plot_forgetting(summary, run / "forgetting.png", title=run.name)
    (run / "report.md").write_text(markdown + f"\n![accuracy matrix and forgetting]({png.name})\n")
    return markdown, png


def _held_out_passages(eval_data: dict[str, Any]) -> int | None:
    """How many held-out passages a ReST-EM run evaluates each generator on (None when that cannot be told
    here: a hub source, or a data file that is not at hand)."""
    try:
        if str(eval_data.get("source", "")).startswith("hub:"):
            return None  # a report does not go to the network to count passages
        return len(select_data(eval_data, where="restem.eval_data")[0])
    except Exception:  # a report never fails over its progress line
        return None


def _restem_progress(run: Path, config: dict[str, Any]) -> str | None:
    """The first step of a ReST-EM run that has not finished, as a phrase, or None when every step has
    (the evaluation of the starting model, then per round: E-step, SFT of the generator, its evaluation)."""
    table = config.get("restem") or {}
    rounds, per_round = int(table.get("rounds", 0)), table.get("passages_per_round")
    eval_data = table.get("eval_data")
    held = _held_out_passages(eval_data) if eval_data is not None else 0

    def evaluation(r: int) -> str | None:
        if not held:  # no evaluation, or one this report cannot count: passed over
            return None
        done = _passages_in(run / f"round-{r}" / "eval" / "results.jsonl")
        who = "the starting model" if r == 0 else f"round {r}'s generator"
        return None if done >= held else f"{who} on the held-out passages: {done} of {held} done"

    steps = [lambda: evaluation(0)]
    for r in range(1, rounds + 1):
        def e_step(r: int = r) -> str | None:
            done = _passages_in(run / f"round-{r}" / "results.jsonl")
            if (run / f"round-{r}" / "round.json").is_file():
                return None
            if per_round is None or done < per_round:
                return f"round {r}'s E-step: {done}{'' if per_round is None else f' of {per_round}'} passages done"
            return f"round {r}'s E-step is done; its SFT of the generator has not finished"

        steps += [e_step, lambda r=r: evaluation(r)]
    return next((phrase for step in steps if (phrase := step()) is not None), None)


def report_restem(run_dir: str | Path) -> tuple[str, Path]:
    """``report.md`` and ``rounds.png`` of a ReST-EM run folder (recomputed from its rounds); an unfinished
    run's report says where it is and how to continue it.

    Raises:
      ValueError: nothing to report yet, neither an evaluation nor an E-step row (the message says how far
        the run got and how to continue it); no table and no chart are written.
    """
    run = Path(run_dir)
    config = _run_config(run)
    summary = summarize_restem(run, config["model"], config["restem"]["strategy"], config["restem"]["rounds"],
                               reward=config.get("reward", "accuracy"))
    progress = _restem_progress(run, config)
    if not any(e.get("eval") or e.get("train") for e in summary["rounds"]):
        name = f" {config['name']!r}" if config.get("name") else ""
        where = f" ({progress})" if progress else ""
        raise ValueError(f"{run} is a ReST-EM run{name} where no round has finished yet{where}; {_resume(run)}")
    markdown = restem_markdown(summary)
    if progress:
        markdown += f"\nThe run has not finished: {progress} ({_resume(run)}).\n"
    png = plot_rounds(summary, run / "rounds.png", title=run.name)
    (run / "report.md").write_text(markdown + f"\n![accuracy per round]({png.name})\n")
    return markdown, png


def plot_iterations(summary: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Four panels over the iterations of a template search — best/mean score (and held-out best),
    hyperparameter similarity, instruction similarity, mean characters per fill; writes a PNG."""
    import matplotlib  # deferred: matplotlib takes ~0.5 s to import and only the charts need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: as matplotlib, once the Agg backend is chosen

    rows = summary["iterations"]
    xs = [e["iteration"] for e in rows]
    fig, axes = plt.subplots(1, 4, figsize=(13.0, 3.2), dpi=120)

    def line(ax: Any, key: str, label: str, style: str = "-o", scale: float = 1.0) -> None:
        points = [(e["iteration"], scale * e[key]) for e in rows if e.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)

    dense = summary.get("reward", "accuracy") != "accuracy"
    scale = 1.0 if dense else 100.0  # gold nats/token, or accuracy in %
    line(axes[0], "best_score", "best", scale=scale)
    line(axes[0], "mean_score", "mean", "--o", scale=scale)
    line(axes[0], "base_score" if dense else "base_accuracy", "base (no update)", ":s", scale=scale)
    held = [(e["iteration"], scale * e["eval"]["score"]) for e in rows
            if e.get("eval") and e["eval"]["score"] is not None]
    if held:
        axes[0].plot(*zip(*held, strict=True), "-^", label="held-out best")
    axes[0].set_ylabel("gold log-likelihood (nats/token)" if dense else "accuracy (%)")
    if not dense:  # accuracy from 0 (all-zero scores would otherwise get an axis of ±0.04%)
        axes[0].set_ylim(0, max(5.0, axes[0].get_ylim()[1]))
    axes[0].legend(fontsize=7)
    line(axes[1], "hyperparameter_similarity", "hyperparameters")
    line(axes[2], "instruction_similarity", "instructions")
    line(axes[3], "mean_sequence_chars", "chars")
    backend = next((e["similarity_backend"] for e in rows if e.get("similarity_backend")), None)
    titles = ("template score", "hyperparameter similarity",
              f"instruction similarity{f' ({backend})' if backend else ''}", "training characters per fill")
    for ax, name in zip(axes, titles, strict=True):
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("iteration")
        ax.set_xticks(xs)
        ax.spines[["top", "right"]].set_visible(False)
    for ax in axes[1:3]:
        ax.set_ylim(0, 1.05)
    fig.suptitle(title or f"{summary['model']} · {summary['variant']}", fontsize=9)
    return _save(fig, path)


def report_templates(run_dir: str | Path) -> tuple[str, Path]:
    """``report.md`` and ``iterations.png`` of a template-search run folder (recomputed from its files)."""
    run = Path(run_dir)
    config = _run_config(run)
    summary = summarize_template_search(run, config)
    if not summary["iterations"]:
        raise ValueError(f"{run} has no proposals yet: the search has not finished its first proposal step")
    markdown = template_markdown(summary)
    png = plot_iterations(summary, run / "iterations.png", title=run.name)
    (run / "report.md").write_text(markdown + f"\n![scores and diversity per iteration]({png.name})\n")
    return markdown, png


def report(run_dir: str | Path) -> tuple[str, Path]:
    """Write ``report.md`` and a chart into ``run_dir``; return the Markdown and the PNG path.

    A knowledge run gets ``accuracy.png`` (accuracy per condition); a ReST-EM run ``rounds.png``
    (accuracy per round); a template search ``iterations.png`` (score and diversity per iteration).
    """
    run = Path(run_dir)
    kind = run_kind(run) if (run / "run_config.json").is_file() else "knowledge"
    if kind == "restem":
        return report_restem(run)
    if kind == "templates":
        return report_templates(run)
    if kind == "continual":
        return report_continual(run)
    summary = load_summary(run)
    markdown = summary_markdown(summary).rstrip("\n") + _unfinished_note(run, summary)
    png = plot_accuracy(summary, run / "accuracy.png", title=run.name)
    (run / "report.md").write_text(markdown + f"\n![accuracy per condition]({png.name})\n")
    return markdown, png
