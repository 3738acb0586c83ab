"""The text towers beyond BERT: RoBERTa and XLM-R, in from a transformers folder and back
out to the same class, compared number for number with transformers' own forward, and
their tokenizers (<s> text </s>, <pad> = 1) as transformers' tokenizer encodes."""

import json

from flax import nnx
import jax
import ml_collections
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
import torch
import transformers

from cookie_jax import sharding
from cookie_jax.config import ConfigError, default_config, validate_config
from cookie_jax.data import tokenizer as tok_lib
from cookie_jax.interop import hf_export, hf_import

TOL = 1e-5  # max abs difference, fp32 (the bar)
MESH = dict(data=2, fsdp=2, tensor=2, dcn_data=1)
VOCAB, MAX_POSITIONS, PAD = 120, 40, 1
SENTENCES = ['a red circle left of a blue square', 'the cat', 'two small green triangles '
             'next to the large shape below the red circle', 'a dog runs', 'hi',
             'a blue square above the triangle', 'the shape', 'green']
# name -> (config class, model class)
CLASSES = {'roberta': (transformers.RobertaConfig, transformers.RobertaModel),
           'xlm-roberta': (transformers.XLMRobertaConfig, transformers.XLMRobertaModel)}


@pytest.fixture(scope='module', autouse=True)
def _torch_threads():
  torch.set_num_threads(2)


def _perturb(module: torch.nn.Module, seed: int) -> None:
  # No tensor at its init value (LayerNorms, the padding rows), so a swap shows.
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _tokenizer(name: str) -> transformers.PreTrainedTokenizerFast:
  """A small tokenizer of the family's kind: RoBERTa's byte-level BPE, XLM-R's
  SentencePiece-style Unigram; <s>=0, <pad>=1, </s>=2, <unk>=3 as theirs."""
  specials = ['<s>', '<pad>', '</s>', '<unk>', '<mask>']
  if name == 'roberta':
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=100, special_tokens=specials)
  else:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=100, special_tokens=specials,
                                      unk_token='<unk>')
  tok.train_from_iterator(SENTENCES * 4, trainer)
  tok.post_processor = (processors.RobertaProcessing(('</s>', 2), ('<s>', 0))
                        if name == 'roberta' else processors.TemplateProcessing(
                            single='<s> $A </s>', pair='<s> $A </s> </s> $B </s>',
                            special_tokens=[('<s>', 0), ('</s>', 2)]))
  assert [tok.token_to_id(t) for t in specials[:4]] == [0, 1, 2, 3]
  assert tok.get_vocab_size() <= VOCAB
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token='<s>', eos_token='</s>', cls_token='<s>',
      sep_token='</s>', pad_token='<pad>', unk_token='<unk>', mask_token='<mask>')


@pytest.fixture(scope='module', params=list(CLASSES))
def folder(request, tmp_path_factory):
  """A small random model of the class and its tokenizer, saved as transformers does."""
  config_cls, model_cls = CLASSES[request.param]
  torch.manual_seed(0)
  model = model_cls(config_cls(
      vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=MAX_POSITIONS, type_vocab_size=1,
      layer_norm_eps=1e-5, pad_token_id=PAD))
  _perturb(model, 0)
  path = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(path)
  tokenizer = _tokenizer(request.param)
  tokenizer.save_pretrained(path)
  return dict(path=path, name=request.param, model=model.eval(), cls=model_cls,
              tokenizer=tokenizer)


def _forward(module, ids, mask, mesh=None):
  """(last hidden state, pooled) of our tower; on `mesh` with its parameters and the
  batch sharded by the training rules."""
  run = nnx.jit(lambda m, i, k: (lambda h: (h, m.pooled(h)))(m(i, k)))
  if mesh is None:
    return tuple(map(np.asarray, run(module, ids, mask)))
  graphdef, state = nnx.split(module)
  nnx.replace_by_pure_dict(state, jax.device_put(nnx.to_pure_dict(state),
                                                 sharding.param_shardings(state, mesh)))
  ids, mask = (jax.device_put(x, sharding.batch_sharding(mesh)) for x in (ids, mask))
  with sharding.activation_sharding(mesh):
    return tuple(map(np.asarray, run(nnx.merge(graphdef, state), ids, mask)))


def _reference(model, ids, mask):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(mask).long())
  return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _encode(folder, max_len):
  """Our tokenisation of SENTENCES from the folder, checked against transformers'."""
  ours = tok_lib.encode(tok_lib.finalize(tok_lib.tokenizer_from_path(str(folder['path'])),
                                         max_len), SENTENCES)
  theirs = transformers.AutoTokenizer.from_pretrained(folder['path'])(
      SENTENCES, padding='max_length', truncation=True, max_length=max_len, return_tensors='np')
  np.testing.assert_array_equal(ours['input_ids'], theirs['input_ids'])
  np.testing.assert_array_equal(ours['attention_mask'], theirs['attention_mask'])
  return ours['input_ids'], ours['attention_mask']


