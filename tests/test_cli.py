"""The CLI surface: commands listed, version, env, one-line errors, results on stdout."""

import json
import sys


from turnctl import __version__
from turnctl.cli import run


def test_help_lists_the_commands(capsys):
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("prepare", "train", "eval", "env"):
        assert f"  {name} " in out


def test_version(capsys):
    assert run(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_hidden_local_rank_is_accepted(capsys):
    assert run(["--local_rank=3", "train", "--help"]) == 0
    assert run(["--local-rank", "1", "env", "--help"]) == 0
    assert "--local_rank" not in capsys.readouterr().out


def test_env_json_has_what_a_bug_report_needs(capsys, monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "3")  # a Slurm task says which one it is
    assert run(["env", "--json"]) == 0
    out = capsys.readouterr().out
    info = json.loads(out)  # nothing but the JSON object on stdout
    assert info["world"]["SLURM_PROCID"] == "3" and "TORCH_EXTENSIONS_DIR" in info["world"]
    assert info["python"] == sys.version.split()[0]
    for pkg in ("torch", "deepspeed", "transformers", "webdataset"):
        assert info["packages"][pkg] not in ("not installed",)
    assert "cuda_available" in info["accelerator"]
    assert "WORLD_SIZE" in info["world"]


def test_known_error_is_one_line_with_nonzero_exit(capsys):
    code = run(["train", "--recipe", "no_such_recipe", "--dry-run"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("turnctl: error: unknown recipe 'no_such_recipe'")


def test_debug_env_prints_the_traceback(capsys, monkeypatch):
    monkeypatch.setenv("TURNCTL_DEBUG", "1")
    assert run(["train", "--recipe", "no_such_recipe", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("turnctl: error:")


def test_usage_error_exit_code(capsys):
    assert run(["train"]) == 2  # --recipe is required
    assert "Missing option '--recipe'" in capsys.readouterr().err


def test_dry_run_prints_recipe_on_stdout_and_logs_on_stderr(capsys):
    assert run(["train", "--recipe", "tiny", "--dry-run"]) == 0
    cap = capsys.readouterr()
    assert "finetune:" in cap.out and "micro_batch_size" in cap.out
    assert "is valid" in cap.err and "is valid" not in cap.out


def test_log_lines_to_a_file_are_one_line_each(tmp_path):
    """Batch jobs log to files: one unwrapped line per record (this one is ~100 characters; rich
    would wrap it at 80)."""
    import re
    import subprocess
    import sys

    with open(tmp_path / "err.log", "w") as err:
        subprocess.run([sys.executable, "-m", "turnctl", "train", "--recipe", "tiny", "--dry-run"],
                       stdout=subprocess.DEVNULL, stderr=err, check=True)
    lines = (tmp_path / "err.log").read_text().splitlines()
    assert any(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO recipe tiny is valid \(digest [0-9a-f]+, world size 1, "
                            r"gradient accumulation \d+\)", line) for line in lines), lines


def test_dry_run_json_is_machine_readable(capsys):
    assert run(["train", "--recipe", "tiny", "--dry-run", "--json", "--method", "lp-gce",
                "--shards", "some/where"]) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert payload["recipe"]["method"] == "lp-gce"
    assert payload["recipe"]["data"]["shards"] == "some/where"
    assert payload["deepspeed_config"]["gradient_clipping"] == 1.0
    assert payload["world_size"] == 1


def test_non_zero_rank_logs_warnings_only(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    from turnctl.logger import log, setup_logging

    setup_logging()
    log.info("hidden info")
    log.warning("visible warning")
    err = capsys.readouterr().err
    assert "hidden info" not in err
    assert "[rank 1] WARNING visible warning" in err
    monkeypatch.setenv("RANK", "0")
    setup_logging()
