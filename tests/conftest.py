"""Shared fixtures: one local Ray instance for the whole session (2 CPUs, as on the demo machine).

Ray Train's internals find "the" local cluster by address, so two Ray instances on one machine
confuse them: every test that needs Ray shares this one.
"""

import json
import logging

import pytest
import ray


@pytest.fixture(scope="session")
def ray_session():
    raylet = None
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
        raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    yield
    ray.shutdown()
    if raylet:  # the instance this fixture started
        _kill_workers_left_by(raylet)


def _kill_workers_left_by(raylet: int) -> None:
    """Kill the instance's worker processes still alive after `ray.shutdown()` (found by the
    RAY_RAYLET_PID their raylet gave them). Ray 2.60's workers sometimes never exit after their core
    worker shut down: one `ray::TrainController` outlived a whole suite, holding ~0.9 GB."""
    import psutil

    for proc in psutil.process_iter():
        try:
            if proc.environ().get("RAY_RAYLET_PID") == str(raylet):
                proc.kill()
        except psutil.Error:  # ended meanwhile, or not ours to read
            pass


@pytest.fixture(scope="session")
def demo_run(ray_session, tmp_path_factory):
    """The whole workflow on test_workflow's tiny config, run once for the session: (cfg, the path of
    summary.json, the summary). test_workflow checks it; test_sweep sweeps on its workdir (its own
    experiment and model name), where the stages every trial shares are found in the cache."""
    from test_workflow import tiny_config

    from pipeline.sample_client import free_port  # the function: the fixture of that name is per test
    from pipeline.workflow import run_workflow

    cfg = tiny_config(tmp_path_factory.mktemp("workflow") / "work", free_port())
    summary_path = run_workflow(cfg)
    return cfg, summary_path, json.loads(summary_path.read_text())


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny ops on a shared 2-core box run 10-50x slower with spinning OpenMP threads; restored after."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(name="free_port")
def free_port_fixture() -> int:
    from pipeline.sample_client import free_port

    return free_port()
