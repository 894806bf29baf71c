"""Seeded fuzzing of everything a user hands turnctl as text: recipes, ``--set`` values, a prepared
dataset's manifest.json and sizes.json, and ``key,label`` CSVs.

Each generated input must end in success or in a one-line user error (exit 2 through the CLI, a
:class:`~turnctl.errors.TurnctlError` with a one-line message through the reader), never in another
exception, a hang (each input runs under a time bound) or memory growth past a bound. The
generator is our own and seeded, so a failure prints the seed and case number that reproduce it
(``TURNCTL_FUZZ_SEED`` / ``TURNCTL_FUZZ_SCALE`` widen a local run; CI runs the defaults: 4,500 inputs in about 10 s).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import random
import resource
import signal
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import yaml

from turnctl.cli import run
from turnctl.errors import TurnctlError

SEED = int(os.environ.get("TURNCTL_FUZZ_SEED", "20261130"))
SCALE = float(os.environ.get("TURNCTL_FUZZ_SCALE", "1"))
TIME_BOUND_S = 5.0  # per input; every real outcome takes milliseconds
MEMORY_BOUND_MB = 400  # growth of the maximum resident set over one target's cases
REPO = Path(__file__).resolve().parent.parent

# Values that have broken parsers before, or are one step away from a valid value.
ATOMS: List[Any] = [
    0, 1, -1, 2, 7, 10**30, -(10**30), 2**63, 0.5, -0.5, 1e-300, 1e308, float("inf"), float("-inf"),
    float("nan"), True, False, None, "", " ", "0", "1", "true", "yes", "no", "on", "null", ".inf", "nan",
    "1e400", "-1", "abc", "../../escaped", "/etc/hostname", "a/b", "..", "[/x]", "[red]y", "\x00",
    "²", "٣", "é", "\ufeff1", "x" * 300, [], [1, 2], ["a"], {}, {"a": 1}, {"format": "turnctl-shards/1"},
]
SET_VALUES = [
    "true", "false", "yes", "no", "1", "0", "-1", "2.5", "1e-3", ".inf", "-.inf", ".nan", "nan", "inf",
    "1e400", "99999999999999999999999", "", "null", "~", "[1, 2]", "{a: 1}", "[", "]", "{", "'x",
    "&a [*a]", "*a", "!!python/object/apply:os.system ['true']", "!!binary AAAA", "../../x", "/abs",
    "[/x]", "a b", "²", "\ufeff", "é", "0x10", "1_000", "2026-11-30", "x" * 200,
]


class _TimeUp(Exception):
    pass


@contextlib.contextmanager
def _time_bound(seconds: float):
    def _alarm(signum, frame):
        raise _TimeUp()

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cases(n: int) -> int:
    return max(1, int(n * SCALE))


class Findings:
    """What went wrong, with what reproduces it; the test fails listing the first few."""

    def __init__(self, target: str):
        self.target = target
        self.items: List[str] = []
        self.outcomes: Dict[str, int] = {}
        self.rss0 = _max_rss_mb()

    def add(self, case: int, what: str, detail: str) -> None:
        self.items.append(f"{self.target} case {case} (TURNCTL_FUZZ_SEED={SEED}): {what}\n    {detail[:600]}")

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def check(self, min_ok: float, min_errors: float) -> None:
        """``min_ok`` / ``min_errors``: the least share of cases that must end each way."""
        grown = _max_rss_mb() - self.rss0
        if grown > MEMORY_BOUND_MB:
            self.items.append(f"{self.target}: max RSS grew by {grown:.0f} MB (bound {MEMORY_BOUND_MB} MB)")
        assert not self.items, f"{len(self.items)} bad outcomes:\n" + "\n".join(self.items[:8])
        # The generator must reach both sides, or it is not testing the parser.
        total = sum(self.outcomes.values())
        assert self.outcomes.get("ok", 0) >= min_ok * total, self.outcomes
        assert self.outcomes.get("error", 0) >= min_errors * total, self.outcomes


# ------------------------------------------------------------------------------------------------
# Structure mutations shared by the YAML and JSON targets
# ------------------------------------------------------------------------------------------------


def _paths(tree: Any, prefix: Tuple = ()) -> List[Tuple]:
    out = [prefix]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += _paths(v, prefix + (i,))
    return out


def _get(tree: Any, path: Tuple) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _mutate_tree(tree: Any, rng: random.Random, steps: int) -> Any:
    tree = copy.deepcopy(tree)
    for _ in range(steps):
        paths = [p for p in _paths(tree) if p]
        if not paths:
            return rng.choice(ATOMS)
        path = rng.choice(paths)
        parent = _get(tree, path[:-1])
        key = path[-1]
        op = rng.random()
        if op < 0.55:
            parent[key] = copy.deepcopy(rng.choice(ATOMS))
        elif op < 0.7 and isinstance(parent, dict):
            del parent[key]
        elif op < 0.8 and isinstance(parent, dict):
            parent[rng.choice(["extra", "x", str(key) + "s", "format", "splits", "shards"])] = rng.choice(ATOMS)
        elif op < 0.9:
            value = parent[key]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                parent[key] = rng.choice([value * -1, value + 1, value * 10**6, str(value), [value]])
            else:
                parent[key] = copy.deepcopy(rng.choice(ATOMS))
        else:  # move a subtree somewhere else
            other = rng.choice(paths)
            parent[key] = copy.deepcopy(_get(tree, other)) if other[: len(path)] != path else None
    return tree


def _mutate_text(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    op = rng.random()
    if op < 0.3 and b:  # truncate
        return bytes(b[: rng.randrange(len(b))])
    if op < 0.55 and b:  # flip bytes (non-UTF-8 often)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if op < 0.7:
        return b"\xef\xbb\xbf" + bytes(b)  # a BOM, as Windows editors write
    if op < 0.85 and b:  # insert a control or punctuation character
        pos = rng.randrange(len(b))
        return bytes(b[:pos]) + rng.choice([b"\x00", b"\t", b"{", b"[", b"&", b"*", b"!", b"%", b"\r"]) + bytes(b[pos:])
    return bytes(b) * rng.randint(2, 3)  # duplicated content: repeated keys


# ------------------------------------------------------------------------------------------------
# Through the CLI: recipes and --set
# ------------------------------------------------------------------------------------------------


def _cli(argv: List[str]) -> Tuple[Optional[int], str, str]:
    """(exit status or None on a time-out, stdout, stderr) of one in-process CLI call."""
    out, err = io.StringIO(), io.StringIO()
    code: Optional[int]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            with _time_bound(TIME_BOUND_S):
                code = run(argv)
        except _TimeUp:
            code = None
    return code, out.getvalue(), err.getvalue()


def _judge_cli(findings: Findings, case: int, argv: List[str], shown: str) -> None:
    code, _, err = _cli(argv)
    if code is None:
        findings.add(case, f"no answer within {TIME_BOUND_S} s", shown)
        return
    lines = [l for l in err.splitlines() if l.strip() and "WARNING" not in l and " INFO " not in l]
    if code == 0:
        findings.count("ok")
    elif code == 2 and len(lines) == 1 and lines[0].startswith("turnctl: error: "):
        findings.count("error")
    else:
        findings.add(case, f"exit {code}, stderr {err[-400:]!r}", shown)
        findings.count("bad")


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8)
)


def test_fuzz_recipe_files(tmp_path):
    rng = random.Random(SEED)
    bases = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "recipes").glob("*.yaml"))]
    findings = Findings("recipe file")
    path = tmp_path / "fuzzed.yaml"
    for case in range(_cases(800)):
        tree = _mutate_tree(rng.choice(bases), rng, rng.randint(1, 3))
        text = yaml.safe_dump(tree, allow_unicode=True, sort_keys=False).encode("utf-8")
        roll = rng.random()
        if roll < 0.25:
            text = _mutate_text(text, rng)
        elif roll < 0.28:  # nested aliases in a free-form section (model.config / deepspeed.extra)
            section = rng.choice(["model:\n  config:\n", "deepspeed:\n  extra:\n"])
            text = (section + "".join("    " + l + "\n" for l in ALIAS_BOMB.splitlines())).encode()
        path.write_bytes(text)
        _judge_cli(findings, case, ["train", "--recipe", str(path), "--dry-run", "--json"],
                   text.decode("utf-8", "replace")[:300])
    findings.check(min_ok=0.01, min_errors=0.3)


def _leaf_keys() -> List[str]:
    from turnctl.recipe import Recipe

    keys: List[str] = []

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            ann = field.annotation
            sub = getattr(ann, "model_fields", None)
            if sub is not None:
                walk(ann, prefix + name + ".")
            else:
                keys.append(prefix + name)

    walk(Recipe, "")
    return keys


def test_fuzz_set_overrides(tmp_path):
    rng = random.Random(SEED + 1)
    keys = _leaf_keys() + ["nonexistent", "finetune.nope", "finetune", ".", "a..b", "model.config.x"]
    findings = Findings("--set")
    for case in range(_cases(1000)):
        sets = []
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(keys)
            value = rng.choice(SET_VALUES)
            sets += ["--set", rng.choice([f"{key}={value}", f"{key}", f"={value}", f"{key}=={value}"])
                     if rng.random() < 0.1 else f"{key}={value}"]
        argv = ["train", "--recipe", "tiny", *sets, "--dry-run", "--json"]
        _judge_cli(findings, case, argv, " ".join(sets))
    findings.check(min_ok=0.02, min_errors=0.3)


# ------------------------------------------------------------------------------------------------
# The reader: manifest.json and sizes.json of a prepared dataset
# ------------------------------------------------------------------------------------------------


def _judge_call(findings: Findings, case: int, fn: Callable[[], Any], shown: str,
                check_ok: Optional[Callable[[Any], Optional[str]]] = None) -> None:
    try:
        with _time_bound(TIME_BOUND_S):
            result = fn()
    except _TimeUp:
        findings.add(case, f"no answer within {TIME_BOUND_S} s", shown)
        return
    except TurnctlError as exc:
        message = str(exc)
        if "\n" in message.strip() or not message.strip():
            findings.add(case, f"a user error that is not one line: {message[:300]!r}", shown)
        else:
            findings.count("error")
        return
    except Exception as exc:  # noqa: BLE001 - anything else is what this test hunts
        findings.add(case, f"{type(exc).__name__}: {exc}", shown)
        findings.count("bad")
        return
    problem = check_ok(result) if check_ok else None
    if problem:
        findings.add(case, problem, shown)
    findings.count("ok")


def test_fuzz_manifest_and_sizes(tmp_path):
    from shardgen import write_toy_shards

    from turnctl.data import open_split

    root = tmp_path / "toy"
    write_toy_shards(root, counts={"train": [6, 5], "val": [4], "test": [4]}, num_classes=3)
    manifest = json.loads((root / "manifest.json").read_text())
    sizes = json.loads((root / "sizes.json").read_text())
    real = {p.resolve() for p in root.glob("*.tar")}

    def inside(info) -> Optional[str]:
        stray = [p for p in info.shard_paths if Path(p).resolve() not in real]
        return f"opened files outside the shard set: {stray}" if stray else None

    rng = random.Random(SEED + 2)
    findings = Findings("manifest/sizes")
    for case in range(_cases(1200)):
        m, s = manifest, sizes
        which = rng.random()
        if which < 0.6:
            m = _mutate_tree(manifest, rng, rng.randint(1, 3))
        elif which < 0.85:
            s = _mutate_tree(sizes, rng, rng.randint(1, 2))
        else:
            m = _mutate_tree(manifest, rng, 1)
            s = _mutate_tree(sizes, rng, 1)
        mtext = json.dumps(m, allow_nan=True).encode()
        stext = json.dumps(s, allow_nan=True).encode()
        if rng.random() < 0.15:
            if rng.random() < 0.5:
                mtext = _mutate_text(mtext, rng)
            else:
                stext = _mutate_text(stext, rng)
        (root / "manifest.json").write_bytes(mtext)
        (root / "sizes.json").write_bytes(stext)
        split = rng.choice(["train", "train", "val", "test"])
        _judge_call(findings, case, lambda: open_split(root, split), f"{split}: {mtext[:200]!r} {stext[:120]!r}",
                    inside)
    findings.check(min_ok=0.05, min_errors=0.3)


# ------------------------------------------------------------------------------------------------
# key,label CSVs
# ------------------------------------------------------------------------------------------------


def test_fuzz_label_csv(tmp_path):
    from turnctl.prepare.labels import load_csv_labels

    rng = random.Random(SEED + 3)
    findings = Findings("labels csv")
    path = tmp_path / "labels.csv"
    cells = ["a.jpg", "b/c.jpg", "images/0/x.jpg", "", " ", "#c", "key", "label", "0", "1", "2", "3", "-1",
             "²", "٣", "1.0", "1e3", "\ufeff0", "é.jpg", "a,b", '"q"', "\x00", "x" * 100, "99999999999999999999"]
    for case in range(_cases(1500)):
        rows = []
        for i in range(rng.randint(0, 8)):
            if rng.random() < 0.8:
                rows.append(f"img{i}.jpg,{rng.randrange(4)}")
            else:
                rows.append(",".join(rng.choice(cells) for _ in range(rng.randint(0, 3))))
        text = ("\n".join(rows) + rng.choice(["", "\n", "\r\n"])).encode("utf-8")
        if rng.random() < 0.3:
            text = _mutate_text(text, rng)
        path.write_bytes(text)
        _judge_call(findings, case, lambda: load_csv_labels(path, num_classes=4), repr(text[:200]))
    findings.check(min_ok=0.2, min_errors=0.2)
