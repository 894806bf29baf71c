"""The Dockerfile and its build context, read as docker reads them (no Docker daemon here, and no
registry to pull the CUDA base from: the image itself is built by users)."""

import fnmatch
import re
import tomllib

from launch import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()


def _instructions():
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)  # continuation lines
    return [l.strip() for l in text.splitlines() if l.strip() and not l.lstrip().startswith("#")]


def _ignored(path: str) -> bool:
    """.dockerignore's rule: the last matching pattern decides; '!' re-includes."""
    ignored = False
    for pat in (REPO / ".dockerignore").read_text().splitlines():
        pat = pat.strip()
        if not pat or pat.startswith("#"):
            continue
        neg = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path.split("/")[0], pat) or \
                (pat.startswith("**/") and fnmatch.fnmatch(path.rsplit("/", 1)[-1], pat[3:])):
            ignored = not neg
    return ignored


def test_a_runtime_base_and_an_unprivileged_user():
    ins = _instructions()
    base = next(l for l in ins if l.startswith("ARG BASE="))
    assert base.endswith("-runtime") and "FROM ${BASE}" in ins
    users = [l.split()[1] for l in ins if l.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")


def test_the_build_context_holds_the_package_and_no_data():
    for path in ("pyproject.toml", "README.md", "turnctl/cli.py", "recipes/clip_l14.yaml"):
        assert not _ignored(path), path
    for path in ("shards/webvision/train-000000.tar", "runs/x/summary.json", "data/cifar", ".venv/bin/python",
                 ".git/HEAD", "turnctl/__pycache__/cli.cpython-311.pyc", "tests/test_cli.py"):
        assert _ignored(path), path
    for line in _instructions():  # what COPY takes is in the context
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists() and not _ignored(src), src


def test_the_extras_it_installs_exist_and_caches_are_documented():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pip = next(l for l in _instructions() if "pip install" in l)
    named = re.search(r'"\.\[([^\]]*)\]"', pip).group(1).split(",")
    assert named and all(e in extras for e in named), named
    assert "HF_HOME=/cache/huggingface" in DOCKERFILE and "/cache/huggingface" in (REPO / "README.md").read_text()
