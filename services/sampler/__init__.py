"""The sampler service: a Celery worker on the ``sample`` queue (plus a small FastAPI app for
health, readiness and metrics) that rolls out :class:`~shared.protocol.SampleJob`s with
:mod:`shared.sampling` and hands the trajectories on to the reward queue."""
