"""The cleaner on small planted data: each detector, the bad inputs, the command end to end."""

import hashlib
import json

import imagehash
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from toolkit import clean
from toolkit.cli import main
from toolkit.data import (
    hamming,
    hash_groups,
    load_dataset,
    near_duplicate_pairs,
    phash_bits,
    save_dataset,
)
from toolkit.errors import CellfuseError


def cells(n, seed=0):
    """Distinct cell-like pictures: a pink, blotchy background (random 8x8 field, so perceptual
    hashes differ by ~32 bits) and a purple disc."""
    rng = np.random.default_rng(seed)
    field = np.kron(rng.normal(0, 25, (n, 8, 8)), np.ones((12, 12)))[..., None]
    images = np.array([235, 200, 200]) + field
    yy, xx = np.mgrid[:96, :96]
    for image in images:
        cy, cx = rng.integers(30, 66, 2)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(100, 300)] = (120, 60, 160)
    return images.clip(0, 255).astype(np.uint8), rng.integers(0, 8, n)


def jitter(image, seed, amount=3):
    noise = np.random.default_rng(seed).integers(-amount, amount + 1, image.shape)
    return (image.astype(int) + noise).clip(0, 255).astype(np.uint8)


def poster():
    """A non-cell picture: a yellow square and a green band on dark blue."""
    image = np.zeros((96, 96, 3), np.uint8) + np.array([20, 30, 90], np.uint8)
    image[10:50, 10:50] = (240, 220, 40)
    image[70:85] = (40, 180, 60)
    return image


def gradient():
    yy, xx = np.mgrid[:96, :96]
    return np.stack([xx * 2.6, yy * 2.6, 255 - xx * 2.6], -1).astype(np.uint8)


N_CELLS = 60
# planted rows, appended after the cells: what each is and what the cleaner must call it
PLANTED = {
    "exact": (60, "exact_duplicate", 3),  # copy of row 3
    "near": (61, "near_duplicate", 5),  # row 5 with pixel noise
    "conflict": (62, "label_conflict", 7),  # row 7 with noise, another label
    "odd": (63, "outlier", None),
}
NONCELL_ROWS = list(range(64, 70))  # a poster pasted 6 times under 6 labels


def planted():
    images, labels = cells(N_CELLS, seed=1)
    extra = [images[3], jitter(images[5], 1), jitter(images[7], 2), gradient()]
    extra_labels = [labels[3], labels[5], (labels[7] + 1) % 8, 0]
    extra += [jitter(poster(), s, 2) for s in range(6)]
    extra_labels += list(range(6))
    return np.concatenate([images, np.stack(extra)]), np.concatenate([labels, extra_labels])


@pytest.fixture
def planted_npz(tmp_path):
    images, labels = planted()
    return save_dataset(tmp_path / "planted.npz", images, labels)


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- detectors

def test_phash_bits_are_imagehash_phash():
    images, _ = cells(5)
    expected = [int(str(imagehash.phash(Image.fromarray(x))), 16) for x in images]
    assert phash_bits(images).tolist() == expected


def test_near_duplicate_pairs_match_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 300, dtype=np.int64).astype(np.uint64)
    flips = [np.bitwise_or.reduce(np.uint64(1) << rng.choice(64, k, replace=False).astype(np.uint64))
             for k in rng.integers(1, 9, 300)]
    hashes = np.concatenate([base, base ^ np.array(flips, np.uint64)])  # near twins at 1..8 bits
    distance = hamming(hashes[:, None], hashes[None, :])
    for threshold in (0, 2, 4, 7):
        i, j = near_duplicate_pairs(hashes, threshold)
        bi, bj = np.nonzero(np.triu(distance <= threshold, k=1))
        assert np.array_equal(np.stack([i, j]), np.stack([bi, bj]))  # both in (i, j) order
        assert threshold == 0 or len(i) > 0


def test_hash_groups_join_chains_and_identical_hashes():
    hashes = np.array([0b0, 0b11, 0b1111, 0b11, 0xFF00FF00, 0b0], dtype=np.uint64)
    group = hash_groups(hashes, threshold=2)  # 0 -2- 0b11 -2- 0b1111: one chain
    assert len({group[0], group[1], group[2], group[3], group[5]}) == 1
    assert group[4] != group[0]
    assert len(set(hash_groups(hashes, threshold=0))) == 4


