"""Slurm's task variables -> the ones torch.distributed and DeepSpeed read; hostfiles for the launcher.

One srun task per rank (``LAYOUT=srun`` in slurm/pretrain.sbatch)::

    RANK        <- SLURM_PROCID
    WORLD_SIZE  <- SLURM_STEP_NUM_TASKS (tasks of this srun step), else SLURM_NTASKS
    LOCAL_RANK  <- SLURM_LOCALID
    MASTER_ADDR <- the first host of SLURM_STEP_NODELIST (where task 0 runs), else of SLURM_JOB_NODELIST
                   (``scontrol show hostnames``), unless set
    MASTER_PORT <- 20000 + SLURM_JOB_ID % 20000, unless set (every task of a job agrees on it without
                   talking; two jobs sharing a node rarely collide, and a requeued job keeps its id)

Used three ways:

* ``eval "$(python -m launch.slurm_env --exports)"`` in a batch script or an srun task;
* :func:`launch.distributed.init_distributed` calls :func:`apply_slurm_env` in an srun task whose
  RANK is not set (:func:`in_slurm_task`), so ``srun python launch/train.py ...`` needs nothing else
  (a process in the batch shell itself stays a world of one);
* ``python -m launch.slurm_env --hostfile PATH --slots N`` writes ``<host> slots=N`` per node of the
  allocation for the ``deepspeed`` launcher (``--no_ssh --node_rank=$SLURM_NODEID`` or pdsh).

The batch shell of a job with several tasks also carries SLURM_PROCID=0 and SLURM_NTASKS=N, but it is
not one of the N ranks (no SLURM_STEP_ID): mapping it would make a plain ``python launch/train.py`` in a
batch script wait forever for N-1 ranks, so that case is refused with a message.

Bad or missing input ends the CLI with one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping

logger = logging.getLogger(__name__)

PORT_BASE = 20000
PORT_SPAN = 20000
EXPORTED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class SlurmEnvError(ValueError):
    """Slurm variables missing or malformed; the message is one line."""


def _int(env: Mapping[str, str], *names: str) -> int:
    for name in names:
        if name in env and env[name] != "":
            try:
                return int(env[name])
            except ValueError:
                raise SlurmEnvError(f"{name}={env[name]!r} is not an integer") from None
    raise SlurmEnvError(f"{' or '.join(names)} is not set; run inside a Slurm allocation (sbatch/srun) "
                        "or set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT yourself")


def _nodelist(env: Mapping[str, str], step: bool = False) -> str:
    nodelist = ((env.get("SLURM_STEP_NODELIST") if step else None) or env.get("SLURM_JOB_NODELIST")
                or env.get("SLURM_NODELIST"))
    if not nodelist:
        raise SlurmEnvError("SLURM_JOB_NODELIST is not set; run inside a Slurm allocation (sbatch/srun)")
    return nodelist


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compact host list (``gpu[01-03,7],login1``) as host names, without scontrol.

    Handles one bracket group per name (what Slurm prints for ordinary clusters), zero-padded ranges
    included. :func:`hostnames` prefers ``scontrol show hostnames`` and uses this when it is absent.
    """
    names: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)?", nodelist):
        m = re.fullmatch(r"([^\[\]]*)\[([^\]]*)\]([^\[\]]*)", item)
        if not m:
            if "[" in item or "]" in item:
                raise SlurmEnvError(f"cannot parse host list {nodelist!r}")
            names.append(item)
            continue
        prefix, body, suffix = m.groups()
        for part in body.split(","):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise SlurmEnvError(f"cannot parse host list {nodelist!r}")
            hi = hi or lo
            if int(hi) < int(lo):
                raise SlurmEnvError(f"cannot parse host list {nodelist!r}: range {part} runs backwards")
            names.extend(f"{prefix}{i:0{len(lo)}d}{suffix}" for i in range(int(lo), int(hi) + 1))
    if not names:
        raise SlurmEnvError(f"host list {nodelist!r} names no host")
    return names


