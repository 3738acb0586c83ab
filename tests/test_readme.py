"""README.md's "Using the library" snippet, run exactly as the README shows it."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def _snippet(section: str) -> str:
  text = README.read_text(encoding='utf-8')
  body = text.split(f'\n## {section}\n', 1)[1].split('\n## ', 1)[0]
  blocks = re.findall(r'```python\n(.*?)```', body, flags=re.S)
  assert blocks, f'no python block under "## {section}" in README.md'
  return blocks[0]


def test_using_the_library_snippet_runs_and_reports_every_metric(capsys):
  scope = {}
  exec(compile(_snippet('Using the library'), 'README.md', 'exec'), scope)  # pylint: disable=exec-used
  metrics = {k: float(v) for k, v in scope['metrics'].items()}
  assert set(metrics) == {'loss', 'loss/cross_modal', 'loss/visual', 'loss/textual',
                          'temperature', 'grad_norm', 'learning_rate', 'nonfinite_step'}
  assert metrics['nonfinite_step'] == -1 and int(scope['state'].step) == 1
  # 16 random pairs: the cross-modal and visual terms start at about log(16), chance (at
  # the initial scale 1/0.07 random embeddings land within about 1 of it: 3.37 with the
  # dropout stream of its own); the textual one below it, since its two views differ only
  # by dropout.
  for term in ('loss/cross_modal', 'loss/visual'):
    assert abs(metrics[term] - np.log(16)) < 1.0, (term, metrics[term])
  assert 0 < metrics['loss/textual'] < np.log(16) - 0.5, metrics['loss/textual']
  weighted = (metrics['loss/cross_modal'] + 0.2 * metrics['loss/visual']
              + 0.2 * metrics['loss/textual'])
  assert abs(metrics['loss'] - weighted) < 1e-5, (metrics['loss'], weighted)
  assert 'nonfinite_step' in capsys.readouterr().out  # the snippet's own print
