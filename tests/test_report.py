"""`turnctl report`: label issues of a TURN run, per sample and per class, with plots.

Two run directories: a real one (tiny TURN training, one process, ~15 s, on toy shards with a known
noisy/clean split and one undecodable image) and a hand-built one whose numbers are small enough to
count by hand (precision, recall, severity order, per-class rates).
"""

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from launch import REPO, check, last_json, run, turnctl_cmd
from turnctl.cli import run as cli_run

from shardgen import REPORT_CORRUPT_IDX as CORRUPT_IDX, REPORT_NUM_CLASSES as NUM_CLASSES, report_toy as _toy

COLUMNS = ["idx", "key", "given_label", "predicted_label", "label_score", "is_label_issue", "loss"]


@pytest.fixture
def trained(report_run):
    """(toy shards, run dir) of a real TURN run: conftest's ``report_run``, shared with
    tests/test_report_html.py (one tiny training for both)."""
    return report_run


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("turnctl: error: ")
    return err[0]


# ---- the real run ------------------------------------------------------------------------------

def test_cli_report_on_a_real_run(trained):
    toy, out = trained
    res = check(run(turnctl_cmd(["report", str(out), "--top", "5", "--plot", "--json"]), timeout=120))
    summary = last_json(res.stdout)
    assert json.loads(res.stdout.strip().splitlines()[-1]) == summary  # the JSON is the LAST line
    sel = np.load(out / "selection" / "epoch_1.npz")
    assert summary["epoch"] == 1 and summary["epochs"] == [0, 1] and summary["keys"] is True
    assert summary["num_samples"] == 117 and summary["undecodable"] == 1
    assert summary["flagged"] == int((~sel["keep"] & sel["ok"]).sum())

    header, rows = _read_csv(out / "report" / "label_issues.csv")
    assert header == COLUMNS + ["true_label"]
    assert len(rows) == 117
    col = {c: [r[i] for r in rows] for i, c in enumerate(header)}
    idx = np.array(col["idx"], dtype=int)
    assert sorted(idx.tolist()) == list(range(117))
    # Keys straight from the shards: shardgen names sample i "train_<i:06d>".
    assert col["key"] == [f"train_{i:06d}" for i in idx]
    assert np.array_equal(np.array(col["given_label"], dtype=int), toy.labels["train"]["cls"][idx])
    assert np.array_equal(np.array(col["true_label"], dtype=int), toy.labels["train"]["clean"][idx])
    flagged = np.array(col["is_label_issue"]) == "True"
    assert np.array_equal(flagged, ~sel["keep"][idx] & sel["ok"][idx])
    # The undecodable sample: last, not an issue, no score / loss / prediction.
    assert rows[-1] == [str(CORRUPT_IDX), f"train_{CORRUPT_IDX:06d}", str(toy.labels["train"]["cls"][CORRUPT_IDX]),
                        "-1", "", "False", "", str(toy.labels["train"]["clean"][CORRUPT_IDX])]
    score = np.array(col["label_score"][:-1], dtype=float)
    np.testing.assert_allclose(score, sel["clean_prob"][idx[:-1]], rtol=1e-6)
    # Severity: score ascending; issues (score <= tau) therefore come first.
    assert np.all(np.diff(score) >= 0)
    assert flagged[:summary["flagged"]].all() and not flagged[summary["flagged"]:].any()

    assert [t["idx"] for t in summary["top"]] == idx[:5].tolist()
    assert summary["top"][0]["key"] in res.stdout and "top 5 suspects" in res.stdout
    assert len(summary["per_class"]) == NUM_CLASSES
    for name in ("label_issues", "per_class", "loss_histograms", "selection_by_epoch"):
        assert Path(summary["files"][name]).is_file()
    from PIL import Image

    for name in ("loss_histograms", "selection_by_epoch"):
        png = Path(summary["files"][name])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        with Image.open(png) as im:
            assert im.size[0] >= 400 and im.size[1] >= 300
            # Not a blank canvas: a plot has many colours.
            assert len(im.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50
    assert not list((out / "report").glob(".*tmp*"))  # atomic writes leave no temporaries


def test_per_class_table_sums_to_the_split_and_matches_the_csv(trained):
    from turnctl.report import health_summary, label_issues, load_selection, per_class_table, write_report

    _, out = trained
    sel = load_selection(out)
    table = per_class_table(sel)
    assert sum(r["size"] for r in table) == 117
    assert sum(r["undecodable"] for r in table) == 1
    for r in table:
        assert r["kept"] + r["flagged"] + r["undecodable"] == r["size"]
    assert [r["name"] for r in table] == [f"class{c}" for c in range(NUM_CLASSES)]  # from the manifest
    # The estimate is checkable from label_issues alone: 1 - mean label_score over a class's rows.
    issues = label_issues(sel)
    for r in table:
        s = issues["label_score"][(issues["given_label"] == r["class"]) & ~np.isnan(issues["label_score"])]
        assert r["noise_rate_est"] == pytest.approx(1 - s.mean())
        # ... and it is the mixture's weight of the noisy component, up to EM's last step.
        assert r["noise_rate_est"] == pytest.approx(r["weight_noisy"], abs=0.05)
    h = health_summary(sel)
    n_valid = sum(r["size"] - r["undecodable"] for r in table)
    assert h["estimated_noise_rate"] == pytest.approx(
        sum(r["noise_rate_est"] * (r["size"] - r["undecodable"]) for r in table) / n_valid)
    assert h["overall_label_health_score"] == pytest.approx(1 - h["estimated_noise_rate"])
    write_report(sel, top=0)
    header, rows = _read_csv(out / "report" / "per_class.csv")
    assert header[:9] == ["class", "name", "size", "undecodable", "kept", "flagged", "selected",
                          "noise_rate_est", "true_noise_rate"]
    assert [int(r[2]) for r in rows] == [r["size"] for r in table]
    assert [float(r[7]) for r in rows] == pytest.approx([r["noise_rate_est"] for r in table], rel=1e-6)


def test_the_plotted_mixture_reproduces_the_selection(trained):
    """The plot's axis and curves are right iff the stored mixture, evaluated on the losses as
    normalised by turnctl.report, gives back the stored clean_prob and its tau lines sit at p = tau."""
    from turnctl.report import load_selection, mixture_posterior, tau_crossings

    _, out = trained
    for epoch in (0, 1):
        sel = load_selection(out, epoch=epoch)
        x, lo, hi = sel.normalised_loss()
        assert np.nanmin(x) == 0.0 and np.nanmax(x) == 1.0 and hi > lo
        g = sel.given
        p = mixture_posterior(x, sel.means[g], sel.variances[g], sel.weights[g])
        np.testing.assert_allclose(p[sel.ok], sel.clean_prob[sel.ok], atol=1e-5)
        for c in range(NUM_CLASSES):
            for xt in tau_crossings(sel.means[c], sel.variances[c], sel.weights[c], tau=sel.tau):
                assert 0.0 <= xt <= 1.0
                assert mixture_posterior(xt, sel.means[c], sel.variances[c], sel.weights[c]) == pytest.approx(sel.tau)


def test_epoch_history_agrees_with_metrics_jsonl_and_epoch_option(trained):
    from turnctl.report import epoch_history, write_report

    _, out = trained
    fft = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    fft = [l for l in fft if l["phase"] == "fft"]
    hist = epoch_history(out)
    assert [h["epoch"] for h in hist] == [0, 1]
    for h, m in zip(hist, fft):
        assert (h["kept"], h["selected"]) == (m["kept"], m["selected"])
        assert h["kept_purity"] == pytest.approx(m["kept_precision"])
        assert h["selected_purity"] == pytest.approx(m["selected_purity"])
    s0 = write_report(out, epoch=0, top=3)
    assert s0["epoch"] == 0 and s0["kept"] == fft[0]["kept"]
    assert s0["quality"]["precision"] is None or 0 <= s0["quality"]["precision"] <= 1


def test_keys_from_moved_or_replaced_shards(trained, tmp_path, capsys):
    toy, out = trained
    moved = tmp_path / "moved"
    shutil.copytree(out / "selection", moved / "selection")
    rec = yaml.safe_load((out / "recipe.yaml").read_text())
    rec["data"]["shards"] = str(tmp_path / "gone")
    (moved / "recipe.yaml").write_text(yaml.safe_dump(rec))
    # Gone: the report is still written, keys empty, and a warning says why.
    assert cli_run(["report", str(moved), "--top", "0", "--json"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out.strip().splitlines()[-1])["keys"] is False
    assert "key column is empty" in " ".join(cap.err.split())
    _, rows = _read_csv(moved / "report" / "label_issues.csv")
    assert {r[1] for r in rows} == {""}
    # --shards points at where they went.
    assert cli_run(["report", str(moved), "--top", "0", "--shards", str(toy.root)]) == 0
    capsys.readouterr()
    _, rows = _read_csv(moved / "report" / "label_issues.csv")
    assert all(r[1] == f"train_{int(r[0]):06d}" for r in rows)
    # Re-prepared with another noise draw: same size, other labels -> no keys rather than wrong ones.
    other = _toy(tmp_path / "other", seed=1)
    assert cli_run(["report", str(moved), "--top", "0", "--shards", str(other.root)]) == 0
    assert "re-prepared" in " ".join(capsys.readouterr().err.split())
    _, rows = _read_csv(moved / "report" / "label_issues.csv")
    assert {r[1] for r in rows} == {""}


# ---- a run small enough to count by hand -------------------------------------------------------

# idx:        0     1     2     3     4     5     6     7     8     9
GIVEN = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
CLEAN = [0, 0, 1, 1, 0, 1, 0, 0, 1, -1]           # real issues: 2, 3, 6, 7; idx 9 unknown
OK = [1, 1, 1, 1, 0, 1, 1, 1, 1, 1]               # idx 4 undecodable
PROB = [0.9, 0.95, 0.1, 0.7, 0.0, 0.99, 0.0, 0.8, 0.3, 0.0]
LOSS = [0.2, 0.1, 2.5, 0.9, 9.9, 0.05, 3.0, 0.8, 1.9, 2.0]


def _hand_run(root: Path, *, method="turn", epochs=(0, 3), shards=None):
    rec = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())
    rec.update(name="hand", method=method)
    rec["data"]["shards"] = str(shards or root / "no-shards-here")
    root.mkdir(parents=True)
    (root / "recipe.yaml").write_text(yaml.safe_dump(rec))
    prob = np.array(PROB, dtype=np.float32)
    for e in epochs:
        (root / "selection").mkdir(exist_ok=True)
        np.savez(root / "selection" / f"epoch_{e}.npz", idx=np.arange(10), loss=np.array(LOSS, dtype=np.float32),
                 clean_prob=prob, selected=prob > 0.85, keep=(prob > 0.6) & np.array(OK, bool),
                 given=np.array(GIVEN), clean=np.array(CLEAN), pred=np.array([0, 0, 1, 1, 0, 1, 0, 0, 0, 0]),
                 ok=np.array(OK, bool), means=np.array([[0.1, 0.8], [0.05, 0.7]]),
                 variances=np.array([[0.01, 0.02], [0.01, 0.03]]), weights=np.array([[0.7, 0.3], [0.4, 0.6]]))
    return root


def test_hand_counted_precision_recall_order_and_rates(tmp_path, capsys):
    run_dir = _hand_run(tmp_path / "hand")
    assert cli_run(["report", str(run_dir), "--json", "--top", "3"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["epoch"] == 3 and s["epochs"] == [0, 3]
    # flagged (decodable, p <= 0.6): 2, 6, 8, 9; with known labels: 2, 6, 8; real: 2, 3, 6, 7.
    q = s["quality"]
    assert (q["known"], q["flagged"], q["real_issues"], q["true_positives"]) == (8, 3, 4, 2)
    assert q["precision"] == pytest.approx(2 / 3) and q["recall"] == pytest.approx(2 / 4)
    assert q["true_noise_rate"] == pytest.approx(4 / 8)
    assert (s["flagged"], s["kept"], s["undecodable"]) == (4, 5, 1)
    # Per class, from the posteriors of the decodable samples.
    c0, c1 = s["per_class"]
    assert (c0["size"], c0["undecodable"], c0["kept"], c0["flagged"]) == (5, 1, 3, 1)
    assert (c1["size"], c1["undecodable"], c1["kept"], c1["flagged"]) == (5, 0, 2, 3)
    assert c0["noise_rate_est"] == pytest.approx(1 - (0.9 + 0.95 + 0.1 + 0.7) / 4)
    assert c1["noise_rate_est"] == pytest.approx(1 - (0.99 + 0.0 + 0.8 + 0.3 + 0.0) / 5)
    assert c0["true_noise_rate"] == pytest.approx(2 / 4) and c1["true_noise_rate"] == pytest.approx(2 / 4)
    assert s["estimated_noise_rate"] == pytest.approx(1 - 4.74 / 9, rel=1e-6)
    assert s["overall_label_health_score"] == pytest.approx(4.74 / 9, rel=1e-6)
    assert [c0["name"], c1["name"]] == ["0", "1"]  # no shards, no export: the ids
    # Severity: score 0 ties broken by loss (6 before 9), then by score, undecodable last.
    header, rows = _read_csv(run_dir / "report" / "label_issues.csv")
    assert header == COLUMNS + ["true_label"]
    assert [int(r[0]) for r in rows] == [6, 9, 2, 8, 3, 7, 0, 1, 5, 4]
    assert [r[5] for r in rows] == ["True"] * 4 + ["False"] * 6
    assert [t["idx"] for t in s["top"]] == [6, 9, 2]
    assert rows[1][-1] == ""  # true label unknown: empty, never a made-up -1
    assert s["top"][1]["true_label"] is None
    assert rows[0][-1] != ""  # known ones are written


def test_without_true_labels_there_is_no_true_label_column_nor_precision(tmp_path, capsys):
    run_dir = _hand_run(tmp_path / "hand")
    for e in (0, 3):
        z = dict(np.load(run_dir / "selection" / f"epoch_{e}.npz"))
        z["clean"] = np.full(10, -1)
        np.savez(run_dir / "selection" / f"epoch_{e}.npz", **z)
    assert cli_run(["report", str(run_dir), "--json"]) == 0
    out = capsys.readouterr().out
    s = json.loads(out.strip().splitlines()[-1])
    assert s["quality"] is None and "true labels unknown" in out
    assert _read_csv(run_dir / "report" / "label_issues.csv")[0] == COLUMNS
    assert "true_noise_rate" not in _read_csv(run_dir / "report" / "per_class.csv")[0]


def test_held_out_samples_are_never_flagged_nor_counted_in_the_gmm_view(tmp_path, capsys):
    """data.val_fraction holds train samples out: the GMM never sees them (the runner writes them
    with clean_prob 0, not kept, ``heldout`` True). The report must not call them label issues,
    count them in the noise estimates, or stretch the loss axis to their losses."""
    from turnctl.report import load_selection

    run_dir = _hand_run(tmp_path / "hand", epochs=(0,))
    npz = run_dir / "selection" / "epoch_0.npz"
    z = dict(np.load(npz))
    held = np.zeros(10, bool)
    held[[8, 9]] = True                      # class 1; 9's loss is above every loss the GMM saw
    z["loss"][9] = 20.0
    z["clean_prob"][held], z["keep"][held], z["selected"][held] = 0.0, False, False
    np.savez(npz, **z, heldout=held)

    assert cli_run(["report", str(run_dir), "--json", "--top", "10"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # flagged among the samples the GMM saw: 2 and 6 (8 and 9 were flagged before, held out now)
    assert s["flagged"] == 2 and sorted(t["idx"] for t in s["top"]) == [2, 6]
    assert (s["held_out"], s["undecodable"]) == (2, 1)
    c0, c1 = s["per_class"]
    assert (c1["size"], c1["held_out"], c1["kept"], c1["flagged"]) == (5, 2, 2, 1)
    assert c1["kept"] + c1["flagged"] + c1["undecodable"] + c1["held_out"] == c1["size"]
    assert c1["noise_rate_est"] == pytest.approx(1 - (0.99 + 0.0 + 0.8) / 3)
    assert s["estimated_noise_rate"] == pytest.approx(1 - (0.9 + 0.95 + 0.1 + 0.7 + 0.99 + 0.0 + 0.8) / 7, rel=1e-6)
    # precision / recall over the known samples the GMM saw: 0, 1, 2, 3, 5, 6, 7 (8 was known, held out)
    assert (s["quality"]["known"], s["quality"]["flagged"], s["quality"]["true_positives"]) == (7, 2, 2)
    header, rows = _read_csv(run_dir / "report" / "label_issues.csv")
    by_idx = {int(r[0]): dict(zip(header, r)) for r in rows}
    for i in (8, 9):
        assert by_idx[i]["is_label_issue"] == "False" and by_idx[i]["label_score"] == ""
        assert by_idx[i]["predicted_label"] == "0" and by_idx[i]["loss"] != ""  # the model did see them
    assert [int(r[0]) for r in rows][-3:] == [9, 8, 4]  # unseen by the GMM: last
    assert "held_out" in _read_csv(run_dir / "report" / "per_class.csv")[0]
    # The loss axis is the GMM's: min-max over the samples it saw, not the held-out 20.0.
    x, lo, hi = load_selection(run_dir).normalised_loss()
    assert (lo, hi) == pytest.approx((0.05, 3.0)) and np.isnan(x[[4, 8, 9]]).all()


def test_errors_are_one_line(tmp_path, capsys):
    assert cli_run(["report", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in _one_error_line(capsys)

    lp = _hand_run(tmp_path / "lp", method="lp-gce", epochs=())  # an LP run of an older turnctl
    assert cli_run(["report", str(lp)]) == 2
    assert "the lp-gce run has no selection" in _one_error_line(capsys)
    fft = _hand_run(tmp_path / "fft", method="fft-ce", epochs=())
    assert cli_run(["report", str(fft)]) == 2
    assert "keeps no per-sample losses to report on; run `turnctl train --method turn`" in _one_error_line(capsys)

    early = _hand_run(tmp_path / "early", epochs=())
    assert cli_run(["report", str(early)]) == 2
    assert "no TURN selection yet" in _one_error_line(capsys)

    hand = _hand_run(tmp_path / "hand")
    assert cli_run(["report", str(hand), "--epoch", "7"]) == 2
    assert "no selection for epoch 7 (available: 0, 3)" in _one_error_line(capsys)

    (hand / "selection" / "epoch_5.npz").write_bytes(b"not a zip")
    assert cli_run(["report", str(hand), "--epoch", "5"]) == 2
    assert "unreadable selection file" in _one_error_line(capsys)


def test_plot_without_matplotlib_is_a_one_line_error_and_writes_nothing(tmp_path, capsys, monkeypatch):
    hand = _hand_run(tmp_path / "hand")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert cli_run(["report", str(hand), "--plot"]) == 2
    assert "pip install 'turnctl[plot]'" in _one_error_line(capsys)
    assert not (hand / "report").exists()


def test_an_lp_baseline_is_reported_from_its_final_heads_losses(tmp_path):
    """An LP baseline writes selection/epoch_0.npz from its final head on the cached features (the
    GMM TURN's first selection draws from its probe); `turnctl report` reads it like TURN's."""
    import torch

    toy = _toy(tmp_path / "toy")
    out = tmp_path / "lp"
    check(run(turnctl_cmd(["train", "--recipe", "tiny", "--method", "lp-gce", "--shards", str(toy.root),
                           "--out", str(out), "--set", "data.num_workers=0"]), timeout=300))
    assert [p.name for p in (out / "selection").iterdir()] == ["epoch_0.npz"]
    from safetensors.torch import load_file

    from turnctl.report import load_selection

    sel = load_selection(out)
    assert sel.method == "lp-gce" and sel.num_samples == 117 and not sel.ok[CORRUPT_IDX]
    # the losses are the exported head's cross-entropy on the cached train features
    (cached,) = toy.root.joinpath(".features").glob("*/train.safetensors")
    feats, head = load_file(str(cached)), load_file(str(out / "final" / "model.safetensors"))
    logits = feats["features"].float() @ head["classifier.weight"].float().T + head["classifier.bias"].float()
    ce = torch.nn.functional.cross_entropy(logits[sel.ok], torch.as_tensor(sel.given[sel.ok]), reduction="none")
    np.testing.assert_allclose(sel.loss[sel.ok], ce.numpy(), rtol=1e-4, atol=1e-5)
    assert np.array_equal(sel.pred[sel.ok], logits[sel.ok].argmax(1).numpy())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lp_selection"]["kept"] == int((sel.keep & sel.usable).sum())
    res = check(run(turnctl_cmd(["report", str(out), "--json"]), timeout=120))
    assert "lp-gce: the selection its final linear head gives" in " ".join(res.stderr.split() + res.stdout.split())
    s = last_json(res.stdout)
    assert s["method"] == "lp-gce" and s["flagged"] == int(sel.flagged.sum()) and s["quality"]["known"] > 0
