"""Plots by default and report.html (issue 16, items 1 and 2): the plots' axes, the page's
contents from a tiny real run, escaping, and the page in a real headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import ModuleTemp, uneven_corpus, write_lines

from domainlm import TrainConfig, train
from domainlm.cli import main
from domainlm.run.checkpoint import read_run_file
from domainlm.run.report import (
    PLOTS,
    REPORT_FILE,
    RunData,
    plot_figure,
    read_run,
    write_run_report,
)

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = '<script>console.error("pwned")</script><img src=x onerror=alert(1)>'
MPL_BLUE, MPL_ORANGE = (31, 119, 180), (255, 127, 14)  # the first two runs' colours


@pytest.fixture(scope="module")
def run_dirs(module_tmp: ModuleTemp) -> tuple[Path, Path]:
    """Two tiny real runs (6 steps, evaluated every 2, checkpoints at 2, 4, 6), lr 1e-3 and 3e-3;
    the first samples while training. The corpus has a duplicated line: one lint warning."""
    from domainlm.model.loading import save_scratch_folder

    base = module_tmp.mktemp("report-page")
    model_dir = save_scratch_folder("tiny", base / "model", seed=0)
    train_file = write_lines(base / "train.txt", uneven_corpus(30) + ["a dup line here"] * 2)
    valid_file = write_lines(base / "valid.txt", uneven_corpus(6, seed=1))
    common = dict(
        model=str(model_dir),
        train_file=str(train_file),
        validation_file=str(valid_file),
        block_size=32,
        batch_size=2,
        max_steps=6,
        eval_steps=2,
        save_steps=2,
        logging_steps=1,
        precision="fp32",
        quiet=True,
        cache_dir=str(base / "cache"),
    )
    first, second = base / "first", base / "second"
    train(
        TrainConfig(
            output_dir=str(first),
            lr=1e-3,
            sample_prompts=["the cat"],
            sample_every=3,
            sample_max_new_tokens=4,
            **common,
        )
    )
    train(TrainConfig(output_dir=str(second), lr=3e-3, **common))
    return first, second


def events(run: Path) -> list[dict]:
    """metrics.jsonl read plainly (the reference; not through domainlm.report)."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- plots


def test_matplotlib_is_a_dependency_not_an_extra() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("matplotlib") for d in project["dependencies"])


def test_plots_have_titles_units_and_marked_validation_points(run_dirs) -> None:
    run_dir = run_dirs[0]
    run = read_run(run_dir)
    evals = [e for e in events(run_dir) if "eval_ppl" in e]
    assert [e["step"] for e in evals] == [0, 2, 4, 6]
    labels = {}
    for name in PLOTS:
        fig = plot_figure(name, [run])
        ax = fig.axes[0]
        assert ax.get_title() and ax.get_xlabel() == "step"
        labels[name] = ax.get_ylabel()
        # the top axis: training tokens (the run's count known from eval_results.json)
        assert any("tokens" in other.get_xlabel() for other in ax.child_axes), name
        if name == "training_loss.png":
            marked = [line for line in ax.get_lines() if line.get_marker() == "o"]
            assert len(marked) == 1 and marked[0].get_linestyle() == "None"
            assert list(marked[0].get_xdata()) == [e["step"] for e in evals]
            assert list(marked[0].get_ydata()) == [e["eval_loss"] for e in evals]
            assert [t.get_text() for t in ax.get_legend().get_texts()] == [
                "training",
                "validation",
            ]
        elif name == "validation_perplexity.png":
            (line,) = ax.get_lines()
            assert line.get_marker() == "o"
            assert list(line.get_ydata()) == [e["eval_ppl"] for e in evals]
            ppl = [e["eval_ppl"] for e in evals]
            assert ax.get_yscale() == ("log" if max(ppl) > 10 * min(ppl) else "linear")
            assert ax.get_legend() is None  # one curve: nothing to tell apart
        else:
            assert ax.get_legend() is None
    assert labels["training_loss.png"] == "loss (nats/token)"
    assert labels["validation_perplexity.png"].startswith("perplexity")
    assert labels["learning_rate.png"] == "learning rate"


def fake_run(tmp_path: Path, name: str, ppl: list[float], train: bool = True) -> RunData:
    steps = range(0, 10 * len(ppl), 10)
    evals = [
        {"step": s, "eval_loss": float(np.log(p)), "eval_ppl": p}
        for s, p in zip(steps, ppl, strict=True)
    ]
    rows = [{"step": s, "loss": 3.0, "lr": 1e-3} for s in range(1, 10 * len(ppl))]
    return RunData(tmp_path / name, train=rows if train else [], evals=evals)


@pytest.mark.parametrize(("ppl", "scale"), [([95.0, 10.0], "linear"), ([101.0, 10.0], "log")])
def test_perplexity_is_log_scale_only_past_a_decade(tmp_path, ppl, scale) -> None:
    fig = plot_figure("validation_perplexity.png", [fake_run(tmp_path, "r", ppl)])
    assert fig.axes[0].get_yscale() == scale


