"""One process of the two-process run-folder tests (run by tests/test_distributed.py).

Usage: python distributed_run_worker.py PROCESS_ID PORT MODEL_DIR RUN_DIR [MODES]

MODES is a comma-separated list of ``knowledge`` (the default), ``restem`` and ``templates``. Both processes
write to the same RUN_DIR (a shared file system). Every mode runs its kind of run into RUN_DIR[/KIND]/full
uninterrupted and into RUN_DIR[/KIND]/part stopped early and resumed, as a killed run would be:

- ``knowledge``: RUN_DIR/full and RUN_DIR/part (stopped after its first passage); then the same again with
  a folder per process (RUN_DIR/own/pN, as on each host's local disk).
- ``restem``: RUN_DIR/restem/{full,part}, a ReST-EM run of two rounds (part stopped after the round-0
  evaluation and round 1's training passage: round 1's generator is written, its evaluation is not); it
  also checks that later rounds load their generator onto the global mesh (the config names none) and
  that a generator folder only process 0 can see is a clear error on both processes.
- ``templates``: RUN_DIR/templates/{full,part}, a template search of two iterations with canned proposals and
  fills (part stopped after iteration 1's passage: inside iteration 2, after its proposals).

In the ``restem`` and ``templates`` modes process 1 records every file it opens, creates, renames or removes
under RUN_DIR (an audit hook) and fails at the end if it wrote anything, or read anything but an exported
generator (everything else it needs is process 0's reading, broadcast).
"""

from __future__ import annotations

import os
import sys

RUN = dict(name="tiny", chat=True, conditions=["base", "passage", "implications"], k=1,
           data={"source": "demo", "n": 2}, selfedit_sampling={"max_new_tokens": 16, "temperature": 1.0, "top_p": 0.95},
           lora={"rank": 4, "alpha": 8.0}, train={"epochs": 2, "learning_rate": 1e-2, "max_len": 96},
           eval_max_new_tokens=8)
MESH = "data=2,fsdp=2,tensor=2"
MODES = ("knowledge", "restem", "templates")
# the ReST-EM run: 2 rounds x 1 training passage x K=2 self-edits, 1 held-out passage evaluated every round
RESTEM = dict(rounds=2, passages_per_round=1, eval_data={"source": "demo", "start": 8, "n": 1})
# no mesh in the config: later rounds must load their generator onto the starting model's (global) mesh
RESTEM_KNOWLEDGE = dict(selfedit_sampling={"max_new_tokens": 16, "temperature": 1.0, "top_p": 0.95})
RESTEM_STOP = 2  # the round-0 evaluation's passage and round 1's training passage
# the template search: 2 iterations x 2 templates (one retried) x 1 fill x 1 passage, SFT between them
TEMPLATES = dict(iterations=2, templates_per_iteration=2, fills=1, passages=1, max_epochs=1)
TEMPLATES_STOP = 1  # iteration 1's passage


def record_run_dir_access(run_dir: str) -> list[str]:
    """Install an audit hook that records file accesses under ``run_dir``: ``"write PATH"`` for anything
    that creates, changes, renames or removes a file or folder, ``"read PATH"`` for a file opened to read.
    Returns the (growing) list of records."""
    root = os.path.realpath(run_dir)
    records: list[str] = []
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    changes = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate", "os.symlink",
               "os.link", "os.utime", "os.chmod"}

    def inside(path: object) -> str | None:
        if isinstance(path, int) or path is None:
            return None
        try:
            full = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return None
        return full if full == root or full.startswith(root + os.sep) else None

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            full = inside(path)
            if full is None:
                return
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & writing)
            records.append(f"{'write' if writes else 'read'} {full}")
        elif event in changes:
            for path in args[:2] if event == "os.rename" else args[:1]:
                full = inside(path)
                if full is not None:
                    records.append(f"write {full} ({event})")

    sys.addaudithook(hook)
    return records


def run_knowledge_mode(lm, model_dir: str, run_dir: str, process_id: int) -> None:
    """The knowledge run into RUN_DIR/full, RUN_DIR/part and RUN_DIR/own/pN (see the module docstring)."""
    from seal_jax.selfedit.knowledge import run_knowledge
    from seal_jax.selfedit.run_config import RunConfig

    config = RunConfig.from_dict({**RUN, "model": model_dir})
    run_knowledge(config, os.path.join(run_dir, "full"), lm=lm, progress=False)
    run_knowledge(config, os.path.join(run_dir, "part"), lm=lm, progress=False, stop_after=1)
    run_knowledge(config, os.path.join(run_dir, "part"), lm=lm, progress=False, resume=True)
    # each process given its own folder, as with a folder on each host's local disk: process 1's stays
    # empty, and on resume it follows process 0's rows
    own = os.path.join(run_dir, "own", f"p{process_id}")
    run_knowledge(config, own, lm=lm, progress=False, stop_after=1)
    run_knowledge(config, own, lm=lm, progress=False, resume=True)


