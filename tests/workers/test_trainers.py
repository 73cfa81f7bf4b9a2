"""Stage helpers: the threads each model takes when several compute at once."""


def test_threads_each_splits_a_models_threads_on_cpu_only(make_config):
    from workers.trainers import threads_each

    cpu = make_config()  # the quickstart: everything on CPU, policy.num_threads 2
    assert cpu.policy.num_threads == 2
    assert threads_each(cpu, cpu.policy, 1) is None  # alone: its own num_threads
    assert threads_each(cpu, cpu.policy, 2) == 1
    assert threads_each(cpu, cpu.critic, 3) == 1  # never below one
    wide = make_config("policy.num_threads=8")
    assert threads_each(wide, wide.policy, 2) == 4
    assert threads_each(wide, wide.policy, 3) == 2
    gpu = make_config("policy.num_gpus=1")
    assert threads_each(gpu, gpu.policy, 3) is None  # on GPUs the models do not share cores
