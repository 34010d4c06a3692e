"""Shared fixtures: one local Ray instance per test process (2 CPUs, as on the demo machine).

A process does not start a second one: Ray Train's internals find "the" cluster of the process, and
a shutdown and restart in between confuses them. `make test` runs two processes (pytest-xdist),
each with its own instance.
"""

import logging

import pytest
import ray

# `make test` runs whole modules in two processes (pytest-xdist, --dist loadfile), handed out in
# collection order: the longest go first, so that neither process is left with one at the end.
LONGEST_FIRST = ("test_cluster.py", "test_sweep.py", "test_workflow.py", "training/test_training.py",
                 "test_user_shards.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        path = item.path.as_posix()
        return next((i for i, name in enumerate(LONGEST_FIRST) if path.endswith("/" + name)), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: the order within each module, and of the rest, is kept


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
