"""`--ray` (cluster.py) on a local Ray cluster of 2 CPUs, one for the module, with the tiny stack:
clips shared among workers, a worker killed mid-clip (Ray restarts it and retries the clip; the
output is written once, whole, nothing partial left), and a driver killed mid-run, then run again
(the finished outputs are skipped, the interrupted one redone, nothing partial left), and a driver
stopped by Ctrl-C (it dies of the signal, its workers' partial files removed). The kills
are placed by the STYLIZE_TEST_PAUSE_ONCE hook (signals.py): the first worker to hand a batch to
the encoder writes its pid into a marker file and waits there; every later arrival goes on.
Without the `cluster` extra the module's Ray tests skip; `--ray` then exits 2 with one line."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from typer.testing import CliRunner

from stylize import video
from stylize.cli import run_app
from stylize.cluster import INSTALL
from stylize.signals import PAUSE_ONCE
from tests.conftest import REPO, write_clip

FAST = ["--style", "oil", "--model", "tiny", "--size", "64", "--preset", "ultrafast", "--batch-size", "4"]
WAIT_S = 60  # the longest any step waits for a worker (a hang fails the test rather than the run)


def invoke(*args):
    return CliRunner().invoke(run_app, [str(a) for a in args], catch_exceptions=False)


def _partials(folder):
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name)


def _wait_for(what, check):
    give_up = time.monotonic() + WAIT_S
    while not (found := check()):
        assert time.monotonic() < give_up, f"waited {WAIT_S} s for {what}"
        time.sleep(0.05)
    return found


def _clips(folder, frames):
    folder.mkdir()
    return [write_clip(folder / name, frames=n) for name, n in frames.items()]


@pytest.fixture(scope="module")
def cluster(tiny_dir):
    """A local Ray cluster of 2 CPUs; its workers import this checkout (PYTHONPATH), and the tiny
    stack is built before any of them loads it. Yields its address, for a driver in another process."""
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        context = ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        yield context.address_info["gcs_address"]
        ray.shutdown()


def test_without_ray_installed_ray_is_one_line_exit_2(clip, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    r = invoke(clip, *FAST, "--ray", "auto")
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [f"error: --ray needs Ray, which is not installed: {INSTALL}"]
    assert INSTALL == 'pip install "stylize[cluster]"'
    assert not clip.with_name("clip_oil.mp4").exists()


def test_bad_ray_options_are_one_line_exit_2(clip):
    pytest.importorskip("ray")
    for args, says in [(["--ray-workers", "2"], "--ray-workers goes with --ray"),
                       (["--ray", "auto", "--ray-workers", "0"], "at least 1"),
                       (["--ray", "127.0.0.1:1"], "cannot reach the Ray cluster"),
                       (["--ray", "nowhere"], "give HOST:PORT"),
                       (["--ray", "auto", "--gpus", "2"], "give one of them")]:  # fmt: skip
        r = invoke(clip, *FAST, *args)
        assert r.exit_code == 2, (args, r.output)
        assert len(r.stderr.strip().splitlines()) == 1 and says in r.stderr, (args, r.stderr)


def test_clips_are_shared_among_workers(cluster, tmp_path):
    from PIL import Image

    clips = _clips(tmp_path / "clips", {"a.mp4": 4, "b.mp4": 6, "c.mp4": 8, "d.mp4": 5})
    (tmp_path / "clips" / "e.mp4").write_bytes(b"not a video")  # fails alone, one line
    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (200, 120, 40)).save(photo)
    out = tmp_path / "out"
    r = invoke(tmp_path / "clips", photo, *FAST, "-o", out, "--ray", "auto", "--ray-workers", "2", "--json")
    assert r.exit_code == 1, r.output
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert sorted(rec["src"] for rec in records) == sorted(str(c) for c in [*clips, photo])
    for rec in records:  # the one-GPU path's record, plus where it ran
        assert rec["status"] == "ok" and rec["worker"] in (0, 1) and rec["node"]
        assert {"frames", "fps", "model_load_s", "process_s_at_end"} <= rec.keys()
        if rec["kind"] == "clip":
            assert video.probe(rec["dst"]).frames == rec["frames"] == video.probe(rec["src"]).frames
    assert [rec["kind"] for rec in records].count("still") == 1 and Image.open(out / "photo_oil.png").size == (40, 30)
    assert sorted(p.name for p in out.iterdir()) == [*(f"{c.stem}_oil.mp4" for c in clips), "photo_oil.png"]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "e.mp4" in errors[0] and "5 of 6 inputs done, 1 failed" in r.stderr
    (tmp_path / "clips" / "e.mp4").unlink()
    r = invoke(tmp_path / "clips", photo, *FAST, "-o", out, "--ray", "auto")  # planned by the driver, as ever
    assert r.exit_code == 0 and "nothing to do: all 5 outputs exist" in r.stderr and r.stdout == ""


def test_a_worker_killed_mid_clip_is_restarted_and_the_clip_retried(cluster, tmp_path, monkeypatch):
    import ray

    from stylize import cluster as ray_cluster
    from stylize.config import run_options
    from stylize.jobs import plan_jobs

    folder = tmp_path / "clips"
    _clips(folder, {"a.mp4": 12})
    marker = tmp_path / "held"
    monkeypatch.setenv(PAUSE_ONCE, f"encode:{marker}")  # the driver hands STYLIZE_TEST_* to its workers
    opts = run_options(style="oil", prompt=None, model="tiny", size=64, batch_size=4, preset="ultrafast")
    jobs = plan_jobs([folder], opts.tag)
    finished = []
    run = threading.Thread(
        target=lambda: finished.extend(ray_cluster.run_on_cluster(ray, jobs, opts, ray_cluster.Placement("cpu", 1)))
    )
    run.start()
    pid = int(_wait_for("the worker to reach the encoder", lambda: marker.exists() and marker.read_text()))
    _wait_for("its partial file", lambda: [p for p in _partials(folder) if f"-{pid}-" in p])
    os.kill(pid, signal.SIGKILL)  # mid-clip, a few frames written
    run.join(WAIT_S)
    assert not run.is_alive() and not _alive(pid)
    assert [(f.job.src.name, f.error) for f in finished] == [("a.mp4", None)]  # done by the restarted worker
    assert finished[0].stats.frames == video.probe(folder / "a_oil.mp4").frames == 12
    assert sorted(p.name for p in folder.iterdir()) == ["a.mp4", "a_oil.mp4"]  # the killed one's partial removed


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_run_resumed_after_its_driver_was_killed(cluster, tmp_path):
    """The CLI end to end: a driver in its own process, connected to the cluster by its address. One
    worker takes a.mp4 then b.mp4; only b has audio, so the hook holds it at the remux, a finished."""
    folder = tmp_path / "clips"
    folder.mkdir()
    write_clip(folder / "a.mp4", frames=8)
    write_clip(folder / "b.mp4", frames=8, audio=True)
    marker = tmp_path / "held"
    env = {**os.environ, PAUSE_ONCE: f"remux:{marker}", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "stylize", str(folder), *FAST, "--ray", cluster, "--ray-workers", "1"]
    driver = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = int(_wait_for("the worker to reach b's remux", lambda: marker.exists() and marker.read_text()))
        held = _partials(folder)
        assert (folder / "a_oil.mp4").is_file() and len(held) == 1 and held[0].startswith(".b_oil.partial-")
    finally:
        # the driver killed outright, and its worker (Ray kills a dead driver's workers outright too;
        # killed here, it is gone before the next run starts)
        with contextlib.suppress(ProcessLookupError, NameError):
            os.kill(pid, signal.SIGKILL)
        driver.kill()
        driver.communicate()
    finished = _sha(folder / "a_oil.mp4")
    _wait_for("the held worker to end", lambda: not _alive(pid))
    assert not (folder / "b_oil.mp4").exists() and _partials(folder) == held  # what a killed run leaves

    again = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=WAIT_S * 2)
    assert again.returncode == 0, again.stderr
    assert "a_oil.mp4 exists" in again.stderr and "1 of 1 clip done; 1 skipped" in again.stderr
    assert again.stdout.count(" -> ") == 1 and "b_oil.mp4: 8 frames" in again.stdout and "(worker 0 on " in again.stdout
    assert _sha(folder / "a_oil.mp4") == finished  # the finished output untouched
    assert video.probe(folder / "b_oil.mp4").frames == 8 and video.probe(folder / "b_oil.mp4").audio
    assert _partials(folder) == []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ctrl_c_stops_the_driver_and_its_workers_delete_their_partial_files(cluster, tmp_path):
    folder = tmp_path / "clips"
    _clips(folder, {"a.mp4": 12})
    marker = tmp_path / "held"
    env = {**os.environ, PAUSE_ONCE: f"encode:{marker}", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "stylize", str(folder), *FAST, "--ray", cluster]
    driver = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = int(_wait_for("the worker to reach the encoder", lambda: marker.exists() and marker.read_text()))
        _wait_for("its partial file", lambda: _partials(folder))
        driver.send_signal(signal.SIGINT)
        _, stderr = driver.communicate(timeout=WAIT_S)
    finally:
        driver.kill()
    assert driver.returncode == -signal.SIGINT and stderr.strip().splitlines()[-1] == "interrupted"
    _wait_for("the worker to end with its driver", lambda: not _alive(pid))
    assert sorted(p.name for p in folder.iterdir()) == ["a.mp4"]  # its partial file deleted by the worker


def test_device_cuda_on_a_cluster_without_gpus_is_one_line_exit_2(cluster, clip):
    r = invoke(clip, *FAST, "--ray", "auto", "--device", "cuda")
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
        "error: --device cuda: the Ray cluster has no GPUs; use --device cpu"]  # fmt: skip
    assert not clip.with_name("clip_oil.mp4").exists()
