"""`detsweep report`: the HTML page of a real finished sweep, opened in headless Chromium.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: the browser reads
NUL-terminated JSON commands on fd 3 and answers on fd 4), so the test needs no extra Python package,
no port and no websocket: it sees every console message (`Runtime.consoleAPICalled`), uncaught
exception (`Runtime.exceptionThrown`) and browser-side error such as a failed image load
(`Log.entryAdded`), asks the page for each <img>'s `naturalWidth`, and takes a full-page screenshot.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
from PIL import Image

from detection.metrics import mean_average_precision
from search import report
from search.cli import main as cli_main
from search.ensemble import bootstrap_line
from search.report import REPORT_FILE, write_report
from search.trial_results import TrialResult, read_trials

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--remote-debugging-pipe")


# ------------------------------------------------------------------------------------------ Chromium


@dataclass
class PageCheck:
    """What Chromium saw while loading a page."""

    errors: list[str] = field(default_factory=list)  # console errors, uncaught exceptions, browser error logs
    images: list[dict[str, Any]] = field(default_factory=list)  # {"src", "complete", "width"} per <img>
    screenshot: bytes = b""  # PNG of the full page


class _DevTools:
    """A minimal DevTools-protocol client over Chromium's --remote-debugging-pipe."""

    def __init__(self, binary: str, profile: str) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire_fds() -> None:  # in the child: fd 3 = commands in, fd 4 = answers out
            a, b = os.dup(to_browser_r), os.dup(from_browser_w)  # dup first: the pipe may already be fd 3 or 4
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.process = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                        preexec_fn=wire_fds, close_fds=False, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_browser], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("Chromium did not answer over the DevTools pipe in time.")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                stderr = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RuntimeError(f"Chromium closed the DevTools pipe; its stderr:\n{stderr[-3000:]}")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None,
             timeout: float = 60.0) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._read_message(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"DevTools {method} failed: {answer['error']}")
                return answer["result"]
            self.events.append(answer)

    def wait_for(self, method: str, *, timeout: float = 60.0) -> dict[str, Any]:
        for event in self.events:
            if event.get("method") == method:
                return event
        deadline = time.monotonic() + timeout
        while True:
            event = self._read_message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


def chromium_binary() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, ("Chromium is needed for this test: `apt-get update && apt-get install -y chromium` "
                    "(`make test` installs it).")
    return binary


