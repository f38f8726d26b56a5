"""The command surface: every example runs as written, and every command follows the same rules.

The rules are checked over the Click command tree, so a new command that breaks one fails here:
every option has help and shows its default; choices are listed; a command that writes has --out
and --force; every command has --json; every docstring ends with a runnable "Example:" paragraph.
"""

import inspect
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import stand_in_model

from toolkit import cli
from toolkit.cli import main, out_of_memory_message

ROOT = Path(__file__).parents[1]
COMMANDS = sorted(main.commands.items())
IDS = [name for name, _ in COMMANDS]
# Where an example's files may live: the checkout's recipes, what cellfuse writes, the shared data.
EXAMPLE_PLACES = ("recipes/", "outputs/", "../shared/")


# ---------------------------------------------------------------- examples run as written

def command_lines(text: str) -> list[str]:
    """`cellfuse ...` lines of a text, backslash continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("cellfuse ")]


def doc_files() -> list[Path]:
    """The README and the pages under docs/ (when there are any)."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


def doc_examples(path: Path) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S)
    return [line for block in blocks for line in command_lines(block)]


def readme_examples() -> list[str]:
    return doc_examples(ROOT / "README.md")


def all_doc_examples() -> list[tuple[str, str]]:
    return [(str(path.relative_to(ROOT)), line) for path in doc_files() for line in doc_examples(path)]


def help_example(command: click.Command) -> list[str]:
    """The lines of a docstring's last paragraph, which must be a "\\b" line, then "Example:", then commands."""
    last = inspect.cleandoc(command.help or "").split("\n\n")[-1].splitlines()
    assert last[:2] == ["\b", "Example:"], "the docstring must end with a \\b line and an Example: paragraph"
    return [line.strip() for line in last[2:]]


def recipe_commands() -> list[str]:
    return [path.read_text().splitlines()[0].lstrip("# ") for path in sorted(ROOT.glob("recipes/**/*.toml"))]


def dry_run(line: str) -> None:
    """Parse LINE's arguments against the command tree, as `cellfuse` would, without running it."""
    argv = shlex.split(line, comments=True)
    assert argv[0] == "cellfuse"
    ctx = main.make_context("cellfuse", argv[1:])
    args = [*getattr(ctx, "_protected_args", ctx.protected_args), *ctx.args]
    name, command, rest = main.resolve_command(ctx, args)
    command.make_context(name, rest, parent=ctx)
    check_paths(argv[1:])


def check_paths(argv: list[str]) -> None:
    """File arguments sit where they make sense in the checkout; recipe files and globs exist."""
    for before, token in zip(["", *argv], argv, strict=False):
        if before == "--set" or token.startswith("-") or not re.search(r"/|\.(npz|zip|toml|png|keras)$", token):
            continue
        assert token.startswith(EXAMPLE_PLACES), f"{token}: put example files under {EXAMPLE_PLACES}"
        if token.startswith("recipes/"):
            assert sorted(ROOT.glob(token)), f"{token}: no such recipe in the checkout"


@pytest.mark.parametrize("page, line", all_doc_examples())
def test_doc_examples_parse(page, line):
    dry_run(line)


