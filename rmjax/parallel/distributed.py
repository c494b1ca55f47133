"""`jax.distributed` set-up from the environment a job runs in.

`process_group(env)` reads which multi-process job this process belongs to, first match wins:

1. explicit: the arguments, or `RMJAX_COORDINATOR_ADDRESS` (`host:port`), `RMJAX_NUM_PROCESSES`
   and `RMJAX_PROCESS_ID` (all three, or none);
2. submitit (`SUBMITIT_EXECUTOR` set, i.e. inside a job submitted by submitit, SLURM or local):
   `submitit.JobEnvironment()`'s `num_tasks`, `global_rank` and first host name;
3. SLURM (`SLURM_JOB_ID`, `SLURM_NTASKS`, `SLURM_PROCID` and a node list): the task count and
   rank, the coordinator on the first node of `SLURM_STEP_NODELIST` (or `SLURM_JOB_NODELIST`);
4. a Cloud TPU VM with several workers (`TPU_WORKER_HOSTNAMES` lists more than one, or
   `TPU_WORKER_ID` / `CLOUD_TPU_TASK_ID` is set): jax's own TPU detection finds the rest;
5. otherwise one process, and nothing is initialised.

For 2 and 3 the coordinator port is `RMJAX_COORDINATOR_PORT`, else derived from the job id
(`61440 + id mod 4096`, as jax does for SLURM), so every task computes the same address.
`initialize_from_env()` then calls `jax.distributed.initialize` once, before anything touches a
device; on CPU hosts the cross-process collectives run over gloo.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

import jax

ENV_COORDINATOR = 'RMJAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'RMJAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'RMJAX_PROCESS_ID'
ENV_PORT = 'RMJAX_COORDINATOR_PORT'
_PORT_BASE, _PORT_RANGE = 65536 - 4096, 4096


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
  """The processes of one job.

  source: 'explicit' | 'submitit' | 'slurm' | 'tpu' | 'single'.
  coordinator_address: `host:port` of process 0 (None: jax finds it, as on a TPU pod).
  num_processes / process_id: the job's size and this process's rank (None: jax finds them).
  """
  source: str
  coordinator_address: str | None = None
  num_processes: int | None = 1
  process_id: int | None = 0

  @property
  def is_multi_process(self) -> bool:
    return self.source != 'single'


def first_host(nodelist: str) -> str:
  """The first host of a SLURM node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
  m = re.match(r'([^,\[]+)(?:\[([^\]]+)\])?', nodelist.strip())
  if m is None:
    raise ValueError(f'cannot read a host name from the SLURM node list {nodelist!r}.')
  prefix, ranges = m.groups()
  return prefix if ranges is None else prefix + re.split(r'[,-]', ranges)[0]


def _port(env: Mapping[str, str], job_id: str) -> int:
  if env.get(ENV_PORT):
    return int(env[ENV_PORT])
  digits = re.sub(r'\D', '', job_id)
  return _PORT_BASE + (int(digits) if digits else 0) % _PORT_RANGE


def _int(env: Mapping[str, str], name: str) -> int:
  try:
    return int(env[name])
  except ValueError as e:
    raise ValueError(f'environment variable {name}={env[name]!r} is not an integer.') from e


def _explicit(coordinator_address, num_processes, process_id, env) -> ProcessGroup | None:
  given = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
  from_env = {ENV_COORDINATOR: 'coordinator_address', ENV_NUM_PROCESSES: 'num_processes',
              ENV_PROCESS_ID: 'process_id'}
  for var, field in from_env.items():
    if given[field] is None and env.get(var):
      given[field] = env[var] if field == 'coordinator_address' else _int(env, var)
  if all(v is None for v in given.values()):
    return None
  missing = [f for f, v in given.items() if v is None]
  if missing:
    raise ValueError(f'an explicit jax.distributed set-up needs coordinator_address, num_processes and '
                     f'process_id; missing {missing} (arguments, or {", ".join(from_env)}).')
  if not 0 <= given['process_id'] < given['num_processes']:
    raise ValueError(f'process_id={given["process_id"]} must be in [0, num_processes={given["num_processes"]}).')
  if ':' not in given['coordinator_address']:
    raise ValueError(f'coordinator_address={given["coordinator_address"]!r}: expected host:port.')
  return ProcessGroup('explicit', given['coordinator_address'], int(given['num_processes']),
                      int(given['process_id']))


def _submitit(env: Mapping[str, str]) -> ProcessGroup | None:
  if not env.get('SUBMITIT_EXECUTOR'):
    return None
  import submitit  # pylint: disable=g-import-not-at-top  # only inside submitit jobs
  job = submitit.JobEnvironment()
  if job.num_tasks <= 1:
    return ProcessGroup('single')
  host = job.hostnames[0] if job.hostnames else 'localhost'
  return ProcessGroup('submitit', f'{host}:{_port(env, str(job.job_id))}', int(job.num_tasks), int(job.global_rank))


def _slurm(env: Mapping[str, str]) -> ProcessGroup | None:
  nodelist = env.get('SLURM_STEP_NODELIST') or env.get('SLURM_JOB_NODELIST')
  if not all(env.get(v) for v in ('SLURM_JOB_ID', 'SLURM_NTASKS', 'SLURM_PROCID')) or not nodelist:
    return None
  n = _int(env, 'SLURM_NTASKS')
  if n <= 1:
    return ProcessGroup('single')
  return ProcessGroup('slurm', f'{first_host(nodelist)}:{_port(env, env["SLURM_JOB_ID"])}', n,
                      _int(env, 'SLURM_PROCID'))


def _tpu(env: Mapping[str, str]) -> ProcessGroup | None:
  hosts = [h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]
  if len(hosts) > 1 or (not hosts and (env.get('TPU_WORKER_ID') or env.get('CLOUD_TPU_TASK_ID'))):
    return ProcessGroup('tpu', None, None, None)
  return None


def process_group(env: Mapping[str, str] | None = None, *, coordinator_address: str | None = None,
                  num_processes: int | None = None, process_id: int | None = None) -> ProcessGroup:
  """Which job this process is part of (see the module docstring); reads `env` only, starts nothing."""
  env = os.environ if env is None else env
  for found in (_explicit(coordinator_address, num_processes, process_id, env), _submitit(env), _slurm(env),
                _tpu(env)):
    if found is not None:
      return found
  return ProcessGroup('single')


def initialize_from_env(env: Mapping[str, str] | None = None, *, coordinator_address: str | None = None,
                        num_processes: int | None = None, process_id: int | None = None,
                        initialization_timeout: int = 300) -> ProcessGroup:
  """Calls `jax.distributed.initialize` for the job `process_group` finds (once; later calls are no-ops).

  Call it first thing in a job's entry point, before anything queries devices. Returns the group.
  """
  group = process_group(env, coordinator_address=coordinator_address, num_processes=num_processes,
                        process_id=process_id)
  if not group.is_multi_process or jax.distributed.is_initialized():
    return group
  # Cross-process collectives of the CPU backend; GPU and TPU backends ignore this setting.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=group.coordinator_address, num_processes=group.num_processes,
                             process_id=group.process_id, initialization_timeout=initialization_timeout)
  return group