def open_in_chromium(page: Path, *, width: int = 1400, height: int = 1000) -> PageCheck:
    """Load `page` (a file) in a fresh headless Chromium profile; see `PageCheck`."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        browser = _DevTools(chromium_binary(), profile)
        try:
            target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                browser.call(f"{domain}.enable", session=session)
            browser.call("Emulation.setDeviceMetricsOverride",
                         {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
            browser.call("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
            browser.wait_for("Page.loadEventFired")
            images = browser.call("Runtime.evaluate", {
                "expression": "Array.from(document.images).map(i => ({src: i.src.slice(0, 40), "
                              "complete: i.complete, width: i.naturalWidth}))",
                "returnByValue": True}, session=session)["result"]["value"]
            full_height = browser.call("Runtime.evaluate", {"expression": "document.documentElement.scrollHeight",
                                                            "returnByValue": True}, session=session)["result"]["value"]
            shot = browser.call("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": min(int(full_height), 12000), "scale": 1}},
                session=session)
        finally:
            browser.close()
    errors = []
    for event in browser.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            errors.append(f"exception: {params['exceptionDetails'].get('text')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(f"console.{params['type']}: {[a.get('value') for a in params.get('args', [])]}")
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            errors.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
    return PageCheck(errors=errors, images=images, screenshot=base64.b64decode(shot["data"]))


def assert_not_blank(png: bytes) -> np.ndarray:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert pixels.shape[0] > 1000 and pixels.shape[1] == 1400, pixels.shape
    assert pixels.std() > 20.0  # a white page has std 0
    colors = np.unique(pixels.reshape(-1, 3)[::7], axis=0)
    assert len(colors) > 500, len(colors)  # text, plots and photos, not a flat fill
    return pixels


def test_checker_catches_console_errors_broken_images_and_blank_pages(tmp_path: Path) -> None:
    """The checker itself can fail: a page with a console error, an exception and a missing image."""
    broken = tmp_path / "broken.html"
    broken.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body><p>x</p>'
                      '<img src="missing.png"><script>console.error("boom"); undefinedFunction();</script>'
                      "</body></html>")
    check = open_in_chromium(broken)
    assert any("boom" in e for e in check.errors)
    assert any(e.startswith("exception") for e in check.errors)
    assert any("missing.png" in e for e in check.errors)
    assert [image["width"] for image in check.images] == [0]
    with pytest.raises(AssertionError):
        assert_not_blank(check.screenshot)


# ------------------------------------------------------------------------------------------ the report


@pytest.fixture(scope="module")
def report_page(finished_sweep: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report(finished_sweep, out=tmp_path_factory.mktemp("report") / REPORT_FILE)


@pytest.mark.slow
def test_report_opens_in_chromium_without_errors(report_page: Path) -> None:
    check = open_in_chromium(report_page)
    assert check.errors == []
    # optimization history + learning curves + PR curves + held-out grid (2 held-out images), at least
    assert len(check.images) >= 5, check.images
    assert all(image["complete"] and image["width"] > 0 for image in check.images), check.images
    assert_not_blank(check.screenshot)


@pytest.mark.slow
def test_the_sweep_writes_its_report_when_it_ends(finished_sweep: Path) -> None:
    page = finished_sweep / REPORT_FILE
    assert page.is_file(), "search/cli.py's _finish must call search.report.write_report(experiment_dir)"
    assert '<section id="images">' in page.read_text()
    assert f"report: {page}" in (finished_sweep.parent / "sweep.log").read_text()


@pytest.mark.slow
def test_report_is_self_contained_and_has_every_section(report_page: Path, finished_sweep: Path) -> None:
    page = report_page.read_text()
    assert "<script" not in page
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(?:src|href)="(?!data:|#)', page)  # nothing loaded from a file or the network
    for anchor in ("leaderboard", "optuna", "curves", "per-class", "images", "reproducibility"):
        assert f'<section id="{anchor}">' in page
    trial_ids = [run.trial_id for run in read_trials(finished_sweep / "tune")]
    assert len(trial_ids) == 2 and all(f"<code>{t}</code>" in page for t in trial_ids)
    chosen = json.loads((finished_sweep / "best_ensemble.json").read_text())
    best = chosen["models"][0]["trial_id"]  # the trial of the chosen ensemble's first model
    assert re.search(r'<tr class="best"><td>&ndash;</td><td><code>chosen</code></td><td>test</td>', page)
    if chosen["name"] != "greedy":
        assert re.search(rf'<tr class="best"><td>1</td><td><code>{chosen["name"]}</code>', page)
    assert "&amp;ndash;" not in page  # an empty cell shows a dash, not the escaped entity's text
    assert html.escape(bootstrap_line(chosen["test_bootstrap"])) in page  # the test figures' intervals
    for name in ("Tree", "Dead", "Alive"):
        assert f"<td>{name}</td>" in page
    assert "optimization history" in page.lower()
    # The best trial's manifest: its dataset hash is shown.
    manifest = json.loads(next((finished_sweep / "tune").glob(f"trial_{best}/checkpoint_*/manifest.json")).read_text())
    assert manifest["dataset"]["sha256"] in page


@pytest.mark.slow
def test_report_ap_agrees_with_the_ensemble_job(finished_sweep: Path) -> None:
    """The report rebuilds the chosen ensemble's test-split predictions and ground truth; its mAP must be the
    ensemble job's own."""
    best = json.loads((finished_sweep / "best_ensemble.json").read_text())
    shown = report._load_split_result(finished_sweep, "test")
    split = json.loads((finished_sweep / "split.json").read_text())
    assert [r.image_id for r in shown.records] == split["test"]
    assert shown.score_threshold == best["score_threshold"]  # chosen on the selection split
    ours = mean_average_precision(shown.preds, shown.targets, class_names=shown.class_names)
    for key in ("map", "map_50", "map_75"):
        assert ours[key] == pytest.approx(best["test_metrics"][key], abs=1e-6)
    assert sum(len(p["boxes"]) for p in shown.preds) > 0  # the fused boxes above WBF's floor


@pytest.mark.slow
def test_report_before_the_ensemble_job_says_so(finished_sweep: Path, tmp_path: Path) -> None:
    experiment = shutil.copytree(finished_sweep, tmp_path / "exp", ignore=shutil.ignore_patterns(
        "ensemble", "best_ensemble*", "leaderboard.*", "optuna.db", "report.html"))
    page = write_report(experiment)
    assert page == experiment / REPORT_FILE
    text = page.read_text()
    assert "No ensemble results yet" in text and "No Optuna study" in text
    assert '<section id="curves">' in text and '<tr class="best">' not in text
    check = open_in_chromium(page)
    assert check.errors == []
    assert check.images and all(image["width"] > 0 for image in check.images)


