"""``llava-med launch``: its plan (ports, GPUs, pass-through flags) and, on real processes, startup, SIGTERM, and a
child that dies."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from launch_helpers import FREE_PORTS, pid_gone, start_launcher
from servers import _base_env, wait_until

import llava_med.serve.launch as launch_module
from llava_med.serve.launch import (
    LaunchConfig,
    LaunchError,
    build_parser,
    config_from_args,
    plan,
)


def config(*argv: str) -> LaunchConfig:
    return config_from_args(build_parser().parse_args(list(argv)))


# ------------------------------------------------------------------------------------------------------- the plan


def test_defaults_are_the_original_ports_and_the_tiny_model(tmp_path, monkeypatch):
    cfg = config("--log-dir", str(tmp_path))
    assert (cfg.controller_port, cfg.worker_port, cfg.web_port, cfg.openai_port) == (21001, 21002, 7860, 8000)
    assert cfg.model_paths == [None] and cfg.engine == "hf" and cfg.web and cfg.openai and cfg.host == "127.0.0.1"
    # The plan checks that each port is free; whatever runs on this machine, the default plan is checked.
    monkeypatch.setattr(launch_module, "_port_free", lambda host, port: True)
    specs = plan(cfg)
    assert [(s.role, s.port) for s in specs] == [("controller", 21001), ("worker", 21002), ("web", 7860),
                                                 ("openai", 8000)]
    api = specs[3]
    assert api.argv[api.argv.index("--controller-url") + 1] == "http://127.0.0.1:21001"
    worker = specs[1]
    assert "--model-path" not in worker.argv  # the worker's default: the embedded tiny checkpoint
    assert worker.argv[worker.argv.index("--controller-address") + 1] == "http://127.0.0.1:21001"
    web = specs[2]
    assert web.argv[web.argv.index("--controller-url") + 1] == "http://127.0.0.1:21001"
    assert web.argv[web.argv.index("--log-dir") + 1] == str(tmp_path / "web")


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_models_workers_gpus_and_loader_flags(tmp_path):
    cfg = config("--model-path", "/ckpt/a", "--model-path", "org/b", "--workers-per-model", "2", "--gpus", "0,1,2",
                 "--load-4bit", "--dtype", "bfloat16", "--device", "cuda", "--conv-mode", "llava_v1",
                 "--controller-port", "0", "--worker-port", "0", "--web-port", "0", "--no-web", "--no-openai",
                 "--worker-arg=--max-queue", "--worker-arg=8", "--log-dir", str(tmp_path))
    specs = plan(cfg)
    workers = [s for s in specs if s.role == "worker"]
    assert [s.role for s in specs] == ["controller", "worker", "worker", "worker", "worker"]  # --no-web
    assert [w.model_path for w in workers] == ["/ckpt/a", "/ckpt/a", "org/b", "org/b"]
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in workers] == ["0", "1", "2", "0"]
    ports = [s.port for s in specs]
    assert len(set(ports)) == len(ports) and all(p > 0 for p in ports)
    for w in workers:
        argv = " ".join(w.argv)
        assert f"--model-path {w.model_path}" in argv
        assert "--load-4bit" in w.argv and "--dtype bfloat16" in argv and "--device cuda" in argv
        assert "--conv-mode llava_v1" in argv and "--max-queue 8" in argv
        assert w.argv[w.argv.index("--worker-address") + 1] == w.url == f"http://127.0.0.1:{w.port}"


def test_num_gpus_gives_each_worker_that_many_devices(tmp_path):
    base = ("--model-path", "/ckpt/a", "--controller-port", "0", "--worker-port", "0", "--no-web",
            "--log-dir", str(tmp_path))
    cfg = config(*base, "--workers-per-model", "3", "--gpus", "0,1,2,3", "--num-gpus", "2")
    workers = [s for s in plan(cfg) if s.role == "worker"]
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in workers] == ["0,1", "2,3", "0,1"]  # cycling, as with one each
    assert all(w.argv[w.argv.index("--num-gpus") + 1] == "2" for w in workers)  # the worker spreads over both
    with pytest.raises(LaunchError, match="--num-gpus 3 needs 3 devices per worker but only 2 are available"):
        config(*base, "--gpus", "4,5", "--num-gpus", "3")


def test_without_gpus_the_devices_the_machine_shows_are_shared_out(tmp_path, monkeypatch):
    from llava_med.serve import launch

    assert launch.detect_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert launch.detect_gpus({"CUDA_VISIBLE_DEVICES": "GPU-1a2b, GPU-3c4d"}) == ["GPU-1a2b", "GPU-3c4d"]
    assert launch.detect_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert launch.detect_gpus({"CUDA_VISIBLE_DEVICES": "1,-1,2"}) == ["1"]  # CUDA stops at an invalid entry
    monkeypatch.setattr(launch.shutil, "which", lambda name: None)
    assert launch.detect_gpus({}) == [], "no CUDA_VISIBLE_DEVICES and no nvidia-smi: a CPU machine"

    monkeypatch.setattr(launch, "detect_gpus", lambda: ["0", "1"])
    base = ("--controller-port", "0", "--worker-port", "0", "--no-web", "--log-dir", str(tmp_path))
    workers = [s for s in plan(config(*base, "--workers-per-model", "2")) if s.role == "worker"]
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in workers] == ["0", "1"], "not every worker on cuda:0"
    for flags in (("--device", "cpu"), ("--engine", "fake")):
        workers = [s for s in plan(config(*base, *flags)) if s.role == "worker"]
        assert "CUDA_VISIBLE_DEVICES" not in workers[0].env


def test_every_worker_flag_is_passed_on_from_its_one_definition(tmp_path):
    from llava_med.model.args import add_model_args
    from llava_med.serve.model_worker import parse_args as worker_parse_args

    cfg = config("--engine", "fake", "--fake-token-delay", "0.5", "--max-batch-size", "4", "--num-gpus", "2",
                 "--vision-tower", "/clip", "--local-files-only", "--stream-min-interval", "0",
                 "--controller-port", "0", "--worker-port", "0", "--no-web", "--no-openai", "--log-dir", str(tmp_path))
    (worker,) = [s for s in plan(cfg) if s.role == "worker"]
    flags = worker.argv[worker.argv.index("llava_med.serve.model_worker") + 1:]
    args = worker_parse_args(flags)  # the worker understands every flag it is given
    assert (args.engine, args.fake_token_delay, args.max_batch_size, args.num_gpus, args.vision_tower,
            args.local_files_only, args.stream_min_interval) == ("fake", 0.5, 4, 2, "/clip", True, 0.0)
    assert "--dtype" not in flags and "--device" not in flags  # defaults are left to the worker
    # The launcher declares the loader's flags from the same definition as the worker.
    import argparse

    loader = argparse.ArgumentParser()
    add_model_args(loader, paths=False)
    launcher_options = set(build_parser()._option_string_actions)
    assert set(loader._option_string_actions) <= launcher_options


def test_consecutive_worker_ports_and_port_conflicts(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with pytest.raises(LaunchError, match=rf"port {taken} .*already in use.*--controller-port 0"):
            plan(config("--controller-port", str(taken), "--log-dir", str(tmp_path)))
    base = _free_run(3)
    specs = plan(config("--controller-port", "0", "--web-port", "0", "--openai-port", "0", "--worker-port", str(base),
                        "--workers-per-model", "3", "--log-dir", str(tmp_path)))
    assert [s.port for s in specs if s.role == "worker"] == [base, base + 1, base + 2]


def _free_run(n: int) -> int:
    """A port p with p .. p+n-1 all free."""
    for start in range(42000, 60000, 97):
        if all(_port_is_free(start + i) for i in range(n)):
            return start
    pytest.skip("no run of free ports")


def test_bad_options_are_refused(tmp_path, capsys):
    with pytest.raises(LaunchError, match="exclusive"):
        config("--load-4bit", "--load-8bit")
    with pytest.raises(LaunchError, match="workers-per-model"):
        config("--workers-per-model", "0")
    from llava_med.serve.launch import main

    with pytest.raises(SystemExit) as exc:
        main(["--load-4bit", "--load-8bit", "--log-dir", str(tmp_path)])
    assert exc.value.code == 2 and "exclusive" in capsys.readouterr().err


def test_subcommands_are_listed(capsys):
    from llava_med.__main__ import main

    assert main([]) == 0
    out = capsys.readouterr().out
    assert "launch" in out and "web" in out


# ------------------------------------------------------------------------------------------------- real processes

@pytest.mark.slow
def test_sigterm_stops_every_child(tmp_path):
    stack = start_launcher(tmp_path / "logs", "--engine", "fake", timeout=90)
    try:
        pids = stack.child_pids()
        assert len(pids) == 4 and all(not pid_gone(p) for p in pids)
        out = stack.output()
        api = stack.info["openai_url"]
        assert api.endswith("/v1") and f"base_url={api}" in out  # the summary prints the API's URL
        for url in (stack.controller_url, stack.web_url, api.removesuffix("/v1"), *stack.worker_urls):
            assert url in out  # the summary prints every URL
            assert requests.get(url + "/health", timeout=5).status_code == 200
        models = requests.get(api + "/models", timeout=5).json()
        assert [m["id"] for m in models["data"]] == ["llava-med-fake"]
        assert stack.models() == ["llava-med-fake"]
        assert stack.terminate(timeout=40) == 0
        wait_until(lambda: all(pid_gone(p) for p in pids), 10, message="every child gone")
        for child in stack.info["children"]:
            assert Path(child["log"]).exists()
    finally:
        stack.kill_everything()


@pytest.mark.slow
def test_a_dead_child_is_reported_with_its_log_and_the_rest_stopped(tmp_path):
    stack = start_launcher(tmp_path / "logs", "--engine", "fake", "--no-web", timeout=60)
    try:
        pids = stack.child_pids()
        worker_pid = stack.pid_of("worker")
        os.kill(worker_pid, signal.SIGKILL)
        code = stack.proc.wait(timeout=30)
        assert code == 1
        err = stack.output()
        assert f"worker-0 (pid {worker_pid}) exited unexpectedly with code -9" in err
        assert "fake engine ready" in err  # a line from the tail of the worker's log
        wait_until(lambda: all(pid_gone(p) for p in pids), 10, message="the other children stopped")
    finally:
        stack.kill_everything()


@pytest.mark.slow
def test_a_worker_that_cannot_start_is_reported(tmp_path):
    """A worker that fails while loading: the launcher exits 1, names it, shows its log, leaves nothing behind."""
    log_dir = tmp_path / "logs"
    missing = tmp_path / "no-such-checkpoint"
    proc = subprocess.run(
        [sys.executable, "-m", "llava_med.serve.launch", "--log-dir", str(log_dir), *FREE_PORTS, "--no-web",
         "--model-path", str(missing), "--local-files-only", "--startup-timeout", "120"],
        capture_output=True, text=True, timeout=150, env=_base_env(None), check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert "worker-0" in proc.stderr and "exited while starting" in proc.stderr
    assert str(missing) in proc.stderr  # the worker's own error message, from its log tail
    assert not (log_dir / "stack.json").exists()
    pids = [int(pid) for pid in re.findall(r"started [\w-]+ \(pid (\d+)\)", proc.stderr)]
    assert len(pids) == 3  # controller, worker and the OpenAI API (started with the worker)
    wait_until(lambda: all(pid_gone(p) for p in pids), 10, message="the controller stopped too")


@pytest.mark.slow
def test_a_stack_with_a_shared_secret(tmp_path):
    """LLAVA_MED_AUTH_TOKEN reaches every child: workers register with it, the launcher and the web UI work with
    it, and the registry refuses changes without it."""
    stack = start_launcher(tmp_path / "logs", "--engine", "fake", "--no-openai", timeout=90,
                           env={"LLAVA_MED_AUTH_TOKEN": "lab-secret"})
    try:
        assert stack.models() == ["llava-med-fake"]
        url = stack.controller_url + "/refresh_all_workers"
        assert requests.post(url, timeout=5).status_code == 401
        assert requests.post(url, headers={"Authorization": "Bearer lab-secret"}, timeout=5).status_code == 200
        from gradio_client import Client

        web = Client(stack.web_url, verbose=False, download_files=False)
        model_choice, banner_text = web.predict(None, api_name="/refresh_models")
        assert model_choice["choices"][0][0] == "llava-med-fake", (model_choice, banner_text)
        assert stack.terminate() == 0
    finally:
        stack.kill_everything()
