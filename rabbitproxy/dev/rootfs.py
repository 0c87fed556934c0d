"""A cached Debian 13 (trixie) root with RabbitMQ 4.0, for dev clusters of a newer release than the host's.

The host runs Debian 12, whose ``rabbitmq-server`` is 3.10. Debian 13 ships 4.0 (with Erlang 27); its packages
install into a ``debootstrap --variant=minbase trixie`` root in a minute or two, and a node runs from there with
``chroot ROOT ...`` sharing the host's network, so the proxy and the tests reach it on 127.0.0.1 as usual.

The root is built once and kept in ``/var/cache/rabbitproxy-ci`` (``RABBITPROXY_CI_CACHE``) under a name that
carries :data:`RECIPE`, the way ``scripts/container-smoke`` caches its base image: change the recipe, bump the
number. Building needs root, ``debootstrap`` and a Debian mirror: the one this machine's apt sources name
(:mod:`rabbitproxy.dev.aptsources`), or ``RABBITPROXY_DEBIAN_MIRROR``. The mirror is not part of the cached
root's name: the same packages from another mirror are the same root, so moving machines never forces a rebuild.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from rabbitproxy.dev.aptsources import AptSourcesError, debian_mirror

# Bump when build() changes what ends up in the root: it names the cached directory.
RECIPE = "1"
SUITE = "trixie"
CACHE_DIR = Path(os.environ.get("RABBITPROXY_CI_CACHE", "/var/cache/rabbitproxy-ci"))
# Written last: a directory without it is an interrupted build and is never used.
_COMPLETE = ".rabbitproxy-root-complete"
# invoke-rc.d asks this before starting a service; 101 = "not allowed", so installing rabbitmq-server inside the
# root does not start a broker (it would be a second one on the host's 5672).
_POLICY_RC_D = "#!/bin/sh\nexit 101\n"


class RootfsError(RuntimeError):
    """The root could not be built; the message says which step failed and what it printed."""


def root_path(release: str = "4.0") -> Path:
    """Where the cached root of ``release`` lives (whether or not it has been built)."""
    return CACHE_DIR / f"rabbitmq-{release}-{SUITE}-root-{RECIPE}"


def is_ready(root: Path) -> bool:
    """Whether ``root`` is a complete build with the RabbitMQ scripts the dev cluster runs."""
    return (root / _COMPLETE).exists() and os.access(root / "usr/lib/rabbitmq/bin/rabbitmq-server", os.X_OK)


def ensure_root(release: str = "4.0", log: Callable[[str], None] | None = None) -> Path:
    """Return the cached root of ``release``, building it first when it is missing.

    Concurrent callers (two pytest sessions, the demo) wait for one build instead of running two.
    """
    say = log or (lambda _line: None)
    root = root_path(release)
    if is_ready(root):
        return root
    if os.geteuid() != 0:
        raise RootfsError(f"{root} is not built yet and building it needs root (debootstrap, chroot)")
    if shutil.which("debootstrap") is None:
        raise RootfsError("debootstrap is not installed: sudo apt-get install -y debootstrap")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with (CACHE_DIR / f"{root.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_ready(root):  # another process may have built it while we waited for the lock
            _build(root, say)
    return root


def _build(root: Path, say: Callable[[str], None]) -> None:
    try:
        mirror = debian_mirror()
    except AptSourcesError as exc:
        raise RootfsError(str(exc)) from None
    say(f"building {root}: debootstrap --variant=minbase {SUITE} from {mirror}, then rabbitmq-server")
    with tempfile.TemporaryDirectory(prefix=f".{root.name}-", dir=root.parent) as tmp:
        new = Path(tmp) / "root"
        _run(["debootstrap", "--variant=minbase", SUITE, str(new), mirror], timeout=1800)
        policy = new / "usr/sbin/policy-rc.d"
        policy.write_text(_POLICY_RC_D)
        policy.chmod(0o755)
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "DEBIAN_FRONTEND": "noninteractive",
            "LC_ALL": "C.UTF-8",
            "HOME": "/root",
        }
        apt = ["chroot", str(new), "apt-get", "-o", "APT::Install-Recommends=false", "-y", "-q"]
        _run([*apt, "install", "rabbitmq-server"], timeout=1800, env=env)
        _run([*apt, "clean"], env=env)
        # Node directories are made under var/tmp of the root by each cluster; they must be writable.
        (new / "var/tmp").chmod(0o1777)
        (new / _COMPLETE).write_text(f"recipe {RECIPE}\n")
        # Renamed into place only when complete, so an interrupted build never leaves a half root behind.
        new.rename(root)
    say(f"{root} is ready")


def _run(argv: list[str], *, timeout: float = 600, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-30:])
        raise RootfsError(f"{' '.join(argv)} exited {done.returncode}:\n{tail}")


def main() -> None:
    """``python -m rabbitproxy.dev.rootfs``: build the root if needed and print its path (scripts/install)."""
    import sys

    def say(line: str) -> None:
        sys.stderr.write(f"[rootfs] {line}\n")

    path = ensure_root(log=say)
    sys.stdout.write(f"{path}\n")


if __name__ == "__main__":
    main()
