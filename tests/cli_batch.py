"""Many `python -m robust_train ...` command lines for the tests at the cost of one start-up.

Every command line of the CLI tests used to start its own interpreter, and each paid about 10 s on a 2-core CPU for
importing torch and Lightning and building the parser before doing half a second of work. Here one process imports
the package and parses one command line, then forks a child per command line: the child gets what a fresh process
gets (its own environment, working directory, file descriptors 1 and 2, exit code and exit handlers) with the
start-up already paid. Where forking is unsafe (threads already running, no `fork`), each runs as a subprocess.

Reads [{"args": [...], "env": {...}, "cwd": "..."}, ...] as JSON on stdin; writes [{"returncode": int, "stdout":
str, "stderr": str}, ...] as JSON on stdout. `tests.test_cli.run_many` is the way in.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import traceback



def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message") prints the message and exits with 1, as Python does
    return 1


def _child(case: dict) -> int:
    os.environ.clear()
    os.environ.update(case["env"])
    os.chdir(case["cwd"])
    try:
        import robust_train
        from robust_train.cli import main

        sys.argv = [os.path.join(os.path.dirname(robust_train.__file__), "__main__.py"), *case["args"]]
        code = _exit_code(main())
    except SystemExit as stop:
        code = _exit_code(stop.code)
    except BaseException:  # noqa: BLE001 - an uncaught error ends a real process with its traceback and 1
        traceback.print_exc()
        code = 1
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    return code


def _forked(case: dict) -> dict:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                code = _child(case)
            finally:
                with contextlib.suppress(BaseException):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code & 0xFF)
        _, status = os.waitpid(pid, 0)  # run_many's timeout bounds the whole batch
        out.seek(0)
        err.seek(0)
        return {"returncode": os.waitstatus_to_exitcode(status), "stdout": out.read().decode(errors="replace"),
                "stderr": err.read().decode(errors="replace")}


def _subprocess(case: dict) -> dict:
    done = subprocess.run([sys.executable, "-m", "robust_train", *case["args"]], capture_output=True, text=True,
                          env=case["env"], cwd=case["cwd"], timeout=600)
    return {"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


def _warm_up() -> None:
    """Import what the command lines use and parse one, so that every child starts where a parse ends."""
    import robust_train.evaluate.cli  # noqa: F401
    from robust_train.cli import main

    argv = sys.argv
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        with contextlib.suppress(SystemExit):
            main(["fit", "--recipe", "standard", "--print_config"])
    sys.argv = argv


def main() -> None:
    cases = json.load(sys.stdin)
    can_fork = hasattr(os, "fork")
    if can_fork:
        _warm_up()
    results = []
    for case in cases:
        safe = can_fork and threading.active_count() == 1
        results.append(_forked(case) if safe else _subprocess(case))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
