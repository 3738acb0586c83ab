"""Evaluation: retrieval, zero-shot classification and an index of your own images.

  protocol      the retrieval protocol: sharded encoders, ranks, Recall@K / RSUM, the
                COCO 1k and MSRVTT 1k-A layouts (pure functions of embeddings)
  search        the sharded blockwise top-k and exact ranks over a gallery
  run           a run's checkpoint on a split -> WORKDIR/eval/retrieval-*.json and PNGs
                (`launch/eval.py`)
  pictures      the example and Recall@K pictures (matplotlib, imported when drawing)
  zeroshot      the prompt-ensemble classifier and its metrics (pure functions of
                embeddings), and the class-name / template files shipped in data/
  zeroshot_run  a run's checkpoint on a labelled image set -> WORKDIR/eval/zeroshot-*.json
                and a PNG of the most-confused classes (`launch/eval.py --task=zeroshot`)
  encoder       what encodes: a run's checkpoint or an export folder, on a mesh
  index         a chunked, resumable embedding index of an image folder or tfds split,
                searched with faiss or exactly in JAX (`launch/index.py`)
"""