def hostnames(nodelist: str) -> list[str]:
    """The hosts of ``nodelist`` in Slurm's order: ``scontrol show hostnames`` when available."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        proc = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                              timeout=60)
        hosts = proc.stdout.split()
        if proc.returncode == 0 and hosts:
            return hosts
        logger.warning("scontrol show hostnames %s failed (%s); parsing the list itself", nodelist,
                       (proc.stderr or "no output").strip().splitlines()[-1:])
    return expand_nodelist(nodelist)


def master_port(env: Mapping[str, str]) -> int:
    """MASTER_PORT if set, else a port derived from the job id (the same in every task of the job)."""
    if env.get("MASTER_PORT"):
        port = _int(env, "MASTER_PORT")
    else:
        port = PORT_BASE + _int(env, "SLURM_JOB_ID", "SLURM_JOBID") % PORT_SPAN
    if not 0 < port < 65536:
        raise SlurmEnvError(f"MASTER_PORT={port} is not a TCP port (1-65535)")
    return port


def torch_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT for this Slurm task.

    MASTER_ADDR and MASTER_PORT already in ``env`` are kept (a batch script may pick them).

    Raises:
        SlurmEnvError: a variable is missing or malformed, or SLURM_PROCID is outside the task count.
    """
    env = os.environ if env is None else env
    rank = _int(env, "SLURM_PROCID")
    world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    local = _int(env, "SLURM_LOCALID")
    if world > 1 and not (env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")):
        raise SlurmEnvError(f"this is the batch shell of a {world}-task job, not one of its tasks (no SLURM_STEP_ID); "
                            "start the ranks with srun (or set RANK/WORLD_SIZE/... yourself)")
    if world < 1 or not 0 <= rank < world:
        raise SlurmEnvError(f"SLURM_PROCID={rank} is not a rank of SLURM_NTASKS={world}")
    if local < 0:
        raise SlurmEnvError(f"SLURM_LOCALID={local} is negative")
    addr = env.get("MASTER_ADDR") or hostnames(_nodelist(env, step=True))[0]
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local), "MASTER_ADDR": addr,
            "MASTER_PORT": str(master_port(env))}


def in_slurm_task(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is a task of an srun step (not the batch shell) and RANK is not set yet."""
    env = os.environ if env is None else env
    return ("RANK" not in env and "SLURM_PROCID" in env
            and bool(env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")))


def apply_slurm_env(environ: dict | None = None) -> dict[str, str]:
    """Set the torch variables in ``environ`` (default ``os.environ``) from Slurm's; return them."""
    environ = os.environ if environ is None else environ
    values = torch_env(environ)
    environ.update(values)
    logger.info("slurm: rank %s/%s, local rank %s, master %s:%s (from SLURM_* variables)", values["RANK"],
                values["WORLD_SIZE"], values["LOCAL_RANK"], values["MASTER_ADDR"], values["MASTER_PORT"])
    return values


def exports(values: Mapping[str, str]) -> str:
    """``export NAME=value`` lines for ``eval`` in a shell."""
    return "".join(f"export {k}={shlex.quote(str(values[k]))}\n" for k in EXPORTED if k in values)


def write_hostfile(path: str, slots: int, env: Mapping[str, str] | None = None) -> list[str]:
    """Write ``<host> slots=<slots>`` for every node of the allocation; return the hosts."""
    env = os.environ if env is None else env
    if slots < 1:
        raise SlurmEnvError(f"--slots {slots}: a node needs at least one slot")
    hosts = hostnames(_nodelist(env))
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(f"{h} slots={slots}\n" for h in hosts)
        os.replace(tmp, path)
    except OSError as e:
        raise SlurmEnvError(f"cannot write hostfile {path}: {e.strerror or e}") from None
    return hosts


def _default_slots(env: Mapping[str, str]) -> int:
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_NTASKS_PER_NODE"):
        value = env.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    raise SlurmEnvError("--slots not given and neither SLURM_GPUS_ON_NODE nor SLURM_NTASKS_PER_NODE is set")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.slurm_env", description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--exports", action="store_true",
                      help="print `export RANK=... WORLD_SIZE=... LOCAL_RANK=... MASTER_ADDR=... MASTER_PORT=...`")
    what.add_argument("--master", action="store_true", help="print `export MASTER_ADDR=... MASTER_PORT=...` only "
                      "(for a batch shell that starts one launcher per node)")
    what.add_argument("--hostfile", metavar="PATH", help="write a deepspeed hostfile for the allocation")
    parser.add_argument("--slots", type=int, default=None,
                        help="slots (GPUs or CPU ranks) per node in the hostfile; default SLURM_GPUS_ON_NODE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.exports:
            sys.stdout.write(exports(torch_env()))
        elif args.master:
            env = os.environ
            values = {"MASTER_ADDR": env.get("MASTER_ADDR") or hostnames(_nodelist(env))[0],
                      "MASTER_PORT": str(master_port(env))}
            sys.stdout.write(exports(values))
        else:
            slots = args.slots if args.slots is not None else _default_slots(os.environ)
            hosts = write_hostfile(args.hostfile, slots)
            logger.info("hostfile %s: %d hosts x %d slots", args.hostfile, len(hosts), slots)
    except SlurmEnvError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
