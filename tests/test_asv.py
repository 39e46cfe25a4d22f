"""The asv tooling, on the CPU: the suite's import, the git stand-in of the device runner,
the reading and merging of committed results."""

import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ASV = ROOT / "asv_bench"


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def suite():
    return _load(ASV / "benchmarks" / "attention.py", "asv_suite_attention")


@pytest.fixture(scope="module")
def results_io():
    return _load(ASV / "results_io.py", "results_io")


def test_suite_imports_no_gpu_library():
    # asv's forkserver imports the suite once and forks a child per benchmark: the
    # parent must not have created a CUDA context, so nothing GPU-side at import.
    code = ("import sys; sys.path.insert(0, 'asv_bench/benchmarks'); import attention; "
            "bad = [m for m in ('cupy', 'torch', 'cuflash') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_suite_grid_matches_report(suite, results_io):
    assert (suite.TOKENS, suite.HIDDEN) == (results_io.TOKENS, results_io.HIDDEN)
    assert suite.Forward.params[0] == suite.FWD_IMPLS
    assert set(suite.FWD_IMPLS) < set(suite.BWD_IMPLS)
    assert min(suite.SEQLENS) == 512 and max(suite.SEQLENS) == 16384


def test_harness_loads_standalone(suite):
    # Loaded by path, with `import cuflash` resolving to whichever checkout is on the
    # path: it must use no relative imports.
    bench = suite.harness()
    case = bench.Case("bfloat16", 128, True, 4096, 4, 16, "bwd")
    assert case.flops == 4.0 * 4 * 16 * 4096 ** 2 * 128 * 2.5 / 2
    assert "from ." not in (ROOT / "cuflash" / "_bench.py").read_text()


def _git(table_path, *args):
    env = {"CUFLASH_ASV_COMMITS": str(table_path), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "asv_git.py"), *args],
                          capture_output=True, text=True, env=env)


def test_git_stand_in(tmp_path):
    head, old = "a" * 40, "b" * 39 + "c"
    table = tmp_path / "commits.json"
    table.write_text(json.dumps({"head": head, "branch": "main",
                                 "commits": {head: 1700000100, old: 1700000000}}))
    assert _git(table, "rev-parse", "main^{commit}").stdout.strip() == head
    assert _git(table, "rev-parse", "bbbb^{commit}").stdout.strip() == old
    assert _git(table, "rev-parse", "cccc^{commit}").returncode == 128
    out = _git(table, "rev-list", "-n", "1", "--format=%at", old).stdout.split()
    assert out == ["commit", old, "1700000000"]
    assert _git(table, "name-rev", "--name-only", old).stdout.strip() == "main"
    assert _git(table, "config", "init.defaultBranch").returncode == 1
    assert _git(table, "log").returncode == 1  # anything else fails loudly


def test_committed_results_read(results_io):
    rows = results_io.load()
    assert rows, "asv_bench/results holds no results"
    for r in rows[:50]:
        flops = 4.0 * 16384 * r.seqlen * 2048 * (2.5 if r.direction == "bwd" else 1)
        flops /= 2 if r.causal else 1
        assert math.isclose(r.tflops, flops / r.seconds / 1e12)
        assert r.seconds > 0
    machine = rows[0].machine
    for impl in ("cuflash", "torch_flash"):
        commits = {r.commit for r in rows if r.impl == impl and r.machine == machine}
        assert len(commits) >= 2, (impl, commits)


def test_merge_keeps_old_and_takes_new(tmp_path):
    collect = _load(ASV / "collect.py", "asv_collect")
    cols = ["result", "params"]
    old = {"result_columns": cols, "durations": {"a": 1},
           "results": {"x": [[1.0], [["1"]]], "y": [[2.0], [["1"]]]}}
    new = {"result_columns": cols, "durations": {"b": 2},
           "results": {"x": [None, [["1"]]], "y": [[3.0], [["1"]]], "z": [[4.0], [["1"]]]}}
    dest, src = tmp_path / "old.json", tmp_path / "new.json"
    dest.write_text(json.dumps(old))
    src.write_text(json.dumps(new))
    collect.merge_file(src, dest)
    merged = json.loads(dest.read_text())
    assert merged["results"]["x"][0] == [1.0]  # a failed re-run keeps the old value
    assert merged["results"]["y"][0] == [3.0]
    assert merged["results"]["z"][0] == [4.0]
    assert merged["durations"] == {"a": 1, "b": 2}
