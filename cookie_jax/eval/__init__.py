"""Evaluation beyond retrieval: zero-shot classification and an index of your own images.

  zeroshot      the prompt-ensemble classifier and its metrics (pure functions of
                embeddings), and the class-name / template files shipped in data/
  zeroshot_run  a run's checkpoint on a labelled image set -> WORKDIR/eval/zeroshot-*.json
                and a PNG of the most-confused classes (`launch/eval.py --task=zeroshot`)
  encoder       what encodes: a run's checkpoint or an export folder, on a mesh
  index         a chunked, resumable embedding index of an image folder or tfds split,
                searched with faiss or exactly in JAX (`launch/index.py`)

Retrieval itself stays in cookie_jax/evaluate.py, evaluate_run.py and retrieval.py, which
these modules use.
"""
