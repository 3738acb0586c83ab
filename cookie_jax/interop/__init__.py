"""Hugging Face / PyTorch interop: pretrained towers in, transformers checkpoints out.

  hf_import    BERT / ViT folders -> our towers (`configure_pretrained_towers`,
               `apply_pretrained_towers`, `load_tower`)
  partner      frozen imported towers as partner encoders (`load_partner_encoder`)
  hf_export    a run or a parameter dict -> transformers folders (`export_run`,
               `export_params`, `read_export`)
  torch_model  `CookieTorchModel`, the exported model in PyTorch (torch + transformers
               only; never imported by the modules above)
  keys         the one name table all of them share

Nothing here imports torch at import time: only reading a pytorch_model.bin does, and
`torch_model` itself, which the JAX side never imports.
"""