def test_exact_duplicates_found_by_bytes():
    images, _ = cells(4)
    images = np.concatenate([images, images[[2, 0, 2]]])
    assert clean.first_identical(images).tolist() == [0, 1, 2, 3, 2, 0, 2]


def test_find_duplicates_groups_near_copies_only():
    images, _ = cells(20, seed=3)
    images = np.concatenate([images, jitter(images[4], 0)[None], images[9][None]])
    groups = clean.find_duplicates(phash_bits(images), clean.DEFAULT_THRESHOLD)
    assert [g.tolist() for g in groups] == [[4, 20], [9, 21]]


def test_find_outliers_ranks_the_odd_picture_first():
    images, _ = cells(60, seed=2)
    images = np.concatenate([images, gradient()[None]])
    odd = clean.find_outliers(clean.image_features(images), contamination=1 / 61)
    assert np.flatnonzero(odd.flags).tolist() == [60]
    assert odd.lof[60] > 2 * np.max(odd.lof[:60])
    assert odd.seed_rank[60] == 1  # the seed's distance from the mean agrees here
    assert not clean.find_outliers(clean.image_features(images), contamination=0).flags.any()


def test_repeated_noncell_needs_copies_and_spread_or_oddness():
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 1, 2, 3])
    groups = [np.arange(6), np.arange(6), np.arange(6, 12), np.arange(12, 15)]
    verdict = clean.find_repeated_noncells(groups, labels, np.array([False, True, False, False]))
    # one label, not odd: a duplicated cell; one label but odd; six labels; too few copies
    assert verdict.tolist() == [False, True, True, False]


def test_clean_arrays_finds_every_planted_row():
    images, labels = planted()
    # 2 of the 62 distinct pictures flagged: the gradient and the poster
    result = clean.clean_arrays(images, labels, contamination=2 / 62)
    by_row = {r["row"]: r for r in result.removed}
    for row, reason, twin in PLANTED.values():
        assert by_row[row]["reason"] == reason
        if reason.endswith("duplicate"):
            assert by_row[row]["duplicate_of"] == twin
    assert by_row[7]["reason"] == "label_conflict"  # the conflict's twin goes too
    assert all(by_row[r]["reason"] == "repeated_noncell" for r in NONCELL_ROWS)
    assert set(by_row) == {60, 61, 62, 63, 7, *NONCELL_ROWS}  # and no real cell
    assert result.keep.tolist() == [r for r in range(N_CELLS) if r != 7]
    counts = result.counts()
    assert counts == {"input": 70, "kept": 59, "removed": 11, "repeated_noncell": 6, "outlier": 1,
                      "label_conflict": 2, "exact_duplicate": 1, "near_duplicate": 1}


def test_near_duplicate_threshold_is_an_option():
    images, labels = planted()
    loose = clean.clean_arrays(images, labels, threshold=32, contamination=0)
    assert loose.counts()["kept"] < 20  # every blotchy cell within 32 bits of another
    with pytest.raises(CellfuseError, match="threshold"):
        clean.clean_arrays(images, labels, threshold=40)
    with pytest.raises(CellfuseError, match="contamination"):
        clean.clean_arrays(images, labels, contamination=0.7)


def test_a_clean_file_loses_no_picture_as_odd():
    """Oddness is decided by score: ordinary cells stay, however many there are (the fraction only caps)."""
    images, _ = cells(400, seed=7)
    odd = clean.find_outliers(clean.image_features(images), contamination=0.05)
    assert not odd.flags.any() and odd.lof.max() < clean.MIN_LOF
    images = np.concatenate([images, gradient()[None]])
    odd = clean.find_outliers(clean.image_features(images), contamination=0.05)
    assert np.flatnonzero(odd.flags).tolist() == [400]


def test_real_cells_are_not_removed_as_odd(shared):
    """On the cleaned real file every picture is a cell: none reaches the oddness threshold."""
    from toolkit.data import load_dataset

    data = load_dataset(shared / "data" / "train.npz")
    result = clean.clean_arrays(data.images[:1500], data.labels[:1500])
    outliers = [r for r in result.removed if r["reason"] == "outlier"]
    assert outliers, "the first 1,500 rows hold planted non-cell crops"
    assert all(r["lof"] >= clean.MIN_LOF and "LocalOutlierFactor" in r["why"] for r in outliers)
    kept = result.keep
    again = clean.clean_arrays(data.images[kept], data.labels[kept])
    assert again.counts()["outlier"] == 0


