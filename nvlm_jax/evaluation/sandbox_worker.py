"""Supervisor process for one sandboxed program (run as a script by `sandbox.py`; standard library only).

    python -I -B sandbox_worker.py CONFIG.json      # prints one JSON result line on stdout

The supervisor makes itself a child subreaper (PR_SET_CHILD_SUBREAPER), so every process the program
starts, however it detaches (double fork, `setsid`), is re-parented to it rather than to init; then it
forks the program's process. That child redirects its output to files, sets its resource limits, installs
audit hooks and `exec`s the program. Only when `exec` returns normally does the child write a random
token, received from the supervisor over a pipe the program's source never names, to a second pipe; the
supervisor passes the program iff exactly that token arrives. Printing text, exiting early with status 0,
`SystemExit(0)` or `os._exit(0)` therefore never pass. The time limit starts at the fork, after the
interpreter has started. When the program ends or its time is up, the supervisor kills every descendant
it can find (by parent links in /proc) until none is left.

The audit hooks refuse process creation, signals to other processes, frame/gc/ctypes introspection (which
could read the token), imports of `ctypes`/`_posixsubprocess`, sockets, and any write, rename, removal or
permission change outside the sample's temporary directory. Not a security boundary: a determined
program can still misbehave (e.g. exhaust the disk in its directory, or find a gap in the hooks); run
untrusted generations in a container.
"""

