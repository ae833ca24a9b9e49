"""The learning-rate schedule's clock: optimizer steps, or whichever of the step and wall-clock
budgets runs out first.

``diffusers.optimization.get_scheduler`` builds a ``LambdaLR`` whose multiplier is a function
``f(step)`` reaching its end (cosine or linear at 0) at ``total`` steps. With a wall-clock budget
(``train.max_train_seconds``) training may stop long before ``total`` on a slow machine, with the
rate still high. :func:`follow_budget` makes the schedule read ``f(max(step, budget_step))``, where
``budget_step = fraction * total`` and ``fraction`` is the share of the time budget spent, set
by the loop once per epoch (:func:`set_budget_fraction`) from a value every rank agrees on (the
slowest rank's clock), so all ranks keep the same rate. The schedule then ends when the first of
the two budgets ends: on a machine fast enough to finish ``max_epochs`` in time it is the step
schedule; on one half as fast it is the same curve over the time budget.
"""

from __future__ import annotations

BUDGET_FRACTION = "budget_fraction"  # LambdaLR attribute: the share of the time budget spent (in its state_dict)


def budget_step(fraction: float, total_steps: int) -> int:
    """The optimizer step at which a schedule of ``total_steps`` steps stands after ``fraction``
    (clipped to ``[0, 1]``) of the time budget: ``floor(fraction * total_steps)``."""
    return int(min(max(fraction, 0.0), 1.0) * total_steps)


def follow_budget(schedule, total_steps: int, warmup_steps: int = 0):
    """Wrap ``schedule`` (a ``torch.optim.lr_scheduler.LambdaLR`` of ``total_steps`` steps, one
    lambda per param group) in place so each lambda is evaluated at
    ``max(step, budget_step(schedule.budget_fraction, total_steps))``; returns it. The first
    ``warmup_steps`` optimizer steps are read at ``step`` itself: a warm-up is counted in steps,
    however fast the clock runs. ``budget_fraction`` starts at 0 (the schedule unchanged until
    :func:`set_budget_fraction`); the state keeps the fraction, so a resumed run whose
    ``max_epochs`` changed reads it against its own ``total_steps``."""
    setattr(schedule, BUDGET_FRACTION, 0.0)
    schedule.lr_lambdas = [_at_budget(f, schedule, total_steps, warmup_steps) for f in schedule.lr_lambdas]
    return schedule


def _at_budget(f, schedule, total_steps: int, warmup_steps: int):
    def at(step: int) -> float:
        if step < warmup_steps:
            return f(step)
        return f(max(step, budget_step(getattr(schedule, BUDGET_FRACTION), total_steps)))
    return at


def set_budget_fraction(schedule, fraction: float) -> None:
    """Tell a :func:`follow_budget` schedule that ``fraction`` of the time budget is spent; the
    next optimizer step's rate is read at ``max(step, budget_step(fraction, total_steps))``, with
    the ``total_steps`` given to :func:`follow_budget`."""
    setattr(schedule, BUDGET_FRACTION, float(fraction))
