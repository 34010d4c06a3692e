"""`make install` hands pip's package sources on this machine to uv (tools/uv_args.py): a uv that
missed a local index or constraint would install other packages than pip, or none."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from uv_args import uv_args  # noqa: E402


def test_every_source_pip_has_becomes_a_uv_option_once():
    listed = "\n".join([
        ":env:.find-links='/opt/wheels'",
        "global.find-links='/opt/wheels'",  # the same setting from a file and the environment: once
        "global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'",
        "global.constraint='/etc/xdg/pip/constraints.txt'",
        "global.cert='/etc/ssl/certs/ca-certificates.crt'",
        "global.timeout='60'",  # nothing uv needs
    ])
    assert uv_args(listed) == [
        "--find-links", "/opt/wheels", "--extra-index-url", "file:///opt/a/simple", "--extra-index-url",
        "file:///opt/b/simple", "--constraint", "/etc/xdg/pip/constraints.txt", "--native-tls",
        "--index-strategy", "unsafe-best-match"]


def test_the_script_reads_pips_own_settings():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_FIND_LINKS="/srv/wheels /srv/more",
               PIP_INDEX_URL="https://mirror.example/simple")
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "uv_args.py")], env=env, capture_output=True,
                         text=True, check=True).stdout
    args = shlex.split(out)
    assert args[args.index("--index-url") + 1] == "https://mirror.example/simple"
    assert [args[i + 1] for i, a in enumerate(args) if a == "--find-links"] == ["/srv/wheels", "/srv/more"]
    assert "--constraint" not in args and "--native-tls" not in args
