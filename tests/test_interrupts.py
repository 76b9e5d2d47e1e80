"""Ctrl-C on the command line: a second press ends the process at once, even where the first was swallowed;
the console script ends with status 130 after the first. Each case runs in a process of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

# IGNORED: a process started in the background by a non-interactive shell (`make test &`, some CI runners)
# inherits SIGINT ignored, and Python then installs no handler of its own; each child here installs
# Python's, as an interactive terminal gives it.

# The main thread swallows every KeyboardInterrupt, as JAX's garbage-collection callback can: only the
# second press, seen by the watching thread, ends it. The child says each step from inside its try, so the
# driver's next press, sent once it has read that line, always lands in the try.
SWALLOWING = textwrap.dedent("""
    import signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (see IGNORED)
    from seal_jax.interrupts import SecondPressQuits
    presses = int(sys.argv[1])
    with SecondPressQuits(lambda: "stopped at once", presses=presses):
        swallowed, said = 0, -1
        deadline = time.monotonic() + 60
        while True:
            try:  # (every step inside: a press lands here whatever the loop is doing; the except only counts)
                if said < swallowed:
                    said = swallowed
                    print("ready" if said == 0 else f"swallowed {said}", flush=True)
                if swallowed >= 3 or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            except KeyboardInterrupt:
                swallowed += 1
    try:
        print("left the context", flush=True)
        time.sleep(30)  # a press after the context: Python's own handling only
    except KeyboardInterrupt:
        print("plain KeyboardInterrupt", flush=True)
    sys.exit(7)
""")


def start(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)


@pytest.fixture
def children():
    started: list[subprocess.Popen] = []
    yield started
    for child in started:  # (one a failed assertion left running)
        child.kill()
        child.communicate()


def test_a_second_press_ends_the_process_even_when_the_first_was_swallowed(children):
    children.append(child := start(SWALLOWING, "2"))
    assert child.stdout.readline() == "ready\n"
    child.send_signal(signal.SIGINT)
    assert child.stdout.readline() == "swallowed 1\n"  # the first press: a KeyboardInterrupt, as usual
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=30)
    # (the main thread may still report the second press before the watching thread ends the process)
    assert child.returncode == 130 and err == "stopped at once\n" and out in ("", "swallowed 2\n")


def test_presses_below_the_count_only_raise_and_the_context_leaves_nothing_behind(children):
    children.append(child := start(SWALLOWING, "4"))
    assert child.stdout.readline() == "ready\n"
    for n in (1, 2, 3):
        child.send_signal(signal.SIGINT)
        assert child.stdout.readline() == f"swallowed {n}\n"
    assert child.stdout.readline() == "left the context\n"
    child.send_signal(signal.SIGINT)  # after the context: no watcher counts it
    out, err = child.communicate(timeout=30)
    assert (child.returncode, out, err) == (7, "plain KeyboardInterrupt\n", "")


def test_the_console_script_ends_with_130_after_ctrl_c(tmp_path, children):
    """``seal-jax run`` stopped by Ctrl-C (here raised where the config loads) ends the process with 130 and
    the command that continues it, without the interpreter's teardown (which could crash after XLA's
    threads were stopped mid-call)."""
    code = textwrap.dedent(f"""
        import signal, sys
        signal.signal(signal.SIGINT, signal.default_int_handler)  # (see IGNORED)
        from seal_jax import cli
        def pressed(*args, **kwargs):
            raise KeyboardInterrupt
        cli.runs.load_config = pressed
        sys.argv = ["seal-jax", "run", "experiments/demo.toml", "--out", {str(tmp_path / "run")!r}]
        cli.main()
        print("main returned", flush=True)  # not reached: the console script ends inside main
    """)
    children.append(child := start(code))
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130 and out == "", err
    assert f"seal-jax run: interrupted; rows written so far are kept: `seal-jax run experiments/demo.toml --out " \
           f"{tmp_path / 'run'} --resume` continues" in err