def test_imported_tower_equals_transformers_on_1_and_8_devices_and_exports_back(
    folder, tmp_path):
  module, cfg = hf_import.load_tower(folder['path'], 'text')
  assert (cfg.positions, cfg.pad_token_id, cfg.layer_norm_eps, cfg.type_vocab_size) == (
      'after_padding', PAD, 1e-5, 1)
  assert cfg.hf_class == folder['cls'].__name__
  # Our tokenizer path gives transformers' ids: <s> ... </s>, right-padded with <pad> = 1,
  # the longest sentence truncated; 8 rows of different lengths.
  ids, mask = _encode(folder, 12)
  lengths = mask.sum(1)
  assert (ids[:, 0] == 0).all() and (ids[~mask.astype(bool)] == PAD).all()
  assert len(set(lengths)) >= 5 and lengths.max() == 12 and lengths.min() <= 5
  ref = _reference(folder['model'], ids, mask)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(MESH))
  assert mesh.devices.size == 8
  diffs = {}
  for where, m in (('1 device', None), ('8 devices', mesh)):
    hidden, pooled = _forward(module, ids, mask, m)
    assert hidden.shape == ref[0].shape and pooled.shape == ref[1].shape
    # Every position, the padded ones included (their positions are pad_token_id).
    diffs[where] = (np.abs(hidden - ref[0]).max(), np.abs(pooled - ref[1]).max())
  print(f"{folder['name']} max abs diff (hidden, pooled): {diffs}")
  assert max(max(d) for d in diffs.values()) <= TOL

  # Out to the same class: no missing or unexpected keys, the very tensors, equal outputs.
  params = nnx.to_pure_dict(nnx.state(module))
  hf_export.write_tower(params, 'text', cfg, tmp_path / 'text_encoder')
  model, info = folder['cls'].from_pretrained(tmp_path / 'text_encoder',
                                              output_loading_info=True)
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys'))
  assert (model.config.pad_token_id, model.config.layer_norm_eps) == (PAD, 1e-5)
  again = _reference(model.eval(), ids, mask)
  np.testing.assert_array_equal(again[0], ref[0])
  np.testing.assert_array_equal(again[1], ref[1])
  settings, flat = hf_import.tower_weights(tmp_path / 'text_encoder', 'text')
  assert settings == {k: v for k, v in cfg.items() if 'dropout' not in k}
  assert flat.keys() == {tuple(k.key for k in p)
                         for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  # The exported tokenizer encodes as the folder's (AutoTokenizer of text_encoder/).
  hf_export.write_tokenizer(tok_lib.tokenizer_from_path(str(folder['path'])),
                            tmp_path / 'text_encoder', 12)
  exported = transformers.AutoTokenizer.from_pretrained(tmp_path / 'text_encoder')(
      SENTENCES, padding='max_length', truncation=True, max_length=12, return_tensors='np')
  np.testing.assert_array_equal(exported['input_ids'], ids)


@pytest.mark.slow  # 14 s on the 2-core CPU (the AutoModel export's torch save and load)
def test_text_init_sets_the_options_and_a_run_exports_the_same_class(folder, tmp_path):
  """text_init + data.tokenizer of the folder: sizes and options from config.json, the
  weights loaded; the export's text_encoder/ is the same class, and CookieTorchModel gives
  the JAX model's text embeddings on the tokenizer's padded ids."""
  from cookie_jax.interop.torch_model import CookieTorchModel  # pylint: disable=g-import-not-at-top
  from cookie_jax.models import init_model  # pylint: disable=g-import-not-at-top
  config = default_config('tiny')
  config.model.text_init = config.data.tokenizer = str(folder['path'])
  config.data.max_len = 12
  config.model.shared.depth = 0
  hf_import.configure_pretrained_towers(config)
  t = config.model.text
  assert (t.vocab_size, t.width, t.max_positions, t.type_vocab_size) == (VOCAB, 32, 40, 1)
  assert (t.positions, t.pad_token_id, t.hf_class) == ('after_padding', PAD,
                                                        folder['cls'].__name__)
  validate_config(config)
  model = init_model(config.model, 0)
  params = hf_import.apply_pretrained_towers(config, nnx.to_pure_dict(nnx.state(model)))
  nnx.replace_by_pure_dict(state := nnx.state(model), params)
  nnx.update(model, state)
  ids, mask = _encode(folder, 12)
  ours = np.asarray(nnx.jit(lambda m, i, k: m.encode_text(i, k))(model, ids, mask))
  hf_export.export_params(jax.device_get(params), config.model, tmp_path / 'out')
  _, info = folder['cls'].from_pretrained(tmp_path / 'out' / 'text_encoder',
                                          output_loading_info=True)
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys'))
  with torch.no_grad():
    exported = CookieTorchModel.from_pretrained(tmp_path / 'out').encode_text(
        torch.from_numpy(ids).long(), torch.from_numpy(mask).long()).numpy()
    auto = transformers.AutoModel.from_pretrained(tmp_path / 'out', trust_remote_code=True)
    auto_text = auto.eval().get_text_features(
        input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
  diff = np.abs(exported - ours).max(), np.abs(auto_text.numpy() - ours).max()
  print(f"{folder['name']} export text embeddings max abs diff: torch_model {diff[0]:.2e}, "
        f'AutoModel {diff[1]:.2e}')
  assert max(diff) <= TOL
  # max_len counts the positions below the padding index out: 40 - 2 = 38 at most.
  config.data.max_len = 39
  with pytest.raises(ConfigError, match='max_len=39 exceeds the 38 positions'):
    hf_import.configure_pretrained_towers(config)


def test_bad_text_folders_and_options_are_refused_in_one_line(tmp_path):
  def refused(hf_config, match, **edits):
    path = tmp_path / f'f{len(list(tmp_path.iterdir()))}'
    hf_config.save_pretrained(path)
    if edits:  # fields transformers 5 no longer writes (older checkpoints have them)
      cfg = json.loads((path / 'config.json').read_text())
      (path / 'config.json').write_text(json.dumps(dict(cfg, **edits)))
    with pytest.raises(ConfigError, match=match) as e:
      hf_import.tower_settings(path, 'text')
    assert '\n' not in str(e.value)

  refused(transformers.RobertaConfig(), r"position_embedding_type='relative_key'; the text "
          r"tower computes absolute learned positions \('absolute'\) only",
          position_embedding_type='relative_key')
  refused(transformers.XLMRobertaConfig(hidden_act='relu'), r"hidden_act='relu'.*'gelu'")
  refused(transformers.RobertaConfig(is_decoder=True), r'is_decoder=True.*bidirectional')
  refused(transformers.GPT2Config(), r"model_type='gpt2'.*loads BertModel, RobertaModel, "
          r'XLMRobertaModel .* only')
  refused(transformers.CLIPVisionConfig(), r"model_type='clip_vision_model'.*use it as "
          'image_init')
  # A RoBERTa tower with a tokenizer that pads with another id: every position would shift.
  transformers.RobertaConfig(vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS,
                             hidden_size=32, num_attention_heads=4).save_pretrained(
                                 tmp_path / 'roberta')
  (tmp_path / 'vocab.txt').write_text('\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', 'a']))
  config = default_config('tiny')
  config.model.text_init, config.data.tokenizer = str(tmp_path / 'roberta'), str(
      tmp_path / 'vocab.txt')
  config.data.max_len = 12
  with pytest.raises(ConfigError, match=r'pads with id 0, but .* past pad_token_id=1'):
    hf_import.configure_pretrained_towers(config)
  # A text layout no transformers class computes cannot be validated nor exported.
  config = default_config('tiny')
  config.model.text.hf_class = 'RobertaModel'
  with pytest.raises(ConfigError, match=r"model.text.positions.*RobertaModel computes "
                     r"positions='after_padding'"):
    validate_config(config)
  config.model.text.positions = 'rotary'
  with pytest.raises(ConfigError, match=r"model.text.positions.*'rotary'"):
    validate_config(config)


