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


FAULTS = textwrap.dedent("""
    import resource, sys
    from turnctl.host import tune_allocator
    tuned = tune_allocator() if sys.argv[1] == "1" else False
    import torch
    torch.set_num_threads(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU())
    x = torch.randn(48, 3, 64, 64)  # 25 MB activations: mapped afresh by default glibc
    with torch.no_grad():
        net(x)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            net(x)
    print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
""")


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_the_tuned_allocator_stops_refaulting_activation_memory():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.pop("TURNCTL_MALLOC_TUNING", None)

    def faults(tune: str):
        out = subprocess.run([sys.executable, "-c", FAULTS, tune], capture_output=True, text=True, env=env,
                             check=True, timeout=120).stdout.split()
        return out[0] == "True", int(out[1])

    (tuned_default, default), (tuned, tuned_faults) = faults("0"), faults("1")
    assert not tuned_default and tuned
    # glibc's defaults map and zero-fill every activation again (hundreds of thousands of page
    # faults here); the tuned heap keeps them.
    assert tuned_faults * 5 < default, (tuned_faults, default)
