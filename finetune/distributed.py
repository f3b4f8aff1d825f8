"""Process set-up for torchrun's workers: one distributed training on a CPU machine (not N independent ones), and
workers that end with their launcher."""

from __future__ import annotations

import json
import os
import shutil
import sys

import torch


def stop_with_launcher(poll_seconds: float = 1.0) -> None:
    """Under torchrun, end this worker (SIGTERM) as soon as the launcher that started it dies.

    torchrun starts each worker in a session of its own, so when torchrun itself is killed outright (kill -9,
    the OOM killer) nothing reaches the workers: they trained on with parent 1 and kept writing into the output
    directory. On Linux the kernel sends the signal when the parent dies (prctl PR_SET_PDEATHSIG; torchrun
    starts its workers from its main thread, which lives as long as it does); where that is missing, a daemon
    thread polls the parent pid every POLL_SECONDS. SIGTERM's default action ends the process at once, even in
    the middle of a step or inside a gloo collective, where a Python-level handler would not run; a handler the
    run itself installs (transformers' --enable_jit_checkpoint) runs as it would for any SIGTERM.

    Only for workers of torchrun's elastic agent (TORCHELASTIC_RUN_ID in the environment: the agent sets it in
    each worker, and starts each as its own child process): a plain `python finetune.py`, perhaps under nohup, must outlive the shell that
    started it. A launcher that died before this call, while the modules were being imported, is not noticed.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import signal

    launcher = os.getppid()
    if signal_on_parent_death(signal.SIGTERM):
        if os.getppid() != launcher:  # it died before the kernel was asked: no signal will come
            os.kill(os.getpid(), signal.SIGTERM)
        return
    import threading

    threading.Thread(
        target=_stop_when_orphaned, args=(launcher, poll_seconds), name="stop-with-launcher", daemon=True
    ).start()


def signal_on_parent_death(signum: int) -> bool:
    """Asks the Linux kernel to send SIGNUM to this process when its parent dies; False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    pr_set_pdeathsig = 1  # PR_SET_PDEATHSIG in <linux/prctl.h>
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return (
            libc.prctl(
                pr_set_pdeathsig, ctypes.c_ulong(signum), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)
            )
            == 0
        )
    except (OSError, AttributeError):  # no C library to load, or one without prctl
        return False


def _stop_when_orphaned(launcher: int, poll_seconds: float) -> None:
    """Sends this process SIGTERM once its parent is no longer LAUNCHER (it died; an orphan is re-parented)."""
    import signal
    import time

    while os.getppid() == launcher:
        time.sleep(poll_seconds)
    os.kill(os.getpid(), signal.SIGTERM)


def prepare_cpu_distributed(argv: list[str]) -> list[str]:
    """Without a GPU, torchrun must still give ONE distributed training, not N independent ones.

    DeepSpeed needs a gloo process group set up before TrainingArguments exist (TrainingArguments would give
    accelerate no backend and it would count one process), and a rendezvous even for one process; plain DDP
    needs accelerate told to use the CPU. Nothing changes on GPU machines. Returns the extended arguments.
    """
    if torch.cuda.is_available():
        return argv
    if deepspeed_config(argv):
        check_cpu_deepspeed_compiler()
        from accelerate import PartialState

        if "LOCAL_RANK" not in os.environ:  # plain `python finetune.py --deepspeed ...`: a world of one
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")  # initialises deepspeed.comm over gloo with the real world size
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
        return argv + ["--accelerator_config", json.dumps({"use_configured_state": True})]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    return argv


def deepspeed_config(argv: list[str]) -> str:
    """The DeepSpeed config ARGV asks for, as the argument parser reads it: the last --deepspeed wins, and an empty
    one (`--deepspeed ''`, what the planner emits for no DeepSpeed after the launcher's own) means none: ''."""
    config = ""
    for index, arg in enumerate(argv):
        if arg == "--deepspeed":
            config = argv[index + 1] if index + 1 < len(argv) else ""
        elif arg.startswith("--deepspeed="):
            config = arg.split("=", 1)[1]
    return config


def cpu_deepspeed_compiler() -> str | None:
    """The C++ compiler DeepSpeed would build its CPU extension with ($CXX, else c++, as torch's cpp_extension
    picks it), or None when it is not on PATH."""
    return shutil.which(os.environ.get("CXX", "c++"))


def check_cpu_deepspeed_compiler() -> None:
    """DeepSpeed on a CPU builds a C++ extension (its shared-memory comm op, deepspeed_shm_comm) when it sets up
    communication; with no compiler that is a long build error from deep inside DeepSpeed. Say it in one line,
    with both fixes, before anything is loaded."""
    if cpu_deepspeed_compiler() is None:
        from finetune.arguments import UsageError

        compiler = os.environ.get("CXX", "c++")
        raise UsageError(
            f"--deepspeed without a GPU needs a C++ compiler ({compiler!r} is not on PATH): DeepSpeed builds its CPU "
            'communication op on first use; install one (e.g. apt-get install g++) or train without DeepSpeed (DS_CONFIG="")'
        )


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
