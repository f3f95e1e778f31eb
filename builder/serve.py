"""Start, watch and stop a real `tritonserver` on a rendered model repository."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from builder.errors import ServerError
from builder.triton.stop_channel import send_drain

INSTALL_HINT = "install it with: pip install --no-deps nvidia-pytriton==0.7.0"
BACKEND_CACHE = Path.home() / ".cache" / "builder" / "backends"
LOG_TAIL_LINES = 40
STOP_WAIT_S = 20.0
DRAIN_WAIT_S = 0.5  # after the drain message, for the engine's error responses to leave
ENGINE_MODEL = "tensorrt_llm"
EXIT_TIMEOUT_S = 3  # Triton's --exit-timeout-secs: how long a stopping server waits for requests in flight
POLL_S = 0.5


@dataclass(frozen=True)
class TritonInstall:
    """Where a tritonserver binary and its python backend files are."""

    server: Path
    python_backend: Path  # folder with libtriton_python.so and triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for this interpreter


def _wheel_root() -> Path | None:
    """The `pytriton/tritonserver` folder of the nvidia-pytriton wheel (found without importing pytriton)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    return root if (root / "bin" / "tritonserver").is_file() else None


def _install_from_path(server: Path) -> TritonInstall | None:
    """A tritonserver on PATH with its backends beside it (e.g. /opt/tritonserver in NGC containers)."""
    backend = server.resolve().parent.parent / "backends" / "python"
    stub = backend / "triton_python_backend_stub"
    if (backend / "libtriton_python.so").is_file() and stub.is_file():
        return TritonInstall(server, backend, stub)
    return None


def find_triton() -> TritonInstall:
    """tritonserver from PATH first, else from the nvidia-pytriton wheel; ServerError if neither."""
    on_path = shutil.which("tritonserver")
    if on_path:
        install = _install_from_path(Path(on_path))
        if install is not None:
            return install
    root = _wheel_root()
    if root is None:
        raise ServerError(f"tritonserver was not found on PATH nor in the nvidia-pytriton wheel; {INSTALL_HINT}")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"the nvidia-pytriton wheel has no python backend stub for Python {version}; use "
                          "Python 3.8-3.13 or a tritonserver container")
    return TritonInstall(root / "bin" / "tritonserver", root / "backends" / "python", stub)


def find_tritonserver() -> Path:
    """The tritonserver binary (PATH first, else the nvidia-pytriton wheel); ServerError if neither."""
    return find_triton().server


def prepare_backend_dir(install: TritonInstall, cache_dir: Path = BACKEND_CACHE) -> Path:
    """A --backend-directory whose python/ holds symlinks to the backend and stub (their RPATH is relative)."""
    if install.stub.parent == install.python_backend:
        return install.python_backend.parent
    version = install.stub.parent.name
    target = Path(cache_dir) / f"py{version}" / "python"
    target.mkdir(parents=True, exist_ok=True)
    links = {"libtriton_python.so": install.python_backend / "libtriton_python.so",
             "triton_python_backend_utils.py": install.python_backend / "triton_python_backend_utils.py",
             "triton_python_backend_stub": install.stub}
    for name, source in links.items():
        link = target / name
        if link.is_symlink() and link.resolve() == source.resolve():
            continue
        temp = target / f".{name}.{os.getpid()}"
        temp.unlink(missing_ok=True)
        temp.symlink_to(source)
        temp.replace(link)  # atomic: concurrent servers never see a missing link
    return target.parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for tests; a race with other processes is possible)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int, host: str = "0.0.0.0") -> bool:
    """True when a TCP listener could not bind host:port now (tritonserver binds 0.0.0.0 by default).

    SO_REUSEADDR as servers set it: a port whose old connections linger in TIME_WAIT counts as free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def interpreter_libdir() -> Path | None:
    """The folder holding this interpreter's shared libpython, if it has one."""
    libdir, library = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    if not libdir or not library or ".so" not in library:
        return None  # a static libpython: nothing to point the stub at
    return Path(libdir) if (Path(libdir) / library).is_file() else None


