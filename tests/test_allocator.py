"""moelab.allocator: freed CPU memory is kept for reuse (glibc), checked on the process's memory map."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from moelab import allocator

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the allocator setting exists on glibc (Linux) only"
)

# a 64 MiB tensor: above glibc's largest mmap threshold (32 MiB), so by default it gets a mapping of its own
_PROBE = textwrap.dedent(
    """
    import sys
    import torch
    {setup}
    def region(addr):
        for line in open("/proc/self/maps"):
            span, *rest = line.split()
            lo, hi = (int(a, 16) for a in span.split("-"))
            if lo <= addr < hi:
                return rest[-1] if len(rest) == 5 else "anonymous"
        return "unmapped"
    x = torch.ones(16 * 2**20)  # 64 MiB of fp32
    print(region(x.data_ptr()))
    """
)


def _probe(setup: str, **env: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _PROBE.format(setup=setup)], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}, timeout=120)
    return out.stdout.split()


def test_large_tensors_come_from_the_heap_once_freed_memory_is_kept():
    setup = "from moelab.allocator import keep_freed_memory, allocator_state\nassert keep_freed_memory()\nprint(allocator_state())"
    *state, where = _probe(setup, MOELAB_SYSTEM_MALLOC="0")
    assert "kept freed memory" in " ".join(state)
    assert where == "[heap]"


def test_by_default_a_large_tensor_is_a_mapping_of_its_own():
    """The control: without the setting glibc maps the 64 MiB tensor by itself (a page fault per page on
    every fresh allocation), which is what the setting avoids."""
    assert _probe("")[-1] == "anonymous"


def test_opt_out_keeps_the_system_allocator():
    setup = "from moelab.allocator import keep_freed_memory, allocator_state\nassert not keep_freed_memory()\nprint(allocator_state().replace(' ', '_'))"
    state, where = _probe(setup, MOELAB_SYSTEM_MALLOC="1")
    assert state == "system_default" and where == "anonymous"


def test_the_moelab_command_keeps_freed_memory():
    setup = "from moelab.cli import main\nassert main(['--help']) == 0"
    assert _probe(setup, MOELAB_SYSTEM_MALLOC="0")[-1] == "[heap]"


def test_state_reports_system_default_before_any_call(monkeypatch):
    monkeypatch.setattr(allocator, "_state", None)
    assert allocator.allocator_state() == "system default"


def test_large_allocations_still_work_off_the_main_thread():
    """With no mmap allowed, a thread's arena cannot hold a 256 MiB block; glibc must fall back to the
    main heap rather than fail."""
    code = textwrap.dedent(
        """
        import threading, torch
        from moelab.allocator import keep_freed_memory
        assert keep_freed_memory()
        out = {}
        def work():
            x = torch.ones(64 * 2**20)  # 256 MiB
            out["sum"] = float(x.sum())
        t = threading.Thread(target=work)
        t.start(); t.join()
        print(out["sum"])
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "MOELAB_SYSTEM_MALLOC": "0"}, timeout=120)
    assert float(run.stdout.split()[-1]) == 64 * 2**20


@pytest.mark.parametrize("value, kept", [("true", False), ("ON", False), ("0", True), ("off", True), ("", True)])
def test_opt_out_accepts_the_usual_boolean_spellings(value, kept):
    setup = "from moelab.allocator import keep_freed_memory\nprint(keep_freed_memory())"
    state, _ = _probe(setup, MOELAB_SYSTEM_MALLOC=value)
    assert state == str(kept)


def test_a_bad_opt_out_value_is_a_one_line_error_from_the_command_and_the_benchmarks():
    env = {**os.environ, "MOELAB_SYSTEM_MALLOC": "maybe"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for argv in ([sys.executable, "-m", "moelab", "count", "--help"], [sys.executable, "-m", "benchmarks", "--only", "train_step"]):
        run = subprocess.run(argv, check=False, capture_output=True, text=True, env=env, cwd=root, timeout=120)
        assert run.returncode == 1, argv
        assert "Traceback" not in run.stderr
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "MOELAB_SYSTEM_MALLOC='maybe'" in lines[0] and lines[0].startswith("error:"), run.stderr
