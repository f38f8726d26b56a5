"""Benchmark helpers and the bench command's promises about the user's files."""

import numpy as np
from click.testing import CliRunner
from test_clean import cells

from toolkit.bench import tile_perturbed
from toolkit.cli import main


def test_tile_perturbed_makes_near_not_exact_copies():
    images, labels = cells(10)
    big, big_labels = tile_perturbed(images, labels, 35, seed=0)
    assert big.shape == (35, 96, 96, 3) and big.dtype == np.uint8
    assert np.array_equal(big[:10], images)
    assert big_labels.tolist() == [labels[i % 10] for i in range(35)]
    copies = big[10:]
    sources = images[np.arange(10, 35) % 10]
    assert not any(np.array_equal(c, s) or np.array_equal(c, s[:, ::-1])
                   for c, s in zip(copies, sources, strict=True))
    unflipped = np.abs(copies.astype(int) - sources).mean((1, 2, 3)) < 15
    assert unflipped.any() and (~unflipped).any()


def test_bench_never_deletes_a_file_it_did_not_write(tmp_path, shared, monkeypatch):
    """`cellfuse bench --out DIR` (even with --force) leaves a user's file alone and says why."""
    mine = tmp_path / "notes.txt"
    mine.write_text("my notes")
    for flags in ([], ["--force"]):
        result = CliRunner().invoke(main, ["bench", "--quick", "--out", str(tmp_path), *flags])
        assert result.exit_code != 0 and mine.read_text() == "my notes"
        assert str(tmp_path) in " ".join(result.output.split())
