"""configs/sft.py end to end on a local text file: trains, checkpoints, describes itself."""
import json
import pathlib
import subprocess
import sys

import numpy as np

from rmjax.train import checkpoint

ROOT = pathlib.Path(__file__).parent.parent


def test_sft_on_local_text_files(tmp_path):
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('\n'.join(f'the cat number {i} sat on the mat.' for i in range(64)) + '\n')
  out = subprocess.run([sys.executable, '-m', 'rmjax.main', '--config=configs/sft.py:test', f'--workdir={tmp_path}/w',
                        '--config.data.source=files', f'--config.data.files={corpus}', '--config.train.progress=False'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  state, meta = checkpoint.load(tmp_path / 'w' / 'checkpoints')
  assert meta['final'] and meta['kind'] == 'causal_lm' and meta['model']['vocab_size'] == 259
  assert meta['tokenizer']  # the byte tokenizer's description
  losses = [json.loads(l)['train/loss'] for l in (tmp_path / 'w' / 'metrics.jsonl').read_text().splitlines()]
  assert len(losses) == 3 and losses[-1] < losses[0]  # 6 steps, logged every 2: the loss falls
  assert np.all(np.isfinite(np.asarray(state['params']['lm_head']['kernel'])))
