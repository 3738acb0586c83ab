"""tfds builders: `synthetic` (generated, the default) and `karpathy` (COCO / Flickr30K)."""
