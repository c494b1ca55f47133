"""Which process group the environment describes (no processes are started here)."""
import pytest

from rmjax import parallel
from rmjax.parallel import distributed


def test_no_cluster_is_one_process():
  assert parallel.process_group({}) == parallel.ProcessGroup('single')
  assert not parallel.process_group({}).is_multi_process
  assert parallel.initialize_from_env({}).source == 'single'  # and initialises nothing


def test_explicit_from_arguments_or_environment():
  env = {'RMJAX_COORDINATOR_ADDRESS': 'host0:1234', 'RMJAX_NUM_PROCESSES': '4', 'RMJAX_PROCESS_ID': '3'}
  assert parallel.process_group(env) == parallel.ProcessGroup('explicit', 'host0:1234', 4, 3)
  assert parallel.process_group({}, coordinator_address='h:1', num_processes=2, process_id=0) == \
      parallel.ProcessGroup('explicit', 'h:1', 2, 0)
  # Arguments win over the environment, and over SLURM.
  slurm = {'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '2', 'SLURM_PROCID': '1', 'SLURM_STEP_NODELIST': 'n1'}
  assert parallel.process_group({**env, **slurm}, process_id=1).process_id == 1
  assert parallel.process_group({**env, **slurm}).source == 'explicit'


@pytest.mark.parametrize('env,kwargs,match', [
    ({'RMJAX_COORDINATOR_ADDRESS': 'h:1'}, {}, r"missing \['num_processes', 'process_id'\]"),
    ({}, dict(coordinator_address='h:1', num_processes=2, process_id=2), r'process_id=2 must be in \[0, num'),
    ({}, dict(coordinator_address='h', num_processes=2, process_id=0), 'expected host:port'),
    ({'RMJAX_COORDINATOR_ADDRESS': 'h:1', 'RMJAX_NUM_PROCESSES': 'two', 'RMJAX_PROCESS_ID': '0'}, {},
     "RMJAX_NUM_PROCESSES='two' is not an integer"),
])
def test_explicit_misuse_names_the_fix(env, kwargs, match):
  with pytest.raises(ValueError, match=match):
    parallel.process_group(env, **kwargs)


@pytest.mark.parametrize('nodelist,first', [('node001', 'node001'), ('node001,host2', 'node001'),
                                            ('gpu[003-005,9],cpu1', 'gpu003'), ('a[7,9]', 'a7')])
def test_first_host_of_a_slurm_node_list(nodelist, first):
  assert distributed.first_host(nodelist) == first


def test_slurm_tasks_share_one_coordinator():
  base = {'SLURM_JOB_ID': '123456', 'SLURM_NTASKS': '8', 'SLURM_STEP_NODELIST': 'gpu[010-011]'}
  groups = [parallel.process_group({**base, 'SLURM_PROCID': str(r)}) for r in range(8)]
  port = 65536 - 4096 + 123456 % 4096
  assert {g.coordinator_address for g in groups} == {f'gpu010:{port}'}
  assert [g.process_id for g in groups] == list(range(8)) and {g.num_processes for g in groups} == {8}
  assert parallel.process_group({**base, 'SLURM_PROCID': '0', 'RMJAX_COORDINATOR_PORT': '999'}).coordinator_address \
      == 'gpu010:999'
  assert parallel.process_group({**base, 'SLURM_NTASKS': '1', 'SLURM_PROCID': '0'}).source == 'single'


def test_submitit_job_environment(monkeypatch):
  for k, v in dict(SUBMITIT_EXECUTOR='local', SUBMITIT_LOCAL_JOB_ID='4242', SUBMITIT_LOCAL_NTASKS='2',
                   SUBMITIT_LOCAL_JOB_NUM_NODES='1', SUBMITIT_LOCAL_NODEID='0', SUBMITIT_LOCAL_GLOBALID='1',
                   SUBMITIT_LOCAL_LOCALID='1').items():
    monkeypatch.setenv(k, v)
  group = parallel.process_group()
  assert (group.source, group.num_processes, group.process_id) == ('submitit', 2, 1)
  assert group.coordinator_address.endswith(f':{65536 - 4096 + 4242 % 4096}')


def test_tpu_pod_is_left_to_jax_detection():
  assert parallel.process_group({'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'}) == parallel.ProcessGroup('tpu', None, None, None)
  assert parallel.process_group({'TPU_WORKER_HOSTNAMES': 'w0'}).source == 'single'  # one host: nothing to join