def test_doc_examples_include_pages_under_docs(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("```bash\ncellfuse synth --out outputs/s.npz\n```\n")
    (tmp_path / "docs" / "recipes.md").write_text("```bash\ncellfuse recipes --json\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert [line for _, line in all_doc_examples()] == ["cellfuse synth --out outputs/s.npz",
                                                       "cellfuse recipes --json"]


def test_readme_has_examples_of_every_command():
    used = {shlex.split(line)[1] for line in readme_examples()}
    assert used >= {"clean", "split", "train", "ensemble", "distill", "export", "grade"}


@pytest.mark.parametrize("name, command", COMMANDS, ids=IDS)
def test_help_example_parses(name, command):
    """The example ends with the command itself; lines before it may make its inputs."""
    lines = help_example(command)
    assert lines and lines[-1].startswith(f"cellfuse {name} "), lines
    for line in lines:
        dry_run(line)


def test_sweep_example_makes_its_training_file_first():
    """A fresh checkout has no outputs/: the sweep example's data comes from the line before it."""
    *before, last = help_example(main.commands["sweep"])
    data = re.search(r"data\.train=(\S+)", last)[1]
    assert any(shlex.split(line)[1] == "synth" and data in shlex.split(line) for line in before), before


@pytest.mark.parametrize("line", recipe_commands())
def test_recipe_opening_commands_parse(line):
    dry_run(line)


@pytest.mark.parametrize("line", [
    "cellfuse clean ../shared/data/train.npz --out outputs/clean --tsne-off",  # unknown option
    "cellfuse cleanse ../shared/data/train.npz",  # unknown command
    "cellfuse evaluate outputs/runs/x ../shared/data/train.npz --tta d5",  # no such view set
    "cellfuse corrupt clean.npz --out outputs/c.npz",  # a file outside the checkout's places
])
def test_dry_run_catches_broken_examples(line):
    with pytest.raises((click.UsageError, AssertionError)):
        dry_run(line)


# ---------------------------------------------------------------- one surface

def option_records(name: str, command: click.Command):
    parent = click.Context(main, info_name="cellfuse", **main.context_settings)
    ctx = click.Context(command, info_name=name, parent=parent, **command.context_settings)
    return [(p, p.get_help_record(ctx)) for p in command.params if isinstance(p, click.Option)]


@pytest.mark.parametrize("name, command", [*COMMANDS, ("cellfuse", main)], ids=[*IDS, "cellfuse"])
def test_every_option_has_help(name, command):
    for option, _ in option_records(name, command):
        assert option.help, f"{name} {option.opts[0]} has no help line"


@pytest.mark.parametrize("name, command", COMMANDS, ids=IDS)
def test_defaults_are_shown_as_values(name, command):
    for option, (_, text) in option_records(name, command):
        assert "default:" not in option.help.lower(), f"{name} {option.opts[0]}: let Click show the default"
        if option.is_flag or option.multiple or option.required or option.default is None:
            continue
        assert "[default: " in text, f"{name} {option.opts[0]} hides its default"
        assert not re.search(r"default: \w+\.[A-Z_]+", text), f"{name} {option.opts[0]} shows a source name"


@pytest.mark.parametrize("name, command", COMMANDS, ids=IDS)
def test_choices_are_listed(name, command):
    for option, (decl, _) in option_records(name, command):
        if option.name in ("tta", "views"):
            assert isinstance(option.type, cli.ViewSpec), f"{name} --{option.name} should be a ViewSpec"
        choices = {click.Choice: lambda t: t.choices, cli.ViewSpec: lambda t: cli.VIEW_SETS + cli.MERGES}
        for kind, names in choices.items():
            if isinstance(option.type, kind):
                missing = [c for c in names(option.type) if str(c) not in decl]
                assert not missing, f"{name} {option.opts[0]} does not list {missing}"


def test_clean_defaults_match_the_module():
    from toolkit import clean

    params = {p.name: p.default for p in main.commands["clean"].params}
    assert params["threshold"] == clean.DEFAULT_THRESHOLD
    assert params["contamination"] == clean.DEFAULT_CONTAMINATION


@pytest.mark.parametrize("name, command", COMMANDS, ids=IDS)
def test_writing_commands_have_out_and_force_and_all_have_json(name, command):
    options = {opt for p in command.params for opt in p.opts}
    assert "--json" in options, f"{name} has no --json"
    if name not in cli.READ_ONLY:
        assert {"--out", "--force"} <= options, f"{name} writes, so it needs --out and --force " \
                                                "(or a place in cli.READ_ONLY if it writes nothing)"


def test_read_only_commands_exist():
    assert cli.READ_ONLY <= set(main.commands)


# ---------------------------------------------------------------- behaviour behind the surface

def test_json_is_the_last_line_and_quiet_prints_only_it(tmp_path):
    out = tmp_path / "s.npz"
    result = CliRunner().invoke(main, ["-q", "synth", "--out", str(out), "--n", "24", "--json"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["out"] == str(out) and out.exists()
    loud = CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "t.npz"), "--n", "24", "--json"])
    assert len(loud.output.strip().splitlines()) > 1 and json.loads(loud.output.strip().splitlines()[-1])