def test_bert_defaults_are_todays_tower():
  """The default options build the tower of before: positions 0..T-1 whatever the ids."""
  from cookie_jax.models import bert  # pylint: disable=g-import-not-at-top
  config = default_config('tiny').model.text
  assert bert.options(config) == bert.OPTIONS
  assert (config.positions, config.layer_norm_eps, config.hf_class) == (
      'absolute', 1e-12, 'BertModel')
  ids = np.array([[2, 7, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(bert.position_ids(ids, 'absolute', 0), [[0, 1, 2, 3]])
  np.testing.assert_array_equal(bert.position_ids(ids, 'after_padding', 0),
                                [[1, 2, 0, 0], [0, 0, 0, 0]])
  # Older configs without the options read as BERT's.
  old = ml_collections.ConfigDict({k: v for k, v in config.items() if k not in bert.OPTIONS})
  assert bert.options(old) == bert.OPTIONS


def test_text_init_takes_a_hub_id_from_the_cache_offline(folder, tmp_path, monkeypatch):
  """text_init and data.tokenizer as a Hub id, read from a huggingface_hub cache laid out
  here (models--owner--name/{refs/main, snapshots/<commit>/}), offline."""
  import shutil  # pylint: disable=g-import-not-at-top
  commit = '0123456789abcdef0123456789abcdef01234567'
  repo = tmp_path / 'cache' / 'models--someone--tiny-text'
  shutil.copytree(folder['path'], repo / 'snapshots' / commit)
  (repo / 'refs').mkdir()
  (repo / 'refs' / 'main').write_text(commit)
  monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  config = default_config('tiny')
  config.model.text_init = config.data.tokenizer = 'someone/tiny-text'
  config.data.max_len = 12
  hf_import.configure_pretrained_towers(config)
  assert (config.model.text.hf_class, config.model.text.pad_token_id) == (
      folder['cls'].__name__, PAD)
  _, flat = hf_import.tower_weights('someone/tiny-text', 'text')
  assert flat[('position_embeddings', 'embedding')].shape == (MAX_POSITIONS, 32)
