"""A multi-node Ray cluster on one machine, started the way a real one is (`ray start`), for trying
the cluster path before Kubernetes and for the tests.

    python -m pipeline.localcluster up [--dir DIR] [--workers 3] [--worker-cpus 1]
    python -m pipeline.localcluster status|down [--dir DIR]

`up` starts a head with no CPUs for work (KubeRay's default, so every task and actor that needs a
CPU runs on a worker node) and worker nodes, each its own raylet with its own `--temp-dir` and
dashboard-agent port (nodes on one machine otherwise share one runtime-env directory and delete each
other's job working directories). Token authentication is on: a fresh token in `DIR/auth_token`,
given to every node. `up` prints what a client needs:

    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=DIR/auth_token
    ray job submit --address http://127.0.0.1:PORT --working-dir . -- python jobs/train_ldm.py ...

`DIR/cluster.json` records the addresses; `down` stops every process of this cluster by pid (never
`ray stop`, which would stop every Ray process on the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.sample_client import free_port

DEFAULT_DIR = Path("/tmp/ldm-local-cluster")
STATE_FILE = "cluster.json"
# Per node: the shared-memory object store (the machine's /dev/shm holds all of them).
OBJECT_STORE_BYTES = 1 << 30
# Ray puts Unix sockets at <root>/<node>/session_<date>_<pid>/sockets/dash_<module> (at most 107 bytes).
MAX_ROOT_CHARS = 40


@dataclass
class LocalCluster:
    root: str
    gcs_port: int
    dashboard_port: int
    workers: list[str] = field(default_factory=list)
    """The worker nodes' names; each node's temp dir is root/<name>."""
    node_env: dict = field(default_factory=dict)
    """Extra environment of every node (credentials, as a Secret gives pods); never saved."""

    @property
    def token_path(self) -> Path:
        return Path(self.root) / "auth_token"

    @property
    def address(self) -> str:
        """The Job API (dashboard) address, for `ray job submit --address` and JobSubmissionClient."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def client_env(self, **extra: str) -> dict:
        """The environment a client (or a node) needs: the token, and this Python's bin on PATH (the
        job's `python` is the head's)."""
        env = {**os.environ, **self.node_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path),
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **extra}
        env.pop("RAY_ADDRESS", None)
        env.pop("RAY_AUTH_TOKEN", None)
        return env

    def auth_headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token_path.read_text().strip()}"}

    # ---- starting and stopping ----

    @classmethod
    def up(cls, root: str | Path = DEFAULT_DIR, workers: int = 3, worker_cpus: float = 1,
           head_cpus: float = 0, node_env: dict | None = None) -> "LocalCluster":
        """Start a head and `workers` worker nodes under `root` (which must not hold a running
        cluster); `node_env` is added to every node's environment (e.g. object-store credentials)."""
        from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

        root = Path(root).resolve()
        if len(str(root)) > MAX_ROOT_CHARS:
            raise ValueError(f"--dir {root} is too long ({len(str(root))} characters, at most {MAX_ROOT_CHARS}): "
                             f"Ray's Unix sockets live under it and a socket path has at most 107 bytes")
        if (root / STATE_FILE).exists() and cls.load(root).pids():
            raise RuntimeError(f"a local cluster is already running in {root}; stop it with "
                               f"`python -m pipeline.localcluster down --dir {root}`")
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        cluster = cls(str(root), free_port(), free_port(), node_env=dict(node_env or {}))
        cluster.token_path.write_text(generate_new_authentication_token())
        cluster.token_path.chmod(0o600)
        try:
            cluster._start_node("head", ["--head", f"--port={cluster.gcs_port}", f"--num-cpus={head_cpus:g}",
                                         "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                         f"--dashboard-port={cluster.dashboard_port}",
                                         f"--ray-client-server-port={free_port()}"])
            for _ in range(workers):
                cluster.add_worker(worker_cpus, wait=False)
            cluster.save()
            cluster.wait_for_nodes(1 + workers)
        except BaseException:
            cluster.down()  # nothing half-started is left running
            raise
        return cluster

    def _start_node(self, name: str, args: list[str]) -> None:
        temp = Path(self.root) / name
        temp.mkdir(parents=True, exist_ok=True)
        cmd = [str(Path(sys.executable).parent / "ray"), "start", f"--temp-dir={temp}",
               f"--dashboard-agent-listen-port={free_port()}", f"--object-store-memory={OBJECT_STORE_BYTES}",
               "--disable-usage-stats", *args]
        with open(temp / "ray-start.log", "w") as log:
            proc = subprocess.run(cmd, env=self.client_env(), stdout=log, stderr=subprocess.STDOUT, timeout=300)
        if proc.returncode:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}); see {temp / 'ray-start.log'}:\n"
                               + (temp / "ray-start.log").read_text()[-3000:])

    def add_worker(self, cpus: float = 1, wait: bool = True) -> str:
        """Start one more worker node (a node the autoscaler would add); returns its name."""
        name = f"worker-{len(self.workers) + 1}"
        alive = len(self.alive_nodes()) if wait else 0
        self._start_node(name, [f"--address={self.gcs_address}", f"--num-cpus={cpus:g}"])
        self.workers.append(name)
        self.save()
        if wait:
            self.wait_for_nodes(alive + 1)
        return name

    def kill_node(self, name: str) -> None:
        """SIGKILL every process of a worker node, its raylet first, as a spot reclaim takes the
        machine away."""
        mine = [(pid, cmd) for pid, cmd in self._processes() if f"{Path(self.root) / name}/" in cmd]
        if not any("raylet/raylet" in cmd for _, cmd in mine):
            raise RuntimeError(f"no raylet of node {name} is running")
        for pid, _ in sorted(mine, key=lambda item: "raylet/raylet" not in item[1].split(" > ")[-1]):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def down(self) -> None:
        """Stop every process of this cluster: SIGTERM, then SIGKILL what is left after 10 s. The
        processes are collected before the first signal: an agent whose raylet ended first is no
        longer its child, and would be left running."""
        import psutil

        procs = {}
        for pid in self.pids():
            try:
                procs[pid] = psutil.Process(pid)
            except psutil.NoSuchProcess:
                pass

        def alive() -> list:
            for pid in self.pids():  # anything started meanwhile, too
                if pid not in procs:
                    try:
                        procs[pid] = psutil.Process(pid)
                    except psutil.NoSuchProcess:
                        pass
            return [p for p in procs.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for proc in alive():
                try:
                    proc.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
            deadline = time.monotonic() + wait
            while alive() and time.monotonic() < deadline:
                time.sleep(0.2)
        if alive():
            raise RuntimeError(f"processes of the local cluster in {self.root} survived SIGKILL: "
                               f"{[p.pid for p in alive()]}")

    # ---- reading its state ----

    def _processes(self) -> list[tuple[int, str]]:
        """(pid, command line) of every process started for this cluster: their command lines name
        the nodes' temp dirs (workers name their session directory), and their children, whose
        titles Ray rewrites (`ray::DashboardAgent`, `ray::RuntimeEnvAgent`, ...)."""
        import psutil

        marker = f"{self.root}/"
        found: dict[int, str] = {}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if marker in cmd and proc.info["pid"] != os.getpid():
                found[proc.info["pid"]] = cmd
                try:
                    for child in proc.children(recursive=True):
                        found.setdefault(child.pid, f"{cmd} > {' '.join(child.cmdline())}")
                except psutil.Error:  # it or a child ended meanwhile
                    pass
        found.pop(os.getpid(), None)
        return list(found.items())

    def pids(self) -> list[int]:
        return [pid for pid, _ in self._processes()]

    def node_name(self, node_id: str) -> str | None:
        """Which of our nodes (head, worker-N) a Ray node id is, from its sockets' paths."""
        for node in self._nodes():
            if node["NodeID"] == node_id:
                socket_path = node.get("RayletSocketName", "")
                relative = Path(socket_path).relative_to(self.root) if socket_path.startswith(self.root) else None
                return relative.parts[0] if relative else None
        return None

    def _nodes(self) -> list[dict]:
        import urllib.request

        request = urllib.request.Request(f"{self.address}/nodes?view=summary", headers=self.auth_headers())
        with urllib.request.urlopen(request, timeout=30) as resp:
            summary = json.loads(resp.read())["data"]["summary"]
        return [{"NodeID": n["raylet"]["nodeId"], "RayletSocketName": n["raylet"].get("rayletSocketName", "")}
                for n in summary]

    def alive_nodes(self) -> list[dict]:
        """The nodes the GCS holds alive (the state API), not the dashboard's cached view."""
        import urllib.request

        try:
            request = urllib.request.Request(f"{self.address}/api/v0/nodes?limit=1000", headers=self.auth_headers())
            with urllib.request.urlopen(request, timeout=30) as resp:
                nodes = json.loads(resp.read())["data"]["result"]["result"]
        except (OSError, ValueError, KeyError):
            return []
        return [n for n in nodes if n["state"] == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.alive_nodes()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the local cluster in {self.root} has {len(self.alive_nodes())} of {count} nodes "
                                   f"alive after {timeout_s:.0f} s; see its ray-start.log files")
            time.sleep(1)

    def save(self) -> None:
        state = {k: v for k, v in asdict(self).items() if k != "node_env"}
        (Path(self.root) / STATE_FILE).write_text(json.dumps(state, indent=2))

    @classmethod
    def load(cls, root: str | Path = DEFAULT_DIR) -> "LocalCluster":
        path = Path(root).resolve() / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no local cluster in {Path(root).resolve()} (no {STATE_FILE})")
        return cls(**json.loads(path.read_text()))

    def instructions(self) -> str:
        return (f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={self.token_path}\n"
                f"ray job submit --address {self.address} --working-dir . -- "
                f"python jobs/train_ldm.py --config jobs/configs/local-cluster.yaml\n"
                f"dashboard: {self.address} (token: {self.token_path})\n"
                f"stop it:   python -m pipeline.localcluster down --dir {self.root}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--dir", default=str(DEFAULT_DIR), help=f"where the nodes live (default {DEFAULT_DIR})")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--worker-cpus", type=float, default=1)
    args = parser.parse_args(argv)
    if args.command == "up":
        cluster = LocalCluster.up(args.dir, args.workers, args.worker_cpus)
        print(f"a head (no CPUs) and {args.workers} worker nodes ({args.worker_cpus:g} CPU each) are up\n"
              + cluster.instructions())
    elif args.command == "down":
        LocalCluster.load(args.dir).down()
        print(f"stopped the local cluster in {Path(args.dir).resolve()}")
    else:
        cluster = LocalCluster.load(args.dir)
        print(json.dumps({"nodes_alive": len(cluster.alive_nodes()), "processes": len(cluster.pids()),
                          **{k: v for k, v in asdict(cluster).items() if k != "node_env"}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
