r"""Every performance figure we promise, measured in one command on this device.

Run:  python -m benchmarks.device_check [--size full|small] [--json PATH]
      [--sections optimizer_step vit_train_step llm_lora_step] [--vit_batch N]

On whatever devices JAX sees, side by side in one process and as ratios to
``optax.adamw`` (medians of interleaved rounds, ``benchmarks.timing``):

1. ``optimizer_step``: one jitted, donating optimizer step
   (``benchmarks.optimizer_step``) of ``adamw``, ``adamspd`` with a float32
   and a bfloat16 anchor, ``adaml2sp`` and FTP's ``adamftp``, on
   the parameter shapes of ViT-B/16 and ViT-L/14 and on the LoRA adapters of
   Llama-3-8B (rank 32 on q, k, v, up, down; there also ``adamspd`` with the
   LoRA recipe's zero anchor, which stores nothing): median time, optimizer
   state bytes, XLA's compiled memory analysis, and the peak device memory of
   the step (params, gradients, state, temporaries). The peak comes from
   ``device.memory_stats()``, which only GPUs and TPUs give; JAX cannot reset
   a peak, so each optimizer is measured in a process of its own (run side by
   side, before this one touches the device), its shape sets smallest first;
   where the backend has no memory stats the peak is null.
2. ``vit_train_step``: ``train.vision.finetune.train_step`` of ViT-B/16 at 224 px
   with bfloat16 activations (``benchmarks.finetune_throughput``), AdamW, SPD
   and L2-SP: images/s.
3. ``llm_lora_step``: the LoRA step of ``train.llm`` on a Llama-3-8B-shaped
   model with random bfloat16 weights (``benchmarks.llm_step``), AdamW and
   SPD: tokens/s, and XLA's memory analysis.

Writes one JSON (``--json``, rewritten after each section; metadata: device
kind, JAX version, git commit) and prints one Markdown table. A section that fails is one row with
``"status": "error"`` and the error, and the other sections still run.

``--size full`` is for one accelerator: the published shapes, ViT batch 128,
LLM batch 16 x 256 tokens in two micro-batches (estimated under five minutes
on one H100, most of it compiling; each section's wall time is in the JSON).
``--size small`` shrinks every shape (widths / 8, one layer; tiny models for
the full steps) so that a CPU runs it all in about a minute.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import time

import flax
import jax
import jaxlib
import optax

import spd_optax
from benchmarks import finetune_throughput
from benchmarks import llm_shapes
from benchmarks import llm_step
from benchmarks import optimizer_sets
from benchmarks import optimizer_step
from benchmarks import vit_shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ('optimizer_step', 'vit_train_step', 'llm_lora_step')

SIZES = {
    'full': dict(
        width_div=1, depth=None, repeats=20,
        vit=dict(model='b/16', image_size=224, batch_size=128, rounds=5,
                 steps=3),
        llm=dict(shapes='llama3_8b', dtype='bfloat16', batch=16,
                 micro_batch=8, seq=256, repeats=5)),
    'small': dict(
        width_div=8, depth=1, repeats=5,
        vit=dict(model='mu/4', image_size=32, batch_size=8, rounds=3,
                 steps=1),
        llm=dict(shapes='smoke', dtype='float32', batch=4, micro_batch=2,
                 seq=32, repeats=3)),
}


# -- The three sections ------------------------------------------------------------

def _ratio(value, base):
  return None if value is None or not base else value / base


def _shape_sets(size: str) -> dict[str, dict]:
  return optimizer_sets.shape_sets(SIZES[size]['width_div'],
                                   SIZES[size]['depth'])


def _peaks(size: str) -> dict:
  names = {n for s in _shape_sets(size)
           for n in optimizer_sets.factories(s)}
  return optimizer_sets.peak_memory(sorted(names), SIZES[size]['width_div'],
                                    SIZES[size]['depth'])


def optimizer_rows(size: str, peaks: dict) -> list[dict]:
  rows = []
  for shape_set, shapes in _shape_sets(size).items():
    found = optimizer_sets.factories(shape_set)
    runs = optimizer_step.time_optimizers(shapes, found,
                                          SIZES[size]['repeats'])
    base = runs['adamw']
    base_peak = peaks.get((shape_set, 'adamw'), (None,))[0]
    for name, run in runs.items():
      peak, why = peaks.get((shape_set, name), (None, 'not measured'))
      rows.append(dict(
          section='optimizer_step', shapes=shape_set, optimizer=name,
          status='measured', params=vit_shapes.num_params(shapes),
          median_ms=1e3 * run['median_s'],
          time_vs_adamw=run['median_s'] / base['median_s'],
          state_bytes=run['state_bytes'],
          state_vs_adamw=_ratio(run['state_bytes'], base['state_bytes']),
          peak_bytes=peak, peak_vs_adamw=_ratio(peak, base_peak),
          peak_note=why, xla=run['xla']))
  return rows


def vit_rows(size: str, batch_size=None) -> list[dict]:
  vit = dict(SIZES[size]['vit'])
  vit['batch_size'] = batch_size or vit['batch_size']
  ips = finetune_throughput.images_per_second(
      vit['model'], vit['image_size'], vit['batch_size'], dtype='bfloat16',
      rounds=vit['rounds'], steps=vit['steps'])
  return [dict(section='vit_train_step', model=vit['model'], optimizer=name,
               status='measured', images_per_s=value,
               throughput_vs_adamw=value / ips['adamw'],
               batch=vit['batch_size'], image_size=vit['image_size'],
               activations='bfloat16') for name, value in ips.items()]


def llm_rows(size: str) -> list[dict]:
  llm = SIZES[size]['llm']
  out = llm_step.time_lora_steps(
      llm_shapes.SHAPES[llm['shapes']], dtype=llm['dtype'], batch=llm['batch'],
      micro_batch=llm['micro_batch'], seq=llm['seq'], repeats=llm['repeats'])
  tokens = llm['batch'] * llm['seq']
  base = tokens / out['adamw']['median_s']
  return [dict(section='llm_lora_step', model=llm['shapes'], optimizer=name,
               status='measured', tokens_per_s=tokens / out[name]['median_s'],
               throughput_vs_adamw=tokens / out[name]['median_s'] / base,
               median_ms=1e3 * out[name]['median_s'],
               state_bytes=out[name]['state_bytes'], xla=out[name]['xla'],
               adapter_params=out['adapter_params'], dtype=llm['dtype'],
               batch=llm['batch'], micro_batch=llm['micro_batch'],
               seq=llm['seq'])
          for name in ('adamw', 'spd')]


# -- The record ------------------------------------------------------------------

def _git(*args) -> str | None:
  try:
    return subprocess.run(['git', *args], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def metadata(size: str) -> dict:
  device = jax.devices()[0]
  status = _git('status', '--porcelain', '--untracked-files=no')
  return dict(
      device_kind=device.device_kind, platform=device.platform,
      device_count=jax.device_count(), jax=jax.__version__,
      jaxlib=jaxlib.__version__, flax=flax.__version__,
      optax=optax.__version__, spd_optax=spd_optax.__version__,
      python=platform.python_version(), git_commit=_git('rev-parse', 'HEAD'),
      git_dirty=None if status is None else bool(status), size=size,
      utc=datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'),
      memory_stats=device.memory_stats() is not None)


def _mb(n) -> str:
  return '-' if n is None else f'{n / 2**20:.1f}'


def _x(ratio) -> str:
  return '-' if ratio is None else f'{ratio:.2f}'


def table(rows: list[dict]) -> str:
  """One Markdown table of every row."""
  lines = ['| section | shapes / model | optimizer | median ms | x adamw'
           ' (time) | images or tokens /s (x adamw) | state x adamw |'
           ' peak MB (x adamw) | XLA temp MB |', '|' + ' --- |' * 9]
  for r in rows:
    where = r.get('shapes') or r.get('model')
    if r['status'] != 'measured':
      lines.append(f'| {r["section"]} | {where} | {r["optimizer"]} |'
                   f' {r["status"]}: {r["reason"]} |' + ' |' * 5)
      continue
    rate = r.get('images_per_s') or r.get('tokens_per_s')
    rate = '-' if rate is None else (
        f'{rate:.1f} ({r["throughput_vs_adamw"]:.3f})')
    median = r.get('median_ms')
    lines.append(
        f'| {r["section"]} | {where} | {r["optimizer"]} |'
        f' {"-" if median is None else f"{median:.2f}"} |'
        f' {_x(r.get("time_vs_adamw"))} | {rate} |'
        f' {_x(r.get("state_vs_adamw"))} |'
        f' {_mb(r.get("peak_bytes"))} ({_x(r.get("peak_vs_adamw"))}) |'
        f' {_mb((r.get("xla") or {}).get("temp"))} |')
  return '\n'.join(lines)


def _write(record: dict, path: str):
  with open(path, 'w') as f:
    json.dump(record, f, indent=1)


def run(size: str, sections, path: str, vit_batch=None) -> dict:
  """The whole check: ``{'metadata', 'rows', 'wall_s'}``, written to
  ``path`` after each section, so that a section that fails (its error is
  a row) or a window that closes early keeps what was measured."""
  peaks, wall = {}, {}
  if 'optimizer_step' in sections:  # Before this process takes the device.
    start = time.perf_counter()
    peaks = _peaks(size)
    wall['peak_memory'] = time.perf_counter() - start
  record = dict(metadata=metadata(size), rows=[], wall_s=wall)
  measure = {'optimizer_step': lambda: optimizer_rows(size, peaks),
             'vit_train_step': lambda: vit_rows(size, vit_batch),
             'llm_lora_step': lambda: llm_rows(size)}
  for section in (s for s in SECTIONS if s in sections):
    start = time.perf_counter()
    try:
      record['rows'] += measure[section]()
    except Exception as e:  # pylint: disable=broad-except
      record['rows'].append(dict(section=section, model='-', optimizer='-',
                                 status='error', reason=repr(e)[:1000]))
    wall[section] = time.perf_counter() - start
    _write(record, path)
  stats = jax.devices()[0].memory_stats()
  record['metadata']['process_peak_bytes'] = (
      None if stats is None else stats['peak_bytes_in_use'])
  return record


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', choices=sorted(SIZES), default='full')
  parser.add_argument('--json', default='device_check.json',
                      help='where the record goes')
  parser.add_argument('--sections', nargs='+', choices=SECTIONS,
                      default=list(SECTIONS))
  parser.add_argument('--vit_batch', type=int, default=None,
                      help="the ViT step's batch instead of the size's")
  args = parser.parse_args()
  start = time.perf_counter()
  record = run(args.size, args.sections, args.json, args.vit_batch)
  record['wall_s']['total'] = time.perf_counter() - start
  _write(record, args.json)
  meta = record['metadata']
  print(f'{meta["device_kind"]} x{meta["device_count"]} ({meta["platform"]}),'
        f' JAX {meta["jax"]}, commit {meta["git_commit"]}'
        f'{" (dirty)" if meta["git_dirty"] else ""}, --size {args.size};'
        f' {record["wall_s"]["total"]:.0f} s')
  print(table(record['rows']))
  print(f'Wrote {args.json}')


if __name__ == '__main__':
  main()
