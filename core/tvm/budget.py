"""A MetaSchedule task scheduler that keeps to a time budget (``tvm.tune_budget``).

MetaSchedule's schedulers stop on a trial count only, and a round of one task (generate
candidates with the evolutionary search, build them, measure them) can take minutes on a small
machine, so a budget checked between ``tune_tasks`` calls is overrun by whole tasks.
:class:`BudgetScheduler` is asked for the next task before every round: it visits the tasks
round-robin in the order given (the largest first), and ends tuning when the budget is spent or
when the next round, at the longest round measured so far, would not end within it. A budget is
therefore overrun by at most the first round, plus measuring what was already built; rounds are
kept short in budgeted runs (:data:`TRIALS_PER_ROUND` candidates). What was measured before the
end is in the database, and tasks without a record keep the default schedule.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from tvm.s_tir.meta_schedule import _ffi_api
from tvm.s_tir.meta_schedule.task_scheduler import PyTaskScheduler
from tvm.ir.utils import derived_object

#: candidates generated, built and measured per round of a task in a budgeted run
TRIALS_PER_ROUND = 16

#: monotonic seconds; the tests replace it with a clock that ticks per round
clock = time.monotonic


def search_strategy() -> Any:
    """MetaSchedule's evolutionary search, sized for short rounds: a population of 128 evolved
    for 2 generations (TVM's defaults, 512 and 4, take minutes per round on 2 busy cores)."""
    from tvm.s_tir.meta_schedule.search_strategy import EvolutionarySearch

    return EvolutionarySearch(population_size=128, init_min_unmeasured=32, genetic_num_iters=2)


@derived_object
class BudgetScheduler(PyTaskScheduler):
    """Round-robin over ``order`` (task indices), ending at ``deadline`` (a :data:`clock` time).

    :ivar rounds: rounds started (each: one task's candidates generated, built and sent to measure)
    :ivar stopped_by_budget: whether the budget, rather than the trial cap, ended tuning
    """

    def __init__(self, order: Sequence[int], deadline: float) -> None:
        super().__init__()
        self.order = list(order)
        self.deadline = deadline
        self.rounds = 0
        self.stopped_by_budget = False
        self._position = -1
        self._round_started: float | None = None
        self._longest = 0.0

    def next_task_id(self) -> int:
        outer = self._outer()
        tasks = outer.tasks_
        for task_id in range(len(tasks)):  # as TVM's round-robin: finished measurements are committed
            _ffi_api.TaskSchedulerTouchTask(outer, task_id)
        now = clock()
        if self._round_started is not None:
            self._longest = max(self._longest, now - self._round_started)
        if now >= self.deadline or now + self._longest > self.deadline:
            self.stopped_by_budget = True
            return -1  # TVM joins the measurements still running, and commits them
        for _ in range(len(self.order)):
            self._position = (self._position + 1) % len(self.order)
            task_id = self.order[self._position]
            if not tasks[task_id].is_terminated:
                if tasks[task_id].runner_futures is not None:
                    self.join_running_task(task_id)
                self.rounds += 1
                self._round_started = clock()
                return task_id
        return -1
