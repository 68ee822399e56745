"""Real servers for the engine tests, on 127.0.0.1 with free ports: an MLflow tracking server, PostgreSQL
and a local Ray cluster.

Each is a context manager: it starts the server in its own process group, waits until the server
answers (polling a condition against a deadline, never a bare sleep), and on exit stops it and every
process it started, also when the test failed. Nothing here talks to any address but 127.0.0.1."""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
PR_SET_PDEATHSIG = 1
LOOPBACK_ENV = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


class ServerUnavailable(RuntimeError):
    """The server binary is not installed here (the test skips with this reason)."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_until(ready: Callable[[], bool], what: str, log: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll ``ready`` until it holds; fail with the server's log tail if the process died or time ran out."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout:.0f} s:\n{_tail(log)}")
        time.sleep(0.2)  # the poll interval, not a wait for readiness


def _tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def _stop_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM the server (it shuts its own workers down), then SIGKILL whatever is left of its group.

    The leader alone gets SIGTERM first: Ray's ``ray start --block`` drains its node in ~3 s when asked,
    but waits 30 s when its children were killed under it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=grace)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the test process dies, even by SIGKILL (Linux prctl)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The server in its own process group, output to ``log``, stopped if the test process is killed."""
    handle = log.open("ab")
    try:
        return subprocess.Popen(
            args,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            env={**os.environ, **(env or {})},
        )
    finally:
        handle.close()


# --- MLflow tracking server ---------------------------------------------------------------------------


def http_get(url: str) -> str:
    """The body of a loopback GET (never through a proxy)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=30) as response:
        return response.read().decode()


def _http_ok(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    try:
        with opener.open(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def mlflow_server(workdir: Path, backend_store_uri: str | None = None) -> Iterator[str]:
    """``mlflow server`` with proxied artifacts; yields its tracking URI ``http://127.0.0.1:PORT``."""
    workdir.mkdir(parents=True, exist_ok=True)
    backend = backend_store_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    port = free_port()
    log = workdir / "mlflow-server.log"
    args = [
        *(sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port), "--workers", "1"),
        *("--backend-store-uri", backend, "--artifacts-destination", str(workdir / "artifacts")),
    ]
    # MLflow 3's server also starts a job runner and 7 huey consumers for its GenAI jobs (scorers, trace
    # archival); the suite uses none, and on 2 cores they slow every start down: switch them off.
    with serving(args, log, f"http://{HOST}:{port}/health", "mlflow server"):
        yield f"http://{HOST}:{port}"


