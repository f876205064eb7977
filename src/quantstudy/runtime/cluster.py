"""Run a study's stages as Ray tasks: a DAG, each stage as soon as the models it reads exist.

Ray does the scheduling, placement, retries and transport; this module only decides what is
ready and writes what comes back. The driver keeps the study lock and the SQLite store and is
its only writer: a task gets a `Job` (plain data) and streams its records back (a Ray streaming
generator), and the driver commits each record as it arrives, as the in-process executor does.
Units of work: one task per stage and model (quantize: per variant; measure: per (parent, variant)
pair; fidelity: per variant), except evaluate: one task per bundle of a model's items (a task entry,
or a contiguous part of its prompt-sorted items: cluster_plan.evaluate_parts), its items streamed
back batch by batch; when a model's last bundle is in, the driver aggregates each cut task from
the stored items.
Ordering rules that keep the numbers honest:
  - measure tasks run one at a time, when no other task is running: a speed figure taken beside
    another job measures the contention (pin them to one node type with `cluster.measure.resources`);
  - fidelity tasks of the same parent run one after another, so the parent's pass is computed once
    and read from the shared cache by the others.
A failed stage fails only what depends on it; the run ends non-zero naming every failure.
"""

from __future__ import annotations

import socket
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

from quantstudy.errors import QuantStudyError
from quantstudy.records import ItemBatch, MadeModel, Metric, Metrics, Note, Provenance, Record
from quantstudy.runtime.cluster_plan import MAKE, alive, check_resources, evaluate_parts, slots
from quantstudy.runtime.faults import failpoint


def connect(address: str) -> Any:
    """Attach to the cluster at `address` ("auto", "HOST:PORT", "ray://..."). Never a bare
    `ray.init()`: it would silently attach to whatever cluster runs on this machine."""
    try:
        import ray
    except ImportError:
        raise QuantStudyError("--ray-address needs Ray, which is not installed", value=address,
                              fix="pip install 'quantstudy[cluster]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise QuantStudyError(f"could not connect to the Ray cluster at {address} ({str(e)[:200]})",
                                  field="--ray-address", value=address,
                                  fix="start one (`ray start --head`), or pass its address (HOST:PORT or ray://...)") from None
    return ray


def _worker(job: Any, versions: dict[str, str], num_cpus: float, log: str) -> Iterator[Record]:
    """Runs on a Ray worker: check the libraries match the driver's, size torch's threads to the
    task's CPUs, send the libraries' output to the stage's log file, and stream the stage's records."""
    from quantstudy.runtime import environment
    from quantstudy.runtime.logs import Output
    from quantstudy.runtime.modeldir import weights_hash
    from quantstudy.study import stage

    mine = environment.versions()
    diff = {k: (versions.get(k), mine.get(k)) for k in set(versions) | set(mine) if versions.get(k) != mine.get(k)}
    if diff:
        raise QuantStudyError(f"worker {socket.gethostname()} has other library versions than the driver: " +
                              ", ".join(f"{k} {a} (driver) vs {b} (worker)" for k, (a, b) in sorted(diff.items())),
                              fix="install the driver's versions on every node (same image or lock file)")
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))  # Ray sets OMP_NUM_THREADS only for whole CPUs
    if job.stage in ("evaluate", "measure", "fidelity") and job.model and job.model.weights_hash:
        if weights_hash(Path(job.model.path)) != job.model.weights_hash:  # the shared copy is the stored one
            raise QuantStudyError(f"model {job.model.name} at {job.model.path} does not have the weights the "
                                  "store recorded", fix="check that cluster.model_dir is the same folder on every node")
    import ray

    # which node and accelerators Ray gave this task (hostnames can repeat; GPU ids: CUDA_VISIBLE_DEVICES)
    place = {"ray_node_id": ray.get_runtime_context().get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}
    yield Provenance(socket.gethostname(), {**environment.hardware(), **place}, mine)
    with Output(verbose=False).capture(Path(log)):
        yield from stage(job.stage).run(job)