def server_env() -> dict[str, str]:
    """The environment for tritonserver and its python stubs.

    This interpreter's bin goes first on PATH (the stub takes its packages from there), and its libpython's
    folder first on LD_LIBRARY_PATH: otherwise the stub may load the system libpython of the same version,
    whose missing private symbols break stdlib modules such as ssl (and so transformers).
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    libdir = interpreter_libdir()
    if libdir is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libdir), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


@dataclass
class TritonServer:
    """A tritonserver process on `repo`; use as a context manager or call start(), wait_ready(), stop()."""

    repo: Path
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    log_path: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)

    @property
    def grpc_url(self) -> str:
        """host:port for tritonclient.grpc."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """Base URL of the HTTP endpoint."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        """Prometheus metrics URL."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self, install: TritonInstall) -> list[str]:
        """The tritonserver command line."""
        return [str(install.server), f"--model-repository={Path(self.repo).resolve()}",
                f"--backend-directory={prepare_backend_dir(install)}",
                f"--grpc-port={self.grpc_port}", f"--http-port={self.http_port}",
                f"--metrics-port={self.metrics_port}", "--allow-metrics=true",
                "--disable-auto-complete-config",
                f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                f"--exit-timeout-secs={EXIT_TIMEOUT_S}", *self.extra_args]

    @property
    def shm_prefix(self) -> str:
        """The name prefix of the python backend's shared-memory regions (in /dev/shm) of this server."""
        return f"builder{os.getpid()}_{self.grpc_port}_"

    def remove_shm(self, shm_dir: Path = Path("/dev/shm")) -> None:
        """Remove the shared-memory regions a stopped server left behind (stubs killed before their cleanup)."""
        for region in shm_dir.glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)

    def exit_reason(self) -> str:
        """One line on why the server process ended by itself: the builder watchdog's message, the fatal signal, or
        the exit code, with the log's path."""
        code = self.process.returncode if self.process is not None else None
        lines = Path(self.log_path).read_text(errors="replace").splitlines() if self.log_path else []
        watchdog = [line for line in lines if "builder watchdog" in line]
        fatal = [line.strip() for line in lines if line.startswith("Signal (") or "malloc()" in line]
        if watchdog:
            model = watchdog[-1].split("stub died: ", 1)[-1].split(":", 1)[0]
            why = f"the python backend stub of model {model} died"
        elif fatal:
            why = f"it crashed ({fatal[0]})"
        elif code is not None and code < 0:
            why = f"it was killed by signal {-code}"
        else:
            why = f"it exited with code {code}"
        return f"tritonserver stopped by itself: {why}; log: {self.log_path}"

    def check_ports(self) -> None:
        """ServerError when a port this server needs is taken: otherwise the server that already listens there
        answers the readiness probe, and this one fails later (its bind fails after its models load)."""
        ports = (("gRPC", self.grpc_port, "--grpc-port"), ("HTTP", self.http_port, "--http-port"),
                 ("metrics", self.metrics_port, "--metrics-port"))
        if len({port for _, port, _ in ports}) < len(ports):
            raise ServerError(f"the gRPC, HTTP and metrics ports must differ (got {self.grpc_port}, {self.http_port}, "
                              f"{self.metrics_port}): pass --grpc-port, --http-port and --metrics-port")
        for name, port, flag in ports:
            if port_in_use(port):
                raise ServerError(f"port {port} ({name}) is already in use, probably by another server: stop it "
                                  f"or pass {flag} with a free port")

    def start(self) -> "TritonServer":
        """Launch tritonserver in its own process group, output going to log_path (a temp file by default)."""
        if self.process is not None:
            raise ServerError("this TritonServer is already started; stop() it first")
        if not (Path(self.repo) / "ensemble").is_dir() and not any(Path(self.repo).glob("*/config.pbtxt")):
            raise ServerError(f"{self.repo} is not a model repository; build one with `builder build`")
        self.check_ports()
        install = find_triton()
        if self.log_path is None:
            self.log_path = Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        self.log_path = Path(self.log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command(install), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=server_env(), start_new_session=True)
        return self

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of the server log."""
        if self.log_path is None or not Path(self.log_path).is_file():
            return ""
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])

    def log_errors(self, limit: int = 10, width: int = 600) -> str:
        """The server log's error lines (model load failures first), shortened; the log tail if there are none."""
        if self.log_path is None or not Path(self.log_path).is_file():
            return ""
        lines = Path(self.log_path).read_text(errors="replace").splitlines()
        errors = [line for line in lines if line.startswith("E") and "CUDA" not in line and "Cuda" not in line]
        errors += [line for line in lines if line.startswith("error:")]
        if not errors:
            return self.log_tail()
        return "\n".join(line if len(line) <= width else line[:width] + " ..." for line in errors[:limit])

    def is_ready(self) -> bool:
        """True when HTTP /v2/health/ready answers 200."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until every model is ready; ServerError with the log tail if the server dies or times out."""
        if self.process is None:
            raise ServerError("the server is not started; call start() first")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode} before it was ready "
                                  f"(full log: {self.log_path}):\n{self.log_errors()}")
            if self.is_ready():
                return
            time.sleep(POLL_S)
        tail = self.log_tail()
        self.stop()
        raise ServerError(f"tritonserver was not ready after {timeout:.0f}s (full log: {self.log_path}):\n{tail}")

    def stop(self, timeout: float = STOP_WAIT_S) -> None:
        """SIGINT (graceful: models finalize), then SIGKILL to the process group if it does not exit in time."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is not None:
            self.remove_shm()
            return
        if send_drain(ENGINE_MODEL, process.pid):  # end running streams first: Triton then finds none in flight
            time.sleep(DRAIN_WAIT_S)
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=10)
        self.remove_shm()

    def __enter__(self) -> "TritonServer":
        """start() and wait_ready()."""
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        """stop()."""
        self.stop()


def _interrupt(signum: int, frame) -> None:
    """Turn SIGTERM into the same clean stop as Ctrl-C."""
    raise KeyboardInterrupt


def serve_forever(repo: Path, grpc_port: int = 8001, http_port: int = 8000, metrics_port: int = 8002,
                  log_path: Path | None = None, ready_timeout: float = 300.0) -> None:
    """Run tritonserver on repo until Ctrl-C / SIGTERM (returns) or until it ends by itself (ServerError with the
    reason in one line: a crash, or a stub that died, builder.triton.watchdog); print the endpoints once ready."""
    server = TritonServer(Path(repo), grpc_port, http_port, metrics_port, log_path)
    # Ctrl-C and SIGTERM stop the server even when this process inherited SIGINT as ignored (a parent that ignores
    # it, e.g. a test runner or a background job, passes SIG_IGN on through exec)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    server.start()
    try:
        server.wait_ready(ready_timeout)
        print(f"builder: ready: Triton is serving {repo}\n  gRPC    {server.grpc_url}  (streaming: model \"ensemble\")\n"
              f"  HTTP    {server.http_url}\n  metrics {server.metrics_url}\n  log     {server.log_path}\n"
              "Press Ctrl-C to stop.", flush=True)
        server.process.wait()
        raise ServerError(server.exit_reason())
    except KeyboardInterrupt:
        print("\nstopping tritonserver ...", flush=True)
    finally:
        server.stop()