@contextlib.contextmanager
def serving(args: list[str], log: Path, health_url: str, what: str) -> Iterator[subprocess.Popen]:
    """An MLflow server process (``mlflow server`` or ``mlflow ui``) from ready (``health_url`` answers
    200) to stopped with its workers. Its GenAI job runner is off (docs/scaling-out.md)."""
    proc = _spawn(args, log, {**LOOPBACK_ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        wait_until(lambda: _http_ok(health_url), what, log, proc, timeout=300)
        yield proc
    finally:
        _stop_group(proc)


# --- PostgreSQL ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Postgres:
    port: int

    def url(self, database: str) -> str:
        """A SQLAlchemy URL; SQLAlchemy 2.1 drives ``postgresql://`` with psycopg 3 (``psycopg[binary]``)."""
        return f"postgresql://postgres@{HOST}:{self.port}/{database}"

    def connect(self, database: str = "postgres"):
        import psycopg

        return psycopg.connect(host=HOST, port=self.port, user="postgres", dbname=database, connect_timeout=2)

    def create_database(self, name: str) -> None:
        conn = self.connect()
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()


def require_postgres() -> None:
    """Raise ServerUnavailable (the reason a test skips) unless a PostgreSQL server can run here."""
    postgres_bin_dir()
    _as_server_user()


def postgres_bin_dir() -> Path:
    """Debian's server binaries (``apt-get install postgresql``), newest version first."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]), reverse=True)
    if not found:
        on_path = shutil.which("initdb")
        if on_path is None:
            raise ServerUnavailable("no PostgreSQL server here: apt-get install postgresql (.ci/run does)")
        return Path(on_path).parent
    return Path(found[0]).parent


def _as_server_user() -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its binaries as the ``postgres`` (or ``nobody``) user."""
    if os.geteuid() != 0:
        return []
    for user in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            import pwd

            pwd.getpwnam(user)
            return ["runuser", "-u", user, "--"]
    raise ServerUnavailable("running as root and there is no 'postgres' or 'nobody' user to run PostgreSQL as")


def _chown_to(prefix: list[str], path: Path) -> None:
    if prefix:
        import pwd

        user = pwd.getpwnam(prefix[2])
        os.chown(path, user.pw_uid, user.pw_gid)


def _can_connect(pg: Postgres) -> bool:
    try:
        pg.connect().close()
        return True
    except Exception:
        return False


@contextlib.contextmanager
def postgres_server() -> Iterator[Postgres]:
    """A throwaway cluster (``initdb``) served by ``postgres`` on 127.0.0.1 only, trust auth, no fsync.

    Its folder is made under the system temp dir (pytest's tmp_path is private to root, and the server
    runs as another user) and removed afterwards."""
    bin_dir, prefix = postgres_bin_dir(), _as_server_user()
    root = Path(tempfile.mkdtemp(prefix="pg-"))
    _chown_to(prefix, root)
    data, log = root / "data", root / "server.log"
    try:
        init = subprocess.run(
            [*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stdout[-2000:]}{init.stderr[-2000:]}")
        pg = Postgres(free_port())
        server = [
            *(str(bin_dir / "postgres"), "-D", str(data), "-h", HOST, "-p", str(pg.port)),
            *("-k", str(root), "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=100"),
        ]
        log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        try:  # the server user writes the log, so open it before dropping privileges
            proc = subprocess.Popen(
                [*prefix, *server],
                stdout=log_fd,
                stderr=log_fd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            os.close(log_fd)
        try:
            wait_until(lambda: _can_connect(pg), "postgres", log, proc)
            yield pg
        finally:
            subprocess.run(
                [*prefix, str(bin_dir / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w", "-t", "30"],
                capture_output=True,
                timeout=60,
            )
            _stop_group(proc)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- Ray -----------------------------------------------------------------------------------------------

# Ray replaces 127.0.0.1 by the machine's outward address unless it runs as a single-machine cluster,
# which this switch (Ray's own, meant for laptops) selects: then every Ray socket binds to 127.0.0.1.
RAY_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", **LOOPBACK_ENV}


@contextlib.contextmanager
def ray_cluster(num_cpus: int = 2) -> Iterator[str]:
    """A one-node Ray cluster (``ray start --head --block``); yields its address ``127.0.0.1:PORT``.

    The session folder is short on purpose: Ray's unix sockets live there (path length limit)."""
    ray = Path(sys.executable).with_name("ray")
    if not ray.exists():
        raise ServerUnavailable("ray is not installed: pip install -e '.[engines]'")
    root = Path(tempfile.mkdtemp(prefix="ray-"))
    log, port = root / "ray.log", free_port()
    ports = {
        "--port": port,
        "--dashboard-port": free_port(),
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(),
        "--runtime-env-agent-port": free_port(),
    }
    args = [str(ray), "start", "--head", "--block", "--node-ip-address", HOST, "--include-dashboard=false"]
    args += [f"--num-cpus={num_cpus}", f"--temp-dir={root}", "--disable-usage-stats"]
    args += [f"{flag}={value}" for flag, value in ports.items()]
    proc = _spawn(args, log, RAY_LOOPBACK_ENV)
    try:
        wait_until(lambda: "Ray runtime started" in _tail(log, 100_000), "ray start", log, proc, timeout=180)
        yield f"{HOST}:{port}"
    finally:
        _stop_group(proc)
        shutil.rmtree(root, ignore_errors=True)


# --- SLURM ---------------------------------------------------------------------------------------------

SLURM_PROGRAMS = (
    "munged",
    "mungekey",
    "munge",
    "unmunge",
    "slurmctld",
    "slurmd",
    "sbatch",
    "squeue",
    "scancel",
    "sinfo",
)
SLURM_PARTITION = "debug"
SLURM_LIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED"})


@dataclass(frozen=True)
class Slurm:
    """A running one-node cluster: its config file, the folder of its stand-in ``sacct`` and its partition."""

    conf: Path
    bin_dir: Path
    partition: str
    cpus: int

    @property
    def env(self) -> dict[str, str]:
        """What every client command (``sbatch``, ``squeue``, ``ablate`` with the submitit launcher) needs:
        the config file, and the stand-in ``sacct`` first on the PATH. ``sbatch`` passes both to the jobs."""
        return {"SLURM_CONF": str(self.conf), "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """A SLURM client command (``squeue``, ``scancel``, ...) against this cluster."""
        return subprocess.run(
            list(args), capture_output=True, text=True, timeout=timeout, env={**os.environ, **self.env}
        )

    def jobs(self) -> list[tuple[str, str]]:
        """(job id, state) of every job the controller still knows, finished ones included."""
        out = self.run("squeue", "-h", "-t", "all", "-o", "%i|%T").stdout
        return [tuple(line.split("|", 1)) for line in out.splitlines() if "|" in line]  # type: ignore[misc]


def _sbin(name: str) -> str | None:
    """A SLURM or munge program: on the PATH, or in /usr/sbin where Debian puts the daemons."""
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}{os.pathsep}/usr/sbin{os.pathsep}/sbin")


def require_slurm() -> None:
    """Raise ServerUnavailable (the reason a test skips) unless a SLURM cluster can run here."""
    missing = [name for name in SLURM_PROGRAMS if _sbin(name) is None]
    if missing:
        raise ServerUnavailable(
            f"no SLURM here ({', '.join(missing)} missing): apt-get install slurmctld slurmd slurm-client munge "
            "(.ci/run does)"
        )
    if os.geteuid() != 0:
        raise ServerUnavailable("slurmd must run as root to start jobs: run the SLURM tests as root (CI does)")


# A stand-in for ``sacct`` on a cluster without accounting (this one): submitit asks sacct for the state of
# a job that ended without writing its result (cancelled, timed out), and waits forever without an answer.
# squeue knows every job for MinJobAge after its end; this prints what sacct would (docs/scaling-out.md).
_SACCT = """#!/bin/sh
ids=""
while [ $# -gt 0 ]; do
    case "$1" in
        -j) ids="$ids,$2"; shift 2 ;;
        *) shift ;;
    esac
done
echo "JobID|State|NodeList"
[ -n "$ids" ] && exec squeue -h -t all -j "${ids#,}" -o '%i|%T|%N'
"""


def _slurm_conf(root: Path, socket_path: Path, cpus: int, memory_mb: int) -> str:
    """The settings a one-node cluster needs on a machine without systemd or cgroups."""
    state, spool = root / "state", root / "spool"
    lines = {
        "ClusterName": "ablate-test",
        "SlurmctldHost": f"localhost({HOST})",
        "SlurmctldPort": free_port(),
        "SlurmdPort": free_port(),
        "SlurmUser": "root",
        "AuthType": "auth/munge",
        "AuthInfo": f"socket={socket_path}",
        "CredType": "cred/munge",
        "ProctrackType": "proctrack/linuxproc",  # no cgroups here
        "TaskPlugin": "task/none",
        "AccountingStorageType": "accounting_storage/none",
        "JobAcctGatherType": "jobacct_gather/none",
        "JobCompType": "jobcomp/none",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_Core",
        "SlurmdParameters": "config_overrides",  # the node is what this file says, whatever the hardware
        "MailProg": "/bin/true",
        "MinJobAge": 86400,  # squeue (and so the stand-in sacct) knows ended jobs for the whole test
        "KillWait": 2,  # seconds from scancel's SIGTERM to SIGKILL (default 30)
        "ReturnToService": 2,
        "StateSaveLocation": state,
        "SlurmdSpoolDir": spool,
        "SlurmctldPidFile": root / "slurmctld.pid",
        "SlurmdPidFile": root / "slurmd.pid",
        "SlurmctldLogFile": root / "slurmctld.log",
        "SlurmdLogFile": root / "slurmd.log",
    }
    text = "".join(f"{key}={value}\n" for key, value in lines.items())
    text += f"NodeName=localhost NodeAddr={HOST} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN\n"
    text += f"PartitionName={SLURM_PARTITION} Nodes=localhost Default=YES MaxTime=INFINITE State=UP\n"
    return text


def _munge_works(socket_path: Path) -> bool:
    if not socket_path.exists():
        return False
    cred = subprocess.run(["munge", "-n", "-S", str(socket_path)], capture_output=True, timeout=10)
    if cred.returncode != 0:
        return False
    return subprocess.run(["unmunge", "-S", str(socket_path)], input=cred.stdout, capture_output=True).returncode == 0


def _node_idle(slurm: Slurm) -> bool:
    try:
        found = slurm.run("sinfo", "-h", "-n", "localhost", "-o", "%T", timeout=10).stdout.split()
    except subprocess.TimeoutExpired:
        return False
    return found == ["idle"]


def _stop_slurm_jobs(slurm: Slurm, timeout: float = 60) -> None:
    """Cancel every job and wait until none is left running (their processes are gone)."""
    slurm.run("scancel", "--partition", slurm.partition)
    deadline = time.monotonic() + timeout
    while any(state in SLURM_LIVE_STATES for _, state in slurm.jobs()) and time.monotonic() < deadline:
        time.sleep(0.5)


@contextlib.contextmanager
def slurm_cluster(cpus: int = 2) -> Iterator[Slurm]:
    """A one-node SLURM cluster on 127.0.0.1: ``munged``, ``slurmctld`` and ``slurmd`` each in the
    foreground in its own session, with their own key, config, state and spool folders and free ports.
    Yields once the node is idle; on exit cancels every job, then stops the daemons.

    The folder is short (munge's socket path has a length limit) and made under the system temp dir."""
    require_slurm()
    root = Path(tempfile.mkdtemp(prefix="slurm-"))
    os.chmod(root, 0o711)  # jobs may run as another user: they need to reach munge's socket
    procs: list[subprocess.Popen] = []
    try:
        munge_dir, run_dir, bin_dir = root / "munge", root / "run", root / "bin"
        for folder, mode in ((munge_dir, 0o700), (run_dir, 0o711), (bin_dir, 0o755), (root / "state", 0o755)):
            folder.mkdir()
            os.chmod(folder, mode)
        (root / "spool").mkdir()
        key, socket_path = munge_dir / "munge.key", run_dir / "munge.socket"
        subprocess.run([str(_sbin("mungekey")), "-c", "-k", str(key)], check=True, capture_output=True, timeout=30)
        munge_log = munge_dir / "munged.log"
        munged = [
            *(str(_sbin("munged")), "-F", "--force", f"--socket={socket_path}", f"--key-file={key}"),
            *(f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_log}", f"--seed-file={munge_dir / 'seed'}"),
        ]
        procs.append(_spawn(munged, root / "munged.out"))
        wait_until(lambda: _munge_works(socket_path), "munged", root / "munged.out", procs[-1], timeout=60)

        sacct = bin_dir / "sacct"
        sacct.write_text(_SACCT)
        sacct.chmod(0o755)
        memory_mb = max(1024, _memory_mb() // 2)
        conf = root / "slurm.conf"
        conf.write_text(_slurm_conf(root, socket_path, cpus, memory_mb))
        slurm = Slurm(conf, bin_dir, SLURM_PARTITION, cpus)
        env = {"SLURM_CONF": str(conf)}
        procs.append(_spawn([str(_sbin("slurmctld")), "-D", "-i", "-f", str(conf)], root / "slurmctld.out", env))
        procs.append(_spawn([str(_sbin("slurmd")), "-D", "-N", "localhost", "-f", str(conf)], root / "slurmd.out", env))
        wait_until(lambda: _node_idle(slurm), "slurmd", root / "slurmd.log", procs[-1], timeout=120)
        try:
            yield slurm
        finally:
            _stop_slurm_jobs(slurm)
    finally:
        for proc in reversed(procs):
            _stop_group(proc)
        shutil.rmtree(root, ignore_errors=True)


def _memory_mb() -> int:
    """This machine's memory in MB (the node's ``RealMemory`` must not exceed it)."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20)
