"""Quiet by default, readable in a log: no TensorFlow/Keras chatter without -v; output that is not a
terminal is never wrapped or cut, and progress still shows, one line per step."""

import io
import logging
import warnings

import pytest
from click.testing import CliRunner
from rich.panel import Panel
from rich.progress import Progress
from rich.rule import Rule

from toolkit import cli
from toolkit.cli import LogConsole, main

# ---------------------------------------------------------------- no wrapping, no cut cells

def test_a_long_line_is_not_wrapped_when_piped(tiny_npz, tmp_path):
    out = tmp_path / ("a-folder-name-long-enough-to-pass-any-terminal-width-" * 3)
    result = CliRunner().invoke(main, ["split", str(tiny_npz), "--out", str(out), "--val-fraction", "0.25"])
    assert result.exit_code == 0, result.output
    wrote = [line for line in result.output.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 1 and wrote[0].count(str(out)) == 3, result.output


def test_table_cells_are_whole_when_piped():
    from toolkit.catalog import shipped_recipes

    output = CliRunner().invoke(main, ["recipes"], terminal_width=80).output
    assert "…" not in output
    for row in shipped_recipes():
        assert row["purpose"] in output, f"{row['name']}: purpose wrapped or cut"


def test_panels_and_rules_fit_their_text_when_piped():
    file = io.StringIO()
    console = LogConsole(file=file)
    console.print(Panel("w" * 300, title="WARNING"), Rule("stage"))
    lines = file.getvalue().splitlines()
    assert any("w" * 300 in line for line in lines)
    assert max(len(line) for line in lines) < 320 and len(lines[-1]) == 80


def test_a_terminal_keeps_its_width():
    console = LogConsole(file=io.StringIO(), force_terminal=True, width=80)
    assert console.size.width == 80
    assert LogConsole(file=io.StringIO()).size.width == LogConsole.UNLIMITED


# ---------------------------------------------------------------- progress in a log

@pytest.fixture
def log_console(monkeypatch):
    monkeypatch.setattr(LogConsole, "PROGRESS_AFTER_S", 0.0)
    monkeypatch.setattr(cli.ProgressLines, "POLL_S", 3600.0)  # the test reports by hand: deterministic
    file = io.StringIO()
    return LogConsole(file=file), file


def test_progress_prints_a_line_per_step_when_piped(log_console):
    console, file = log_console
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("predicting", total=20)
        for _ in range(20):
            progress.advance(task)
            console._progress_lines.report()
    console.print("done")
    console.print()  # a blank line asked for is kept
    lines = file.getvalue().split("\n")
    assert lines[-3:] == ["done", "", ""], "rich's Progress ended a log with a blank line of its own"
    lines = lines[:-3]
    assert len(lines) == 10 and all(line.startswith("predicting") for line in lines), lines
    assert [line.split()[1] for line in lines] == [f"{p}%" for p in range(10, 101, 10)]


def test_no_progress_lines_on_a_terminal_or_when_quiet(monkeypatch):
    monkeypatch.setattr(LogConsole, "PROGRESS_AFTER_S", 0.0)
    for console in (LogConsole(file=io.StringIO(), force_terminal=True), LogConsole(file=io.StringIO(), quiet=True)):
        with Progress(console=console, transient=True) as progress:
            progress.add_task("predicting", total=2, completed=2)
            assert getattr(console, "_progress_lines", None) is None


# ---------------------------------------------------------------- TensorFlow's Python-side warnings

@pytest.fixture
def restored_logging():
    names = ("tensorflow", "absl", "keras")
    levels = {name: logging.getLogger(name).level for name in names}
    with warnings.catch_warnings():
        yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def keras_warns() -> list:
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit("a retracing note", UserWarning, "trainer.py", 1, module="keras.src.trainers")
    return caught


@pytest.mark.parametrize("flags, shown", [([], False), (["-v"], True)])
def test_tensorflow_python_warnings_only_with_verbose(flags, shown, restored_logging, tmp_path):
    for name in ("tensorflow", "absl"):
        logging.getLogger(name).setLevel(logging.NOTSET)
    warnings.resetwarnings()
    result = CliRunner().invoke(main, [*flags, "runs", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert logging.getLogger("tensorflow").isEnabledFor(logging.WARNING) is shown  # tf.function retracing
    assert logging.getLogger("absl").isEnabledFor(logging.WARNING) is shown
    assert bool(keras_warns()) is shown