def test_split_refuses_to_replace_without_force(tiny_npz, tmp_path):
    args = ["split", str(tiny_npz), "--out", str(tmp_path / "split"), "--val-fraction", "0.25", "--json"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    written = json.loads(first.output.strip().splitlines()[-1])
    assert Path(written["val"]).exists() and Path(written["val_corrupt"]).exists()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "Error: " in again.output and "--force" in again.output
    assert CliRunner().invoke(main, [*args, "--force"]).exit_code == 0


def test_bad_input_is_one_error_line_with_status_2(tmp_path):
    result = CliRunner().invoke(main, ["train", "recipes/tiny.toml", "--set", "train.ema=False"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith("Error: ") and "true or false" in result.output
    usage = CliRunner().invoke(main, ["clean", "x.npz", "--out", str(tmp_path), "--tsne-off"])
    assert usage.exit_code == 2 and "Error: No such option" in usage.output


def test_internal_failure_keeps_the_traceback_with_status_1(tmp_path, monkeypatch):
    import toolkit.synth

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(toolkit.synth, "write_synthetic", broken)
    result = CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "s.npz")])
    assert result.exit_code == 1
    assert "Traceback" in result.output and "ZeroDivisionError" in result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: internal failure")


def test_out_of_memory_is_one_line_that_says_what_this_command_can_lower(tmp_path, tiny_npz, monkeypatch):
    import tensorflow as tf

    import toolkit.evaluate
    import toolkit.synth

    def exhausted(*args, **kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[64,1024]\nmore")

    monkeypatch.setattr(toolkit.synth, "write_synthetic", exhausted)
    monkeypatch.setattr(toolkit.evaluate, "evaluate_model", exhausted)
    model = stand_in_model(tmp_path / "m.keras")
    said = {}
    for args in (["synth", "--out", str(tmp_path / "s.npz")], ["evaluate", str(model), str(tiny_npz)]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        said[args[0]] = result.output.strip().splitlines()[-1]
    assert said["synth"] == ("Error: out of memory (OOM when allocating tensor with shape[64,1024]); close what "
                             "else uses this machine's memory, or use one with more")
    assert said["evaluate"].endswith("; give a smaller --batch-size")
    assert out_of_memory_message(MemoryError(), "distill").startswith("out of memory (MemoryError); lower "
                                                                      "train.batch_size")


# ---------------------------------------------------------------- TensorFlow's start-up noise

TF_NOISE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]|absl::InitializeLog|cuInit|oneDNN",
                      re.M)


