"""Eight CPU devices for every test, set before jax is imported anywhere."""

import atexit
import os
import shutil
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update('jax_default_matmul_precision', 'highest')

# Many tests compile the same tiny programs; a compilation cache shared by this session
# (and by the subprocesses its tests start, through the environment) compiles each once.
# It is new for every session, so timings of a run never depend on an earlier one.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='cookie_jax_xla_cache_')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], True)
_CACHE = os.environ['JAX_COMPILATION_CACHE_DIR']
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


# The files whose tests take longest on 2 cores, longest first. `--dist loadfile` hands out
# whole files in collection order, so starting these first keeps one worker from running
# the longest file alone at the end (it did: 7 minutes of one worker idle).
# pytest-xdist >= 3.6 reorders files by their number of tests unless told not to, which
# put test_data_distributed.py (2 tests, 3 minutes) last: a 20 min 46 s run on 2 cores
# ended with one worker on it and the other idle.
# Refreshed from `--durations=0` of the default run after its three longest tests were
# split (2026-12-07): test_train.py 235 s of the workers' time, test_stop.py ~150,
# test_train_step.py 146, test_patch_dropout.py 105, test_eval_cli.py 92, then 70-75 s
# each.
LONGEST_FIRST = ('test_train.py', 'test_stop.py', 'test_train_step.py',
                 'test_patch_dropout.py', 'test_eval_cli.py', 'test_methods.py',
                 'test_freeze.py', 'test_models.py')


def pytest_configure(config):
  if hasattr(config.option, 'loadscopereorder'):  # pytest-xdist's --no-loadscope-reorder
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.path.name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
  items.sort(key=rank)  # stable: each file's tests keep their order
