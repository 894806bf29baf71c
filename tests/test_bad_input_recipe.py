"""Bad recipes, run names, output directories and disks: one line and exit 2, nothing lost (issue #13).

Each test drives the real CLI (``turnctl.cli.run``, or ``python -m turnctl``-like subprocesses where
memory must be bounded) and checks the exit status, that stderr is one line, and what it names.
"""

import errno
import json
import os
import subprocess
import sys
import re
from pathlib import Path

import pytest
import yaml

from turnctl.cli import run

REPO = Path(__file__).resolve().parent.parent
_NOTICE = re.compile(r"^(\[rank \d+\] )?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d )?(INFO|WARNING) ")
TINY = REPO / "recipes" / "tiny.yaml"


def _one_error_line(err: str, *names: str) -> str:
    # Log notices may come first (e.g. "waiting for <lock>" when another process builds DeepSpeed's
    # extension at the same time); the error itself must be one line, and nothing else may be printed.
    lines = [l for l in err.strip().splitlines() if not _NOTICE.match(l)]
    assert len(lines) == 1, err[-3000:]
    line = lines[0]
    assert line.startswith("turnctl: error: "), line
    for name in names:
        assert name in line, (name, line)
    return line


def _tiny() -> dict:
    return yaml.safe_load(TINY.read_text())


def _write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ---- 1. YAML alias bombs, bounded size ---------------------------------------------------------

def _bomb(levels: int = 9) -> str:
    """A "billion laughs" as a YAML flow mapping: 9 levels of 9 aliases = 9**9 strings expanded."""
    parts = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        parts.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "{" + ", ".join(parts) + "}"


_BOUNDED = r"""
import contextlib, io, json, resource, sys
from turnctl.cli import run
import turnctl.runner, turnctl.evaluate, turnctl.models  # the heavy imports, before the limit

def vm_bytes():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))

limit = vm_bytes() + 1024 ** 3  # 1 GiB more than the imports take; the bombs expand to several GB
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run(argv)
    out.append({"code": code, "err": err.getvalue()})
print(json.dumps(out))
"""


