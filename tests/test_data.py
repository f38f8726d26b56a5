"""The one data loader: every bad input is one clear error naming the file and the problem."""

import io
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_images

from toolkit.data import (
    CLASS_NAMES,
    check_dataset,
    check_npz,
    load_dataset,
    save_dataset,
    stratified_split,
)
from toolkit.errors import CellfuseError


def npz(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


GOOD = make_images(16)


@pytest.mark.parametrize("arrays, message", [
    ({"images": GOOD[0]}, r"missing key\(s\) \['labels'\]"),
    ({"images": GOOD[0][0], "labels": GOOD[1]}, r"expected rank 4"),
    ({"images": GOOD[0].transpose(0, 3, 1, 2), "labels": GOOD[1]}, r"looks channels-first"),
    ({"images": GOOD[0][:, :64], "labels": GOOD[1]}, r"expected \(N,96,96,3\)"),
    ({"images": GOOD[0] / 255.0, "labels": GOOD[1]}, r"looks like a 0..1 scale"),
    ({"images": GOOD[0].astype(float) * 2, "labels": GOOD[1]}, r"expected 0..255"),
    ({"images": np.full(GOOD[0].shape, np.nan), "labels": GOOD[1]}, r"NaN or infinite"),
    ({"images": GOOD[0].astype(np.complex64), "labels": GOOD[1]}, r"dtype complex64"),
    ({"images": GOOD[0], "labels": GOOD[1] + 8}, r"label \d+ at row \d+ is out of range 0..7"),
    ({"images": GOOD[0], "labels": -GOOD[1] - 1}, r"out of range"),
    ({"images": GOOD[0], "labels": GOOD[1][:5]}, r"5 labels for 16 images"),
    ({"images": GOOD[0], "labels": GOOD[1] + 0.5}, r"non-integer"),
    ({"images": GOOD[0], "labels": GOOD[1].reshape(4, 4)}, r"expected \(N,\) or \(N,1\)"),
    ({"images": GOOD[0], "labels": np.array(["a"] * 16)}, r"expected integers"),
])
def test_bad_arrays(tmp_path, arrays, message):
    path = npz(tmp_path, **arrays)
    with pytest.raises(CellfuseError, match=message) as e:
        load_dataset(path)
    assert str(path) in str(e.value)


def test_object_array_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, images=np.array([GOOD[0][0], None], dtype=object), labels=np.zeros(2))
    with pytest.raises(CellfuseError, match="object arrays"):
        load_dataset(path)


def test_truncated_and_garbage_files(tmp_path):
    good = save_dataset(tmp_path / "good.npz", *GOOD)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:500])
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip at all")
    for path in (truncated, garbage):
        with pytest.raises(CellfuseError, match="not a readable .npz"):
            load_dataset(path)
    with pytest.raises(CellfuseError, match="does not exist"):
        load_dataset(tmp_path / "missing.npz")


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array)
    return buf.getvalue()


def npz_of_members(path, images_npy: bytes, compression=zipfile.ZIP_STORED):
    """An npz whose images.npy is exactly the bytes given (and good labels for 4 rows)."""
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("images.npy", images_npy)
        archive.writestr("labels.npy", npy_bytes(GOOD[1][:4]))
    return path


def header_claiming(shape) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buf.getvalue()


def zip_size_claiming(path, file_size: int):
    """Rewrite the central directory's uncompressed size of the first member (images.npy)."""
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02")
    data[entry + 24:entry + 28] = file_size.to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("check", [load_dataset, check_npz])
def test_a_header_claiming_515_gib_is_refused_before_allocating(tmp_path, check):
    path = npz_of_members(tmp_path / "huge.npz", header_claiming((20_000_000, 96, 96, 3)) + bytes(100))
    with pytest.raises(CellfuseError, match=r"huge.npz: member images.npy claims 552960000000 bytes "
                                            r"\(a uint8 array of shape \(20000000, 96, 96, 3\)\) but holds 100;"):
        check(path)


@pytest.mark.parametrize("check", [load_dataset, check_npz])
def test_a_zip_claiming_more_than_its_bytes_can_hold_is_refused(tmp_path, check):
    n = 155_000  # header and zip entry agree on 4.3 GB, from a few hundred bytes in the file
    path = npz_of_members(tmp_path / "bomb.npz", header_claiming((n, 96, 96, 3)) + bytes(100))
    zip_size_claiming(path, len(header_claiming((n, 96, 96, 3))) + n * 96 * 96 * 3)
    with pytest.raises(CellfuseError, match=r"bomb.npz: member images.npy claims 4285440128 bytes from "
                                            r"\d+ in the file, more than its compression can hold"):
        check(path)


