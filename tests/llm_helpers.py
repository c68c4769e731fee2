"""Tiny random decoders saved by ``transformers``, and ``python -m train.llm``.

The references of the LLM tests: ``transformers`` builds each model small and
random from its config, with every norm weight random too (so a missing
``1 +`` in Gemma's norm or a swapped norm shows), and saves it as
safetensors; our loader reads the folder as it would a published one.
"""

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


def transformers_logits(directory: str, tokens: np.ndarray) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=torch.float32).eval()
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


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
