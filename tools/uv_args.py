"""Print the `uv pip install` options that give uv the package sources pip has on this machine.

`make install` installs with uv (about 40 s where pip takes 3.5 min on the demo machine), but uv
does not read pip's settings. This reads them with `pip config list` (config files and PIP_*
variables alike) and prints them as uv options: index URLs, find-links, constraints, and the system
certificates when pip is given a certificate file. uv then considers every index for the best
version, as pip does. Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import shlex
import subprocess
import sys

# pip's setting -> uv's option; each value may list several, separated by whitespace.
OPTIONS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
           "constraint": "--constraint"}


def uv_args(listed: str) -> list[str]:
    """uv options for the lines of `pip config list` (`section.key='value'`)."""
    args: list[str] = []
    seen: set[tuple[str, str]] = set()
    certificates = False
    for line in listed.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        name = key.rsplit(".", 1)[-1]
        certificates |= name == "cert"
        option = OPTIONS.get(name)
        if option is None:
            continue
        for item in " ".join(shlex.split(value)).split():  # pip prints the value quoted
            if (option, item) not in seen:
                seen.add((option, item))
                args += [option, item]
    if certificates:
        args.append("--native-tls")
    return args + ["--index-strategy", "unsafe-best-match"]


def main() -> None:
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            check=True).stdout
    print(shlex.join(uv_args(listed)))


if __name__ == "__main__":
    main()
