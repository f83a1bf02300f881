"""Multi-GPU `lx2v run`: torchrun start-up, the per-rank body, one error for all ranks.

`lx2v run --gpus N ...` (a plain process) re-executes itself as
`python -m torch.distributed.run --standalone --nproc-per-node N -m lightx2v run ...` with
NVLink multicast forced off in the environment (parallel.NVLS_OFF_ENV) and waits. Each rank
runs its body inside `run_rank`: a rank that fails prints one line, records the message in
a file of a folder the launcher made, and exits at once (os._exit: no atexit handler or
process-group destructor may wait on peers). A rank that succeeds waits for the others,
leaves the process group and exits with os._exit too (`parallel.exit_rank`: gloo could
abort in interpreter teardown). torchrun then stops the other ranks (some
may be blocked in a collective), and the launcher raises one LX2VError naming the rank and
the first error. Collectives also time out (LX2V_DIST_TIMEOUT, default 900 s), so a rank
that stalls without dying cannot hang the run either.

Started directly (`torchrun --nproc-per-node N -m lightx2v run ...`) the ranks behave the
same; the one-line summary is then torchrun's own failure report.

Only rank 0 writes the video (`is_rank0()`); every rank holds the whole model.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import torch

from lightx2v.config import vae_tiling_mode
from lightx2v.errors import LX2VError
from lightx2v.pipeline import WanPipeline
from lightx2v.runtime.parallel import (
    ParallelConfig,
    ParallelGroups,
    ParallelRunner,
    broadcast_,
    disable_nvls,
    exit_now,
    in_torchrun,
    init_distributed,
    is_rank0,
    leave_process_group,
    make_groups,
    parallel_vae_decode,
)

ERROR_DIR_ENV = "LX2V_ERROR_DIR"
LAUNCHED_ENV = "LX2V_LAUNCHED"  # set for the ranks: never re-launch from inside torchrun

__all__ = [
    "ParallelWanPipeline",
    "in_torchrun",
    "is_rank0",
    "launch",
    "relaunch",
    "run_rank",
    "setup_parallel",
    "torchrun_command",
    "wants_relaunch",
]


# ---------------------------------------------------------------------------------------
# the launcher side


def torchrun_command(nproc: int, target: Sequence[str]) -> list[str]:
    """torchrun (as `python -m torch.distributed.run`, so the same interpreter) for one
    host; `target` is what follows: ["-m", "lightx2v", "run", ...] or [script, args...]."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "--monitor-interval=0.5", *target,
    ]  # fmt: skip


def wants_relaunch(gpus: int | None) -> bool:
    """True in a plain process asked for several GPUs (not already a torchrun rank)."""
    return bool(gpus and gpus > 1) and not in_torchrun() and LAUNCHED_ENV not in os.environ


def launch(nproc: int, target: Sequence[str], check_gpus: bool = True) -> int:
    """Run `target` on `nproc` ranks under torchrun and wait.

    → 0 on success. A failure raises one LX2VError: the earliest error any rank recorded
    (rank and message), or the exit status when no rank could record one (killed, OOM).
    """
    if nproc < 1:
        raise LX2VError(f"--gpus {nproc}: must be at least 1")
    if check_gpus:
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if nproc > have:
            raise LX2VError(f"--gpus {nproc}: only {have} CUDA GPU(s) visible here")
    env = dict(os.environ)
    disable_nvls(env)
    env[LAUNCHED_ENV] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its warning
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")  # a timed-out collective aborts
    with tempfile.TemporaryDirectory(prefix="lx2v-ranks-") as tmp:
        env[ERROR_DIR_ENV] = tmp
        rc = subprocess.run(torchrun_command(nproc, target), env=env).returncode
        if rc == 0:
            return 0
        errors = sorted(
            (f.stat().st_mtime, int(f.stem.removeprefix("rank")), f.read_text().strip())
            for f in Path(tmp).glob("rank*.txt")
        )
    if errors:
        _, rank, msg = errors[0]
        raise LX2VError(f"rank {rank} of {nproc} failed: {msg} (all ranks stopped)")
    raise LX2VError(
        f"a rank of {nproc} died without an error message (torchrun exit status {rc}; "
        "killed or out of memory?); all ranks stopped, see the log above"
    )


