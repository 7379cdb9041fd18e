"""Multi-host start-up: ``jax.distributed.initialize`` from flags or the environment.

Every host runs the same ``jaxtune train`` command. Hosts find each other through a
coordinator (``host:port`` of process 0), given either explicitly (``--coordinator``,
``--num-processes``, ``--process-id``, or the environment variables
``JAXTUNE_COORDINATOR`` / ``JAXTUNE_NUM_PROCESSES`` / ``JAXTUNE_PROCESS_ID``) or found by
JAX's cluster detection on TPU pods, SLURM and Open MPI. After initialisation
``jax.devices()`` lists every host's devices, the mesh spans them all, and each host
loads only its own slice of every global batch (``BatchIterator`` with
``process_index`` / ``process_count``).

On CPU, cross-process collectives go through gloo (the CPU backend has no other
transport); the setting only affects the CPU backend, so it is made unconditionally.
"""

from __future__ import annotations

import os

from jaxtune.errors import ConfigError

ENV = {
    "coordinator": "JAXTUNE_COORDINATOR",
    "num_processes": "JAXTUNE_NUM_PROCESSES",
    "process_id": "JAXTUNE_PROCESS_ID",
}


def cluster_detected(environ=None) -> str | None:
    """Name of a multi-process launcher found in the environment, else None.

    Only launches with more than one process count: a single SLURM task or a one-host
    TPU VM runs as an ordinary single process.
    """
    env = os.environ if environ is None else environ

    def many(var: str) -> bool:
        try:
            return int(env.get(var, "1")) > 1
        except ValueError:
            return False

    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if "SLURM_JOB_ID" in env and (many("SLURM_NTASKS") or many("SLURM_STEP_NUM_TASKS")):
        return "SLURM"
    if many("OMPI_COMM_WORLD_SIZE"):
        return "Open MPI"
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "TPU pod"
    return None


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    environ=None,
) -> bool:
    """Joins the multi-process job if one is configured; returns whether it did.

    Must run before anything touches a JAX backend (``jax.devices()``, any array).

    Args:
      coordinator: ``host:port`` of process 0 (it listens there).
      num_processes: total number of processes.
      process_id: this process's index in ``[0, num_processes)``.
      environ: environment to read (default ``os.environ``).

    Raises:
      ConfigError: only some of the three explicit settings are given, or bad values.
    """
    # jax here, not at the top: `jaxtune --help` builds its parser from this module
    # (add_distributed_args) and must not import jax.
    import jax

    env = os.environ if environ is None else environ
    coordinator = coordinator or env.get(ENV["coordinator"]) or None
    try:
        if num_processes is None and env.get(ENV["num_processes"]):
            num_processes = int(env[ENV["num_processes"]])
        if process_id is None and env.get(ENV["process_id"]):
            process_id = int(env[ENV["process_id"]])
    except ValueError as e:
        raise ConfigError(f"{ENV['num_processes']} / {ENV['process_id']}: {e}") from None
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ConfigError(
                "multi-host: give all of --coordinator HOST:PORT, --num-processes N and "
                f"--process-id I (got coordinator={coordinator}, num_processes="
                f"{num_processes}, process_id={process_id})"
            )
        if not 0 <= process_id < num_processes:
            raise ConfigError(
                f"multi-host: --process-id {process_id} is not in [0, {num_processes})"
            )
        if num_processes == 1:
            return False
        _cpu_collectives(jax)
        jax.distributed.initialize(coordinator, num_processes, process_id)
        return True
    found = cluster_detected(env)
    if found is None:
        return False
    _cpu_collectives(jax)
    jax.distributed.initialize()  # JAX reads the launcher's environment itself
    return True


def _cpu_collectives(jax) -> None:
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # a JAX without the option: nothing to choose
        pass


def add_distributed_args(parser) -> None:
    """``--coordinator`` / ``--num-processes`` / ``--process-id`` for ``jaxtune train``."""
    g = parser.add_argument_group(
        "multi-host",
        "Run the same command on every host. Without these flags, TPU pods, SLURM and "
        "Open MPI launches are detected from the environment.",
    )
    g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
    g.add_argument("--num-processes", type=int, metavar="N", help="number of processes")
    g.add_argument("--process-id", type=int, metavar="I", help="index of this process")


def initialize_from_args(args) -> bool:
    """:func:`initialize` with the flags of :func:`add_distributed_args`."""
    return initialize(
        getattr(args, "coordinator", None),
        getattr(args, "num_processes", None),
        getattr(args, "process_id", None),
    )
