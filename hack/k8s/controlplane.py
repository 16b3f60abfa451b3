"""A real Kubernetes control plane on 127.0.0.1 for tests and for humans.

etcd + kube-apiserver (client-cert auth, Node,RBAC, a real service-account key pair) +
kube-controller-manager + kube-scheduler + kwok (fake GPU nodes; pods go Running/Ready),
each on random free ports, with binaries built by hack/k8s/build.sh.

    python hack/k8s/controlplane.py up [--state-dir DIR] [--crds DIR]   # start, write kubeconfig
    python hack/k8s/controlplane.py env                                  # print export lines
    python hack/k8s/controlplane.py down                                 # stop everything

The pytest fixture (tests/conftest.py) uses ControlPlane directly. CRDs passed to start() are
installed before the controller-manager starts, so the garbage collector's first discovery
already knows their kinds (otherwise it notices them only after its ~30 s periodic resync).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


import fake_nodes

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_STATE_DIR = REPO / ".kube"
SERVICE_CIDR = "10.96.0.0/16"
# Stop order: the reverse of start order.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


def pinned_versions() -> dict[str, str]:
    """The pins in versions.env (KEY=value lines)."""
    pins = {}
    for line in (HERE / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            pins[key] = value
    return pins


def bin_dir() -> Path:
    """Where build.sh puts the binaries for the pinned Kubernetes version."""
    cache = Path(os.environ.get("KUBEINFER_CACHE", Path.home() / ".cache" / "kubeinfer"))
    return cache / f"k8s-{pinned_versions()['K8S_VERSION']}" / "bin"


def build_binaries() -> Path:
    """Run build.sh (fast when cached); raises CalledProcessError when the build fails."""
    subprocess.run(["bash", str(HERE / "build.sh")], check=True, stdout=sys.stderr)
    return bin_dir()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ControlPlaneError(RuntimeError):
    pass


@dataclass
class ControlPlane:
    """Starts and stops the components; state (certs, kubeconfigs, logs, etcd data) in state_dir."""

    state_dir: Path
    bin_dir: Path = field(default_factory=bin_dir)
    gpu_nodes: int = 2
    cpu_nodes: int = 1
    die_with_parent: bool = False  # tests: the kernel kills the components if pytest dies
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    server: str = ""

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    def binary(self, name: str) -> str:
        path = self.bin_dir / name
        if not path.exists():
            raise ControlPlaneError(f"{path} is missing: run `make k8s-binaries` (hack/k8s/build.sh)")
        return str(path)

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self, crd_files: list[Path] | tuple[Path, ...] = (), timeout: float = 240.0) -> None:
        """Start every component and wait until the API is ready, the controllers act and nodes are Ready."""
        deadline = time.monotonic() + timeout
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(exist_ok=True)
        try:
            self._write_pki()
            self._start_etcd()
            self._start_apiserver()
            self._wait(self._apiserver_ready, deadline, "kube-apiserver /readyz")
            if crd_files:
                self.kubectl("apply", "--server-side", *[a for f in crd_files for a in ("-f", str(f))])
                self.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
            self._start_controller_manager()
            self._start_scheduler()
            self._start_kwok()
            self.kubectl("apply", "-f", "-", stdin=fake_nodes.manifest(self.gpu_nodes, self.cpu_nodes))
            self._wait(
                self._default_service_account_exists, deadline, "controller-manager (default ServiceAccount)"
            )
            self._wait(self._nodes_ready, deadline, "kwok nodes Ready")
            self._wait(self._scheduler_healthy, deadline, "kube-scheduler /healthz")
        except BaseException:
            self.print_log_tails()
            self.stop()
            raise
        self._save_state()

    def stop(self) -> None:
        """Stop every process group (SIGTERM, then SIGKILL after 10 s), in reverse start order."""
        for name in reversed(COMPONENTS):
            proc = self.processes.pop(name, None)
            if proc is not None:
                _terminate_group(proc.pid, proc)
        (self.state_dir / "state.json").unlink(missing_ok=True)

    # ---- helpers for callers ---------------------------------------------------------------

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        """Run the pinned kubectl against this cluster; raises with stderr when it fails and check is set."""
        result = subprocess.run(
            [self.binary("kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise ControlPlaneError(
                f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}"
            )
        return result

    def print_log_tails(self, lines: int = 30) -> None:
        for name in COMPONENTS:
            log = self.state_dir / "logs" / f"{name}.log"
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-lines:]
                print(f"----- {name} ({log}) last {len(tail)} lines -----", file=sys.stderr)
                print("\n".join(tail), file=sys.stderr)

    # ---- components ------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.state_dir / "logs" / f"{name}.log", "wb")  # noqa: SIM115 (owned by the child)
        self.processes[name] = subprocess.Popen(
            [self.binary(name), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: teardown kills it and its children
            preexec_fn=_kill_me_with_parent if self.die_with_parent else None,
            cwd=self.state_dir,
        )
        log.close()
        time.sleep(0.2)
        if self.processes[name].poll() is not None:
            raise ControlPlaneError(f"{name} exited at once with {self.processes[name].returncode}")

    def _write_pki(self) -> None:
        import pki  # needs `cryptography`; imported here so the root conftest loads without it

        d = self.state_dir / "pki"
        d.mkdir(exist_ok=True)
        ca = pki.CertificateAuthority(d)
        self.ca_file = ca.cert_path
        self.serving = ca.issue(
            "apiserver",
            "kube-apiserver",
            server_ips=("127.0.0.1", str(ipaddress.ip_network(SERVICE_CIDR)[1])),
            server_dns=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"),
        )
        self.sa_private, self.sa_public = pki.service_account_key_pair(d)
        # Front proxy (API aggregation): also stops the "missing requestheader CA" errors in every log.
        (d / "front-proxy").mkdir(exist_ok=True)
        front_proxy = pki.CertificateAuthority(d / "front-proxy")
        self.front_proxy_ca = front_proxy.cert_path
        self.front_proxy_client = front_proxy.issue("client", "front-proxy-client")
        self.clients = {
            "admin": ca.issue("admin", "kubeinfer-admin", "system:masters"),
            "kube-controller-manager": ca.issue("controller-manager", "system:kube-controller-manager"),
            "kube-scheduler": ca.issue("scheduler", "system:kube-scheduler"),
            "kwok": ca.issue("kwok", "kwok-controller", "system:masters"),
        }
        self.ca_key = ca.key_path

    def _write_kubeconfig(self, path: Path, user: str) -> Path:
        cert, key = self.clients[user]
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "kubeinfer-test",
                    "cluster": {"server": self.server, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
            "contexts": [{"name": "kubeinfer-test", "context": {"cluster": "kubeinfer-test", "user": user}}],
            "current-context": "kubeinfer-test",
        }
        path.write_text(json.dumps(config, indent=2))  # JSON is valid YAML
        path.chmod(0o600)
        return path

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        self._spawn(
            "etcd",
            [
                "--name=default",
                f"--data-dir={self.state_dir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=default=http://127.0.0.1:{peer}",
                "--unsafe-no-fsync",  # test data: durability is not needed, speed is
                "--log-level=warn",
            ],
        )

    def _start_apiserver(self) -> None:
        port = free_port()
        self.server = f"https://127.0.0.1:{port}"
        cert, key = self.serving
        self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",  # 1.37 refuses a loopback endpoint for the kubernetes Service
                f"--secure-port={port}",
                f"--tls-cert-file={cert}",
                f"--tls-private-key-file={key}",
                f"--client-ca-file={self.ca_file}",
                "--authorization-mode=Node,RBAC",
                f"--service-account-key-file={self.sa_public}",
                f"--service-account-signing-key-file={self.sa_private}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                "--profiling=false",
                f"--cert-dir={self.state_dir / 'pki'}",
                f"--requestheader-client-ca-file={self.front_proxy_ca}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={self.front_proxy_client[0]}",
                f"--proxy-client-key-file={self.front_proxy_client[1]}",
            ],
        )
        for user in self.clients:
            self._write_kubeconfig(self.state_dir / f"{user}.kubeconfig", user)
        self._write_kubeconfig(self.kubeconfig, "admin")

    def _start_controller_manager(self) -> None:
        kubeconfig = str(self.state_dir / "kube-controller-manager.kubeconfig")
        self._spawn(
            "kube-controller-manager",
            [
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--leader-elect=false",
                "--controllers=*",  # garbage collector, deployment, replicaset, HPA, namespace, SA token, ...
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={self.sa_private}",
                f"--root-ca-file={self.ca_file}",
                f"--cluster-signing-cert-file={self.ca_file}",
                f"--cluster-signing-key-file={self.ca_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allocate-node-cidrs=false",
                "--horizontal-pod-autoscaler-sync-period=5s",
                "--profiling=false",
            ],
        )

    def _start_scheduler(self) -> None:
        kubeconfig = str(self.state_dir / "kube-scheduler.kubeconfig")
        self.scheduler_port = free_port()
        self._spawn(
            "kube-scheduler",
            [
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.scheduler_port}",
                "--leader-elect=false",
                "--profiling=false",
            ],
        )

    def _start_kwok(self) -> None:
        stages = self.bin_dir.parent / "kwok" / "stages.yaml"  # written by build.sh
        if not stages.is_file():
            raise ControlPlaneError(f"{stages} is missing: run `make k8s-binaries` (hack/k8s/build.sh)")
        self._spawn(
            "kwok",
            [
                f"--config={stages}",
                f"--kubeconfig={self.state_dir / 'kwok.kubeconfig'}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={fake_nodes.MANAGED_ANNOTATION}=fake",
                "--node-ip=10.244.0.1",
                "--cidr=10.244.0.0/16",
                f"--server-address=127.0.0.1:{free_port()}",
            ],
        )

    # ---- readiness checks ------------------------------------------------------------------

    def _wait(self, check, deadline: float, what: str) -> None:
        while True:
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise ControlPlaneError(f"{name} exited with {proc.returncode} while waiting for {what}")
            if check():
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"timed out waiting for {what}")
            time.sleep(0.25)

    def _get(self, url: str) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        cert, key = self.clients["admin"]
        ctx.load_cert_chain(str(cert), str(key))
        if not url.startswith(self.server):
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # component self-signed certs
        try:
            with urllib.request.urlopen(url, context=ctx, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def _apiserver_ready(self) -> bool:
        return self._get(f"{self.server}/readyz")

    def _scheduler_healthy(self) -> bool:
        return self._get(f"https://127.0.0.1:{self.scheduler_port}/healthz")

    def _default_service_account_exists(self) -> bool:
        return self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0

    def _nodes_ready(self) -> bool:
        result = self.kubectl("get", "nodes", "-o", "json", check=False)
        if result.returncode != 0:
            return False
        nodes = json.loads(result.stdout)["items"]
        ready = [
            n
            for n in nodes
            if any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in n.get("status", {}).get("conditions", [])
            )
        ]
        return len(nodes) == self.gpu_nodes + self.cpu_nodes and len(ready) == len(nodes)

    # ---- state file for `down` in another process -----------------------------------------

    def _save_state(self) -> None:
        state = {
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "bin_dir": str(self.bin_dir),
            "processes": {name: {"pid": p.pid, "exe": p.args[0]} for name, p in self.processes.items()},
        }
        (self.state_dir / "state.json").write_text(json.dumps(state, indent=2))


def _kill_me_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)


def _terminate_group(pid: int, proc: subprocess.Popen | None = None, grace: float = 10.0) -> None:
    """SIGTERM the process group led by pid, SIGKILL it after `grace` seconds."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.monotonic() + grace
    while time.monotonic() < end:
        if proc is not None:
            if proc.poll() is not None:
                break
        elif not _alive(pid):
            break
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    if proc is not None:
        proc.wait()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def down(state_dir: Path) -> None:
    """Stop a control plane started by `up` in another process (pids from state.json)."""
    state_file = state_dir / "state.json"
    if not state_file.exists():
        print(f"no control plane running from {state_dir}", file=sys.stderr)
        return
    processes = json.loads(state_file.read_text())["processes"]
    for name in reversed(COMPONENTS):
        info = processes.get(name)
        if info is None:
            continue
        try:
            exe = os.readlink(f"/proc/{info['pid']}/exe")
        except OSError:
            continue  # already gone
        if Path(exe).name == Path(info["exe"]).name:  # never signal a recycled pid
            _terminate_group(info["pid"])
            print(f"stopped {name} (pid {info['pid']})", file=sys.stderr)
    state_file.unlink()
    shutil.rmtree(state_dir / "etcd", ignore_errors=True)  # logs and certs stay for post-mortems


def print_env(state_dir: Path) -> None:
    print(f"export KUBECONFIG={state_dir / 'kubeconfig'}")
    print(f'export PATH="{bin_dir()}:$PATH"')


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["up", "down", "env"])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    parser.add_argument(
        "--crds", type=Path, default=REPO / "crds", help="CRD files to install before controllers"
    )
    args = parser.parse_args()
    state_dir = args.state_dir.resolve()
    if args.command == "down":
        down(state_dir)
        return
    if args.command == "env":
        print_env(state_dir)
        return
    if (state_dir / "state.json").exists():
        down(state_dir)  # a stale or running one from before: replace it
    shutil.rmtree(state_dir / "etcd", ignore_errors=True)
    started = time.monotonic()
    plane = ControlPlane(state_dir)
    crds = sorted(args.crds.glob("*.yaml")) if args.crds.is_dir() else []
    plane.start(crds)
    print(f"control plane up in {time.monotonic() - started:.1f}s at {plane.server}", file=sys.stderr)
    print(f"logs: {state_dir / 'logs'}; stop with `make cluster-down`", file=sys.stderr)
    print_env(state_dir)


if __name__ == "__main__":
    main()
