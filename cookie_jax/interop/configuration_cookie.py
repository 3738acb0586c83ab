"""The configuration of the COOKIE transformers model (`modeling_cookie.CookieModel`).

Remote code: an export copies this file into its folder, where
`transformers.AutoConfig.from_pretrained(OUT, trust_remote_code=True)` finds it through
`auto_map` in config.json. It needs transformers (>= 5.20, the first with
`SubConfigSpec`; 5.0 to 5.19 lack it) only.
"""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


class CookieConfig(PreTrainedConfig):
  """The two towers' configs plus what sits on top of them.

  text_config / vision_config: the text (`BertModel`, `RobertaModel`, `XLMRobertaModel`)
    and vision towers (the same configs as
    the export's text_encoder/ and image_encoder/ folders).
  cookie: the contents of cookie_config.json (pooling, the weight-sharing transformer,
    projection heads, temperature, the video mode); see `torch_model.CookieTorchModel`.
  cookie_jax: the JAX model config (`config.model`) and preprocessing (`data`) the export
    was written from, so that cookie_jax can rebuild the JAX model from this folder.
  """

  model_type = 'cookie'
  # text_config: the class its model_type names (bert, roberta, xlm-roberta);
  # vision_config: the class its model_type names (vit, clip_vision_model,
  # siglip_vision_model, dinov2, dinov2_with_registers).
  sub_configs_defaults = {'text_config': SubConfigSpec(AutoConfig, model_type='bert'),
                          'vision_config': SubConfigSpec(AutoConfig, model_type='vit')}

  text_config: dict | PreTrainedConfig | None = None
  vision_config: dict | PreTrainedConfig | None = None
  cookie: dict | None = None
  cookie_jax: dict | None = None
