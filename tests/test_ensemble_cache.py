"""The one key of cached predictions (ensemble's predictions.npz, distill's teacher outputs): a file's
contents, so a retrained member or an edited data file is predicted afresh and nothing else is."""

import os
import shutil

from toolkit.ensemble import _cache_key, content_key


def test_cached_predictions_follow_the_files_contents_not_their_path_or_time(tmp_path):
    member, data = tmp_path / "run" / "best.keras", tmp_path / "val.npz"
    member.parent.mkdir()
    member.write_bytes(b"weights after epoch 1")
    data.write_bytes(b"validation images")
    key = _cache_key(member, str(data), "id")
    assert len(key) == 20 and _cache_key(member, str(data), "flip") != key

    os.utime(member, ns=(10**18, 10**18))  # touched, same contents
    moved = tmp_path / "copied" / "best.keras"
    moved.parent.mkdir()
    shutil.copy(member, moved)
    assert _cache_key(member, str(data), "id") == _cache_key(moved, str(data), "id") == key

    member.write_bytes(b"weights after epoch 2")  # retrained: same size
    os.utime(member, ns=(2 * 10**18, 2 * 10**18))
    assert _cache_key(member, str(data), "id") != key
    assert _cache_key(moved, str(data.rename(tmp_path / "renamed.npz")), "id") == key


def test_the_content_key_is_the_files_sha1(tmp_path):
    import hashlib

    file = tmp_path / "ensemble.keras"
    file.write_bytes(b"an ensemble")
    assert content_key(file) == hashlib.sha1(b"an ensemble").hexdigest()  # distill's bank_<first 16> folders
    file.write_bytes(b"another, longer ensemble")
    assert content_key(file) == hashlib.sha1(b"another, longer ensemble").hexdigest()


def test_a_folder_of_class_sub_folders_is_keyed_by_its_files_names_and_contents(tmp_path):
    folder = tmp_path / "val"
    for name, pixels in (("basophil/0.png", b"a cell"), ("platelet/1.png", b"another cell")):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(pixels)
    key = content_key(folder)
    copy = shutil.copytree(folder, tmp_path / "copied")
    assert content_key(copy) == key and content_key(folder) != content_key(folder / "basophil")
    (copy / "platelet" / "1.png").rename(copy / "basophil" / "1.png")  # relabelled: same bytes, other class
    assert content_key(copy) != key
    (folder / "platelet" / "1.png").write_bytes(b"an edited cell")
    assert content_key(folder) != key