def relaunch(gpus: int, argv: Sequence[str], check_gpus: bool = True) -> int:
    """`lx2v <argv>` again, as `gpus` torchrun ranks (argv keeps --gpus: ranks check it).
    check_gpus=False allows CPU ranks (gloo), e.g. for `--device cpu` tests."""
    return launch(gpus, ["-m", "lightx2v", *argv], check_gpus=check_gpus)


# ---------------------------------------------------------------------------------------
# the rank side


def _record_error(msg: str) -> None:
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder:
        return
    rank = os.environ.get("RANK", "0")
    try:
        tmp = Path(folder) / f".rank{rank}.tmp"
        tmp.write_text(msg + "\n")
        os.replace(tmp, Path(folder) / f"rank{rank}.txt")
    except OSError:
        pass


def run_rank(body: Callable[[], int | None]) -> NoReturn:
    """Run one rank's work, then end the process (os._exit, parallel.exit_now). On success:
    wait for every rank, leave the process group and exit with body's code. On any failure,
    also one at that final barrier (a peer died): print one line (plus a traceback for
    programming errors), record it for the launcher, and exit with a non-zero status."""
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    try:
        try:
            code = body() or 0
        except SystemExit as e:
            if e.code:
                raise
            code = 0
        try:
            leave_process_group()
        except Exception as e:
            raise LX2VError(
                f"leaving the process group (a peer is gone?): {type(e).__name__}: {e}"
            ) from e
    except BaseException as e:  # noqa: BLE001 - every failure must end this rank
        if isinstance(e, LX2VError):
            msg, status = str(e), 2
        elif isinstance(e, KeyboardInterrupt):
            msg, status = "interrupted", 130
        elif isinstance(e, SystemExit):
            msg, status = (
                f"exited with status {e.code}",
                e.code if isinstance(e.code, int) else 1,
            )
        else:
            traceback.print_exc()
            msg, status = f"{type(e).__name__}: {e}", 1
        msg = " ".join(msg.split())  # one line
        _record_error(msg)
        print(f"lx2v: error (rank {rank} of {world}): {msg}", file=sys.stderr)
        exit_now(status)
    exit_now(code)


# ---------------------------------------------------------------------------------------
# a pipeline that runs as one rank of a parallel instance


def setup_parallel(
    num_heads: int,
    gpus: int | None = None,
    ulysses: int | None = None,
    cfg_parallel: bool | None = None,
    uses_cfg: bool = True,
) -> tuple[ParallelGroups, torch.device]:
    """Inside torchrun: join the process group, choose and check the split, build the
    groups. → (groups, this rank's device). Everything user-caused is an LX2VError."""
    _, world, device = init_distributed()
    if gpus is not None and gpus != world:
        raise LX2VError(f"--gpus {gpus} but torchrun started {world} process(es)")
    config = ParallelConfig.choose(world, num_heads, ulysses, cfg_parallel, uses_cfg)
    groups = make_groups(config)
    assert groups is not None
    return groups, device


class ParallelWanPipeline(WanPipeline):
    """WanPipeline as one rank of a parallel instance: same results on every rank.

    Denoising runs through `ParallelRunner` (CFG parallel and/or Ulysses); the initial noise
    is broadcast from the instance's first rank; decode runs on every rank (tiles split
    across ranks when `parallel_decode`). Only rank 0 should save.
    """

    def __init__(
        self,
        ckpt,
        runtime,
        groups: ParallelGroups,
        device: torch.device,
        parallel_decode: bool = True,
    ):
        self.groups = groups
        self.parallel_decode = parallel_decode
        # one GPU per rank; CFG always as one batch (the runner splits it across ranks)
        runtime = dataclasses.replace(runtime, device=str(device), cfg_batch=True)
        super().__init__(ckpt, runtime)

    def runner_class(self):
        if self.groups.config.world == 1:
            return super().runner_class()
        return ParallelRunner

    def runner_args(self) -> tuple:
        return () if self.groups.config.world == 1 else (self.groups,)

    def initial_noise(self, req, gen):
        latents = super().initial_noise(req, gen)
        broadcast_(latents, self.groups)  # equal noise on every rank, whatever the RNG
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Every rank decodes one horizontal band (with halo; see parallel_vae_decode) and
        gets the whole video; with --vae-tiling (memory first) the usual tiled decode."""
        if not self.parallel_decode or vae_tiling_mode(self.runtime.vae_tiling) == "on":
            return super().decode(latents)
        video = parallel_vae_decode(self.vae, latents[None].to(self.device), self.groups)
        return video[0].float().cpu()
