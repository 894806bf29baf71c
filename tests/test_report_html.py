"""`turnctl report RUN --html`: one self-contained page, checked in a real headless browser.

The run is test_report.py's (a tiny real TURN run on toy shards with known true labels); the page is
opened from a file:// URL in Debian's chromium through chromedriver (Selenium). `make browser` (a
prerequisite of `make test`) installs both; without them the browser tests skip, except under
CI=true, where they fail: the browser test must run on the CI machine.

Also without a browser: thumbnails are the images of the right idx (prepared and `turnctl index`
shards) and only the shards that hold them are read, names are escaped, and the page's size grows
with the classes and the gallery, not with the samples.
"""

import base64
import io
import json
import os
import re
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_report import NUM_CLASSES, _read_csv, trained  # noqa: F401  (trained: the module's run fixture)
from turnctl.cli import run as cli_run

# ---- the browser ------------------------------------------------------------------------------

IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _no_browser(why: str):
    if IN_CI:
        pytest.fail(f"{why}; the browser test must run in CI: `make browser` installs chromium and chromium-driver",
                    pytrace=False)
    pytest.skip(f"{why} (`make browser` installs them; under CI=true this fails instead)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless chromium driven by chromedriver, both found on PATH (never downloaded: Selenium
    Manager is bypassed by naming the driver), with Chrome's performance (network) log on."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _no_browser("selenium is not installed (pip install -e '.[test]')")
    binary = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        _no_browser(f"no {'chromium' if binary is None else 'chromedriver'} on PATH")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    profile = tmp_path_factory.mktemp("chromium-profile")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1600", f"--user-data-dir={profile}", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _open(driver, path: Path) -> None:
    driver.get_log("performance")  # drop what earlier pages logged
    driver.get(path.resolve().as_uri())
    deadline = time.monotonic() + 30
    while driver.execute_script("return document.body && document.body.dataset.ready") != "1":
        assert time.monotonic() < deadline, "the page's script never finished (see the browser log)"
        time.sleep(0.05)


def _page_json(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S)
    assert m, "no data block in the page"
    return json.loads(m.group(1))


def _visible_cards(driver):
    return driver.execute_script(
        "return [...document.querySelectorAll('#gallery figure.card')].filter(c => !c.hidden && c.offsetParent)"
        ".map(c => ({idx: +c.dataset.idx, given: +c.dataset.given, predicted: +c.dataset.predicted,"
        " score: +c.dataset.score, loss: +c.dataset.loss, key: c.querySelector('.key').textContent,"
        " text: c.textContent}))")


def _select(driver, element_id: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", element_id)).select_by_value(value)


def _shard_images(root: Path):
    """{idx: image bytes} of a prepared dataset's train split, read with Python's tarfile (not turnctl's reader)."""
    out, by_key = {}, {}
    for shard in sorted(root.glob("train-*.tar")):
        with tarfile.open(shard) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}
        for name, data in members.items():
            key, ext = name.split(".", 1)
            by_key.setdefault(key, {})[ext] = data
    for key, sample in by_key.items():
        img = next((sample[e] for e in ("png", "jpg", "jpeg", "webp") if e in sample), None)
        out[int(sample["idx"])] = img
    return out


# ---- the page in a browser ---------------------------------------------------------------------

