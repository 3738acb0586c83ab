"""Hugging Face / PyTorch interop: pretrained towers in, transformers checkpoints out.

  hf_import    BERT / ViT folders -> our towers (`configure_pretrained_towers`,
               `apply_pretrained_towers`, `load_tower`)
  partner      frozen imported towers as partner encoders (`load_partner_encoder`)
  hf_export    a run or a parameter dict -> transformers folders (`export_run`,
               `export_params`, `read_export`)
  torch_model  `CookieTorchModel`, the exported model in PyTorch (torch + transformers
               only; imported only inside `hf_automodel.write_automodel`)
  hf_automodel the export's AutoModel files (`hf_export` calls it; needs torch), with the
               remote code it copies into the folder: configuration_cookie.py,
               modeling_cookie.py (`CookieModel`, a PreTrainedModel around
               `CookieTorchModel`, also the zero-shot pipeline's model),
               image_processing_cookie.py (the eval view) and processing_cookie.py
               (`CookieProcessor`: text and images in one call)
  clip_benchmark_cookie  the export with open_clip's interface, for CLIP_benchmark (torch
               only; copied into the folder)
  model_card   the export's README.md
  keys         the one name table all of them share

Nothing here imports torch at import time: only reading a pytorch_model.bin does, and
writing the AutoModel files of an export.
"""

# torch's CPU build from the public PyTorch index: a plain `pip install torch` on Linux
# pulls a CUDA build of several GB, which an export or a checkpoint read does not need.
TORCH_CPU_INSTALL = 'pip install torch --index-url https://download.pytorch.org/whl/cpu'
