"""Shapes of decoder LLMs (Hugging Face config.json fields) and their LoRA.

No model is built here: the optimizer benchmarks need the adapters' shapes
alone, and this module imports nothing heavy.
"""

SHAPES = {
    'smoke': dict(model_type='llama', vocab_size=512, hidden_size=64,
                  intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2,
                  rms_norm_eps=1e-5, rope_theta=10_000.0),
    # meta-llama/Meta-Llama-3-8B's config.json.
    'llama3_8b': dict(model_type='llama', vocab_size=128_256,
                      hidden_size=4096, intermediate_size=14_336,
                      num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, rms_norm_eps=1e-5,
                      rope_theta=500_000.0),
}


def lora_adapter_shapes(hf: dict, rank: int,
                        targets) -> dict[str, tuple[int, ...]]:
  """Name -> shape of the LoRA factors (PEFT's layout: ``A`` is
  ``[in, rank]``, ``B`` is ``[rank, out]``) of ``targets`` in every layer of
  the Llama of ``hf``'s shapes."""
  d, inter = hf['hidden_size'], hf['intermediate_size']
  head_dim = d // hf['num_attention_heads']
  kv = hf['num_key_value_heads'] * head_dim
  in_out = {'q_proj': (d, d), 'k_proj': (d, kv), 'v_proj': (d, kv),
            'o_proj': (d, d), 'gate_proj': (d, inter), 'up_proj': (d, inter),
            'down_proj': (inter, d)}
  shapes = {}
  for i in range(hf['num_hidden_layers']):
    for target in targets:
      n_in, n_out = in_out[target]
      shapes[f'layers_{i}/{target}/lora_a'] = (n_in, rank)
      shapes[f'layers_{i}/{target}/lora_b'] = (rank, n_out)
  return shapes
