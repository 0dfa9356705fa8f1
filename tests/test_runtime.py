"""Device and precision policy: `precision: auto` from a timed probe, cached per machine."""

import json

import pytest
import torch

from dlm.core import runtime
from dlm.core.runtime import BF16_MARGIN, choose_precision, resolved_precision


@pytest.fixture
def probes(monkeypatch):
    """time_probe replaced by injected timings; every call counted. This process's memory of
    earlier answers is emptied (the cache file is per test: conftest sets XDG_CACHE_HOME)."""
    calls = []

    def set_timings(fp32_s, bf16_s):
        def fake():
            calls.append((fp32_s, bf16_s))
            return fp32_s, bf16_s
        monkeypatch.setattr(runtime, "time_probe", fake)

    monkeypatch.setattr(runtime, "_measured", {})
    monkeypatch.setattr(runtime, "load_per_core", lambda: 0.0)  # a quiet machine unless a test says otherwise
    set_timings.calls = calls
    return set_timings


def forget_this_process(monkeypatch):
    monkeypatch.setattr(runtime, "_measured", {})


def test_bf16_only_where_it_wins_by_the_margin():
    assert BF16_MARGIN == 1.3
    assert choose_precision(fp32_s=1.31, bf16_s=1.0) == "bf16"
    assert choose_precision(fp32_s=1.29, bf16_s=1.0) == "fp32"
    assert choose_precision(fp32_s=1.0, bf16_s=4.0) == "fp32"  # a CPU that emulates bf16


@pytest.mark.parametrize("fp32_s, expected", [(2.0, "bf16"), (1.2, "fp32")])
def test_auto_on_cpu_follows_the_probe_and_caches_it(probes, monkeypatch, fp32_s, expected):
    probes(fp32_s, 1.0)
    assert resolved_precision("auto", "cpu") == expected
    assert resolved_precision("auto", "cpu") == expected and len(probes.calls) == 1  # once per process
    cache = json.loads(runtime.probe_cache().read_text())
    assert cache == {runtime.machine_key(): {"fp32_s": fp32_s, "bf16_s": 1.0, "load": 0.0}}
    # a new process on the same machine reads the file instead of probing again
    forget_this_process(monkeypatch)
    probes(99.0, 1.0)  # would say bf16, were it run
    assert resolved_precision("auto", "cpu") == expected and len(probes.calls) == 1


def test_another_thread_count_is_another_machine(probes, monkeypatch):
    probes(2.0, 1.0)
    resolved_precision("auto", "cpu")
    forget_this_process(monkeypatch)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1234)
    probes(1.0, 1.0)
    assert resolved_precision("auto", "cpu") == "fp32" and len(probes.calls) == 2
    assert len(json.loads(runtime.probe_cache().read_text())) == 2


def test_explicit_choices_and_cuda_never_probe(probes):
    probes(2.0, 1.0)
    assert resolved_precision("fp32", "cpu") == "fp32" and resolved_precision("bf16", "cpu") == "bf16"
    assert resolved_precision("auto", "cuda") == "bf16" and resolved_precision("fp32", "cuda") == "fp32"
    assert probes.calls == [] and not runtime.probe_cache().exists()
    with runtime.autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with runtime.autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")


def test_a_broken_cache_file_is_measured_again(probes):
    runtime.probe_cache().parent.mkdir(parents=True)
    runtime.probe_cache().write_text("{not json")
    probes(2.0, 1.0)
    assert resolved_precision("auto", "cpu") == "bf16" and len(probes.calls) == 1
    assert runtime.machine_key() in json.loads(runtime.probe_cache().read_text())


def test_the_real_probe_runs_anywhere_and_leaves_the_rng_alone(monkeypatch):
    forget_this_process(monkeypatch)
    rng = torch.get_rng_state()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # where a sampler first asks
        probe = runtime.cpu_precision_probe()
    assert torch.equal(torch.get_rng_state(), rng)  # a run's draws do not depend on whether it probed
    assert 0 < probe.fp32_s < 2 and 0 < probe.bf16_s < 10 and probe.precision in ("fp32", "bf16")


def test_a_probe_timed_on_a_busy_machine_is_measured_again_when_it_is_quieter(probes, monkeypatch):
    monkeypatch.setattr(runtime, "load_per_core", lambda: 3.0)  # busy: bf16 looked slow
    probes(1.0, 4.0)
    assert resolved_precision("auto", "cpu") == "fp32" and len(probes.calls) == 1
    forget_this_process(monkeypatch)
    probes(1.0, 4.0)
    assert resolved_precision("auto", "cpu") == "fp32" and len(probes.calls) == 1  # as busy: the cache stands
    forget_this_process(monkeypatch)
    monkeypatch.setattr(runtime, "load_per_core", lambda: 0.2)
    probes(2.0, 1.0)  # quiet now: bf16 wins
    assert resolved_precision("auto", "cpu") == "bf16" and len(probes.calls) == 2
    assert json.loads(runtime.probe_cache().read_text())[runtime.machine_key()]["load"] == 0.2
    forget_this_process(monkeypatch)
    probes(1.0, 4.0)  # a quiet measurement is kept
    assert resolved_precision("auto", "cpu") == "bf16" and len(probes.calls) == 2


def test_a_cache_written_before_loads_were_recorded_counts_as_quiet(probes):
    runtime.probe_cache().parent.mkdir(parents=True)
    runtime.probe_cache().write_text(json.dumps({runtime.machine_key(): {"fp32_s": 2.0, "bf16_s": 1.0}}))
    probes(1.0, 4.0)
    assert resolved_precision("auto", "cpu") == "bf16" and probes.calls == []


def test_log_lines_show_the_cache_under_the_home_folder_as_a_tilde(tmp_path, monkeypatch):
    from pathlib import Path

    from dlm.core import runtime

    monkeypatch.setattr(Path, "home", classmethod(lambda cls: tmp_path / "someone"))
    assert runtime.shown(tmp_path / "someone" / ".cache" / "dlm" / "precision.json") == "~/.cache/dlm/precision.json"
    assert runtime.shown(tmp_path / "elsewhere" / "precision.json") == str(tmp_path / "elsewhere" / "precision.json")
