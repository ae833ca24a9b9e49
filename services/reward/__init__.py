"""The reward service: rewards served over Open Inference Protocol v2 and Flow-Factory's
``/compute``, with server-side dynamic batching, an optional bearer token and ``/metrics``.

    flowrl serve reward --rewards brightness,toy_geneval --port 8000

Modules: :mod:`~services.reward.server` (app factory and routes), :mod:`~services.reward.v2`
and :mod:`~services.reward.flow_factory` (the two wire protocols),
:mod:`~services.reward.batching` (dynamic batching), :mod:`~services.reward.state` (model
loading), :mod:`~services.reward.images`, :mod:`~services.reward.metrics`,
:mod:`~services.reward.settings`, :mod:`~services.reward.cli`.
"""

from services.reward.server import create_app
from services.reward.settings import RewardServerSettings, ServedReward

__all__ = ["create_app", "RewardServerSettings", "ServedReward"]
