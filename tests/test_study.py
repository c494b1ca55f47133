"""The overoptimization study: stage caching and invalidation, and the :smoke run's outputs."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from experiments.pipeline import Pipeline
from rmjax import config as config_lib

ROOT = pathlib.Path(__file__).parent.parent
CMD = [sys.executable, '-m', 'rmjax.main', '--config=configs/study/overoptimization.py:smoke',
       '--config.world.policy.train.progress=False', '--config.proxy.train.progress=False']


def test_pipeline_skips_keys_and_invalidates_downstream(tmp_path):
  calls = []

  def stage(name):
    def fn(folder):
      calls.append(name)
      (folder / 'out.txt').write_text(name)
      return {'name': name}
    return fn

  def run(redo=(), a_value=1, b_value=2):
    p = Pipeline(tmp_path, redo=redo, known=('a', 'b', 'c'))
    a = p.run('a', stage('a'), reads={'x': a_value})
    b = p.run('b', stage('b'), reads={'y': b_value}, after=[a])
    c = p.run('c', stage('c'), reads={}, after=[b])
    return a, b, c

  a, b, c = run()
  assert calls == ['a', 'b', 'c'] and c.result == {'name': 'c'}
  run()
  assert calls == ['a', 'b', 'c']  # all cached
  _, b2, c2 = run(b_value=3)  # a changed read: b gets a new key, and so does c
  assert calls[3:] == ['b', 'c'] and b2.key != b.key and c2.key != c.key
  run()  # back to the old value: the old folders are reused
  assert calls[5:] == []
  run(redo=('a',))  # redo a under the same key: a's new record invalidates b and c
  assert calls[5:] == ['a', 'b', 'c']
  with pytest.raises(config_lib.ConfigError, match=r"unknown stages \['z'\]; the stages are \['a', 'b', 'c'\]"):
    Pipeline(tmp_path, redo=('z',), known=('a', 'b', 'c'))


def test_a_new_option_at_its_neutral_default_keeps_the_stage_key(tmp_path):
  p = Pipeline(tmp_path)
  before = {'train': {'steps': 10, 'lr': 1e-3}, 'model': {'width': 32}}
  with_defaults = {'train': {'steps': 10, 'lr': 1e-3, 'grad_accum_steps': 1, 'extra_steps': ()},
                   'model': {'width': 32, 'remat': 'none', 'scan_layers': False, 'dtype': 'float32'}}
  assert p.key(with_defaults, []) == p.key(before, [])
  for section, field, value in (('train', 'grad_accum_steps', 2), ('train', 'extra_steps', (1,)),
                                ('model', 'remat', 'block'), ('model', 'scan_layers', True),
                                ('model', 'dtype', 'bfloat16')):
    changed = {k: dict(v) for k, v in with_defaults.items()}
    changed[section][field] = value
    assert p.key(changed, []) != p.key(before, []), field
  # Only those options: any other field at any value is part of the key.
  assert p.key({**before, 'train': {**before['train'], 'log_every': 1}}, []) != p.key(before, [])


def test_killed_stage_has_no_record_and_reruns(tmp_path):
  p = Pipeline(tmp_path)

  def dies(folder):
    (folder / 'partial').write_text('half')
    raise RuntimeError('killed')

  with pytest.raises(RuntimeError):
    p.run('s', dies, reads={})
  stage = p.run('s', lambda folder: (folder / 'partial').read_text(), reads={})
  assert stage.result == 'half' and not stage.skipped  # resumed in the same folder


def test_gold_adds_weighted_fluency_then_standardizes():
  from experiments.rm_world import Gold
  from rmjax.data.synthetic_language import Grammar
  grammar = Grammar.random(0)
  lx = grammar.lexicon
  ok, bad = f'{lx["Det_pl"][0]} {lx["N_pl"][0]} {lx["VI_pl"][0]}.', f'{lx["Det_pl"][0]} {lx["N_pl"][0]}.'
  gold = Gold(model=None, params=None, net_norm=None, grammar=grammar, weight=0.5, mean=0.2, std=1.25)
  got = gold.from_net(np.array([0.3, -0.2, 1.0]), [f' {ok}', f' {bad}', f' {ok} {bad}'])
  want = [(0.3 + 0.5 * 1 - 0.2) / 1.25, (-0.2 + 0 - 0.2) / 1.25, (1.0 + 0.5 * 0.5 - 0.2) / 1.25]
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('study')
  out = subprocess.run(CMD + [f'--workdir={workdir}'], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]
  return workdir, out.stdout


@pytest.mark.slow
def test_smoke_study_writes_results_plot_and_report(smoke):
  workdir, stdout = smoke
  assert f'report: {workdir / "report.md"}' in stdout
  results = json.loads((workdir / 'results.json').read_text())
  bon = [c for c in results['curves'] if c['optimizer'] == 'bon']
  rl = [c for c in results['curves'] if c['optimizer'] == 'rl']
  assert sorted((c['method'], c['ensemble']) for c in bon) == [
      ('mean', 'finetune'), ('mean', 'pretrain'), ('single', None), ('uwo', 'finetune'), ('warm', 'finetune'),
      ('wco', 'finetune')]
  for c in bon:
    n = len(c['n'])
    assert c['optimizer'] == 'bon' and c['n'] == sorted(c['n'])
    assert len(c['kl']) == len(c['proxy_reward']) == len(c['gold_reward']) == len(c['kl_plugin']) == n
    assert len(c['grammatical']) == n and all(0 <= x <= 1 for x in c['grammatical'])
    # relative to the base policy: zero at n = 1 (scores are float32, so to 1e-6)
    assert c['gold_reward'][0] == pytest.approx(0.0, abs=1e-6)
    assert c['proxy_reward'][0] == pytest.approx(0.0, abs=1e-6)
    assert np.all(np.diff(c['proxy_reward']) >= -1e-9)  # the optimized reward rises with n
    assert np.all(np.asarray(c['kl_plugin']) <= np.asarray(c['kl']) + 1e-9)  # the bound bounds it
  # RL: one curve per (objective, seed, KL coefficient), read at iterations 0, 2, 4 and the extra 1.
  assert sorted((c['method'], c['kl_coef']) for c in rl) == [
      ('log_sigmoid', 0.0), ('log_sigmoid', 0.05), ('uwo', 0.0), ('uwo', 0.05), ('warm', 0.0), ('warm', 0.05)]
  for c in rl:
    assert c['step'] == [0, 1, 2, 4] and c['seed'] == 0
    assert len(c['kl']) == len(c['proxy_reward']) == len(c['gold_reward']) == len(c['length']) == 4
    assert len(c['grammatical']) == 4 and all(0 <= x <= 1 for x in c['grammatical'])
    # step 0 is the base policy: the policy equals its reference, so the KL is exactly 0
    assert c['kl'][0] == 0.0 and c['gold_reward'][0] == 0.0 and c['proxy_reward'][0] == 0.0
    assert c['kl'][-1] > 0
  # DPO: one curve per (seed, β), read at its checkpoints 0, 2, 4, as RL is.
  dpo = [c for c in results['curves'] if c['optimizer'] == 'dpo']
  assert [(c['method'], c['kl_coef']) for c in dpo] == [('dpo', 0.1)]
  assert dpo[0]['step'] == [0, 2, 4] and dpo[0]['kl'][0] == 0.0 and dpo[0]['gold_reward'][0] == 0.0
  assert dpo[0]['fits']['gold']['form'] in ('bon', 'rl')
  for png in ('bon_gold_proxy.png', 'rl_gold_proxy.png', 'dpo_gold_proxy.png'):
    assert (workdir / png).stat().st_size > 10_000
  # proxy size x data size: (32, 1) and (64, 2) x 128 and 256 pairs; (64, 2) with all pairs is the single proxy
  sweep = {(c['proxy_size'], c['num_train']): c for c in results['size_sweep']}
  assert sorted(sweep) == [('32x1', 128), ('32x1', 256), ('64x2', 128), ('64x2', 256)]
  single = next(c for c in bon if c['method'] == 'single')
  assert sweep['64x2', 256]['gold_reward'] == single['gold_reward']
  assert sweep['32x1', 128]['gold_reward'] != sweep['32x1', 256]['gold_reward']
  # parameters by hand, vocabulary 259: embedding + layers x (2 norms, fused qkv, out, fused gate-up, down)
  # + final norm + head (weight, bias); heads of 16 dims, MLP 4·⌈2w/3⌉
  by_hand = lambda w, layers, heads, kv, mlp: (259 * w + layers * (2 * w + w * (heads + 2 * kv) * 16
                                                                   + heads * 16 * w + w * 2 * mlp + mlp * w) + w + w + 1)
  assert sweep['32x1', 128]['proxy_params'] == by_hand(32, 1, 2, 1, 88) == 19_937
  assert sweep['64x2', 256]['proxy_params'] == by_hand(64, 2, 4, 2, 172)  # PERF_NOTES tiny's shape
  for c in sweep.values():
    assert c['n'] == single['n'] and c['gold_reward'][0] == pytest.approx(0.0, abs=1e-6)
    assert 0.0 <= c['agreement'] <= 1.0 and np.isfinite(c['fits']['gold']['alpha'])
  from rmjax.train import checkpoint
  (proxy_128,) = list((workdir / 'proxy_32x1_n128').iterdir())
  assert max(checkpoint.saved_steps(proxy_128 / 'checkpoints')) == 10  # 20 steps x 128 / 256 pairs
  assert (workdir / 'bon_sizes.png').stat().st_size > 10_000
  report = (workdir / 'report.md').read_text()
  assert '## Proxy size and data size' in report and '| 32x1 | 19,937 | 128 |' in report
  assert '| single |' in report and '## Stages' in report and 'n=16' in report and '## RL (RLOO)' in report
  assert '| uwo | 0.05 | 1 |' in report


@pytest.mark.slow
def test_smoke_study_rerun_with_redo_skips_upstream_and_reruns_downstream(smoke):
  workdir, _ = smoke
  out = subprocess.run(CMD + [f'--workdir={workdir}', '--redo=bon'], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  # policy, gold, pairs, proxies, warm, backbones, proxies_pretrain, ref_rewards and the RL and DPO stages
  # (which do not read best-of-n) are reused
  # the size sweep's language model and proxies are reused; only their best-of-n scores rerun
  assert out.stdout.count('skipped') == 16 and '[bon] running' in out.stdout and '[report] running' in out.stdout
  assert '[rl_uwo] done before' in out.stdout and '[bon_warm] running' in out.stdout
  assert '[bon_pretrain] running' in out.stdout
  assert '[proxy_32x1_n128] done before' in out.stdout and '[bon_32x1_n128] running' in out.stdout


@pytest.mark.slow
def test_smoke_study_warm_is_the_members_weight_average(smoke):
  from rmjax.train import checkpoint
  workdir, _ = smoke
  (proxies,), (warm,) = (list((workdir / name).iterdir()) for name in ('proxies', 'warm'))
  members, _ = checkpoint.load(proxies / 'checkpoints')
  averaged, meta = checkpoint.load(warm / 'checkpoints')
  assert meta['model']['num_members'] == 1 and meta['role'] == 'warm'
  flat_members = dict(_leaves(members['params']))
  for path, leaf in _leaves(averaged['params']):
    member_leaves = flat_members[path]
    assert leaf.shape == (1, *member_leaves.shape[1:])
    np.testing.assert_allclose(leaf[0], member_leaves.mean(axis=0), rtol=1e-6, atol=1e-7)  # float32 means
  assert meta['normalization']['std'][0] > 0 and 0.0 <= meta['eval']['eval/gold_accuracy'] <= 1.0


@pytest.mark.slow
def test_smoke_study_pretrain_members_start_from_different_pretrained_backbones(smoke):
  from rmjax.train import checkpoint
  workdir, _ = smoke
  (policy,), (backbones,) = (list((workdir / name).iterdir()) for name in ('policy', 'backbones'))
  lm, _ = checkpoint.load(policy / 'checkpoints')
  other, _ = checkpoint.load(backbones / 'seed_1' / 'checkpoints')
  embed = lambda state: np.asarray(state['params']['backbone']['embed']['embedding'])
  assert embed(lm).shape == embed(other).shape and not np.allclose(embed(lm), embed(other))


@pytest.mark.slow
def test_smoke_study_log_sigmoid_reference_is_the_single_proxys_base_policy_rewards(smoke):
  workdir, _ = smoke
  (folder,) = list((workdir / 'ref_rewards').iterdir())
  ref = np.load(folder / 'ref_samples.npy')
  assert ref.shape == (64 + 8, 8)  # world.num_prompts + bon.num_prompts prompt ids, log_sigmoid.ref_samples each
  # normalized on base-policy samples, so about mean 0 and std 1 (8 x 72 samples here)
  assert abs(ref.mean()) < 0.5 and 0.5 < ref.std() < 2.0


def test_size_sweep_models_and_bad_sizes():
  from configs.study import overoptimization as study_config
  from experiments import overoptimization
  config = study_config.get_config('smoke')
  tiny = overoptimization.size_model(config, 64, 2)
  assert config_lib.model_config(tiny) == config_lib.model_config(config_lib.model('tiny'))
  m = overoptimization.size_model(config, 96, 3)
  assert (m.width, m.mlp_width, m.num_layers, m.num_heads, m.num_kv_heads) == (96, 256, 3, 6, 3)
  for field, value, message in (('models', ((40, 2),), r'\(40, 2\) is not \(width, layers\)'),
                                ('num_train', (512,), r'512 is not a pair count in 1..data.num_train=256'),
                                ('num_train', (), r'give both')):
    bad = study_config.get_config('smoke')
    bad.sizes[field] = value
    with pytest.raises(config_lib.ConfigError, match=f'config.sizes.*{message}'):
      overoptimization.validate(bad)
  bad = study_config.get_config('smoke')
  bad.rl.extra_evals = (0, 2)
  with pytest.raises(config_lib.ConfigError, match=r'extra_evals: \[0\] are not iterations in 1..rl.iterations-1=3'):
    overoptimization.validate(bad)
  bad = study_config.get_config('smoke')
  bad.proxy.model.width = 32
  with pytest.raises(config_lib.ConfigError, match='config.proxy.model differs from world.policy.model'):
    overoptimization.validate(bad)


def test_first_rows_of_the_training_pairs():
  from experiments.rm_world import _Head
  from rmjax.data import pipeline
  from rmjax.data.tokenizer import ByteTokenizer
  rows = [{'prompt_id': i, 'prompt': f'p{i}', 'chosen': 'a', 'rejected': 'b'} for i in range(10)]
  head = _Head(rows, 6)
  assert len(head) == 6 and head[5] is rows[5]
  with pytest.raises(IndexError):
    head[6]
  batches = pipeline.PairBatches(head, ByteTokenizer(), seq_len=16, global_batch_size=4, seed=0)
  seen = np.concatenate([batches[s]['index'] for s in range(6)])  # steps over several epochs
  assert set(seen[seen >= 0]) == set(range(6))
  with pytest.raises(ValueError, match='n=11 is not in 1..10'):
    _Head(rows, 11)


def _leaves(tree, prefix=''):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _leaves(v, f'{prefix}/{k}')
  else:
    yield prefix, np.asarray(tree)


def test_rl_config_wires_each_objective_to_its_model_and_options(tmp_path):
  # Every study option reaches the RL trainer's config (PITFALLS #3): a changed value changes it.
  from configs.study import overoptimization as study_config
  from experiments import study_rl
  config = study_config.get_config('smoke')
  config.log_sigmoid.q, config.uwo.lam = 0.25, 0.7
  dirs = [tmp_path / name for name in ('policy', 'gold', 'reward')]
  ls = study_rl.rl_config(config, 'log_sigmoid', *dirs, ref_samples=tmp_path / 'ref.npy')
  assert ls.objective.reward == 'mean,log_sigmoid,kl_penalty'
  assert ls.objective.log_sigmoid.to_dict() == {'ref': 'quantile', 'q': 0.25}
  assert ls.reward.members == '0' and ls.reward.ref_samples == str(tmp_path / 'ref.npy')
  uwo = study_rl.rl_config(config, 'uwo', *dirs)
  assert uwo.objective.reward == 'uwo,kl_penalty' and uwo.objective.uwo.lam == 0.7
  assert uwo.reward.members == '' and uwo.reward.ref_samples == ''
  warm = study_rl.rl_config(config, 'warm', *dirs)
  assert warm.objective.reward == 'mean,kl_penalty' and warm.reward.path == str(tmp_path / 'reward' / 'checkpoints')
  assert warm.population.hparams.startswith('objective.kl_penalty.beta=')