@pytest.mark.slow
def test_report_command(finished_sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "page.html"
    assert cli_main(["report", str(finished_sweep), "--out", str(out), "--max-images", "1"]) == 0
    assert f"report: {out}" in capsys.readouterr().out
    assert out.read_text().count("<figcaption>") == 1


def test_report_of_a_folder_that_is_no_experiment_fails_naming_it(tmp_path: Path) -> None:
    from detection.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(str(tmp_path))):
        write_report(tmp_path)


# ------------------------------------------------------------------------------------------ optuna section


def _study(folder: Path, values: list[float]) -> Path:
    """An experiment-like folder with `optuna.db` holding one completed trial per value (a real study)."""
    folder.mkdir()
    study = optuna.create_study(storage=f"sqlite:///{folder / 'optuna.db'}", study_name=folder.name,
                                direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for value in values:
        trial = study.ask()
        trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        trial.suggest_categorical("batch_size", [4, 8])
        study.tell(trial, value)
    return folder


def test_optuna_section_with_one_trial_explains_missing_importances(tmp_path: Path) -> None:
    html = report._section_optuna(_study(tmp_path / "exp", [0.3]))
    assert "1 complete" in html
    assert "Parameter importances are not available with 1 completed trial(s)" in html
    assert html.count("<img") == 1  # the optimization history only


def test_optuna_section_with_several_trials_shows_importances(tmp_path: Path) -> None:
    html = report._section_optuna(_study(tmp_path / "exp", [0.1, 0.5, 0.2, 0.7, 0.4, 0.6]))
    assert html.count("<img") == 2  # history + importances
    names = re.findall(r"<tr><td>(\w+)</td><td>([0-9.]+)</td></tr>", html)
    assert {name for name, _ in names} == {"lr", "batch_size"}
    assert sum(float(v) for _, v in names) == pytest.approx(1.0, abs=2e-3)  # fANOVA importances sum to 1


def test_optuna_section_without_a_study(tmp_path: Path) -> None:
    assert "No Optuna study" in report._section_optuna(tmp_path)
    assert not (tmp_path / "optuna.db").exists()  # reading never creates the database


def test_learning_curve_figure_from_real_result_rows(tmp_path: Path) -> None:
    """Two epochs of two folds: the curve is drawn from fold mean and std; an empty trial is skipped. (The
    records are built here: reading them back needs Tune's experiment state, see the finished sweep's tests.)"""
    rows = [{"trial_id": "abc", "training_iteration": e, "score_mean": m, "score_std": s, "fold0/score": m - s,
             "fold1/score": m + s, "config": {"detector": "faster_rcnn/mobilenet_v2", "lr": 0.01, "batch_size": 4,
                                              "score_threshold": 0.3}}
            for e, m, s in ((1, 0.2, 0.05), (2, 0.4, 0.1))]
    records = [TrialResult(trial_id="abc", status="TERMINATED", folder=tmp_path / "trial_abc",
                           params=rows[-1]["config"], rows=rows),
               TrialResult(trial_id="empty", status="PENDING", folder=tmp_path / "trial_empty", params={})]
    runs = {r.trial_id: r for r in records}
    assert set(runs) == {"abc", "empty"} and runs["empty"].rows == []
    assert runs["abc"].num_folds == 2
    np.testing.assert_allclose(runs["abc"].series("score_mean"), [0.2, 0.4])
    html = report._section_curves(list(runs.values()), ["abc"], max_trials=24)
    assert html.count("<img") == 1
    assert "No trial has reported" in report._section_curves([runs["empty"]], [], max_trials=24)


def test_per_class_section_with_no_predictions(deepforest_index) -> None:
    """The empty case: an ensemble that predicted nothing gives AP 0 and an empty PR plot, not an error."""
    records = deepforest_index.records([0, 1])
    shown = report._SplitResult(
        class_names=deepforest_index.class_names, records=records,
        preds=[{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
               for _ in records],
        targets=[{"boxes": torch.as_tensor(r.boxes), "labels": torch.as_tensor(r.labels),
                  "iscrowd": torch.as_tensor(r.iscrowd)} for r in records],
        score_threshold=0.3)
    html = report._section_per_class(shown)
    num_boxes = sum(len(r.boxes) for r in records)
    assert f"<tr><th>all</th><td>{num_boxes}</td><td>0.0000</td><td>0.0000</td></tr>" in html
    assert html.count("<img") == 1
