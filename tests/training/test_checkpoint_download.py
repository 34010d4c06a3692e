"""Resuming from a checkpoint in S3 when a node runs several workers: one download per node, which
no rank rewrites while another reads it (a real S3-protocol server, moto, on 127.0.0.1)."""

import os
import threading
import time
from pathlib import Path

import pyarrow.fs
import pytest
import ray.train

from pipeline.localservices import BUCKET, REGION, LocalServices
from pipeline.sample_client import free_port
from pipeline.training.checkpoint import checkpoint_directory

FILES = {"progress.json": b'{"step": 3}', "deepspeed/mp_rank_00_model_states.pt": os.urandom(3 << 20),
         "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt": os.urandom(1 << 20)}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    stack = LocalServices(str(tmp_path_factory.mktemp("s3")), 0, free_port(), 0, "", pids={})
    try:
        stack.start_s3()
        yield stack
    finally:
        stack.down()


@pytest.fixture(scope="module")
def s3_checkpoint(s3, tmp_path_factory) -> ray.train.Checkpoint:
    local = tmp_path_factory.mktemp("written")
    for name, data in FILES.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(data)
    fs = pyarrow.fs.S3FileSystem(access_key=s3.access_key, secret_key=s3.secret_key, region=REGION,
                                 endpoint_override=s3.s3_endpoint.removeprefix("http://"), scheme="http")
    path = f"{BUCKET}/ray-train/run/checkpoint_000000"
    pyarrow.fs.copy_files(str(local), path, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)
    return ray.train.Checkpoint(path, filesystem=fs)


def test_the_ranks_of_a_node_read_one_download_that_no_later_rank_rewrites(s3_checkpoint):
    """Three ranks on two nodes: node 0's second rank comes a while after its first. Every rank reads
    the whole checkpoint intact; a node's ranks share one copy, written once (its files keep their
    modification times while the late rank reads them); the copies are gone afterwards."""
    ranks = [(0, 0), (0, 1), (1, 0)]  # (node rank, local rank)
    barrier = threading.Barrier(len(ranks), timeout=120)
    seen, errors = {}, []

    def rank(node: int, local: int) -> None:
        try:
            if (node, local) == (0, 1):
                time.sleep(1.0)
            with checkpoint_directory(s3_checkpoint, node, local, barrier.wait) as directory:
                stamps = {name: (Path(directory) / name).stat().st_mtime_ns for name in FILES}
                read = {name: (Path(directory) / name).read_bytes() for name in FILES}
                seen[node, local] = directory, stamps, read
        except BaseException as e:  # noqa: BLE001 - reported by the test's thread below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=r) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors
    for node, local in ranks:
        assert seen[node, local][2] == FILES, f"rank {local} of node {node} read a damaged checkpoint"
    assert seen[0, 0][0] == seen[0, 1][0] != seen[1, 0][0], "one copy per node"
    assert seen[0, 0][1] == seen[0, 1][1], "the late rank's arrival rewrote the node's copy"
    for directory, _, _ in seen.values():
        assert not Path(directory).exists(), f"{directory} left behind"


def test_a_checkpoint_on_a_local_file_system_is_read_in_place(tmp_path):
    (tmp_path / "progress.json").write_text("{}")
    with checkpoint_directory(ray.train.Checkpoint.from_directory(str(tmp_path)), 0, 0, lambda: None) as directory:
        assert directory == str(tmp_path)
    assert (tmp_path / "progress.json").exists()