def test_the_page_in_a_headless_browser(browser, trained, tmp_path, capsys):
    from turnctl.report.thumbnails import make_thumbnail

    toy, out = trained
    top = 30
    t0 = time.monotonic()
    assert cli_run(["report", str(out), "--html", "--top", str(top), "--json"]) == 0
    report_s = time.monotonic() - t0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    page = Path(summary["files"]["html"])
    assert page == out / "report" / "index.html" and page.is_file()
    assert len(summary["top"]) == top  # --top is also what is printed
    text = page.read_text(encoding="utf-8")
    assert ('<meta http-equiv="Content-Security-Policy" content="default-src &#x27;none&#x27;; img-src data:; '
            "style-src &#x27;unsafe-inline&#x27;; script-src &#x27;unsafe-inline&#x27;") in text
    # Every attribute that names a resource is data: (the CSP would block anything else; this says none is tried).
    assert all(v.startswith("data:") for v in re.findall(r'\b(?:src|href)="([^"]*)"', text))
    assert not list((out / "report").glob(".*tmp*"))

    header, rows = _read_csv(out / "report" / "label_issues.csv")
    col = {c: [r[i] for r in rows] for i, c in enumerate(header)}
    flagged = [i for i, f in enumerate(col["is_label_issue"]) if f == "True"]
    want = [int(col["idx"][i]) for i in flagged[:top]]  # the gallery: the `top` most severe flagged, in order
    given_of = {int(col["idx"][i]): int(col["given_label"][i]) for i in flagged[:top]}
    pred_of = {int(col["idx"][i]): int(col["predicted_label"][i]) for i in flagged[:top]}

    _open(browser, page)
    browser.save_screenshot(str(tmp_path / "report.png"))
    with Image.open(tmp_path / "report.png") as shot:
        assert shot.size[0] >= 1000 and len(shot.convert("RGB").getcolors(1 << 16) or range(1 << 16)) > 50

    # The gallery: `top` cards in severity order, each an image that decoded, of that very sample.
    cards = _visible_cards(browser)
    assert [c["idx"] for c in cards] == want
    assert [c["key"] for c in cards] == [f"train_{i:06d}" for i in want]
    widths = browser.execute_script(
        "return [...document.querySelectorAll('#gallery img')].map(i => [i.complete, i.naturalWidth, i.src])")
    assert len(widths) == top and all(done and w > 0 for done, w, _ in widths)
    images = _shard_images(toy.root)
    for i, (_, _, src) in zip(want, widths):
        assert src == make_thumbnail(images[i]).data_uri()  # the image of idx i, not of another sample
    # Class names, never bare numbers.
    assert all(f"given: class{given_of[c['idx']]}" in c["text"] for c in cards)

    # Filter by given class: only that class is left, all of it.
    counts = np.bincount(list(given_of.values()), minlength=NUM_CLASSES)
    c = int(np.argmax(counts))
    assert 0 < counts[c] < top
    _select(browser, "filter-given", str(c))
    shown = _visible_cards(browser)
    assert sorted(x["idx"] for x in shown) == sorted(i for i in want if given_of[i] == c)
    assert {x["given"] for x in shown} == {c}
    assert f"showing {counts[c]} of {top}" in browser.find_element("id", "gallery-count").text
    # ... and by predicted class on top of it.
    p = pred_of[shown[0]["idx"]]
    _select(browser, "filter-pred", str(p))
    both = _visible_cards(browser)
    assert both and sorted(x["idx"] for x in both) == sorted(i for i in want if given_of[i] == c and pred_of[i] == p)
    _select(browser, "filter-given", "")
    _select(browser, "filter-pred", "")
    assert len(_visible_cards(browser)) == top

    # Sort: by idx, by score descending, by loss descending; the default is the severity order.
    _select(browser, "sort", "idx")
    by_idx = [x["idx"] for x in _visible_cards(browser)]
    assert by_idx == sorted(want) and by_idx != want
    _select(browser, "sort", "-score")
    scores = [x["score"] for x in _visible_cards(browser)]
    assert scores == sorted(scores, reverse=True)
    _select(browser, "sort", "-loss")
    losses = [x["loss"] for x in _visible_cards(browser)]
    assert losses == sorted(losses, reverse=True)
    _select(browser, "sort", "score")
    assert [x["idx"] for x in _visible_cards(browser)] == want

    # Per class: one section per class, named, its histogram drawn (bars, two components, tau).
    classes = browser.execute_script(
        "return [...document.querySelectorAll('#classes details')].map(d => [d.querySelector('.cname').textContent,"
        " d.open, d.querySelectorAll('svg rect').length, d.querySelectorAll('svg path').length])")
    assert sorted(n for n, *_ in classes) == [f"class{k}" for k in range(NUM_CLASSES)]
    assert all(opened and rects > 1 and paths >= 2 for _, opened, rects, paths in classes)

    # Confused pairs: as counted from the CSV (flagged, predicted another class), with their thumbnails.
    pairs = {}
    for i in flagged:
        g, pr = int(col["given_label"][i]), int(col["predicted_label"][i])
        if pr >= 0 and pr != g:
            pairs[(g, pr)] = pairs.get((g, pr), 0) + 1
    table = browser.execute_script(
        "return [...document.querySelectorAll('#pairs tbody tr')].map(r => [...r.cells].slice(0, 3).map(c => c.textContent)"
        ".concat([[...r.querySelectorAll('img')].filter(i => i.naturalWidth > 0).length]))")
    best = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    assert [(r[0], r[1], int(r[2])) for r in table] == [(f"class{g}", f"class{pr}", n) for (g, pr), n in best]
    assert all(r[3] == min(4, int(r[2])) for r in table)

    # Nothing left file://: every request the browser made, and every resource the page loaded.
    urls = []
    for entry in browser.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    # (Chrome's own pages, e.g. chrome://favicon2 for its new-tab page, are served by the browser
    # itself and are not the page's; a network fetch they caused would be logged as http(s) and fail)
    own = [u for u in urls if not u.startswith(("chrome:", "chrome-extension:", "chrome-untrusted:", "devtools:",
                                                "about:"))]
    assert own and all(u.startswith(("file:", "data:")) for u in own), urls
    loaded = browser.execute_script(
        "return performance.getEntries().filter(e => ['navigation', 'resource'].includes(e.entryType)).map(e => e.name)")
    assert loaded and all(u.startswith(("file:", "data:")) for u in loaded), loaded
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    # ... and the page's own policy refuses a request that would (a script adding a remote image).
    violation = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        document.addEventListener('securitypolicyviolation', e => done([e.violatedDirective, e.blockedURI]), {once: true});
        const img = new Image(); img.src = 'http://127.0.0.1:9/x.png'; document.body.appendChild(img);
        setTimeout(() => done(null), 5000);""")
    assert violation and violation[0].startswith("img-src") and violation[1].startswith("http://127.0.0.1:9")
    print(f"page {page.stat().st_size} bytes, report --html {report_s:.1f} s")


def test_names_are_text_never_markup(browser, trained, tmp_path):
    """Class names and the run's directory name come from files: <, &, a closing </script> and bytes
    that are not UTF-8 are shown as they are written, and nothing they hold runs."""
    from turnctl.report.html import write_html_report

    toy, out = trained
    shards = tmp_path / "shards"
    shutil.copytree(toy.root, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    evil = ["<img src=x onerror=\"window.pwned=1\">", "a & b", "</script><script>window.pwned=2</script>",
            "caf\udce9"]
    manifest["class_names"] = evil
    # ensure_ascii: the lone surrogate is written as \udce9, as a non-UTF-8 folder name's would be
    (shards / "manifest.json").write_text(json.dumps(manifest))
    run = tmp_path / "run <b>&amp;"
    shutil.copytree(out / "selection", run / "selection")
    shutil.copy(out / "recipe.yaml", run / "recipe.yaml")
    page = Path(write_html_report(run, shards=shards, top=12))
    assert page == run / "report" / "index.html"
    _open(browser, page)
    assert browser.execute_script("return window.pwned") is None
    assert browser.find_element("tag name", "h1").text == "Label issues of run <b>&amp;"
    names = browser.execute_script(
        "return [...document.querySelectorAll('#classes .cname')].map(n => n.textContent)")
    assert sorted(names) == sorted(evil[:3] + ["caf\\xe9"])
    assert browser.execute_script(
        "return [...document.querySelectorAll('img')].every(i => i.src.startsWith('data:'))")
    options = browser.execute_script(
        "return [...document.querySelectorAll('#filter-given option')].map(o => o.textContent)")
    assert options[0] == "all" and set(options[1:]) <= set(names)


def test_histograms_are_drawn_when_opened(browser, trained, tmp_path):
    """At 1000 classes the page draws only the noisiest ones at load; the others when opened."""
    from turnctl.report.html import page_data, render_page

    _, out = trained
    data = page_data(out, top=5, open_classes=1)
    page = tmp_path / "lazy.html"
    page.write_text(render_page(data), encoding="utf-8")
    _open(browser, page)
    drawn = "return [...document.querySelectorAll('#classes details')].map(d => !!d.querySelector('svg'))"
    assert browser.execute_script(drawn) == [True] + [False] * (NUM_CLASSES - 1)
    browser.execute_script("document.querySelectorAll('#classes summary')[2].click()")
    deadline = time.monotonic() + 5
    while browser.execute_script(drawn)[2] is not True:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert browser.execute_script(drawn) == [True, False, True] + [False] * (NUM_CLASSES - 3)


# ---- without a browser ------------------------------------------------------------------------

def test_the_gallery_defaults_to_100_and_the_printed_table_to_10(trained, capsys):
    _, out = trained
    assert cli_run(["report", str(out), "--html", "--json"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    data = _page_json(Path(s["files"]["html"]))
    assert len(s["top"]) == 10
    assert len(data["suspects"]) == min(100, s["flagged"]) and data["top"] == 100
    assert len(data["thumbnails"]) >= len(data["suspects"])  # every suspect is decodable here
    assert data["run"]["dataset"] == "toy" and data["classes"] == [f"class{k}" for k in range(NUM_CLASSES)]
    assert data["summary"]["health_score"] == pytest.approx(s["overall_label_health_score"], rel=1e-3)
    assert data["summary"]["true_noise_rate"] == pytest.approx(s["quality"]["true_noise_rate"], rel=1e-3)
    pc = data["per_class"]  # columns
    assert pc["class"] == list(range(NUM_CLASSES))
    for hist, noise, row in zip(pc["hist"], pc["noise"], s["per_class"]):
        assert sum(hist) == row["kept"] + row["flagged"]  # what the GMM saw
        assert noise == pytest.approx(row["noise_rate_est"], rel=1e-3)


def test_without_the_shards_the_page_says_why_and_shows_no_images(tmp_path, capsys):
    from test_report import _hand_run

    run_dir = _hand_run(tmp_path / "hand")  # its recipe names shards that do not exist
    assert cli_run(["report", str(run_dir), "--html", "--top", "3"]) == 0
    capsys.readouterr()
    data = _page_json(run_dir / "report" / "index.html")
    assert [s["idx"] for s in data["suspects"]] == [6, 9, 2] and data["thumbnails"] == {}
    assert data["pairs"] == [{"given": 1, "predicted": 0, "count": 3, "examples": [6, 9, 8]},
                             {"given": 0, "predicted": 1, "count": 1, "examples": [2]}]
    assert any("key column is empty" in w for w in data["warnings"])
    assert "key column is empty" in (run_dir / "report" / "index.html").read_text()  # in the header, not only the data


def test_thumbnails_read_only_the_shards_holding_the_wanted_idx(trained, tmp_path):
    from turnctl.data import open_split
    from turnctl.report.thumbnails import make_thumbnail, read_thumbnails

    toy, _ = trained
    shards = tmp_path / "shards"
    shutil.copytree(toy.root, shards)
    images = _shard_images(shards)
    # Shard 2 (idx 80..116) becomes garbage of the same size: reading it would raise.
    last = shards / "train-000002.tar"
    last.write_bytes(b"\x01" * last.stat().st_size)
    info = open_split(shards, "train")
    wanted = [0, 39, 40, 79, toy.corrupt["train"][0]]
    got = read_thumbnails(info, wanted)
    assert sorted(got) == sorted(set(wanted) - set(toy.corrupt["train"]))  # the corrupt one has no thumbnail
    for i, t in got.items():
        assert t.data_uri() == make_thumbnail(images[i]).data_uri()
        assert max(t.width, t.height) <= 96
    with pytest.raises(tarfile.ReadError):
        read_thumbnails(info, [80])


def test_thumbnails_of_indexed_shards_by_tar_order(tmp_path):
    """`turnctl index` shards have no idx member: idx = the shard's first idx + the position."""
    from test_index import N_TRAIN, _digits, _index, _png, _user_shards

    from turnctl.data import open_split
    from turnctl.report.thumbnails import make_thumbnail, read_thumbnails

    root = tmp_path / "user"
    _user_shards(root)
    assert _index(root, "train") == 0
    images, _ = _digits()
    info = open_split(root, "train")
    wanted = [0, 69, 70, 119, 120, 179, 180, N_TRAIN - 1]  # both ends of each of the 4 shards
    got = read_thumbnails(info, wanted + [N_TRAIN])           # an idx past the split: absent
    assert sorted(got) == wanted
    for i in wanted:
        assert got[i].data_uri() == make_thumbnail(_png(images[i])).data_uri()


