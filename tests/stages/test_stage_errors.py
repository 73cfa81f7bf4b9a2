"""A stage that fails inside a Ray actor shows the actor's error in its Prefect state message (what the UI shows beside
the failed task run), not Ray's remote traceback; the task's log keeps that traceback.

Run alone:  .venv/bin/pytest tests/stages/test_stage_errors.py
"""

import pytest


@pytest.fixture(scope="module")
def failing_actor(ray_session):
    import ray

    @ray.remote(num_cpus=0)
    class Trainer:
        def train(self):
            raise ValueError("policy.micro_batch_size: 48 does not divide policy.mini_batch_size 64")

    return Trainer.remote()


def test_a_failed_stage_states_the_actors_error(failing_actor, prefect_backend):
    import ray
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    from stages.common import stage_errors

    def update(iteration: int) -> dict:
        return ray.get(failing_actor.train.remote())

    plain = task(name="update", task_run_name="update-{iteration}", cache_policy=NO_CACHE)(update)
    wrapped = task(name="update", task_run_name="update-{iteration}", cache_policy=NO_CACHE)(stage_errors(update))

    @flow
    def both():
        return plain(3, return_state=True), wrapped(3, return_state=True)

    without, with_ = both()
    # What Prefect makes of Ray's error: the remote traceback, behind the actor's name and pid.
    assert without.message.startswith("Task run encountered an exception RayTaskError(ValueError): ")
    assert "ray::Trainer.train()" in without.message
    assert with_.message == ("Task run encountered an exception ValueError: policy.micro_batch_size: 48 does not "
                             "divide policy.mini_batch_size 64")
    with pytest.raises(ValueError) as raised:
        with_.result()
    assert "ray::Trainer.train()" in str(raised.value.__cause__)  # the remote traceback stays in the chain
