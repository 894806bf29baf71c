"""turnctl.host: threads per rank and the glibc allocator settings, each leaving a user's choice alone."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from turnctl import host


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_each_rank_gets_its_share_of_the_cores(monkeypatch, threads_restored):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_SIZE", "2")  # as the DeepSpeed launcher sets it
    cores = len(os.sched_getaffinity(0))
    assert host.set_threads_per_rank() == max(1, cores // 2)
    assert torch.get_num_threads() == max(1, cores // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * cores))  # torchrun's, more ranks than cores
    assert host.set_threads_per_rank() == 1 and torch.get_num_threads() == 1


def test_omp_num_threads_or_a_single_rank_is_left_alone(monkeypatch, threads_restored):
    torch.set_num_threads(1)
    monkeypatch.setenv("LOCAL_SIZE", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert host.set_threads_per_rank() is None and torch.get_num_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("LOCAL_SIZE", "1")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert host.set_threads_per_rank() is None and torch.get_num_threads() == 1


@pytest.mark.parametrize("env", [{"MALLOC_ARENA_MAX": "2"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"},
                                 {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"},
                                 {"TURNCTL_MALLOC_TUNING": "0"}])
def test_a_users_allocator_settings_are_kept(monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert host.tune_allocator() is False


HEAP = textwrap.dedent("""
    import ctypes, sys
    from turnctl.host import tune_allocator
    tuned = tune_allocator() if sys.argv[1] == "1" else False
    import torch

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    before = libc.mallinfo2()
    block = torch.empty(30 * 2**20, dtype=torch.uint8).fill_(1)  # one 30 MiB activation
    alive = libc.mallinfo2()
    del block
    freed = libc.mallinfo2()
    print(tuned, (alive.hblkhd - before.hblkhd) >> 20, freed.fordblks >> 20, (alive.arena - freed.arena) >> 20)
""")


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc"
                    or tuple(map(int, platform.libc_ver()[1].split(".")[:2])) < (2, 33),
                    reason="glibc >= 2.33 (mallinfo2) only")
def test_the_tuned_allocator_keeps_activation_memory_in_the_heap():
    # The mechanism, read from glibc's own accounting rather than from page-fault counts (which
    # NUMA balancing and transparent huge pages change from host to host): with glibc's defaults a
    # fresh 30 MiB activation is a new mmap, unmapped when freed, so the next one is zero-filled by
    # the kernel again; the tuned heap serves it from the heap and keeps it once freed.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.pop("TURNCTL_MALLOC_TUNING", None)

    def heap(tune: str):
        out = subprocess.run([sys.executable, "-c", HEAP, tune], capture_output=True, text=True, env=env,
                             check=True, timeout=120).stdout.split()
        return out[0] == "True", *map(int, out[1:])

    tuned_default, mapped_default, _, _ = heap("0")
    assert not tuned_default and mapped_default >= 30  # the default: a fresh mapping per activation
    tuned, mapped, kept_free, shrunk = heap("1")
    assert tuned and mapped == 0 and kept_free >= 30 and shrunk == 0, (mapped, kept_free, shrunk)


def test_each_environment_builds_deepspeed_ops_in_its_own_directory(tmp_path, monkeypatch):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    root = host.isolate_extension_builds(env)
    assert env["TORCH_EXTENSIONS_DIR"] == root and root.startswith(str(tmp_path / "torch_extensions" / "turnctl-py"))
    assert host.isolate_extension_builds(dict(env)) is None  # set already: the user's (or this) choice stays
    again = {"XDG_CACHE_HOME": str(tmp_path)}
    assert host.isolate_extension_builds(again) == root  # stable: every rank and every run of this env
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "another-venv"))
    assert host.isolate_extension_builds({"XDG_CACHE_HOME": str(tmp_path)}) != root
    # and DeepSpeed's stale-lock check looks where the builds now are
    from turnctl.distributed import extension_build_roots

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", root)
    assert extension_build_roots() == [root]