def check_shared(ray: Any, folder: Path) -> None:
    """A worker writes a file into the shared model folder; the driver must read the same bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    probe, token = folder / f".quantstudy-probe-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex

    def write(path: str, text: str) -> str:
        Path(path).write_text(text)
        return socket.gethostname()

    try:
        node = ray.get(ray.remote(num_cpus=0)(write).remote(str(probe), token), timeout=120)
        if not probe.is_file() or probe.read_text() != token:
            raise QuantStudyError(f"a worker on {node} wrote into {folder}, but the driver cannot read it there",
                                  field="cluster.model_dir", value=str(folder),
                                  fix="set cluster.model_dir to a folder mounted at the same path on every node")
    except ray.exceptions.GetTimeoutError:
        raise QuantStudyError("no Ray worker took a task within 120 s", field="--ray-address",
                              fix="check the cluster has CPUs free (`ray status`)") from None
    finally:
        probe.unlink(missing_ok=True)


def execute_ray(ctx: Any, steps: list[Any], wanted: Callable[[Any], bool], address: str,
                on_start: Callable[[Any], None], on_done: Callable[[Any, str | None, dict], None]) -> None:
    """Run the wanted, not yet done steps on the cluster at `address` (see the module docstring)."""
    from quantstudy.config import ClusterConfig
    from quantstudy.runtime import environment
    from quantstudy.study import is_done, job_for

    ray = connect(address)
    ccfg = ctx.cfg.cluster or ClusterConfig()
    shared = Path(ccfg.model_dir).resolve() if ccfg.model_dir else ctx.study_dir
    check_shared(ray, shared / "models")
    versions = environment.versions()
    todo = [s for s in steps if wanted(s) and not is_done(ctx, s)]
    nodes = alive(ray)
    check_resources(nodes, ccfg, {s.stage for s in todo})
    n_eval = sum(s.stage == "evaluate" for s in todo)
    parts = evaluate_parts(ctx.cfg, ctx.data_dir, n_eval, slots(nodes, ccfg.evaluate)) if n_eval else []
    maker = {s.model: s for s in steps if s.stage in MAKE}
    running: dict[Any, Any] = {}  # streaming generator -> step
    failed: dict[str, str] = {}  # step label -> why
    t0: dict[int, float] = {}  # id(step) -> start
    made: dict[int, str] = {}  # id(step) -> path of the model it made
    where: dict[int, dict] = {}  # id(step) -> node, hardware, versions it ran with
    shares: dict[int, int] = {}  # id(step) -> its tasks still running
    cut: dict[Any, bool] = {}  # streaming generator -> it scores a part of a task (evaluate_parts)
    spent: dict[int, dict[str, list[Metric]]] = {}  # id(step) -> time.eval.<task> -> the parts' times

    def label(s: Any) -> str:
        return f"{s.stage} {s.model}"

    def reads(s: Any) -> list[str]:
        return s.parents if s.stage in MAKE else [s.model, *s.parents]

    def blocked(s: Any) -> str | None:
        return next((m for m in reads(s) if m in maker and label(maker[m]) in failed), None)

    def ready(s: Any) -> bool:
        pending = [id(o) for o in todo] + [id(o) for o in running.values()]
        if any(m in maker and id(maker[m]) in pending for m in reads(s)):
            return False
        if s.stage == "measure":  # alone on the cluster, after everything else
            return not running and all(o.stage == "measure" for o in todo)
        if s.stage == "fidelity":
            return not any(o.stage == "fidelity" and o.parents == s.parents for o in running.values())
        return not any(o.stage == "measure" for o in running.values())

    ndone, total = 0, len(todo)

    def status() -> None:  # the whole study at a glance: done, running (and where), pending
        now = {f"{o.stage} {o.model}" + (f" @{where[id(o)]['node']}" if id(o) in where else "")
               for o in running.values()}
        ctx.console.print(f"[dim]cluster: {ndone}/{total} done, running: {', '.join(sorted(now)) or '-'}; "
                          f"{len(todo)} pending, {len(failed)} failed[/]", highlight=False, soft_wrap=True)

    while todo or running:
        for s in [s for s in todo if blocked(s)]:
            todo.remove(s)
            failed[label(s)] = f"not run: {blocked(s)} failed"
        for s in [s for s in todo if ready(s)]:
            todo.remove(s)
            job = job_for(ctx, s)
            if s.stage in MAKE:
                job.out_dir = shared / "models" if s.stage == "resolve" else shared / "models" / s.model
            job = replace(job, study_dir=shared)
            res = getattr(ccfg, s.stage)
            opts = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus, "resources": res.resources or None,
                    "max_retries": ccfg.max_retries, "num_returns": "streaming"}
            if res.memory:
                opts["memory"] = res.memory
            on_start(s)
            t0[id(s)] = time.perf_counter()
            # evaluate: one task per bundle of items (evaluate_parts), its items streamed back batch by batch
            mine = parts if s.stage == "evaluate" else [None]
            shares[id(s)] = len(mine)
            for part in mine:
                one = replace(job, tasks=[part[0]], shard=part[1]) if part else job
                log = ctx.study_dir / "logs" / f"{s.stage}-{s.model}{_suffix(part)}.log"
                gen = ray.remote(_worker).options(**opts).remote(one, versions, res.num_cpus, str(log))
                running[gen], cut[gen] = s, bool(part and part[1])
        if not running:
            if todo:  # nothing can start: a resource no node has would hang here
                raise QuantStudyError(f"no stage can start ({', '.join(label(s) for s in todo)})",
                                      fix="check the cluster's resources against the study's `cluster:` section")
            break
        ready_gens, _ = ray.wait(list(running), num_returns=1, timeout=600)
        if not ready_gens:
            waiting = [label(s) for s in running.values()]
            ctx.console.print(f"[dim]waiting on the cluster: {', '.join(waiting)} (see `ray status` if no node "
                              "has the resources they ask for)[/]", highlight=False, soft_wrap=True)
            continue
        for gen in ready_gens:
            s = running[gen]
            try:
                ref = next(gen)
                rec = ray.get(ref)
            except StopIteration:
                del running[gen]
                shares[id(s)] -= 1
                if shares[id(s)] == 0 and label(s) not in failed:  # its last task ended
                    if s.stage == "evaluate" and any(p[1] for p in parts):  # the cut tasks' figures, from
                        aggregate(ctx, s, [p[0] for p in parts if p[1]], spent.pop(id(s), {}))  # all their items
                    s.seconds = time.perf_counter() - t0[id(s)]
                    on_done(s, made.get(id(s)), where.get(id(s), {}))
                    ndone += 1
                    status()
                continue
            except Exception as e:  # the stage raised, or Ray gave up on it: this stage fails, others go on
                del running[gen]
                shares[id(s)] -= 1
                cause = getattr(e, "cause", None) or e
                failed[label(s)] = f"{type(cause).__name__}: {str(cause).splitlines()[0][:300] if str(cause) else ''}"
                ctx.console.print(f"[red]{label(s)} failed[/]: {failed[label(s)]}", highlight=False, soft_wrap=True)
                continue
            if isinstance(rec, Note):
                ctx.console.print(rec.text, highlight=False, soft_wrap=True)
            elif isinstance(rec, Provenance):
                where[id(s)] = {"node": rec.node, "hardware": rec.hardware, "versions": rec.versions}
            elif isinstance(rec, Metrics) and cut[gen]:  # a part's scoring time: summed when the task is whole
                for m in rec.metrics:
                    spent.setdefault(id(s), {}).setdefault(m.name, []).append(m)
            else:
                ctx.store.write(rec, s.key)
                if isinstance(rec, ItemBatch):
                    failpoint("driver-items")  # tests kill the driver here: this batch is stored, later ones not
                if isinstance(rec, MadeModel):
                    made[id(s)] = rec.model.path
    if failed:
        raise QuantStudyError("stages failed on the cluster: " + "; ".join(f"{k} ({v})" for k, v in failed.items()),
                              fix="read each stage's log under logs/, fix the cause and run again (done stages are kept)")


def _suffix(part: Any) -> str:
    if part is None:
        return ""
    return f"-{part[0]}" + (f"-{part[1][0] + 1}of{part[1][1]}" if part[1] else "")


def aggregate(ctx: Any, step: Any, keys: list[str], times: dict[str, list[Metric]]) -> None:
    """A task cut into parts: once every part is stored, the evaluate stage runs here over the stored
    items (all fresh, so no model is loaded) and yields the task's figures, which the driver writes.
    The task's scoring time is the sum of its parts' (the work, as an in-process run would time it;
    the parts ran on several workers at once, so it is not the wall time)."""
    from quantstudy.study import job_for, stage

    job = replace(job_for(ctx, step), tasks=sorted(set(keys)))
    for rec in stage(job.stage).run(job):
        if isinstance(rec, (Metrics, ItemBatch)):  # ItemBatch only if a part's items went missing
            ctx.store.write(rec, step.key)
    summed = [Metric(name, sum(m.value for m in ms),
                     {"items_scored": sum(m.info.get("items_scored", 0) for m in ms), "items": ms[0].info.get("items"),
                      "parts": len(ms), "what": "sum of the parts' scoring times (they ran in parallel)"})
              for name, ms in times.items()]
    if summed:
        ctx.store.write(Metrics(step.model, summed), step.key)
