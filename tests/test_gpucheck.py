"""`make gpu-check`: one line and exit 1 without a GPU; the whole script on the CPU with --dry-run."""

import json

import pytest


def test_without_a_gpu_it_says_so_in_one_line(capsys):
    import tensorflow as tf

    from toolkit.gpucheck import main

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    assert main([]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no GPU" in out[0]


def test_dry_run_runs_every_check(tmp_path, capsys):
    from toolkit.gpucheck import main

    code = main(["--dry-run", "--out", str(tmp_path)])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {r["check"]: r for r in result["rows"]}
    assert code == 0, rows
    assert result["dry_run"] and "tensorflow" in result["environment"]
    speed = [r for name, r in rows.items() if name.startswith("tiny-cnn") and not name.endswith("member")]
    # both settings off, then both on: each branch of mixed precision and of XLA runs once
    assert [r["check"] for r in speed] == ["tiny-cnn fp32", "tiny-cnn mixed xla"]
    for r in speed:
        assert r["status"] == "ok" and r["toolkit_img_per_s"] > 0 and r["bare_img_per_s"] > 0
    assert rows["tiny-cnn member"]["status"] == "ok"  # the member row's code path; on a GPU, Lite0
    assert rows["distill step"]["status"] == "ok"


def test_the_gpu_run_times_every_setting():
    """The dry run times two of the four settings; the real run must still time all four."""
    from toolkit.gpucheck import DRY_SIZES, GPU_SIZES

    assert GPU_SIZES.member == "efficientnet-lite0"  # the pipeline's member
    assert sorted(GPU_SIZES.settings) == [(False, False), (False, True), (True, False), (True, True)]
    assert {m for m, _ in DRY_SIZES.settings} == {x for _, x in DRY_SIZES.settings} == {False, True}
