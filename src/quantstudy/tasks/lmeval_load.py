"""Finding and building lm-evaluation-harness tasks: registry names, the user's task YAML, safety, data.

lm-eval's own `TaskManager(include_path=...)` indexes the YAML and its `load()` builds the tasks
(dataset loading, few-shot sampler, prompt functions, filters, metrics), so a task here means
exactly what it means in lm-eval 0.4.13. What quantstudy adds, before anything is built:
  - an unknown name is one error with lm-eval's closest names (did-you-mean);
  - a user YAML (anything under an include_path) that names Python code (`!function`, or a
    `class:` task) is refused unless `evaluate.trust_task_code: true`: lm-eval imports and runs
    that code while building the task. Registry YAML ships with lm-eval and is trusted like it;
  - data: a task over local files (`dataset_path: json|csv|parquet|...` + `data_files`) needs no
    hub; one that needs the hub while the hub is unreachable fails at plan time, naming the task,
    the dataset and how to provide it.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import socket
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from quantstudy.config import LMEvalTaskSpec
from quantstudy.errors import QuantStudyError

LM_TASKS = Path(__import__("lm_eval").__file__).resolve().parent / "tasks"
# datasets' packaged builders that read local files (dataset_path: json + data_files, ...)
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}
FIELD = "evaluate.tasks"


@dataclass(frozen=True)
class Resolved:
    """Where an lm-eval entry comes from: its TaskManager, and the leaf task configs it expands to."""

    spec: LMEvalTaskSpec
    include: Path | None  # the user's include path (absolute), None for a registry task
    defaults: bool  # the TaskManager also indexes lm-eval's registry
    leaves: dict[str, dict[str, Any]]  # leaf task name -> its config (includes merged, functions unresolved)
    files: tuple[Path, ...]  # user YAML files read (fingerprinted into the stage key)


@lru_cache(maxsize=8)
def task_manager(include: Path | None, defaults: bool) -> Any:
    """One TaskManager per (include path, registry) for the process: indexing lm-eval's registry
    reads ~15k YAML files (about 15 s on this machine)."""
    import logging

    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return TaskManager(include_path=str(include) if include else None, include_defaults=defaults)


def include_dir(spec: LMEvalTaskSpec, config_dir: Path) -> Path | None:
    if spec.include_path is None:
        return None
    p = Path(spec.include_path).expanduser()
    p = (p if p.is_absolute() else config_dir / p).resolve()
    if not p.exists():
        raise QuantStudyError(f"lm-eval task {spec.lmeval}: include_path not found", field=f"{FIELD}.include_path",
                              value=str(p), fix="point include_path at a folder of lm-eval task YAML files (or one "
                              "file), relative to the study file")
    return p if p.is_dir() else p.parent  # lm-eval indexes folders; a file's folder holds it


def yaml_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.yaml") if "__pycache__" not in p.parts)


def python_refs(path: Path, seen: set[Path] | None = None) -> list[str]:
    """`!function` tags and `class:` entries in a user YAML file and the user files it includes
    (registry YAML that it includes is lm-eval's own, trusted like the library)."""
    seen = set() if seen is None else seen
    path = path.resolve()
    if path in seen or path.is_relative_to(LM_TASKS):
        return []
    seen.add(path)
    found: list[str] = []

    class Loader(yaml.SafeLoader):
        pass

    def ctor(loader: yaml.SafeLoader, node: yaml.Node) -> str:
        found.append(f"{path}: !function {loader.construct_scalar(node)}")  # type: ignore[arg-type]
        return ""

    Loader.add_constructor("!function", ctor)
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 (a SafeLoader subclass)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise QuantStudyError(f"lm-eval task YAML {path} cannot be read ({type(e).__name__}: {str(e)[:200]})",
                              field=f"{FIELD}.include_path", value=str(path), fix="correct the YAML file") from None
    if not isinstance(cfg, dict):
        return found
    if "class" in cfg:
        found.append(f"{path}: class: (a Python task class)")
    incs = cfg.get("include") or []
    for inc in incs if isinstance(incs, list) else [incs]:
        p = Path(str(inc))
        p = p if p.is_absolute() else path.parent / p
        if p.is_file():
            found += python_refs(p, seen)
    return found


def check_trust(spec: LMEvalTaskSpec, include: Path, trust: bool) -> None:
    refs = [r for f in yaml_files(include) for r in python_refs(f)]
    if refs and not trust:
        raise QuantStudyError(
            f"lm-eval task {spec.lmeval}: the task YAML under {include} runs Python code of its own "
            f"({'; '.join(refs[:3])}{'; ...' if len(refs) > 3 else ''}); building the task would import and run it",
            field="evaluate.trust_task_code", value=False,
            fix="read that code, then set `evaluate.trust_task_code: true` in the study file to allow it "
                "(or write the task without !function)")


def _leaves(tm: Any, name: str, depth: int = 0) -> dict[str, dict[str, Any]]:
    """Leaf task name -> config for a task, group or tag name (configs as lm-eval's index holds them)."""
    from lm_eval.tasks._index import Kind

    e = tm.task_index.get(name)
    if e is None or depth > 8:
        return {}
    if e.kind in (Kind.TASK, Kind.PY_TASK):
        return {name: dict(e.cfg or {})}
    out: dict[str, dict[str, Any]] = {}
    members = (e.cfg or {}).get("task", []) if e.kind is Kind.GROUP else sorted(e.tags)
    for m in members if isinstance(members, list) else [members]:
        if isinstance(m, dict) and "task" in m:  # an inline task (or a registered one with overrides)
            sub = _leaves(tm, str(m["task"]), depth + 1)
            out.update({k: {**v, **m} for k, v in sub.items()} or {str(m["task"]): dict(m)})
        elif isinstance(m, str):
            out.update(_leaves(tm, m, depth + 1))
    return out


def resolve(spec: LMEvalTaskSpec, config_dir: Path, trust: bool) -> Resolved:
    """Find the entry (user include path first, then the registry); refuse untrusted user code."""
    inc = include_dir(spec, config_dir)
    if inc is not None:
        check_trust(spec, inc, trust)
        tm = task_manager(inc, False)  # the user's folder alone indexes in milliseconds
        leaves = _leaves(tm, spec.lmeval)
        if leaves and all("output_type" in c or "class" in c for c in leaves.values()):
            return Resolved(spec, inc, False, leaves, tuple(yaml_files(inc)))
    tm = task_manager(inc, True)  # a registry name, or a user group over registry tasks
    leaves = _leaves(tm, spec.lmeval)
    if not leaves:
        close = difflib.get_close_matches(spec.lmeval, tm.all_tasks, n=3, cutoff=0.6)
        where = f" under {inc} or" if inc else ""
        raise QuantStudyError(f"unknown lm-eval task: no task, group or tag {spec.lmeval!r}{where} in lm-eval's "
                              "registry", field=f"{FIELD}.lmeval", value=spec.lmeval,
                              fix=(f"did you mean {' or '.join(repr(c) for c in close)}? " if close else "")
                              + "see `lm_eval ls tasks` for registry names; a task of your own needs include_path")
    return Resolved(spec, inc, True, leaves, tuple(yaml_files(inc)) if inc else ())


# ------------------------------------------------------------------ data: local files, cache or hub
def hub_reachable() -> bool:
    """False when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set or huggingface.co does not answer in 3 s."""
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    return _probe()


@lru_cache(maxsize=1)
def _probe() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def in_cache(path: str) -> bool:
    """Whether a hub dataset has been downloaded here before (datasets' or the hub's cache)."""
    from datasets import config as dcfg
    from huggingface_hub import constants

    return (Path(dcfg.HF_DATASETS_CACHE) / path.replace("/", "___")).is_dir() or \
        (Path(constants.HF_HUB_CACHE) / f"datasets--{path.replace('/', '--')}").is_dir()


def _data_files(kwargs: dict[str, Any]) -> list[str]:
    files = (kwargs or {}).get("data_files") or []
    if isinstance(files, dict):
        files = [f for v in files.values() for f in (v if isinstance(v, list) else [v])]
    return [str(f) for f in (files if isinstance(files, list) else [files])]


def data_needs(r: Resolved) -> tuple[list[Path], list[str]]:
    """(local data files the tasks read, hub datasets neither local nor cached)."""
    files, hub = [], []
    for name, cfg in r.leaves.items():
        path, kw = str(cfg.get("dataset_path") or ""), cfg.get("dataset_kwargs") or {}
        if path in LOCAL_BUILDERS:
            for f in _data_files(kw):
                p = Path(f).expanduser()
                if not p.is_file():
                    raise QuantStudyError(f"lm-eval task {name}: data file not found", field=f"{FIELD}.include_path",
                                          value=str(p), fix="correct dataset_kwargs.data_files in the task YAML "
                                          "(lm-eval reads relative paths from the working directory)")
                files.append(p.resolve())
        elif path and not Path(path).expanduser().is_dir() and not in_cache(path):
            hub.append(f"{name}: {path}" + (f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else ""))
    return files, hub


def offline_fix(r: Resolved) -> str:
    return ("download the dataset once where the hub is reachable (`python -c \"import datasets; "
            "datasets.load_dataset('<dataset>', '<name>')\"` fills the local cache, which lm-eval then reads "
            "offline), or copy the data to local files and write a task YAML that `include:`s the registry YAML "
            "and sets `dataset_path: json` with `dataset_kwargs: {data_files: ...}`; list it with include_path "
            "(README, lm-eval tasks)")


def plan_check(spec: LMEvalTaskSpec, config_dir: Path, trust: bool) -> str:
    """Everything about an lm-eval entry that can fail without running a model, at plan time. Returns a
    fingerprint of what can change its results: the user YAML (and code) files and the local data files."""
    r = resolve(spec, config_dir, trust)
    files, hub = data_needs(r)
    if hub and not hub_reachable():
        raise QuantStudyError(f"lm-eval task {spec.lmeval} needs data from the Hugging Face hub, which is not "
                              f"reachable, and the data is not in the local cache: {'; '.join(hub[:4])}"
                              f"{'; ...' if len(hub) > 4 else ''}", field=f"{FIELD}.lmeval", value=spec.lmeval,
                              fix=offline_fix(r))
    h = hashlib.sha256()
    code = [p for f in r.files for p in sorted(f.parent.glob("*.py"))]
    for p in sorted(set(r.files) | set(files) | set(code)):
        h.update(str(p).encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]
