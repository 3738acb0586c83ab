"""The processor of a COOKIE export: text and images in one call, as `CLIPProcessor`.

Remote code: `AutoProcessor.from_pretrained(OUT, trust_remote_code=True)` finds it through
`auto_map` in processor_config.json. It needs transformers (>= 5) only.

    processor = AutoProcessor.from_pretrained(OUT, trust_remote_code=True)
    inputs = processor(text=captions, images=pictures, return_tensors='pt', padding=True)
    logits = model(**inputs).logits_per_image          # [images, texts]

The tokenizer is the export's (the training tokenizer: BERT's, or RoBERTa's; pass
`truncation=True` for texts longer than the model's `max_len`), the image processor
`CookieImageProcessor` (cookie_jax's evaluation view).
"""

from transformers import ProcessorMixin


class CookieProcessor(ProcessorMixin):
  """`CookieImageProcessor` and the export's tokenizer as one processor."""

  def __init__(self, image_processor=None, tokenizer=None, **kwargs):
    super().__init__(image_processor, tokenizer, **kwargs)


__all__ = ['CookieProcessor']
