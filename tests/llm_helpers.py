"""Tiny random decoders saved by ``transformers``, and ``python -m train.llm``.

The references of the LLM tests: ``transformers`` builds each model small and
random from its config, with every norm weight random too (so a missing
``1 +`` in Gemma's norm or a swapped norm shows), and saves it as
safetensors; our loader reads the folder as it would a published one.
"""

import contextlib
import subprocess
import sys

import numpy as np

from configs.commonsense import DATASETS  # pylint: disable=unused-import
from tests import trainlib

# Halves XLA:CPU's compile time (LLVM without optimisation) in the tests'
# subprocesses; a run and its resumption use the same flags.
FAST_COMPILE = '--xla_backend_optimization_level=0'
SIZES = dict(vocab_size=96, hidden_size=32, intermediate_size=48,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def _configs():
  import transformers  # pylint: disable=g-import-not-at-top
  return {
      # rope_theta 1e4 (LLaMA-1/2's): Tunix's default 1e6 would show.
      'llama': (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                dict(num_hidden_layers=2, rope_theta=10_000.0,
                     rms_norm_eps=1e-5)),
      # Llama 3.1's scaling, with an original context short enough that
      # every frequency band occurs in 40 positions.
      'llama31': (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                  dict(num_hidden_layers=2, rope_theta=500_000.0,
                       rope_scaling={'rope_type': 'llama3', 'factor': 8.0,
                                     'low_freq_factor': 1.0,
                                     'high_freq_factor': 4.0,
                                     'original_max_position_embeddings': 16},
                       max_position_embeddings=128)),
      'qwen3': (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                dict(num_hidden_layers=2, rope_theta=10_000.0,
                     tie_word_embeddings=True)),
      # Seven layers: the sixth is global; a window of 8 within 40 tokens.
      'gemma3': (transformers.Gemma3TextConfig,
                 transformers.Gemma3ForCausalLM,
                 dict(num_hidden_layers=7, sliding_window=8,
                      query_pre_attn_scalar=8,
                      rope_scaling={'rope_type': 'linear', 'factor': 4.0})),
  }


FAMILIES = ('llama', 'llama31', 'qwen3', 'gemma3')


def save_tiny(kind: str, directory: str, *, seed: int = 0,
              init_scale: float = 0.2, **overrides) -> str:
  """A random ``kind`` model saved as safetensors in ``directory``."""
  import torch  # pylint: disable=g-import-not-at-top
  config_cls, model_cls, extra = _configs()[kind]
  torch.manual_seed(seed)
  config = config_cls(**{**SIZES, **extra, 'initializer_range': init_scale,
                         'bos_token_id': 1, 'eos_token_id': 2,
                         'pad_token_id': 0, **overrides})
  model = model_cls(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
  model.save_pretrained(directory, safe_serialization=True)
  return directory


def transformers_logits(directory: str, tokens: np.ndarray, *,
                        float64: bool = False) -> np.ndarray:
  """``transformers``' logits in float32, or all in float64 (its float32
  islands promoted too, see :func:`torch_float32_promoted`)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  dtype = torch.float64 if float64 else torch.float32
  with torch_float32_promoted() if float64 else contextlib.nullcontext():
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype).eval()
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    wrong = [n for n, x in tensors.items()
             if x.is_floating_point() and x.dtype != dtype]
    assert not wrong, f'not {dtype}: {wrong}'
    with torch.no_grad():
      return model(torch.tensor(tokens)).logits.numpy()


# -- Float64 runs of both libraries --------------------------------------------
#
# The float32 parity tests cannot tell a small real difference of computation
# from float32 rounding; the same two models run in float64 can (they agree
# to ~1e-14 when the computation is the same). Both libraries upcast some
# steps to float32 on purpose (norms' variance, softmax, RoPE angles), which
# in a float64 run would round there: these two contexts promote those
# float32 upcasts to float64, running each library's own code unchanged.

@contextlib.contextmanager
def torch_float32_promoted():
  """In ``transformers``' code: ``.float()``, ``.to(torch.float32)``,
  ``softmax(dtype=torch.float32)`` and new tensors (its RoPE frequencies,
  Gemma's embedding scale) in float64."""
  import torch  # pylint: disable=g-import-not-at-top
  functional = torch.nn.functional
  to, softmax = torch.Tensor.to, functional.softmax
  promote = lambda d: torch.float64 if d is torch.float32 else d

  def promoted_to(self, *args, **kwargs):
    if 'dtype' in kwargs:
      kwargs['dtype'] = promote(kwargs['dtype'])
    return to(self, *map(promote, args), **kwargs)

  def promoted_softmax(x, *args, dtype=None, **kwargs):
    return softmax(x, *args, dtype=promote(dtype), **kwargs)

  saved = torch.Tensor.float, torch.get_default_dtype()
  torch.Tensor.to, functional.softmax = promoted_to, promoted_softmax
  torch.Tensor.float = lambda self, *a, **k: to(self, torch.float64)
  torch.set_default_dtype(torch.float64)
  try:
    yield
  finally:
    torch.Tensor.to, functional.softmax = to, softmax
    torch.Tensor.float = saved[0]
    torch.set_default_dtype(saved[1])


class _Float32IsFloat64:
  """``jax.numpy`` with ``float32`` meaning ``float64``."""

  def __getattr__(self, name):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    return jnp.float64 if name == 'float32' else getattr(jnp, name)


@contextlib.contextmanager
def jax_float64():
  """JAX with float64 on, models loadable with ``dtype='float64'``, and
  Tunix's Llama 3 and Qwen 3 (whose norms and softmax cast to
  ``jnp.float32``) computing those steps in float64. Tunix's Gemma 3 computes
  in its inputs' dtype and needs nothing."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from tunix.models.llama3 import model as llama3  # pylint: disable=g-import-not-at-top
  from tunix.models.qwen3 import model as qwen3  # pylint: disable=g-import-not-at-top
  from train.language import families  # pylint: disable=g-import-not-at-top
  modules = (llama3, qwen3)
  saved = [m.jnp for m in modules]
  for m in modules:
    m.jnp = _Float32IsFloat64()
  families.DTYPES['float64'] = jnp.float64
  try:
    with jax.enable_x64(True):
      yield
  finally:
    del families.DTYPES['float64']
    for m, numpy_module in zip(modules, saved):
      m.jnp = numpy_module


# Rounding grows with depth and with the logits' size: a forward pass in a
# float type of machine epsilon eps is held to PER_LAYER * layers * eps *
# max|logit|. Measured on the tiny models here (per layer, in units of eps *
# max|logit|): ours against transformers' in float32, 4 to 12 (15 for Gemma 3
# on the CPU where a flat 1e-4 failed); each float32 run against the float64
# one, 3 to 9; float64 against float64, 4 to 15. Gemma 3's 8x Llama's error
# is its 7 layers to 2 and logits of 8 to 4: per layer and logit size, both
# are 11.6. A real difference of computation (a norm's 1 +, the embedding's
# scale, a RoPE base, the window) moves logits 1e4 times the float32 bound;
# one small enough to hide in float32 (a norm epsilon of 1e-5 for 1e-6:
# 0.8x the bound) is 1e8 times the float64 bound.
PER_LAYER = 64


def rounding_tolerance(logits: np.ndarray, num_layers: int,
                       dtype=np.float32) -> float:
  """What rounding alone can move a ``num_layers`` model's ``logits`` by."""
  return (PER_LAYER * num_layers * float(np.finfo(dtype).eps)
          * float(np.abs(logits).max()))


def mesh(shape=(1, 1, 1), devices=None):
  import jax  # pylint: disable=g-import-not-at-top
  devices = np.asarray(devices if devices is not None else
                       jax.devices()[:int(np.prod(shape))]).reshape(shape)
  return jax.sharding.Mesh(devices, ('data', 'fsdp', 'tp'),
                           axis_types=(jax.sharding.AxisType.Auto,) * 3)


# -- python -m train.llm, as users run it -------------------------------------

def llm_command(workdir, *overrides, config='configs/commonsense.py:smoke'):
  return [sys.executable, '-m', 'train.llm', f'--config={config}',
          f'--workdir={workdir}', *overrides]


def llm_env(cache_dir, num_devices=1):
  """One device (or ``num_devices`` fake ones); compiled programs shared
  between the runs of a test through JAX's persistent cache."""
  env = trainlib.env_with_devices(
      num_devices, JAX_COMPILATION_CACHE_DIR=str(cache_dir),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  env['XLA_FLAGS'] += ' ' + FAST_COMPILE
  return env


def run_llm(workdir, *overrides, cache_dir, check=True, timeout=300,
            num_devices=1):
  result = subprocess.run(llm_command(workdir, *overrides),
                          env=llm_env(cache_dir, num_devices),
                          cwd=trainlib.REPO, capture_output=True, text=True,
                          timeout=timeout)
  if check:
    assert result.returncode == 0, (
        f'train.llm failed (exit {result.returncode}):\n'
        f'{result.stderr[-6000:]}')
  return result


def start_llm(workdir, *overrides, cache_dir):
  return subprocess.Popen(llm_command(workdir, *overrides),
                          env=llm_env(cache_dir), cwd=trainlib.REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)


def final_state(workdir):
  """(adapters, optimizer state, metrics rows without timings)."""
  from train.llm import loop  # pylint: disable=g-import-not-at-top
  model, opt, rows = trainlib.final_state(workdir)
  rows = [{k: v for k, v in r.items() if k not in loop.TIMING_KEYS}
          for r in rows]
  return model, opt, rows