def run_cellfuse(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user's shell has it
    return subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_tensorflow_start_up_lines_are_hidden_unless_verbose(tiny_npz, tmp_path):
    clean = run_cellfuse("clean", str(tiny_npz), "--out", str(tmp_path / "clean"), "--no-tsne", cwd=ROOT)
    assert clean.returncode == 0, clean.stderr
    assert not TF_NOISE.search(clean.stderr), clean.stderr
    # preview imports TensorFlow: quiet by default, TensorFlow's own lines back with -v
    preview = ["preview", "recipes/tiny.toml", "--set", f'data.train="{tiny_npz}"', "--images", "2",
               "--repeats", "1", "--out", str(tmp_path / "p.png")]
    quiet = run_cellfuse(*preview, "--json", cwd=ROOT)
    assert quiet.returncode == 0, quiet.stderr
    assert not TF_NOISE.search(quiet.stderr), quiet.stderr
    assert json.loads(quiet.stdout.strip().splitlines()[-1])["out"] == str(tmp_path / "p.png")
    verbose = run_cellfuse("-v", *preview, "--force", cwd=ROOT)
    assert verbose.returncode == 0, verbose.stderr
    assert TF_NOISE.search(verbose.stderr), "TensorFlow printed nothing at start-up: is quieting still needed?"


# ---------------------------------------------------------------- the top-level help and flags

def test_short_version_flag():
    short, long = CliRunner().invoke(main, ["-V"]), CliRunner().invoke(main, ["--version"])
    assert short.exit_code == 0 and short.output == long.output and "cellfuse, version" in short.output


def test_top_level_help_lists_each_command_untruncated_and_documents_completion():
    text = CliRunner().invoke(main, ["--help"], terminal_width=80).output
    commands = text.split("Commands:")[1].split("Shell completion")[0]
    assert "..." not in commands, commands
    listed = re.findall(r"^  (\w+) ", commands, flags=re.M)
    assert listed == sorted(main.commands)
    assert "_CELLFUSE_COMPLETE=bash_source cellfuse" in text


def test_grade_help_says_it_is_not_a_sandbox():
    text = " ".join(CliRunner().invoke(main, ["grade", "--help"]).output.split())
    assert "Not a sandbox" in text and "model.py runs as your user" in text


# ---------------------------------------------------------------- Ctrl-C

def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_prints_the_command_that_resumes(tiny_npz, tmp_path, monkeypatch):
    import toolkit.sweep

    monkeypatch.setattr(toolkit.sweep, "run_sweep", interrupt)
    args = ["sweep", "recipes/tiny.toml", "--space", "recipes/spaces/tiny.toml", "--set",
            f"data.train={tiny_npz}", "--out", str(tmp_path / "sw"), "--force"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130 and "Aborted" not in result.output
    line = result.output.strip().splitlines()[-1]
    resume = shlex.split(line.split("to continue: ", 1)[1])
    assert line.startswith("Error: interrupted") and resume == ["cellfuse", *args[:-1], "--resume"]


def test_ctrl_c_in_the_demo_says_how_to_resume_it(tmp_path, monkeypatch):
    import toolkit.pipeline

    monkeypatch.setattr(toolkit.pipeline, "run_demo", interrupt)
    monkeypatch.delenv("MAKELEVEL", raising=False)  # `make test` sets it
    args = ["demo", "--out", str(tmp_path / "demo"), "--force"]
    result = CliRunner().invoke(main, args)
    line = result.output.strip().splitlines()[-1]
    assert result.exit_code == 130 and shlex.split(line.split("to continue: ", 1)[1]) == ["cellfuse", "demo", "--out",
                                                                                          str(tmp_path / "demo"), "--resume"]


def test_ctrl_c_in_make_demo_says_how_to_resume_it_with_make(tmp_path, monkeypatch):
    """`make demo` points Keras at its own cache; the line that resumes it must too."""
    import toolkit.pipeline

    monkeypatch.setattr(toolkit.pipeline, "run_demo", interrupt)
    monkeypatch.setenv("MAKELEVEL", "1")
    data = tmp_path / "my data.npz"
    data.write_bytes(b"")
    monkeypatch.setattr("toolkit.precheck.data_file", lambda path: path)
    result = CliRunner().invoke(main, ["demo", "--out", "outputs/demo", "--data", str(data), "--force"])
    line = result.output.strip().splitlines()[-1]
    assert result.exit_code == 130, result.output
    assert shlex.split(line.split("to continue: ", 1)[1]) == ["make", "demo", "OUT=outputs/demo", f"DATA={data}",
                                                              "RESUME=1"]


def test_ctrl_c_in_a_command_that_cannot_resume(tmp_path, monkeypatch):
    import toolkit.synth

    monkeypatch.setattr(toolkit.synth, "write_synthetic", interrupt)
    result = CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "s.npz")])
    assert result.exit_code == 130 and result.output.strip() == "Error: interrupted"
