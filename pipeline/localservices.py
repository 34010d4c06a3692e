"""The production tracking stack on one machine, real servers on 127.0.0.1: PostgreSQL, an
S3-protocol endpoint (moto's server mode) and `mlflow server` on them with MLflow's basic-auth app,
as `infra/` deploys them on Kubernetes. For trying that path before a cluster, and for the tests.

    python -m pipeline.localservices up [--dir DIR]     # prints the environment a client needs
    python -m pipeline.localservices down [--dir DIR]

Needs Debian's `postgresql` package (initdb, pg_ctl; `.ci/run` installs it) and the dev extra
(`moto[server]`, `psycopg`, `mlflow[auth]`). Run as root, PostgreSQL runs as the `postgres` user,
its data directory under DIR (which that user must be able to enter: not under /root).

The S3 endpoint checks credentials (moto's IAM emulation): the access key the stack creates works,
any other is refused, as a real object store would.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.sample_client import free_port

DEFAULT_DIR = Path("/tmp/ldm-local-services")
STATE_FILE = "services.json"
BUCKET = "ldm"
REGION = "us-east-1"
# MLflow's basic-auth credential cache (seconds a checked password is trusted): without it every
# request pays a PBKDF2 check, a third of a core for the server while a job logs its steps.
AUTH_CACHE_TTL_S = 60
# moto answers this many requests without checking credentials: the stack's own set-up (an IAM
# user, its policy and access key), after which every request must be signed with that key.
SETUP_REQUESTS = 4
PG_BIN = Path("/usr/lib/postgresql/15/bin")



def _wait_http(url: str, what: str, proc: subprocess.Popen | None, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; see {log}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{what} did not answer at {url} within {timeout_s:.0f} s; see {log}")


def _pg_bin(name: str) -> str:
    path = PG_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"PostgreSQL's {name} was not found (install Debian's postgresql package)")
    return found


@dataclass
class LocalServices:
    root: str
    pg_port: int
    s3_port: int
    mlflow_port: int
    pg_password: str
    access_key: str = ""
    secret_key: str = ""
    mlflow_password: str = ""
    flask_secret: str = ""
    pids: dict | None = None

    # ---- what clients need ----

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def backend_uri(self, database: str = "mlflow") -> str:
        return f"postgresql+psycopg://postgres:{self.pg_password}@127.0.0.1:{self.pg_port}/{database}"

    def client_env(self) -> dict[str, str]:
        """What a job (and every Ray node) needs to reach the stack, as a Secret gives pods on k8s."""
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, "MLFLOW_TRACKING_USERNAME": "admin",
                "MLFLOW_TRACKING_PASSWORD": self.mlflow_password, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_ENDPOINT_URL": self.s3_endpoint,
                "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint, "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION,
                # Artifacts stream through the server: moto's credential checks reject the presigned
                # URLs a client would otherwise download large files from (S3 and MinIO accept them).
                "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false"}

    def s3_client(self, **overrides):
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint, region_name=REGION,
                            aws_access_key_id=overrides.get("access_key", self.access_key),
                            aws_secret_access_key=overrides.get("secret_key", self.secret_key))

    # ---- starting and stopping ----

    @classmethod
    def up(cls, root: str | Path = DEFAULT_DIR) -> "LocalServices":
        root = Path(root).resolve()
        if (root / STATE_FILE).exists():
            cls.load(root).down()
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        root.chmod(0o755)
        stack = cls(str(root), free_port(), free_port(), free_port(), secrets.token_hex(16), pids={})
        try:
            stack.start_postgres()
            stack.start_s3()
            stack.mlflow_password, stack.flask_secret = secrets.token_hex(16), secrets.token_hex(32)
            stack.start_mlflow()
        except BaseException:
            stack.down()
            raise
        stack.save()
        return stack

    def _log(self, name: str) -> Path:
        return Path(self.root) / f"{name}.log"

    def start_postgres(self) -> None:
        data, sockets = Path(self.root) / "pgdata", Path(self.root) / "pgsock"
        for path in (data, sockets):
            path.mkdir()
        pwfile = Path(self.root) / "pgpass"
        pwfile.write_text(self.pg_password)
        as_postgres: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
            user = pwd.getpwnam("postgres")
            for path in (data, sockets, pwfile):
                os.chown(path, user.pw_uid, user.pw_gid)
            as_postgres = ["runuser", "-u", "postgres", "--"]
        subprocess.run([*as_postgres, _pg_bin("initdb"), "-D", str(data), "-U", "postgres", f"--pwfile={pwfile}",
                        "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8"],
                       check=True, capture_output=True, timeout=300)
        log = self._log("postgres")
        log.touch()
        if as_postgres:
            os.chown(log, pwd.getpwnam("postgres").pw_uid, -1)
        subprocess.run([*as_postgres, _pg_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "120",
                        "-o", f"-p {self.pg_port} -k {sockets} -c listen_addresses=127.0.0.1", "start"],
                       check=True, capture_output=True, timeout=180)
        self.pids["postgres"] = int((data / "postmaster.pid").read_text().split()[0])
        for database in ("mlflow", "mlflow_auth"):
            subprocess.run([_pg_bin("psql"), "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "postgres",
                            "-c", f"CREATE DATABASE {database}"], check=True, capture_output=True, timeout=60,
                           env={**os.environ, "PGPASSWORD": self.pg_password})

    def start_s3(self) -> None:
        log = self._log("s3")
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_REQUESTS)}
        proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p",
                                 str(self.s3_port)], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        self.pids["s3"] = proc.pid
        _wait_http(f"{self.s3_endpoint}/moto-api/", "the S3 endpoint (moto)", proc, log)
        import boto3

        iam = boto3.client("iam", endpoint_url=self.s3_endpoint, region_name=REGION,
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="ldm")
        iam.put_user_policy(UserName="ldm", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="ldm")["AccessKey"]
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        self.s3_client().create_bucket(Bucket=BUCKET)

    def start_mlflow(self) -> None:
        """`mlflow server` on PostgreSQL with artifacts proxied to the bucket, basic auth on."""
        auth = Path(self.root) / "basic_auth.ini"
        auth.write_text("[mlflow]\ndefault_permission = READ\n"
                        f"database_uri = {self.backend_uri('mlflow_auth')}\n"
                        "admin_username = admin\n"
                        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                        f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL_S}\n")
        log = self._log("mlflow")
        # No job runner: its seven consumer processes serve MLflow's GenAI jobs, which nothing here uses.
        env = {**os.environ, **self.client_env(), "MLFLOW_AUTH_CONFIG_PATH": str(auth),
               "MLFLOW_AUTH_ADMIN_PASSWORD": self.mlflow_password, "MLFLOW_FLASK_SERVER_SECRET_KEY": self.flask_secret,
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI")
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port",
             str(self.mlflow_port), "--backend-store-uri", self.backend_uri(), "--artifacts-destination",
             f"s3://{BUCKET}/mlartifacts", "--serve-artifacts", "--app-name", "basic-auth", "--workers", "1"],
            stdout=open(log, "a"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.pids["mlflow"] = proc.pid
        _wait_http(f"{self.tracking_uri}/health", "mlflow server", proc, log)

    def stop_mlflow(self) -> None:
        """Stop the tracking server (an outage); `start_mlflow` brings it back on the same port."""
        self._stop(self.pids.pop("mlflow", None))

    @staticmethod
    def _stop(pid: int | None) -> None:
        if not pid:
            return
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pid, sig)
            except (ProcessLookupError, PermissionError):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
                try:  # our own child: reap it
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        return
                except ChildProcessError:
                    pass
                time.sleep(0.2)

    def down(self) -> None:
        pids = dict(self.pids or {})
        for name in ("mlflow", "s3"):
            self._stop(pids.pop(name, None))
        data = Path(self.root) / "pgdata"
        if (data / "postmaster.pid").exists():
            as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
            subprocess.run([*as_postgres, _pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                           capture_output=True, timeout=120)
        self.pids = {}

    def save(self) -> None:
        (Path(self.root) / STATE_FILE).write_text(json.dumps(asdict(self), indent=2))
        (Path(self.root) / STATE_FILE).chmod(0o600)

    @classmethod
    def load(cls, root: str | Path = DEFAULT_DIR) -> "LocalServices":
        path = Path(root).resolve() / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no local services in {Path(root).resolve()} (no {STATE_FILE})")
        return cls(**json.loads(path.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("--dir", default=str(DEFAULT_DIR))
    args = parser.parse_args(argv)
    if args.command == "up":
        stack = LocalServices.up(args.dir)
        print("# PostgreSQL, an S3 endpoint and mlflow server are up; for a client (secrets: keep them out of logs):")
        print(f"# the env is in {Path(args.dir).resolve() / STATE_FILE} (mode 600); e.g.")
        print(f"export MLFLOW_TRACKING_URI={stack.tracking_uri} AWS_ENDPOINT_URL={stack.s3_endpoint} "
              f"MLFLOW_S3_ENDPOINT_URL={stack.s3_endpoint} AWS_DEFAULT_REGION={REGION}")
        print(f"# bucket: s3://{BUCKET}/ (shards under s3://{BUCKET}/shards/, checkpoints s3://{BUCKET}/ray-train)")
    else:
        LocalServices.load(args.dir).down()
        print(f"stopped the local services in {Path(args.dir).resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
