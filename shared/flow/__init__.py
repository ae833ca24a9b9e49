"""Pure tensor math for rectified-flow RL: sigma schedules and the SDE/ODE sampling step with log-probs.

Imports only torch and the standard library (never ``services`` or ``trainer``).
Convention: ``x_t = (1 - t) x0 + t eps``, sigma = t goes 1 -> 0, ``v = eps - x0``, ``dt < 0``.
"""

from shared.flow.schedule import (
    exp_time_shift,
    flow_sigmas,
    resolution_shift_mu,
    progressive_window,
    select_sde_steps,
    time_shift,
)
from shared.flow.sde import DYNAMICS, StepOutput, gaussian_log_prob, reduce_over_latent, sde_step

__all__ = [
    "DYNAMICS",
    "StepOutput",
    "sde_step",
    "gaussian_log_prob",
    "reduce_over_latent",
    "time_shift",
    "exp_time_shift",
    "resolution_shift_mu",
    "flow_sigmas",
    "progressive_window",
    "select_sde_steps",
]
