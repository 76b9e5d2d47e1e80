"""Every kind of run behind one door: read a TOML config, tell its kind, run it, summarise it.

A config's kind is given by its tables: a ``[restem]`` table makes a ReST-EM run
(:mod:`seal_jax.selfedit.restem`), a ``[templates]`` table a template search
(:mod:`seal_jax.selfedit.template_search`), a ``[cpt]`` table multi-passage continued pretraining
(:mod:`seal_jax.selfedit.cpt`), a ``[continual]`` table continual self-edits (:mod:`seal_jax.selfedit.continual`),
none of them a knowledge-incorporation run
(:mod:`seal_jax.selfedit.knowledge`). ``seal-jax run``, ``seal-jax report`` and the tests of
``experiments/`` all go through :func:`load_config` and :func:`run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from seal_jax.lm.types import mesh_lays_out, parse_mesh_spec
from seal_jax.selfedit.continual import ContinualConfig, continual_markdown, run_continual
from seal_jax.selfedit.cpt import CptConfig, run_cpt
from seal_jax.selfedit.knowledge import run_knowledge
from seal_jax.selfedit.restem import RestemConfig, restem_markdown, run_restem
from seal_jax.selfedit.results import RUN_CONFIG_REMEDY, read_state, summary_markdown
from seal_jax.selfedit.run_config import RunConfig, RunConfigError, hardware_settings, read_toml
from seal_jax.selfedit.template_search import TemplateSearchConfig, run_template_search, template_markdown
from seal_jax.targets import get_target, running_target

KINDS = ("knowledge", "restem", "templates", "cpt", "continual")
AnyConfig = RunConfig | RestemConfig | TemplateSearchConfig | CptConfig | ContinualConfig


def kind_of(raw: dict[str, Any]) -> str:
    """The kind of run a parsed config (or a run folder's ``run_config.json``) describes."""
    tables = [kind for kind in KINDS[1:] if kind in raw]
    if len(tables) > 1:
        named = " and ".join(f"[{t}]" for t in tables)
        raise RunConfigError("a config has at most one of the [restem], [templates], [cpt] and [continual] tables, "
                             f"{'not both' if len(tables) == 2 else 'not all of'} {named}")
    return tables[0] if tables else "knowledge"


def config_from_dict(raw: dict[str, Any], where: str = "config") -> AnyConfig:
    """A config object of the right kind from a parsed TOML/JSON table."""
    kind = kind_of(raw)
    if kind == "restem":
        return RestemConfig.from_dict(raw, where)
    if kind == "templates":
        return TemplateSearchConfig.from_dict(raw, where)
    if kind == "cpt":
        return CptConfig.from_dict(raw, where)
    if kind == "continual":
        return ContinualConfig.from_dict(raw, where)
    return RunConfig.from_dict(raw, where)


def load_config(path: str | Path) -> AnyConfig:
    """Read a run config TOML file of any kind; errors name the file."""
    return config_from_dict(read_toml(path), where=str(path))


def on_hardware(config: AnyConfig, target: str | None = None, *, devices: int | None = None
                ) -> tuple[AnyConfig, str | None]:
    """``config`` with the settings of its ``[hardware.<target>]`` table over the top-level ones (and without
    the tables: the config a run records), and a line saying what applies (None for a config without such
    tables and no ``target``).

    ``target`` is a ``seal-jax compile --target`` name; without it, the target this process's devices are
    (:func:`seal_jax.targets.running_target`, asked only of a config with ``[hardware]`` tables, so call
    this after ``jax.distributed.initialize``). ``devices``: the number of devices the run has, to check
    that the mesh it gets lays them out.

    Raises:
      RunConfigError: an unknown target, or a mesh for another number of devices (naming where it came from).
    """
    tables = getattr(config, "knowledge", config).hardware
    said = None
    if target is None and tables:
        found = running_target()
        target = found.name if found else None
        if target is None:
            said = (f"these devices are none of the targets with a [hardware] table ({', '.join(tables)}): the "
                    "top-level settings apply (seal-jax run --target NAME picks a table)")
    resolved = config.on_target(target)
    if target is not None:
        table = tables.get(target)
        said = (f"{target}: [hardware.{target}] sets {hardware_settings(table)}" if table else
                f"{target}: the config has no [hardware.{target}] table; the top-level settings apply")
        chips = get_target(target).chips
        if devices is not None and chips != devices:
            said += f" (note: {target} has {chips} device{'s' if chips > 1 else ''} and this run has {devices})"
    mesh = getattr(resolved, "knowledge", resolved).mesh
    if devices is not None and mesh and not mesh_lays_out(parse_mesh_spec(mesh), devices):
        origin = f"[hardware.{target}]" if target in tables and "mesh" in tables[target] else "the top level"
        raise RunConfigError(f"mesh {mesh!r} (from {origin} of the config) does not lay out this run's {devices} "
                             "devices: set mesh for them (a [hardware.<target>] table, or the top-level mesh)")
    return resolved, said


def run(config: AnyConfig, out_dir: str | Path, *, resume: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Run (or resume) ``config`` into ``out_dir``; returns its summary."""
    if isinstance(config, RestemConfig):
        return run_restem(config, out_dir, resume=resume, **kwargs)
    if isinstance(config, TemplateSearchConfig):
        return run_template_search(config, out_dir, resume=resume, **kwargs)
    if isinstance(config, CptConfig):
        return run_cpt(config, out_dir, resume=resume, **kwargs)
    if isinstance(config, ContinualConfig):
        return run_continual(config, out_dir, resume=resume, **kwargs)
    return run_knowledge(config, out_dir, resume=resume, **kwargs)


def markdown(summary: dict[str, Any]) -> str:
    """The summary of any kind of run as a Markdown table."""
    if "rounds" in summary:
        return restem_markdown(summary)
    if "iterations" in summary:
        return template_markdown(summary)
    if "mean_over_sequences" in summary:
        return continual_markdown(summary)
    return summary_markdown(summary)


def run_kind(run_dir: str | Path) -> str:
    """The kind of run a folder holds (from its ``run_config.json``)."""
    path = Path(run_dir) / "run_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no run_config.json; pass a folder written by `seal-jax run`")
    return kind_of(read_state(path, RUN_CONFIG_REMEDY) or {})