def restem_config(model_dir: str):
    """The two-process ReST-EM config: tests/test_restem.py's tiny run, made smaller (no mesh of its own)."""
    from test_restem import restem_raw  # tests/ is sys.path[0]: this file runs as a script

    from seal_jax.selfedit.restem import RestemConfig

    raw = restem_raw(model_dir, **RESTEM)
    return RestemConfig.from_dict({**raw, **RESTEM_KNOWLEDGE})


def run_restem_mode(lm, model_dir: str, run_dir: str) -> None:
    """A ReST-EM run into RUN_DIR/restem/full, and into RUN_DIR/restem/part stopped early and resumed."""
    from seal_jax.selfedit import generator
    from seal_jax.selfedit.restem import run_restem

    config = restem_config(model_dir)
    load, meshes = generator.load_model, []  # the loop loads later generators through it

    def recording_load(*args, **kwargs):
        loaded = load(*args, **kwargs)
        meshes.append(loaded.mesh)
        return loaded

    generator.load_model = recording_load
    try:
        run_restem(config, os.path.join(run_dir, "restem", "full"), lm=lm, progress=False)
        part = os.path.join(run_dir, "restem", "part")
        run_restem(config, part, lm=lm, progress=False, stop_after=RESTEM_STOP)
        run_restem(config, part, lm=lm, progress=False, resume=True)
    finally:
        generator.load_model = load
    # every later round's generator went onto the starting model's global mesh (the config names none)
    assert meshes and all(m is not None and m.devices.size == 8 for m in meshes), meshes
    # a generator folder that only process 0 can see (as on its local disk) is one clear error everywhere
    import jax

    from seal_jax.selfedit.multihost import require_visible

    folder = os.path.join(run_dir, "restem", "visible", f"p{jax.process_index()}", "generator")
    if jax.process_index() == 0:
        os.makedirs(folder)
    try:
        require_visible(folder, "the ReST-EM generator")
    except FileNotFoundError as e:
        assert "missing on process(es) [1]" in str(e) and "file system all hosts share" in str(e), e
    else:
        raise AssertionError("require_visible passed although process 1 cannot see the folder")


def templates_config(model_dir: str):
    """The two-process template-search config: tests/test_template_search.py's tiny run, made smaller."""
    from test_template_search import search_raw

    from seal_jax.selfedit.template_search import TemplateSearchConfig

    return TemplateSearchConfig.from_dict({**search_raw(model_dir, **TEMPLATES), "mesh": MESH})


def run_templates_mode(lm, model_dir: str, run_dir: str) -> None:
    """A template search into RUN_DIR/templates/full, and into RUN_DIR/templates/part stopped early and
    resumed; proposals and fills are canned (a random model writes no JSON), everything else is real."""
    from test_template_search import CannedLM

    import seal_jax as sj
    from seal_jax.selfedit.template_search import run_template_search

    config = templates_config(model_dir)

    def loader(path: str):
        return CannedLM(sj.load(path, mesh=MESH, progress=False))

    run_template_search(config, os.path.join(run_dir, "templates", "full"), lm=CannedLM(lm), progress=False,
                        loader=loader)
    part = os.path.join(run_dir, "templates", "part")
    run_template_search(config, part, lm=CannedLM(lm), progress=False, stop_after=TEMPLATES_STOP, loader=loader)
    run_template_search(config, part, lm=CannedLM(lm), progress=False, resume=True, loader=loader)


def main() -> None:
    """Start this process of the pair, load the model on the global mesh and run the MODES."""
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"  # before jax starts (a fresh process)
    import jax

    from seal_jax.lm.sharding import initialize_distributed

    process_id, port, model_dir, run_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    modes = sys.argv[5].split(",") if len(sys.argv) > 5 else ["knowledge"]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"unknown modes {unknown}; known: {MODES}")
    started = initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                                     cpu_collectives="gloo")
    assert started and jax.process_count() == 2
    jax.config.update("jax_default_matmul_precision", "highest")
    import seal_jax as sj

    records = record_run_dir_access(run_dir) if process_id == 1 and set(modes) - {"knowledge"} else None
    lm = sj.load(model_dir, mesh=MESH, progress=False)
    for mode in modes:
        if mode == "knowledge":
            run_knowledge_mode(lm, model_dir, run_dir, process_id)
        elif mode == "restem":
            run_restem_mode(lm, model_dir, run_dir)
        else:
            run_templates_mode(lm, model_dir, run_dir)
    if records is not None:
        writes = [r for r in records if r.startswith("write")]
        generator = f"{os.sep}generator{os.sep}"
        reads = [r for r in records if r.startswith("read") and generator not in r]
        assert not writes and not reads, f"process 1 touched the run folder: {writes + reads}"
        assert any(generator in r for r in records), "process 1 loaded no generator from the run folder"


if __name__ == "__main__":
    main()
