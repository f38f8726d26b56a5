"""Shared fixtures: tiny data made here, the real data from ../shared when present."""

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Keras reads KERAS_HOME once, when imported: its weights cache is a folder of this test run, so no test
# reads ~/.keras or leaves a download there. Removed when the run ends.
_KERAS_HOME = tempfile.TemporaryDirectory(prefix="cellfuse-keras-home-")
os.environ["KERAS_HOME"] = _KERAS_HOME.name

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from toolkit.cli import fd2_to_devnull  # noqa: E402
from toolkit.data import save_dataset  # noqa: E402
from toolkit.runs import shared_dir  # noqa: E402


def _split_cpu_in_two():
    """Two logical CPU devices, so MirroredStrategy has something to mirror over (set before TF starts).
    TensorFlow's start-up lines go to /dev/null, as the command line sends them: they are written before
    its logging reads TF_CPP_MIN_LOG_LEVEL, and an xdist worker hands them on after the test summary."""
    with fd2_to_devnull():
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        except RuntimeError:  # TF already initialised by an earlier import: keep what is there
            pass


_split_cpu_in_two()


def _seed_keras_cache() -> None:
    """The ImageNet files in ../shared/weights, under the names Keras caches them by, so `weights =
    "imagenet"` loads without a network (mobilenet_2_5_128_tf.h5 is the file MobileNet 0.25 fetches)."""
    models = Path(_KERAS_HOME.name) / "models"
    models.mkdir(exist_ok=True)
    for path in sorted((shared_dir() / "weights").glob("*.h5")):
        shutil.copyfile(path, models / path.name)


_seed_keras_cache()


def stand_in_model(path: Path) -> Path:
    """A .keras file that is located, never loaded: a zip holding the two parts every .keras file has, empty."""
    with zipfile.ZipFile(path, "w") as archive:
        for name in ("config.json", "model.weights.h5"):
            archive.writestr(name, b"")
    return path


def make_images(n: int, n_classes: int = 8, seed: int = 0, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Learnable toy images: each class is a disc of its own colour and size on a noisy background."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    rng.shuffle(labels)
    yy, xx = np.mgrid[:size, :size]
    images = rng.integers(150, 200, (n, size, size, 3)).astype(np.uint8)
    for i, c in enumerate(labels):
        cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
        r = 10 + 3 * c
        colour = np.array([40 + 25 * c, 200 - 20 * c, 120 + (c % 3) * 40])
        images[i][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = colour
    return images, labels


@pytest.fixture
def tiny_npz(tmp_path):
    """64 toy images in the challenge format."""
    images, labels = make_images(64)
    return save_dataset(tmp_path / "tiny.npz", images, labels)


@pytest.fixture(autouse=True)
def brief_timing(monkeypatch):
    """distill's img/s timing at 0.1 s per model instead of 3 s, in every test (each distillation times
    three models): tests check that it runs and is reported, not what it measures (test_distill times a
    model of known speed on its own, with a budget of its own)."""
    from functools import partial

    from toolkit import distill

    monkeypatch.setattr(distill, "img_per_s", partial(distill.img_per_s, budget_s=0.1))


@pytest.fixture(scope="session")
def shared():
    path = shared_dir()
    if not (path / "data" / "train.npz").exists():
        pytest.skip(f"real data not found under {path}")
    return path


slow = pytest.mark.skipif(not os.environ.get("CELLFUSE_SLOW"), reason="slow; set CELLFUSE_SLOW=1")


# `make test` runs two pytest-xdist workers (--dist loadgroup --no-loadscope-reorder). A unit of work is
# a test file (its module-scoped runs shared within one worker), except that each member recipe of the
# recipe matrix is a unit of its own, so that the matrix spreads over both workers. Units are handed out
# in collection order: the longest (measured in CI) go first so that both workers finish together.
LONGEST_FIRST = ("test_train.py", "test_recipe_matrix.py", "test_pipeline.py", "test_distill.py", "test_backbones.py",
                 "matrix-gpu-efficientnetv2-m-eager", "test_sweep.py", "matrix-gpu-convnext-base-eager",
                 "test_multiworker.py", "matrix-gpu-efficientnetv2-s-eager", "test_augment.py", "test_gpucheck.py",
                 "test_lite.py", "matrix-gpu-densenet121-eager", "test_ownership.py", "test_inspect.py",
                 "test_consistency.py", "matrix-gpu-resnet50v2-eager")


def work_unit(item) -> str:
    if item.path.name == "test_recipe_matrix.py" and item.originalname.startswith("test_member_recipe"):
        return f"matrix-{item.callspec.id}"
    return item.path.name


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.xdist_group(work_unit(item)))
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(work_unit(item), len(rank)))  # stable: order within a file kept


UNGROUPED = pytest.StashKey[str]()


def pytest_collection_finish(session):
    """xdist hands a group to one worker by a suffix it writes into each node id; a pytest that ignores
    the write (9.2: pytest-xdist issue 1386) spreads every test alone, so module-scoped runs are repeated
    on both workers and the suite takes minutes longer, silently. Every test fails instead, saying why
    (an error raised here, in a worker, would not reach the terminal)."""
    if session.config.getoption("loadgroup", False) and session.items and "@" not in session.items[0].nodeid:
        session.config.stash[UNGROUPED] = (f"--dist loadgroup does not group tests on pytest {pytest.__version__} "
                                           "(pytest-xdist issue 1386): install the pytest pyproject.toml pins")


def pytest_runtest_setup(item):
    if UNGROUPED in item.config.stash:
        pytest.fail(item.config.stash[UNGROUPED], pytrace=False)
