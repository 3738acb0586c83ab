r"""Exports a trained run to PyTorch / transformers:
`python launch/export_torch.py --workdir=DIR [--step=N] --output=OUT`.

OUT/text_encoder and OUT/image_encoder load with `transformers.BertModel` / `ViTModel`;
`CookieTorchModel.from_pretrained(OUT)` (OUT/torch_model.py) gives the full model's
embeddings; OUT itself loads with transformers' Auto classes and zero-shot pipeline
(`trust_remote_code=True`) and with CLIP_benchmark (OUT/clip_benchmark_cookie.py), and
OUT/README.md is its model card. See cookie_jax/interop/hf_export.py.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'The workdir of a training run (holding checkpoints/).')
flags.DEFINE_integer('step', -1, 'Which checkpoint step to export; -1 = the latest.')
flags.DEFINE_string('output', None, 'The folder to write the export to.')
flags.mark_flags_as_required(['workdir', 'output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from cookie_jax import cli  # pylint: disable=g-import-not-at-top
  from cookie_jax.interop import hf_export  # pylint: disable=g-import-not-at-top
  cli.quiet_library_logs()
  step = None if FLAGS.step < 0 else FLAGS.step
  result = cli.run_or_exit(lambda: hf_export.export_run(FLAGS.workdir, FLAGS.output, step))
  tokenizer = '' if result['tokenizer'] else ' (no tokenizer; see the warning above)'
  print(f"Exported step {result['step']} to {result['output']}{tokenizer}.")


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from cookie_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