import json
import os
import resource
import select
import signal
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
TOKEN_BYTES = 16
_REFUSED_EVENTS = frozenset(
  {
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "os.startfile",
    "subprocess.Popen",
    "pty.spawn",
    "os.kill",
    "os.killpg",
    "signal.pthread_kill",
    "sys._getframe",
    "sys._current_frames",
    "sys.settrace",
    "sys.setprofile",
    "sys.addaudithook",
    "gc.get_objects",
    "gc.get_referrers",
    "gc.get_referents",
    "socket.bind",
    "socket.connect",
    "socket.sendto",
    "socket.sendmsg",
  }
)
_REFUSED_IMPORTS = frozenset({"ctypes", "_ctypes", "_posixsubprocess"})
_FRAME_ATTRIBUTES = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"})
# Events whose listed argument positions are paths the program would create, change or remove.
_PATH_EVENTS = {
  "os.remove": (0,),
  "os.rmdir": (0,),
  "os.mkdir": (0,),
  "os.rename": (0, 1),
  "os.symlink": (1,),
  "os.link": (0, 1),
  "os.truncate": (0,),
  "os.chmod": (0,),
  "os.chown": (0,),
  "os.utime": (0,),
  "os.chflags": (0,),
  "os.setxattr": (0,),
  "os.removexattr": (0,),
  "shutil.rmtree": (0,),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _make_audit_hook(sandbox_dir: str):
  """The hook refuses by raising PermissionError inside the program (where it can be caught, not undone)."""
  root = os.path.realpath(sandbox_dir)
  realpath, fspath, join, getcwd = os.path.realpath, os.fspath, os.path.join, os.getcwd

  def inside(path) -> bool:
    if isinstance(path, int):  # an already open file descriptor
      return True
    path = os.fsdecode(fspath(path))
    resolved = realpath(join(getcwd(), path))
    return resolved == root or resolved.startswith(root + os.sep) or resolved == "/dev/null"

  def hook(event, args):
    if event in _REFUSED_EVENTS or event.startswith("ctypes."):
      raise PermissionError(f"sandbox: {event} is refused")
    if event == "import" and args[0] in _REFUSED_IMPORTS:
      raise PermissionError(f"sandbox: importing {args[0]} is refused")
    if event == "object.__getattr__" and args[1] in _FRAME_ATTRIBUTES:
      raise PermissionError(f"sandbox: reading .{args[1]} is refused")
    if event == "open":
      path, mode, flags = args
      if path is None:
        return
      if not isinstance(path, int) and os.fsdecode(fspath(path)).startswith("/proc"):
        raise PermissionError("sandbox: /proc is refused")
      writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
      if writes and not inside(path):
        raise PermissionError(f"sandbox: writing {path!r} outside the sample's directory is refused")
    elif event in _PATH_EVENTS:
      for position in _PATH_EVENTS[event]:
        if position < len(args) and args[position] is not None and not inside(args[position]):
          raise PermissionError(f"sandbox: {event} on {args[position]!r} outside the sample's directory is refused")

  return hook


def _run_program(config: dict, token_read: int, result_write: int) -> None:
  """In the forked child: never returns."""
  write, exit_now = os.write, os._exit  # bound before the program can replace them
  token = b""
  while len(token) < TOKEN_BYTES:
    chunk = os.read(token_read, TOKEN_BYTES - len(token))
    if not chunk:
      exit_now(3)
    token += chunk
  os.close(token_read)
  sandbox_dir = config["sandbox_dir"]
  with open(config["program_path"], encoding="utf-8") as f:
    source = f.read()
  os.chdir(sandbox_dir)
  stdin = os.open(os.devnull, os.O_RDONLY)
  stdout = os.open(os.path.join(config["work_dir"], "stdout.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
  stderr = os.open(os.path.join(config["work_dir"], "stderr.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
  for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
    os.dup2(fd, target)
    os.close(fd)
  keep = {0, 1, 2, result_write}
  for fd in range(3, 1024):
    if fd not in keep:
      try:
        os.close(fd)
      except OSError:
        pass
  limits = config["limits"]
  cpu = limits["cpu_s"]
  resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
  resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"], limits["memory_bytes"]))
  resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
  resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_size_bytes"], limits["file_size_bytes"]))
  resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"], limits["open_files"]))
  code = compile(source, "program.py", "exec")
  namespace: dict = {}  # as human-eval's exec: no __name__ == "__main__" blocks run
  if config["guard"]:
    for name in [m for m in sys.modules if m.split(".")[0] in _REFUSED_IMPORTS]:
      del sys.modules[name]  # the supervisor's ctypes: a fresh import must pass the hook
    sys.addaudithook(_make_audit_hook(sandbox_dir))
  try:
    exec(code, namespace)  # noqa: S102 - running the program is the point; see the module docstring
  except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt fail the program too
    try:
      sys.stderr.write(f"{type(e).__name__}: {e}\n")
      sys.stderr.flush()
    finally:
      exit_now(1)
  try:
    write(result_write, token)
  finally:
    try:
      sys.stdout.flush()
      sys.stderr.flush()
    finally:
      exit_now(0)


def _descendants(root: int) -> list[int]:
  """Every process whose chain of parents leads to `root` (zombies included)."""
  children: dict[int, list[int]] = {}
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/stat", "rb") as f:
        stat = f.read()
    except OSError:
      continue
    ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
    children.setdefault(ppid, []).append(int(name))
  found, stack = [], [root]
  while stack:
    for child in children.get(stack.pop(), ()):
      found.append(child)
      stack.append(child)
  return found


def _kill_descendants(give_up_after_s: float = 10.0) -> int:
  """SIGKILL and reap every descendant until none is left; returns how many were killed."""
  killed: set[int] = set()
  me = os.getpid()
  give_up = time.monotonic() + give_up_after_s  # only a process stuck in the kernel survives SIGKILL
  while time.monotonic() < give_up:
    alive = _descendants(me)
    for pid in alive:
      try:
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
      except ProcessLookupError:
        pass
    while True:  # reap what has been re-parented to us
      try:
        pid, _ = os.waitpid(-1, os.WNOHANG)
      except ChildProcessError:
        pid = 0
      if pid == 0:
        break
    if not alive:
      break
    time.sleep(0.005)
  return len(killed)


def _tail(path: str, max_chars: int = 2000) -> str:
  try:
    with open(path, "rb") as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(0, f.tell() - max_chars))
      return f.read().decode("utf-8", errors="replace")
  except OSError:
    return ""


def main(config_path: str) -> int:
  with open(config_path, encoding="utf-8") as f:
    config = json.load(f)
  import ctypes  # only the supervisor needs it; the program's process drops it from sys.modules

  libc = ctypes.CDLL(None, use_errno=True)
  if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
  token_read, token_write = os.pipe()
  result_read, result_write = os.pipe()
  sys.stdout.flush()
  pid = os.fork()
  if pid == 0:
    os.close(token_write)
    os.close(result_read)
    _run_program(config, token_read, result_write)
  started = time.monotonic()
  token = os.urandom(TOKEN_BYTES)  # made after the fork: the child's memory holds it only once sent
  os.close(token_read)
  os.close(result_write)
  os.write(token_write, token)
  os.close(token_write)
  os.set_blocking(result_read, False)

  received, status, returncode = b"", None, None
  deadline = started + config["limits"]["timeout_s"]
  while True:
    remaining = deadline - time.monotonic()
    readable, _, _ = select.select([result_read], [], [], max(0.0, min(remaining, 0.02)))
    if readable:
      try:
        received += os.read(result_read, 4096)
      except BlockingIOError:
        pass
    done, wait_status = os.waitpid(pid, os.WNOHANG)
    if done:
      returncode = os.waitstatus_to_exitcode(wait_status)
      break
    if time.monotonic() >= deadline:
      status = "timeout"
      break
  duration = time.monotonic() - started
  try:
    received += os.read(result_read, 4096)
  except BlockingIOError:
    pass
  killed = _kill_descendants()
  if status is None:
    if received == token:
      status = "passed"
    elif returncode == -signal.SIGXCPU:  # the CPU-seconds limit
      status = "timeout"
    else:
      status = "failed"
  work_dir = config["work_dir"]
  result = {
    "status": status,
    "returncode": returncode,
    "stdout_tail": _tail(os.path.join(work_dir, "stdout.txt")),
    "stderr_tail": _tail(os.path.join(work_dir, "stderr.txt")),
    "duration_s": duration,
    "processes_killed": killed,
  }
  sys.stdout.write(json.dumps(result) + "\n")
  sys.stdout.flush()
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1]))
