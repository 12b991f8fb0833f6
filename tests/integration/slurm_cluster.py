"""A real SLURM cluster on one machine: munged, slurmctld and one slurmd per node.

Every node is its own host: a network namespace with a private address behind a
bridge (see `netns.py`) and its own hostname (`unshare --uts`), so a multi-node job
really rendezvouses across hosts. All state, spool, logs and the munge socket live
under one directory; the daemons run as root in the foreground and are stopped by
pid.

    with SlurmCluster(workdir, nodes=2, cpus_per_node=2) as cluster:
        job = cluster.sbatch(["launch/alm.slurm", "--config", "alm/tiny_cpu"])
        state = cluster.wait(job)

From a shell (to try the launch scripts by hand):
    python tests/integration/slurm_cluster.py DIR     # up until Ctrl-C, then down

Needs root, `slurm-wlm`, `munge` and iproute2 (Debian's slurm 22.05 checked).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netns import BridgedHosts  # noqa: E402

DAEMONS = ("munged", "slurmctld", "slurmd", "mungekey", "sbatch", "scontrol", "sinfo", "srun")


def missing_programs() -> list[str]:
    return [p for p in DAEMONS if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _slurm_conf(d: Path, munge_socket: Path, net: BridgedHosts, ctl_port: int, cpus: int) -> str:
    # Credentials expire after 10 s rather than 120 s: a requeued job waits for the
    # old credential to expire before it may start again on the same node.
    lines = f"""
ClusterName=itest
SlurmctldHost=ctl({net.gateway})
SlurmctldPort={ctl_port}
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire=10
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
JobRequeue=1
MinJobAge=3600
ReturnToService=2
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
InactiveLimit=0
KillWait=30
"""
    for host, addr in net.addresses.items():
        lines += f"NodeName={host} NodeAddr={addr} NodeHostname={host} CPUs={cpus} State=UNKNOWN\n"
    lines += "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
    return lines.lstrip()


class SlurmCluster:
    def __init__(self, workdir: str | os.PathLike, nodes: int = 2, cpus_per_node: int = 2):
        self.dir = Path(workdir).resolve()
        self.nodes = [f"node{i + 1}" for i in range(nodes)]
        self.cpus = cpus_per_node
        self.net = BridgedHosts(self.nodes)
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.dir / "slurm.conf"
        self.munge_dir: Path | None = None

    # -- environment for clients (sbatch, squeue, scontrol) ---------------------------
    @property
    def env(self) -> dict:
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=kw.pop("env", self.env), check=check, capture_output=True,
                              text=True, **kw)

    # -- bring-up ----------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        d = self.dir
        BridgedHosts.remove_stale()
        for sub in ("state", "spool", "run", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        # munged wants every directory above its socket searchable by all and its own
        # directory writable by root alone; a private temporary directory (0700) fails
        # that, so the socket gets a short-lived directory of its own under /tmp.
        m = self.munge_dir = Path(tempfile.mkdtemp(prefix="munge-", dir="/tmp"))
        os.chmod(m, 0o711)
        self.net.up()
        subprocess.run(["mungekey", "--create", "--force", f"--keyfile={m}/munge.key"], check=True,
                       capture_output=True)
        os.chmod(m / "munge.key", 0o600)
        self.conf.write_text(_slurm_conf(d, m / "munge.sock", self.net, _free_port(self.net.gateway), self.cpus))

        self._spawn("munged", ["munged", "--foreground", f"--socket={m}/munge.sock",
                               f"--key-file={m}/munge.key", f"--pid-file={d}/run/munged.pid",
                               f"--log-file={d}/log/munged.log", f"--seed-file={m}/munged.seed"])
        self._wait_for(lambda: (m / "munge.sock").exists(), 10, "munged socket")
        # Each daemon gets its own hostname; unshare and nsenter exec, so the pid we hold
        # is the daemon's own.
        self._spawn("slurmctld", ["unshare", "--uts", "sh", "-c", "hostname ctl && exec slurmctld -D"])
        # The nodes know each other by name through a private hosts file; other names fail
        # at once instead of waiting for a name server that no namespace can reach
        # (torch's rendezvous looks peers up by address and would stall 10 s each).
        (d / "hosts").write_text("127.0.0.1 localhost\n" + "".join(
            f"{a} {h}\n" for h, a in {"ctl": self.net.gateway, **self.net.addresses}.items()))
        (d / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        for node in self.nodes:
            setup = (f"hostname {node} && mount --bind {d}/hosts /etc/hosts && "
                     f"mount --bind {d}/resolv.conf /etc/resolv.conf && exec slurmd -D -N {node}")
            self._spawn(f"slurmd-{node}", ["nsenter", f"--net={self.net.ns_path(node)}",
                                           "unshare", "--uts", "--mount", "sh", "-c", setup])
        self._wait_for(self._all_idle, timeout, "all nodes idle")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.dir / "log" / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        log.close()

    def _all_idle(self) -> bool:
        r = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
        return r.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes)

    def _wait_for(self, cond, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}; see {self.dir}/log\n" + self.logs())
            if cond():
                return
            time.sleep(0.3)
        raise TimeoutError(f"waited {timeout:.0f}s for {what}\n" + self.logs())

    # -- jobs --------------------------------------------------------------------------
    def sbatch(self, args: list[str], env: dict | None = None, cwd: str | None = None) -> int:
        r = self.run("sbatch", "--parsable", *args, env={**self.env, **(env or {})}, cwd=cwd, check=False)
        if r.returncode:
            raise RuntimeError(f"sbatch failed: {r.stderr}")
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """`scontrol show job` as a dict (JobState, RestartCnt, ExitCode, NodeList, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, timeout: float = 600.0,
             done=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "PREEMPTED")) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in done:
                return info
            time.sleep(1.0)
        self.run("scancel", str(job_id), check=False)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout:.0f}s\n"
                           + self.logs())

    def logs(self, tail: int = 30) -> str:
        out = []
        for f in sorted((self.dir / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"==> {f.name} <==\n" + "\n".join(lines))
        return "\n".join(out)

    # -- teardown ----------------------------------------------------------------------
    def stop(self) -> None:
        """Cancels jobs, stops the daemons by pid, removes the network. Safe to repeat."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user=root", check=False)
            time.sleep(1)
        # slurmd first, then whatever job steps it left inside the node namespaces.
        order = [n for n in self.procs if n.startswith("slurmd-")] + ["slurmctld", "munged"]
        for name in order:
            p = self.procs.get(name)
            if name == "slurmctld":
                try:
                    self.net.kill_all()
                except Exception:
                    pass
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()
        if self.munge_dir is not None:
            shutil.rmtree(self.munge_dir, ignore_errors=True)
            self.munge_dir = None
        self.net.down()

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with SlurmCluster(sys.argv[1]) as c:
        print(f"export SLURM_CONF={c.conf}   # nodes: "
              + ", ".join(f"{n}={c.net.addresses[n]}" for n in c.nodes) + "; Ctrl-C stops the cluster")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
