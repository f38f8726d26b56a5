"""The install a user does: the wheel, in a fresh venv outside the checkout, run from an empty folder.

The venv borrows the project venv's installed dependencies through a .pth file (TensorFlow is not
downloaded again) and gets cellfuse itself only from the wheel, so what runs is what `pip install`
ships: the package, its console script and its recipes, nothing from the checkout.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import venv
from pathlib import Path

ROOT = Path(__file__).parents[1]
SOURCES = ("pyproject.toml", "README.md", "toolkit", "recipes")  # what the wheel is built from


def run(*args, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def last_json(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def build_wheel(tmp: Path) -> Path:
    """From a copy of the sources: setuptools' build/ stays out of the checkout, and no stale file
    left in it can slip into the wheel. No build isolation: setuptools comes with the [dev] extra."""
    source = tmp / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
        "--wheel-dir", tmp / "dist", source, cwd=tmp)
    return next((tmp / "dist").glob("cellfuse-*.whl"))


def fresh_venv(path: Path) -> Path:
    """A venv whose own site-packages comes first, then this venv's (a plain path line: .pth files
    there, such as an editable cellfuse's finder, are not run)."""
    venv.EnvBuilder(with_pip=False).create(path)
    python = path / "bin" / "python"
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=path).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "project-dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    return python


def test_the_wheel_works_from_an_empty_folder(tmp_path):
    started = time.time()
    wheel = build_wheel(tmp_path)
    python = fresh_venv(tmp_path / "venv")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--quiet",
        wheel, cwd=tmp_path)
    cellfuse, work = tmp_path / "venv" / "bin" / "cellfuse", tmp_path / "work"
    work.mkdir()

    where = run(python, "-c", "import toolkit, toolkit.catalog as c; print(toolkit.__file__); print(c.shipped_dir())",
                cwd=work).stdout.split()
    print("\n".join(where))
    assert all(Path(p).is_relative_to(tmp_path / "venv") for p in where), where  # not the checkout

    assert run(cellfuse, "--version", cwd=work).stdout.strip() == "cellfuse, version 0.1.0"
    listed = last_json(run(cellfuse, "recipes", "--json", cwd=work))
    assert {"tiny", "cpu-mobilenet", "student-cpu"} <= {r["name"] for r in listed["recipes"]}
    run(cellfuse, "recipes", "copy", "tiny", "mine.toml", cwd=work)
    assert (work / "mine.toml").read_text().startswith("# cellfuse train mine.toml")

    # The synthetic demo's first stages, with the shipped recipe named rather than a path.
    run(cellfuse, "-q", "synth", "--out", "synth.npz", "--n", "160", cwd=work)
    run(cellfuse, "-q", "clean", "synth.npz", "--out", "clean", "--no-tsne", cwd=work)
    trained = last_json(run(cellfuse, "-q", "train", "tiny", "--set", 'data.train="clean/clean.npz"',
                            "--set", "train.steps_per_epoch=2", "--out", "runs", "--json", cwd=work))
    assert (work / "runs" / "tiny" / "best.keras").is_file(), trained
    print(f"wheel -> venv -> synth, clean, train: {time.time() - started:.0f} s")