@pytest.mark.parametrize("check", [load_dataset, check_npz])
def test_a_truncated_member_says_truncated_not_object_arrays(tmp_path, check):
    path = npz_of_members(tmp_path / "short.npz", npy_bytes(GOOD[0][:4])[:1000], zipfile.ZIP_DEFLATED)
    with pytest.raises(CellfuseError, match=r"short.npz: member images.npy claims 110592 bytes .* but "
                                            r"holds 872; the file is truncated or corrupt") as e:
        check(path)
    assert "object" not in str(e.value)


@pytest.mark.parametrize("check", [load_dataset, check_npz])
def test_damaged_zips_and_headers_are_one_line(tmp_path, check):
    good = save_dataset(tmp_path / "good.npz", *GOOD).read_bytes()
    (tmp_path / "cut.npz").write_bytes(good[:len(good) // 2])
    npz_of_members(tmp_path / "noheader.npz", b"\x93NUMPY garbage")
    for name, message in [("cut.npz", "not a readable .npz file \\(corrupt or truncated"),
                          ("noheader.npz", "member images.npy is not a readable .npy array")]:
        with pytest.raises(CellfuseError, match=f"{name}: {message}") as e:
            check(tmp_path / name)
        assert "\n" not in str(e.value)


def test_damaged_pixels_are_one_line(tmp_path):
    good = bytearray(save_dataset(tmp_path / "good.npz", *GOOD).read_bytes())
    good[len(good) // 3:len(good) // 3 + 64] = bytes(64)  # inside the deflated pixels: only a full read sees it
    (tmp_path / "flipped.npz").write_bytes(bytes(good))
    with pytest.raises(CellfuseError, match=r"flipped.npz: not a readable .npz file \(corrupt or truncated"):
        load_dataset(tmp_path / "flipped.npz")


def test_check_npz_reads_headers_and_labels_only(tmp_path):
    good = save_dataset(tmp_path / "good.npz", *GOOD, index=np.arange(16) * 2)
    assert check_npz(good) == 16 and check_dataset(good) == 16
    with pytest.raises(CellfuseError, match="label 7 at row .* out of range 0..4"):
        check_npz(good, n_classes=5)
    with pytest.raises(CellfuseError, match=r"expected \(N,64,64,3\)"):
        check_npz(good, image_shape=(64, 64, 3))
    bad_index = save_dataset(tmp_path / "bad_index.npz", *GOOD, index=np.arange(15))
    with pytest.raises(CellfuseError, match="'index' must be \\(N,\\) integers"):
        check_npz(bad_index)
    negative = save_dataset(tmp_path / "negative.npz", *GOOD, index=-np.arange(16) - 1)
    with pytest.raises(CellfuseError, match="negative.npz: 'index' holds negative row numbers"):
        load_dataset(negative)  # was read as 16 leaked training rows by ensemble's split check
    with pytest.raises(CellfuseError, match="missing key"):
        check_npz(npz(tmp_path, "nolabels.npz", images=GOOD[0]))
    with pytest.raises(CellfuseError, match="does not exist"):
        check_npz(tmp_path / "none.npz")


def test_check_npz_does_not_import_tensorflow(tmp_path):
    good = save_dataset(tmp_path / "good.npz", *GOOD)
    bad = npz(tmp_path, "bad.npz", images=GOOD[0][:, :64], labels=GOOD[1])
    script = ("import sys; from toolkit.data import check_npz; from toolkit.errors import CellfuseError\n"
              f"print(check_npz({str(good)!r}))\n"
              f"try: check_npz({str(bad)!r})\nexcept CellfuseError as e: print('refused')\n"
              "print(sorted(m for m in ('tensorflow', 'keras', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["16", "refused", "[]"]


def test_challenge_format_round_trip(tmp_path):
    images, labels = GOOD
    path = save_dataset(tmp_path / "x.npz", images, labels)
    with np.load(path) as f:
        assert f["labels"].shape == (16, 1) and f["images"].dtype == np.uint8
    data = load_dataset(path)
    np.testing.assert_array_equal(data.images, images)
    np.testing.assert_array_equal(data.labels, labels)
    np.testing.assert_array_equal(data.index, np.arange(16))
    sub = data.subset(np.array([3, 5]))
    np.testing.assert_array_equal(sub.index, [3, 5])


def test_float_pixels_in_range_are_accepted(tmp_path):
    data = load_dataset(npz(tmp_path, images=GOOD[0].astype(np.float32), labels=GOOD[1].astype(float)))
    assert data.images.dtype == np.uint8 and data.labels.dtype == np.int64


def test_class_folder(tmp_path):
    from PIL import Image

    for c, name in enumerate(["Basophil", "ig"]):
        (tmp_path / "root" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(GOOD[0][c * 3 + i]).save(tmp_path / "root" / name / f"{i}.png")
    Image.fromarray(GOOD[0][0][:50, :50]).save(tmp_path / "root" / "ig" / "small.png")  # resized
    (tmp_path / "root" / "ig" / "broken.png").write_bytes(b"nope")
    with pytest.raises(CellfuseError, match="broken.png: unreadable image"):
        load_dataset(tmp_path / "root")
    (tmp_path / "root" / "ig" / "broken.png").unlink()
    data = load_dataset(tmp_path / "root")
    assert check_dataset(tmp_path / "root") == 7
    assert data.class_names == CLASS_NAMES
    assert data.images.shape == (7, 96, 96, 3) and list(data.labels) == [0, 0, 0, 3, 3, 3, 3]


def test_class_folders_are_labelled_by_name_not_by_their_place_in_a_listing(tmp_path):
    from PIL import Image

    for name in ["lymphocyte", "Platelets"]:  # six classes absent: labels must still be 4 and 7
        (tmp_path / "root" / name).mkdir(parents=True)
        Image.fromarray(GOOD[0][0]).save(tmp_path / "root" / name / "0.png")
    (tmp_path / "root" / ".ipynb_checkpoints").mkdir()  # what notebooks and macOS leave beside data: skipped
    (tmp_path / "root" / "lymphocyte" / "._0.png").write_bytes(b"AppleDouble")
    assert list(load_dataset(tmp_path / "root").labels) == [4, 7]
    (tmp_path / "root" / "zzz").mkdir()
    with pytest.raises(CellfuseError, match="sub-folder\\(s\\) 'zzz' name no class"):
        check_dataset(tmp_path / "root")
    (tmp_path / "root" / "zzz").rmdir()
    (tmp_path / "root" / "platelet").mkdir()
    with pytest.raises(CellfuseError, match="more than one sub-folder stands for platelet"):
        check_dataset(tmp_path / "root")


def test_an_image_pillow_refuses_is_named_in_one_line(tmp_path, monkeypatch):
    from PIL import Image

    (tmp_path / "root" / "monocyte").mkdir(parents=True)
    Image.fromarray(GOOD[0][0]).save(tmp_path / "root" / "monocyte" / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 96 x 96 is then a "decompression bomb"
    with pytest.raises(CellfuseError, match="big.png: unreadable image \\(DecompressionBombError"):
        load_dataset(tmp_path / "root")


def test_a_folder_image_is_read_as_predict_reads_it(tmp_path):
    from PIL import Image

    from toolkit.data import to_model_input

    wide = np.zeros((96, 192, 3), np.uint8)
    wide[:, 48:144] = 200  # the centre square: a crop keeps only it, a squashing resize would not
    (tmp_path / "root" / "monocyte").mkdir(parents=True)
    Image.fromarray(wide).save(tmp_path / "root" / "monocyte" / "wide.png")
    images = load_dataset(tmp_path / "root").images
    np.testing.assert_array_equal(images[0], to_model_input(tmp_path / "root" / "monocyte" / "wide.png"))
    assert images[0].min() == 200


def test_stratified_split_is_reproducible_and_balanced():
    labels = np.repeat(np.arange(8), 20)
    a_train, a_val = stratified_split(labels, 0.25, seed=1)
    b_train, b_val = stratified_split(labels, 0.25, seed=1)
    np.testing.assert_array_equal(a_val, b_val)
    assert not set(a_train) & set(a_val) and len(a_val) == 40
    assert np.all(np.bincount(labels[a_val]) == 5)


def test_cli_reports_bad_input_in_one_line(tmp_path):
    from toolkit.cli import main

    path = npz(tmp_path, images=GOOD[0])
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "none.keras"), str(path)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_too_small_a_validation_split_is_one_clear_line():
    from toolkit.data import stratified_split

    labels = np.arange(40) % 8
    with pytest.raises(CellfuseError, match="leaves 6 of 40 rows for 8 classes; use at least 0.20"):
        stratified_split(labels, 0.15, 0)
    train, val = stratified_split(labels, 0.2, 0)
    assert len(val) == 8 and set(labels[val]) == set(range(8))
