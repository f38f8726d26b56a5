"""Two `cellfuse train` worker processes on 127.0.0.1 under one TF_CONFIG: MultiWorkerMirroredStrategy."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
TINY = ROOT / "recipes" / "tiny.toml"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_workers(tiny_npz, cwd: Path, ports: list[int], *extra: str) -> list[subprocess.Popen]:
    cmd = [sys.executable, "-m", "toolkit", "train", str(TINY), "--set", f"data.train=\"{tiny_npz}\"",
           "--json", *extra]
    workers = [f"127.0.0.1:{p}" for p in ports]
    procs = []
    for index in range(len(ports)):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "",
               "TF_CONFIG": json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}),
               "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def traceback_lines(err: str) -> str:
    return "\n".join(line for line in err.splitlines() if line.lstrip().startswith(("File", "Error", "error"))
                     or "Error:" in line)[-4000:]


def finish(procs, timeout=240) -> list[tuple[int, str, str]]:
    outcomes = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            outcomes.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return outcomes


def test_two_workers_train_one_run_and_resume_it_after_a_kill(tiny_npz, tmp_path):
    """Killed in stage 2, resumed without repeating stage 1's epoch. With the weight average on: each
    worker re-estimates BatchNorm statistics on its own augmented batches, and must still end on the
    same weights as the other. (One test: each start of two TensorFlow processes costs 20 s here.)"""
    extra = ("--set", "train.ema=true", "--set", "train.steps_per_epoch=6", "--set", "train.checkpoint_every=2",
             "--set", "train.stages=[{epochs=1, lr=1e-3, unfreeze=1.0}, {epochs=2, lr=1e-3, unfreeze=1.0}]")
    ports = free_ports(2)
    procs = start_workers(tiny_npz, tmp_path, ports, *extra)
    run = tmp_path / "outputs" / "runs" / "tiny"
    meta = run / "checkpoint" / "stage1" / "training_metadata.json"
    deadline = time.time() + 180
    while not meta.exists() and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.2)
    assert meta.exists(), "the chief never reached stage 2's first backup"
    procs[1].send_signal(signal.SIGKILL)  # a worker dies; the chief cannot go on without it
    procs[0].send_signal(signal.SIGKILL)
    for proc in procs:
        proc.communicate()
    assert not (run / "summary.json").exists()
    outcomes = finish(start_workers(tiny_npz, tmp_path, free_ports(2), *extra, "--resume"))
    for code, _, _ in outcomes:
        assert code == 0, "\n\n".join(traceback_lines(e) for _, _, e in outcomes)
    epochs = [int(line.split(",")[0]) for line in (run / "history.csv").read_text().splitlines()[1:]]
    assert epochs == [1, 2, 3]
    resumed = outcomes[0][1]
    assert "stage 1/2" not in resumed and "epoch   1 " not in resumed  # stage 1's epoch was not trained again
    chief, worker = (json.loads(out.strip().splitlines()[-1])[0] for _, out, _ in outcomes)
    assert chief["final_weights_sha1"] == worker["final_weights_sha1"]  # the workers stayed in sync
    assert worker["role"] == "worker" and (run / "best.keras").exists()
    env = json.loads((run / "env.json").read_text())["distribution"]
    assert env["strategy"] == "MultiWorkerMirroredStrategy" and env["workers"] == 2 and env["role"] == "chief"
    assert env["replicas"] == 2
    assert not (tmp_path / "outputs" / "runs" / ".workertemp" / "worker1" / "tiny").exists()