# ---------------------------------------------------------------- the command

def test_command_end_to_end(planted_npz, tmp_path):
    before = sha(planted_npz)
    out = tmp_path / "cleaned"
    result = CliRunner().invoke(main, ["clean", str(planted_npz), "--out", str(out), "--json",
                                       "--contamination", str(2 / 62)])
    assert result.exit_code == 0, result.output
    counts = json.loads(result.output.strip().splitlines()[-1])
    assert counts["input"] == 70 and counts["kept"] == 59 and counts["repeated_noncell"] == 6
    assert "label_conflict" in result.output  # the rich table
    assert sha(planted_npz) == before

    kept = load_dataset(out / "clean.npz")
    original = load_dataset(planted_npz)
    assert len(kept) == 59
    assert np.array_equal(kept.images, original.images[kept.index])
    assert np.array_equal(kept.labels, original.labels[kept.index])
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["outlier"] == 1
    assert {r["row"] for r in report["removed"]} == {7, 60, 61, 62, 63, *NONCELL_ROWS}
    assert report["conflict_groups"][0]["rows"] == [7, 62]
    assert report["noncell_groups"][0]["copies"] == 6
    for png in ("removed.png", "tsne.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_force_replaces_only_what_cellfuse_wrote(planted_npz, tmp_path):
    out = tmp_path / "cleaned"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    args = ["clean", str(planted_npz), "--out", str(out), "--no-tsne"]
    for flags in ([], ["--force"]):  # a folder cellfuse did not write is never emptied
        result = CliRunner().invoke(main, [*args, *flags])
        assert result.exit_code != 0 and "cleaned" in result.output
        assert (out / "keep.txt").read_text() == "earlier work"
    (out / "keep.txt").unlink()
    assert CliRunner().invoke(main, args).exit_code == 0
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "--force" in result.output  # its own output, but no --force
    assert CliRunner().invoke(main, [*args, "--force"]).exit_code == 0  # its own output: replaced
    for bad in (["--contamination", "0.6"], ["--threshold", "40"]):  # refused by the command line
        assert CliRunner().invoke(main, [*args, "--force", *bad]).exit_code == 2
    with pytest.raises(CellfuseError, match="--contamination must be"):  # and before anything is emptied
        clean.clean_file(planted_npz, out, contamination=0.6, tsne=False, force=True)
    assert (out / "clean.npz").exists() and (out / "report.json").exists()
    (out / "mine.npz").write_bytes(b"a file the user put there later")
    result = CliRunner().invoke(main, [*args, "--force"])
    assert result.exit_code != 0 and "mine.npz" in result.output and (out / "mine.npz").exists()
    assert (out / "clean.npz").exists() and not (out / "tsne.png").exists()


def test_command_refuses_an_output_dir_holding_its_input(planted_npz):
    before = sha(planted_npz)
    result = CliRunner().invoke(main, ["clean", str(planted_npz), "--out", str(planted_npz.parent),
                                       "--force"])
    assert result.exit_code == 2 and "contain the input" in result.output
    assert sha(planted_npz) == before


def _bad_files(tmp_path):
    images, labels = cells(4)
    files = {}

    def npz(name, **arrays):
        files[name] = tmp_path / f"{name}.npz"
        np.savez(files[name], **arrays)

    npz("missing_key", images=images)
    npz("wrong_shape", images=images[:, :48], labels=labels)
    npz("zero_to_one", images=images / 255.0, labels=labels)
    npz("label_range", images=images, labels=np.array([0, 1, 2, 9]))
    npz("object_array", images=np.array([images[0], "x"], dtype=object), labels=labels)
    npz("truncated", images=images, labels=labels)
    files["truncated"].write_bytes(files["truncated"].read_bytes()[:500])
    files["not_there"] = tmp_path / "not_there.npz"
    return files


@pytest.mark.parametrize("name", ["missing_key", "wrong_shape", "zero_to_one", "label_range",
                                  "object_array", "truncated", "not_there"])
def test_command_rejects_bad_input_in_one_line(tmp_path, name):
    path = _bad_files(tmp_path)[name]
    result = CliRunner().invoke(main, ["clean", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert str(path) in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing created for a bad input
