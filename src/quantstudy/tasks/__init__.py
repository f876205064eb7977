"""Benchmark tasks: one definition per `config.TaskName`, lm-eval 0.4.13 semantics.

`TASKS` maps each TaskName to its (stateless) definition; `get_task` also accepts a string and
turns an unknown name into a QuantStudyError that lists the known ones.
"""

from __future__ import annotations

import difflib

from quantstudy.config import TaskName
from quantstudy.errors import QuantStudyError
from quantstudy.tasks.arc import ArcTask
from quantstudy.tasks.base import Item, Kind, Sampler, Task, build_context, continuation_prefix, pick_fewshot
from quantstudy.tasks.gsm8k import GSM8KTask
from quantstudy.tasks.hellaswag import HellaSwagTask
from quantstudy.tasks.mmlu import MMLUTask
from quantstudy.tasks.openmath import OpenMathTask
from quantstudy.tasks.squad import SquadV2Task
from quantstudy.tasks.wikitext import WikiTextTask

TASKS: dict[TaskName, Task] = {
    TaskName.arc_easy: ArcTask(TaskName.arc_easy, "ARC-Easy"),
    TaskName.arc_challenge: ArcTask(TaskName.arc_challenge, "ARC-Challenge"),
    TaskName.hellaswag: HellaSwagTask(),
    TaskName.mmlu: MMLUTask(),
    TaskName.squad_v2: SquadV2Task(),
    TaskName.gsm8k: GSM8KTask(),
    TaskName.openmathinstruct2: OpenMathTask(),
    TaskName.wikitext: WikiTextTask(),
}
assert set(TASKS) == set(TaskName), "every TaskName needs a task definition"


def get_task(name: TaskName | str) -> Task:
    try:
        return TASKS[TaskName(name)]
    except ValueError:
        known = [t.value for t in TaskName]
        close = difflib.get_close_matches(str(name), known, n=1)
        raise QuantStudyError("unknown task", field="evaluate.tasks", value=str(name),
                              fix=(f"did you mean '{close[0]}'? " if close else "") + f"known tasks: {', '.join(known)}"
                              ) from None


__all__ = ["TASKS", "Item", "Kind", "Sampler", "Task", "build_context", "continuation_prefix", "get_task",
           "pick_fewshot"]