def test_legends_only_for_what_is_drawn(tmp_path) -> None:
    empty = fake_run(tmp_path, "empty", [], train=False)
    for name in PLOTS:
        ax = plot_figure(name, [empty]).axes[0]
        assert ax.get_legend() is None
        assert [t.get_text() for t in ax.texts] == ["nothing logged"]
    both = [fake_run(tmp_path, "a", [50.0, 20.0]), fake_run(tmp_path, "b", [60.0, 30.0])]
    ax = plot_figure("learning_rate.png", both).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
    from matplotlib.colors import to_hex

    assert [to_hex(line.get_color()) for line in ax.get_lines()] == ["#1f77b4", "#ff7f0e"]
    # a run that logged nothing is not named in the legend
    ax = plot_figure("validation_perplexity.png", [both[0], empty]).axes[0]
    assert ax.get_legend() is None and not ax.texts


# ----------------------------------------------------------------------------- report.html


class Page(HTMLParser):
    """Every tag with its attributes, and the page's text (HTML entities decoded)."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def all_text(self) -> str:
        return " ".join(" ".join(self.text).split())

    def find(self, tag: str) -> list[dict[str, str | None]]:
        return [attrs for name, attrs in self.tags if name == tag]


def assert_self_contained(page: Page) -> None:
    """No script, no frame or object, no stylesheet link, and nothing loaded but data: URLs."""
    names = {name for name, _ in page.tags}
    assert not names & {"script", "iframe", "object", "embed", "link", "base"}
    for _, attrs in page.tags:
        for key in ("src", "href", "srcset", "data"):
            value = attrs.get(key)
            assert value is None or value.startswith("data:"), (key, value)
        assert not any(key.startswith("on") for key in attrs)  # no event handlers


def test_every_run_writes_report_html(run_dirs) -> None:
    run_dir = run_dirs[0]
    text = (run_dir / REPORT_FILE).read_text(encoding="utf-8")
    page = Page(text)
    words = page.all_text()
    assert_self_contained(page)
    assert REPORT_FILE in read_run_file(run_dir)["written"]  # --overwrite-output-dir removes it
    # the three plots, embedded byte for byte
    images = page.find("img")
    assert [base64.b64decode(i["src"].split(",", 1)[1]) for i in images] == [
        (run_dir / name).read_bytes() for name in PLOTS
    ]
    # before / after perplexity
    results = json.loads((run_dir / "eval_results.json").read_text())
    assert f"{results['initial_perplexity']:.3f} before training" in words
    assert f"{results['perplexity']:.3f} after" in words
    # the best checkpoint: the lowest validation perplexity among the steps that have one
    evals = {e["step"]: e["eval_ppl"] for e in events(run_dir) if "eval_ppl" in e}
    kept = [int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*")]
    best = min(kept, key=lambda step: (evals[step], -step))
    assert f"Best checkpoint: checkpoint-{best} (step {best}," in words
    # data summary and the lint warning
    assert "train documents 32" in words and "validation documents 6" in words
    assert "1 exact duplicate line(s), e.g. 'a dup line here' x2" in words
    # samples while training: every record of samples.jsonl
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [3, 6]
    assert f"Samples while training ({len(samples)})" in words
    for record in samples:
        assert " ".join(record["text"].split()) in words
    # every setting of run_config.json
    config = json.loads((run_dir / "run_config.json").read_text())["config"]
    for key, value in config.items():
        shown = value if isinstance(value, str) else json.dumps(value)
        assert f"{key} {' '.join(shown.split())}".strip() in words, key


def test_report_compares_runs(run_dirs, tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    assert main(["report", *map(str, run_dirs), "--output", str(out)]) == 0
    capsys.readouterr()
    page = Page((out / REPORT_FILE).read_text(encoding="utf-8"))
    assert_self_contained(page)
    words = page.all_text()
    assert "2 runs compared" in words
    for run_dir in run_dirs:
        final = json.loads((run_dir / "eval_results.json").read_text())["perplexity"]
        assert f"Run {run_dir.name} " in words
        assert f"{run_dir.name} " in words and f" {final:.3f} " in words
    assert len(page.find("img")) == len(PLOTS)
    # each run's lint warning, read back from its model card's front matter
    assert words.count("1 exact duplicate line(s), e.g. 'a dup line here' x2") == 2
    # the settings side by side, the differing rows marked
    differing = text_of_rows(out / REPORT_FILE, "differs")
    first, second = (json.loads((r / "run_config.json").read_text())["config"] for r in run_dirs)
    assert (
        {row.split()[0] for row in differing}
        == {key for key in first.keys() | second.keys() if first.get(key) != second.get(key)}
        >= {"lr", "output_dir", "sample_prompts"}
    )
    assert "lr 0.001 0.003" in differing


def text_of_rows(path: Path, row_class: str) -> list[str]:
    """The text of each <tr class=row_class> of a page."""
    rows: list[str] = []

    class Rows(HTMLParser):
        inside = False

        def handle_starttag(self, tag, attrs):
            if tag == "tr":
                self.inside = dict(attrs).get("class") == row_class
                if self.inside:
                    rows.append("")

        def handle_data(self, data):
            if self.inside:
                rows[-1] += " " + data

    Rows(convert_charrefs=True).feed(path.read_text(encoding="utf-8"))
    return [" ".join(row.split()) for row in rows]


@pytest.fixture
def hostile_run(run_dirs, tmp_path) -> Path:
    """A copy of the first run whose user text (a sample, a setting, a lint warning) is HTML."""
    copy = tmp_path / "hostile"
    shutil.copytree(run_dirs[0], copy)
    with open(copy / "samples.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"step": 6, "prompt": HOSTILE, "text": HOSTILE}) + "\n")
    run_file = json.loads((copy / "run_config.json").read_text())
    run_file["config"]["train_file"] = f"/data/{HOSTILE}.txt"
    (copy / "run_config.json").write_text(json.dumps(run_file))
    data = {"train_documents": 1, "train_tokens": 9, "validation_documents": 1}
    write_run_report(copy, {**data, "validation_tokens": 9}, [f"{HOSTILE} x2"])
    return copy


def test_user_text_is_escaped(hostile_run: Path) -> None:
    text = (hostile_run / REPORT_FILE).read_text(encoding="utf-8")
    page = Page(text)
    assert_self_contained(page)
    assert "<script" not in text and "<img src=x" not in text
    words = page.all_text()
    # shown as text, as many times as it was planted: prompt, text, training file twice
    # (data summary and settings), lint warning
    assert words.count(HOSTILE) == 5


# ----------------------------------------------------------------------------- in Chromium


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def render(page: Path, tmp_path: Path, height: int = 2600) -> tuple[np.ndarray, list[str]]:
    """Load `page` in headless Chromium: the screenshot's RGB pixels and its console messages.

    Chromium logs every console message (errors, CSP refusals of a script or a request) on
    stderr as a `:CONSOLE` line with --enable-logging=stderr.
    """
    binary = chromium()
    if binary is None:
        pytest.skip("no chromium binary (apt-get install chromium); the browser test is skipped")
    shot = tmp_path / f"screenshot-{len(list(tmp_path.glob('screenshot-*')))}.png"
    command = [
        binary,
        "--headless",
        "--no-sandbox",  # as root, in a container
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        f"--window-size=1200,{height}",
        f"--screenshot={shot}",
        page.resolve().as_uri(),
    ]
    home = {
        "HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(tmp_path),
        "XDG_CACHE_HOME": str(tmp_path),
    }
    done = subprocess.run(  # its profile, cache and NSS files in tmp_path, not the user's home
        command, capture_output=True, text=True, timeout=120, check=False, env=os.environ | home
    )
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    from matplotlib.image import imread

    pixels = (imread(shot)[..., :3] * 255).round().astype(np.int16)
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return pixels, console


def count_colour(pixels: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 12) -> int:
    return int((np.abs(pixels - np.array(rgb)).max(axis=-1) <= tolerance).sum())


def without_images(page: Path, tmp_path: Path) -> Path:
    """The same page with every <img> taken out (what a page whose plots failed looks like)."""
    import re

    target = tmp_path / page.parent.name / page.name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(re.sub(r"<img [^>]*>", "", page.read_text(encoding="utf-8")))
    return target


def test_the_page_in_chromium_shows_the_plots_with_no_console_errors(run_dirs, tmp_path) -> None:
    page = run_dirs[0] / REPORT_FILE
    pixels, console = render(page, tmp_path)
    assert console == []
    # the curves (matplotlib's blue) fill over a thousand pixels; the page without its images
    # has none of that blue: the plots, not the page's text or tables, drew them
    blue = count_colour(pixels, MPL_BLUE)
    bare, _ = render(without_images(page, tmp_path), tmp_path)
    assert blue > 1000 and count_colour(bare, MPL_BLUE) < 50, blue
    # the plots lie in the first screen: below the heading, three 800-pixel-wide images
    rows = np.nonzero((np.abs(pixels - np.array(MPL_BLUE)).max(axis=-1) <= 12).any(axis=1))[0]
    assert rows.min() < 800


def test_the_comparison_page_in_chromium_overlays_both_runs(run_dirs, tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    assert main(["report", *map(str, run_dirs), "--output", str(out)]) == 0
    capsys.readouterr()
    pixels, console = render(out / REPORT_FILE, tmp_path, height=3000)
    assert console == []
    assert count_colour(pixels, MPL_BLUE) > 1000 and count_colour(pixels, MPL_ORANGE) > 1000


def test_chromium_console_check_sees_a_script_run_or_refused(hostile_run, tmp_path) -> None:
    """The harness itself: a script on a page is reported, so `console == []` means something.

    The escaped hostile page stays silent; the same text unescaped is refused by the page's
    Content-Security-Policy, and Chromium says so on the console."""
    _, console = render(hostile_run / REPORT_FILE, tmp_path)
    assert console == []
    raw = hostile_run / "raw.html"
    raw.write_text((hostile_run / REPORT_FILE).read_text().replace("</h1>", f"</h1>{HOSTILE}"))
    _, console = render(raw, tmp_path)
    assert any("Content Security Policy" in line for line in console), console