def _synthetic_selection(tmp_path, n: int, classes: int):
    """A WebVision-shaped selection (no shards: no keys, no thumbnails) to measure the page by."""
    from turnctl.report.selection import Selection
    from turnctl.rundir import SelectionSettings

    rng = np.random.default_rng(0)
    given = rng.integers(0, classes, n)
    noisy = rng.random(n) < 0.3
    loss = np.where(noisy, rng.normal(3, 1, n), rng.normal(0.5, 0.3, n)).clip(0.01).astype(np.float32)
    prob = np.where(noisy, rng.random(n) * 0.3, 0.7 + rng.random(n) * 0.3).astype(np.float32)
    means = np.tile([[0.15, 0.6]], (classes, 1))
    return Selection(
        run_dir=tmp_path / "webvision", epoch=0, epochs=(0,), path=tmp_path / "x.npz", idx=np.arange(n), loss=loss,
        clean_prob=prob, keep=prob > 0.5, selected=prob > 0.5, given=given, clean=np.full(n, -1),
        pred=np.where(noisy, (given + 1) % classes, given), ok=np.ones(n, bool), heldout=np.zeros(n, bool),
        means=means, variances=np.full((classes, 2), 0.01), weights=np.tile([[0.7, 0.3]], (classes, 1)),
        settings=SelectionSettings(tau=0.5, normalize="minmax", gmm_max_iter=10, gmm_tol=1e-3, gmm_reg_covar=1e-6,
                                   min_per_class=1, fallback_k=1),
        method="turn", shards=None, train_split="train",
        class_names=tuple(f"n{c:08d} <a very long WebVision synset name & more>" for c in range(classes)),
        shards_problem="none here")