def _cli_in_bounded_memory(cases, cwd: Path):
    env = dict(os.environ, MALLOC_ARENA_MAX="2", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               TURNCTL_NO_PROGRESS="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-c", _BOUNDED, json.dumps(cases)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_yaml_alias_bombs_are_refused_in_bounded_memory(tmp_path, run_shards):
    bomb = _bomb()
    in_config = tmp_path / "config_bomb.yaml"
    in_config.write_text(_swap_config(TINY.read_text(), bomb))
    raw = _tiny()
    raw["deepspeed"]["extra"] = "@BOMB@"
    in_extra = tmp_path / "extra_bomb.yaml"
    in_extra.write_text(yaml.safe_dump(raw, sort_keys=False).replace("'@BOMB@'", bomb))
    # A run directory whose saved recipe.yaml was replaced by the bomb: --resume and eval read it.
    rundir = tmp_path / "run"
    (rundir / "checkpoints").mkdir(parents=True)
    (rundir / "checkpoints" / "latest").write_text("epoch_0000")
    (rundir / "recipe.yaml").write_text(_swap_config(TINY.read_text(), bomb).replace(
        "shards: shards/digits-symmetric-0.6", f"shards: {run_shards}"))
    cases = [
        ["train", "--recipe", str(in_config), "--dry-run"],
        ["train", "--recipe", str(in_extra), "--dry-run"],
        ["train", "--recipe", "tiny", "--dry-run", "--set", f"model.config={bomb}"],
        ["train", "--recipe", "tiny", "--shards", str(run_shards), "--out", str(rundir), "--resume",
         "--set", f"data.shards={run_shards}"],
        ["eval", "--checkpoint", str(rundir)],
    ]
    results = _cli_in_bounded_memory(cases, tmp_path)
    names = [in_config.name, in_extra.name, "--set 'model.config=", "run/recipe.yaml", "run/recipe.yaml"]
    for res, name in zip(results, names):
        assert res["code"] == 2, res
        _one_error_line(res["err"], name, "anchors and aliases")
    # the line of the first anchor is named, so the user can find it
    assert f"{in_config.name}:" in results[0]["err"]


def _swap_config(text: str, flow: str) -> str:
    """tiny.yaml with model.config replaced by ``flow`` (a one-line YAML flow mapping)."""
    lines = text.splitlines()
    start = lines.index("  config:")
    end = start + 1
    while lines[end].startswith("    "):
        end += 1
    return "\n".join(lines[:start] + [f"  config: {flow}"] + lines[end:]) + "\n"


def test_a_recipe_larger_than_one_mib_is_refused(tmp_path, capsys):
    big = tmp_path / "huge.yaml"
    big.write_text(TINY.read_text() + ("# padding\n" * 120_000))  # 1.2 MB of comments: valid YAML
    assert run(["train", "--recipe", str(big), "--dry-run"]) == 2
    _one_error_line(capsys.readouterr().err, str(big), "larger than 1 MiB")


def test_deeply_nested_yaml_is_one_line(tmp_path, capsys):
    deep = tmp_path / "deep.yaml"
    deep.write_text(_swap_config(TINY.read_text(), "{a: " + "[" * 5000 + "]" * 5000 + "}"))
    assert run(["train", "--recipe", str(deep), "--dry-run"]) == 2
    _one_error_line(capsys.readouterr().err, "deep.yaml:", "nested more than")


# ---- 2. run names and output directories -------------------------------------------------------

@pytest.mark.parametrize("override", ["name=../../escaped", "name=/abs", "name=a/b", "name=''", "name=.."])
def test_a_run_name_that_is_not_one_directory_name_is_refused(override, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(["train", "--recipe", "tiny", "--dry-run", "--set", override]) == 2
    line = _one_error_line(capsys.readouterr().err, "name: a run name is one directory name")
    assert repr(yaml.safe_load(override.split("=", 1)[1]) or "") in line
    assert list(tmp_path.iterdir()) == []


def test_a_recipe_file_naming_its_run_outside_runs_is_refused(tmp_path, capsys):
    raw = _tiny()
    raw["name"] = "../../escaped"
    p = _write_recipe(tmp_path / "escape.yaml", raw)
    assert run(["train", "--recipe", str(p), "--dry-run"]) == 2
    _one_error_line(capsys.readouterr().err, "escape.yaml", "name:", "'../../escaped'")


def test_output_dir_that_is_a_file_is_one_line(tmp_path, run_shards, capsys):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine\n")
    assert run(["train", "--recipe", "tiny", "--shards", str(run_shards), "--set", f"output.dir={afile}"]) == 2
    _one_error_line(capsys.readouterr().err, str(afile), "is a file, not a directory")
    assert afile.read_text() == "mine\n"
    # a run directory below a file: the OS says ENOTDIR, turnctl says where
    assert run(["train", "--recipe", "tiny", "--shards", str(run_shards), "--set",
                f"output.dir={afile}/run"]) == 2
    _one_error_line(capsys.readouterr().err, f"{afile}/run", "cannot write there")


def test_an_unwritable_run_directory_is_found_before_any_work(tmp_path, run_shards, capsys, monkeypatch):
    import turnctl.rundir as rundir
    import turnctl.runner as runner

    def read_only(path, text):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def no_work(*a, **k):
        raise AssertionError("the run went past a run directory it cannot write")

    monkeypatch.setattr(rundir, "atomic_write_text", read_only)
    monkeypatch.setattr(runner, "_validation_holdout", no_work)
    out = tmp_path / "ro"
    assert run(["train", "--recipe", "tiny", "--shards", str(run_shards), "--out", str(out)]) == 2
    _one_error_line(capsys.readouterr().err, f"run directory {out}", "cannot write there", "Read-only file system")


# ---- 3. never overwrite what turnctl did not write ---------------------------------------------

def test_train_refuses_a_directory_that_is_not_its_run(tmp_path, run_shards, capsys):
    """The existing contract, kept: a non-empty --out needs --resume, and --resume needs the run's own
    recipe.yaml; the user's files are untouched either way."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    assert run(["train", "--recipe", "tiny", "--shards", str(run_shards), "--out", str(out)]) == 2
    _one_error_line(capsys.readouterr().err, str(out), "is not empty")
    assert run(["train", "--recipe", "tiny", "--shards", str(run_shards), "--out", str(out), "--resume"]) == 2
    _one_error_line(capsys.readouterr().err, str(out), "no recipe.yaml")
    (out / "recipe.yaml").write_text("my: own file\n")
    assert run(["train", "--recipe", "tiny", "--shards", str(run_shards), "--out", str(out), "--resume"]) == 2
    _one_error_line(capsys.readouterr().err, str(out / "recipe.yaml"), "unknown key 'my'")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "recipe.yaml"]
    assert (out / "recipe.yaml").read_text() == "my: own file\n"


def _fake_compare(calls):
    """compare_methods without training: writes what the real one writes at the end."""
    from turnctl.rundir import atomic_write_json

    def fake(recipe, *, methods, seeds, out):
        calls.append(out)
        table = {m: {"best": {"mean": 0.5, "std": 0.0}, "last": {"mean": 0.5, "std": 0.0},
                     "max_over_epochs": {"mean": 0.5, "std": 0.0}, "wall_time_s": {"mean": 1.0, "std": 0.0},
                     "wall_time_vs_fft_ce": None, "seeds": list(seeds)} for m in methods}
        atomic_write_json(Path(out) / "compare.json", {"table": table})
        atomic_write_json(Path(out) / "summary.json", {"test_accuracy": {}})
        return {"table": table}

    return fake


def test_compare_refuses_a_non_empty_out(tmp_path, capsys, monkeypatch):
    import turnctl.compare

    calls = []
    monkeypatch.setattr(turnctl.compare, "compare_methods", _fake_compare(calls))
    out = tmp_path / "results"
    out.mkdir()
    (out / "summary.json").write_text('{"mine": true}\n')
    assert run(["compare", "--recipe", "tiny", "--methods", "lp-ce", "--out", str(out)]) == 2
    _one_error_line(capsys.readouterr().err, f"--out {out}", "is not empty")
    assert calls == [] and (out / "summary.json").read_text() == '{"mine": true}\n'


def test_two_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    import turnctl.rundir as rundir
    from turnctl.recipe import load_recipe

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: "20260101-000000")
    r = load_recipe("tiny")
    a = rundir.RunDir.open(r, resume=False)
    b = rundir.RunDir.open(r, resume=False)
    assert a.path == Path("runs/tiny-20260101-000000") and b.path == Path("runs/tiny-20260101-000000-2")
    assert (a.path / "recipe.yaml").is_file() and (b.path / "recipe.yaml").is_file()


# ---- 4. files that are not what they should be; markup in printed values ----------------------

def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path, capsys):
    p = tmp_path / "latin1.yaml"
    p.write_bytes(TINY.read_bytes().replace(b"# The test workhorse", b"# caf\xe9 workhorse"))
    assert run(["train", "--recipe", str(p), "--dry-run"]) == 2
    _one_error_line(capsys.readouterr().err, str(p), "not UTF-8", "0xe9")


@pytest.mark.parametrize("content", ["- model\n- data\n", "just a string\n", "42\n"])
def test_a_recipe_that_is_not_a_mapping_is_one_line(tmp_path, capsys, content):
    p = tmp_path / "list.yaml"
    p.write_text(content)
    assert run(["train", "--recipe", str(p), "--dry-run", "--set", "seed=1"]) == 2
    _one_error_line(capsys.readouterr().err, str(p), "top level must be a mapping")


def test_env_prints_values_holding_rich_markup(capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", "/data/[/x]/hf[red]y")
    assert run(["env"]) == 0
    assert "/data/[/x]/hf[red]y" in capsys.readouterr().out


def test_compare_prints_paths_and_names_holding_rich_markup(tmp_path, capsys, monkeypatch):
    import turnctl.compare

    calls = []
    monkeypatch.setattr(turnctl.compare, "compare_methods", _fake_compare(calls))
    out = tmp_path / "a[/x]"
    assert run(["compare", "--recipe", "tiny", "--methods", "lp-ce", "--out", str(out),
                "--set", "name=[red]y", "--set", "data.shards=/d/[bold]z"]) == 0
    text = capsys.readouterr().out
    assert "[red]y on /d/[bold]z" in text
    assert f"wrote {out / 'compare.json'}" in text
    assert (out / "compare.json").is_file()


# ---- 5. strict numbers -------------------------------------------------------------------------

@pytest.mark.parametrize("override,key,got", [
    ("finetune.epochs=true", "finetune.epochs", "True"),
    ("seed=yes", "seed", "True"),
    ("data.val_seed=on", "data.val_seed", "True"),
    ("finetune.lr=true", "finetune.lr", "True"),
    ("cleanse.gmm_tol=.inf", "cleanse.gmm_tol", "inf"),
    ("finetune.gradient_clipping=.inf", "finetune.gradient_clipping", "inf"),
    ("losses.elr_lambda=nan", "losses.elr_lambda", "nan"),
    ("probe.lr_search=[1, true]", "probe.lr_search", "boolean"),
])
def test_set_refuses_booleans_for_numbers_and_non_finite_values(override, key, got, capsys):
    assert run(["train", "--recipe", "tiny", "--dry-run", "--set", override]) == 2
    _one_error_line(capsys.readouterr().err, key, got)


def test_recipe_files_are_as_strict_as_set(tmp_path, capsys):
    p = tmp_path / "lax.yaml"
    p.write_text(TINY.read_text().replace("seed: 0", "seed: yes").replace("gce_q: 0.7", "gce_q: .inf"))
    assert run(["train", "--recipe", str(p), "--dry-run"]) == 2
    _one_error_line(capsys.readouterr().err, "lax.yaml", "seed", "boolean")
    # numbers written the ways people write them still load
    assert run(["train", "--recipe", "tiny", "--dry-run", "--set", "finetune.lr=1e-4",
                "--set", "cleanse.gmm_tol=1", "--set", "probe.epochs=3", "--set", "cleanse.redraw_each_epoch=false"]) == 0


# ---- 6. compare --methods / --seeds ------------------------------------------------------------

@pytest.mark.parametrize("option,value,says", [
    ("--methods", ",", "name at least one"),
    ("--methods", "", "name at least one"),
    ("--methods", "lp-ce,lp-ce", "'lp-ce' is listed twice"),
    ("--methods", "lp-ce,nope", "unknown method 'nope'"),
    ("--seeds", ",", "name at least one"),
    ("--seeds", "0,-1", "seeds are integers >= 0"),
])
def test_compare_refuses_an_empty_or_repeated_list(option, value, says, tmp_path, capsys):
    args = {"--methods": "lp-ce", "--seeds": "0", option: value}
    out = tmp_path / "cmp"
    assert run(["compare", "--recipe", "tiny", "--out", str(out), *[x for kv in args.items() for x in kv]]) == 2
    _one_error_line(capsys.readouterr().err, option, says)
    assert not out.exists()


# ---- 7. the disk, not turnctl ------------------------------------------------------------------

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EBUSY])
def test_environment_oserrors_are_one_line_exit_2(code, capsys, monkeypatch):
    import turnctl.runner

    target = "/data/runs/x/metrics.jsonl"

    def fails(*a, **k):
        raise OSError(code, os.strerror(code), target)

    monkeypatch.setattr(turnctl.runner, "train_from_recipe", fails)
    assert run(["train", "--recipe", "tiny"]) == 2
    line = _one_error_line(capsys.readouterr().err, f"turnctl: error: {target}: {os.strerror(code)}")
    if code == errno.ENOSPC:
        assert "no space left on the device holding it" in line


def test_a_full_disk_in_compare_is_one_line(tmp_path, capsys, monkeypatch):
    import turnctl.compare

    def fails(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "cmp" / "compare.json"))

    monkeypatch.setattr(turnctl.compare, "compare_methods", fails)
    assert run(["compare", "--recipe", "tiny", "--methods", "lp-ce", "--out", str(tmp_path / "cmp")]) == 2
    _one_error_line(capsys.readouterr().err, str(tmp_path / "cmp" / "compare.json"), "no space left")


def test_other_oserrors_stay_internal_errors(capsys, monkeypatch):
    import turnctl.runner

    def fails(*a, **k):
        raise OSError(errno.EIO, os.strerror(errno.EIO), "/x")

    monkeypatch.setattr(turnctl.runner, "train_from_recipe", fails)
    assert run(["train", "--recipe", "tiny"]) == 1
    assert "internal error" in capsys.readouterr().err
