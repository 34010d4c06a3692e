"""Shared fixtures: one local Ray instance for the whole session (2 CPUs, as on the demo machine).

Ray Train's internals find "the" local cluster by address, so two Ray instances on one machine
confuse them: every test that needs Ray shares this one.
"""

import logging

import pytest
import ray


@pytest.fixture(scope="session")
def ray_session():
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


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