def test_page_size_grows_with_classes_not_samples(tmp_path):
    from turnctl.report.html import page_data, render_page

    small = len(render_page(page_data(_synthetic_selection(tmp_path, 20_000, 1000))).encode())
    t = time.monotonic()
    large_data = page_data(_synthetic_selection(tmp_path, 400_000, 1000))
    large = len(render_page(large_data).encode())
    took = time.monotonic() - t
    # 1000 classes: names, counts, mixtures, 40-bin histograms; 100 suspects (without thumbnails here)
    assert large < 350_000 and abs(large - small) < 0.1 * small, (small, large)
    assert len(large_data["suspects"]) == 100 and len(large_data["per_class"]["class"]) == 1000
    assert len(large_data["pairs"]) == 10 and all(len(p["examples"]) == 4 for p in large_data["pairs"])
    assert took < 60
    print(f"1000 classes: page {small} bytes at 20k samples, {large} at 400k ({took:.1f} s)")


def test_make_thumbnail_refuses_what_decode_refuses():
    from turnctl.pixels import TooManyPixels
    from turnctl.report.thumbnails import make_thumbnail

    buf = io.BytesIO()
    Image.new("RGB", (300, 200), "blue").save(buf, "PNG")
    t = make_thumbnail(buf.getvalue(), 64)
    assert (t.width, t.height) == (64, 43)
    with Image.open(io.BytesIO(base64.b64decode(t.data_uri().split(",", 1)[1]))) as im:
        assert im.format == "JPEG" and im.size == (64, 43)
    with pytest.raises((OSError, ValueError)):
        make_thumbnail(buf.getvalue()[:100])
    bomb = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(bomb, "PNG")
    with pytest.raises(TooManyPixels):
        make_thumbnail(bomb.getvalue())
