r"""The paper's ablation (Table 4) in miniature: every row and seed, one table, one plot.

  python -m nas_jax.ablate --workdir runs/ablation [--seeds 3] [--config configs/ablation.py[:tiny]]
      [--parallel 6] [--doc docs/ABLATION.md] [--override KEY=VALUE ...]

The runs and rows come from the config file (configs/ablation.py: RUNS, ROWS, TINY_ROWS): per seed,
the stage-1 runs the rows need, then each row's continuation from its stage-1 checkpoint
(`--config.init_from`). Each run is a subprocess `python -m nas_jax.train` in
<workdir>/seed<S>/<run> (its log in train.log there), so several small runs share one GPU: at
most `--parallel` at a time, each allowed 0.9 / parallel of the GPU memory
(XLA_PYTHON_CLIENT_MEM_FRACTION), all sharing one compilation cache (<workdir>/jax_cache), so a
run whose program an earlier run compiled loads it.

Resumable: a run whose eval.json reports its last step is done and skipped; an interrupted one
resumes from its checkpoint (the train CLI does); Ctrl-C or SIGTERM stops every run cleanly (each
saves) so the same command goes on later.

Outputs in <workdir>: ablation.md (results per row: mean ± std over seeds of the synthetic suite,
the main-object foils per attribute, training health at the end of each run), ablation.json (every
number of every run) and ablation.png (results and health curves). `--doc` writes the tables and the
plot (copied beside the doc) between the doc's `<!-- ablation:begin -->` / `<!-- ablation:end -->`
markers (appended when it has none).

Health metrics (from each run's metrics.jsonl; the absent ones are shown as '—'): live VD codes and
code perplexity, the fraction of patches NVA replaced, ITM accuracy per pair group (positives,
in-batch image / text negatives, NVA negatives, NTA negatives), the ITM loss.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Mapping, Sequence

# Columns of the results table: (eval.json key, title, chance %).
RESULT_COLUMNS = (
    ('main_attribute', 'Main obj. attribute', 50.0),
    ('main_object', 'Main obj. replaced', 50.0),
    ('counting', 'Counting', 50.0),
    ('existence', 'Existence', 50.0),
    ('attribute', 'Attribute swap', 50.0),
    ('relation', 'Relation swap', 50.0),
    ('winoground_text', 'Wino text', 25.0),
    ('winoground_image', 'Wino image', 25.0),
    ('winoground_group', 'Wino group', 100 / 6),
    ('txt_r1', 'TR@1', None),
    ('img_r1', 'IR@1', None),
    ('heldout_itm_pairwise', 'ITM held-out', 50.0),
)
DETAIL_COLUMNS = (
    ('main_attribute/colour', 'colour replaced', 50.0),
    ('main_attribute/shape', 'shape replaced', 50.0),
    ('main_attribute/size', 'size replaced', 50.0),
    ('main_object', 'similar object', 50.0),
    ('itm_p_caption', 'ITM says match: captions', None),
    ('itm_p_foil', 'ITM says no match: foils', None),
)
# Training health: (metrics.jsonl key, title). ITM accuracies are fractions in [0, 1].
HEALTH_COLUMNS = (
    ('vd_used_codes', 'live codes'),
    ('vd_perplexity', 'code perplexity'),
    ('nva_replaced_frac', 'NVA replaced'),
    ('itm_acc_pos', 'ITM pos'),
    ('itm_acc_neg_img', 'ITM neg img'),
    ('itm_acc_neg_txt', 'ITM neg txt'),
    ('itm_acc_nva', 'ITM NVA neg'),
    ('itm_acc_nta', 'ITM NTA neg'),
    ('itm_acc', 'ITM all'),
    ('loss_itm', 'ITM loss'),
)
HEALTH_TAIL = 0.2   # Health "at the end" = mean over the last 20 % of a run's logged steps.
DOC_BEGIN, DOC_END = '<!-- ablation:begin -->', '<!-- ablation:end -->'


# ------------------------------------------------------------------------------------------ plan

@dataclasses.dataclass
class Job:
  """One training run: `run` (a key of the config file's RUNS) for one seed."""
  run: str
  seed: int
  workdir: str
  config_spec: str            # path.py:RUN[,tiny]
  total_steps: int            # The step its eval.json reports when it is done (a continuation's
                              # steps follow its stage-1 run's).
  stage1: str | None = None   # Key of the job it continues from.

  @property
  def key(self) -> str:
    return f'seed{self.seed}/{self.run}'


def load_plan_module(config_path: str):
  """The config file as a module (RUNS, ROWS, TINY_ROWS, get_config)."""
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'--config {config_path!r} not found (e.g. configs/ablation.py)')
  spec = importlib.util.spec_from_file_location('nas_jax_ablation_plan', config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for name in ('RUNS', 'ROWS', 'TINY_ROWS', 'get_config'):
    if not hasattr(module, name):
      raise ValueError(f'--config {config_path!r} has no {name}: an ablation config defines RUNS, '
                       'ROWS, TINY_ROWS and get_config (see configs/ablation.py)')
  return module


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, object]]:
  """`KEY=VALUE` strings -> (key, Python literal or string)."""
  out = []
  for item in overrides:
    key, sep, value = item.partition('=')
    if not sep or not key:
      raise ValueError(f'--override {item!r}: use KEY=VALUE, e.g. data.num_workers=4')
    try:
      out.append((key, ast.literal_eval(value)))
    except (ValueError, SyntaxError):
      out.append((key, value))
  return out


def _apply(config, overrides: Sequence[tuple[str, object]]):
  config.unlock()
  for key, value in overrides:
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise ValueError(f'--override {key}: the config has no such key (keys: nas_jax/config_lib.py)')
    node[leaf] = value
  config.lock()
  return config


def make_jobs(config_path: str, tiny: bool, seeds: int, workdir: str,
              overrides: Sequence[tuple[str, object]] = ()) -> tuple[dict[str, Job], list]:
  """Every job of the ablation ({key: Job}, dependencies first) and its rows [(label, run)]."""
  plan = load_plan_module(config_path)
  rows = [(label, run) for label, run in plan.ROWS if not tiny or run in plan.TINY_ROWS]
  needed: list[str] = []
  for _, run in rows:
    stage1 = plan.RUNS[run][0]
    for r in (stage1, run):
      if r is not None and r not in needed:
        needed.append(r)
  needed.sort(key=lambda r: plan.RUNS[r][0] is not None)   # Stage-1 runs first.
  jobs: dict[str, Job] = {}
  for seed in range(seeds):
    for run in needed:
      spec = f'{os.path.abspath(config_path)}:{run}{",tiny" if tiny else ""}'
      config = _apply(plan.get_config(f'{run}{",tiny" if tiny else ""}'), overrides)
      stage1 = plan.RUNS[run][0]
      stage1_key = None if stage1 is None else f'seed{seed}/{stage1}'
      last = int(config.total_steps)
      if stage1_key and config.get('continue_schedule', False):   # Its steps follow stage 1's.
        last += jobs[stage1_key].total_steps
      job = Job(run, seed, os.path.join(workdir, f'seed{seed}', run), spec, last, stage1_key)
      jobs[job.key] = job
  return jobs, rows


def is_done(job: Job) -> bool:
  """A run is done when its eval.json reports its last step (train writes it after the final
  checkpoint, and only when the run was not interrupted)."""
  path = os.path.join(job.workdir, 'eval.json')
  try:
    with open(path) as f:
      return int(json.load(f).get('step', -1)) >= job.total_steps
  except (OSError, ValueError):
    return False


def command(job: Job, jobs: Mapping[str, Job], overrides: Sequence[tuple[str, object]]) -> list[str]:
  cmd = [sys.executable, '-m', 'nas_jax.train', f'--config={job.config_spec}',
         f'--workdir={job.workdir}', f'--config.seed={job.seed}']
  if job.stage1:
    cmd.append(f'--config.init_from={jobs[job.stage1].workdir}')
  cmd += [f'--config.{k}={v}' for k, v in overrides]
  return cmd


# The CPU smoke version runs a handful of steps: compiling is nearly all its time, and XLA's CPU
# backend compiles about twice as fast without LLVM's optimisations.
TINY_XLA_FLAGS = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'


def child_env(workdir: str, parallel: int, tiny: bool = False) -> dict[str, str]:
  """The runs' environment: a share of the GPU memory each, one compilation cache, this nas_jax."""
  env = dict(os.environ)
  if tiny:
    env.setdefault('XLA_FLAGS', TINY_XLA_FLAGS)
  env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', f'{0.9 / parallel:.3f}')
  env.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(os.path.abspath(workdir), 'jax_cache'))
  env.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')   # Evaluation's small programs too.
  env.setdefault('TQDM_MININTERVAL', '30')   # Progress bars into train.log at most twice a minute.
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env['PYTHONPATH'] = os.pathsep.join(p for p in (root, env.get('PYTHONPATH', '')) if p)
  return env


# ------------------------------------------------------------------------------------------ run

def run_jobs(jobs: Mapping[str, Job], parallel: int, env: Mapping[str, str],
             overrides: Sequence[tuple[str, object]] = (), poll_s: float = 0.5,
             progress_s: float = 60.0, out=None) -> dict[str, str]:
  """Runs the jobs not done yet, at most `parallel` at a time, each after its stage-1 job.
  Returns {key: 'skipped' (done before) | 'done' | 'failed' | 'blocked' | 'interrupted'}."""
  status = {k: 'skipped' if is_done(j) else 'pending' for k, j in jobs.items()}
  running: dict[str, tuple[subprocess.Popen, float, object]] = {}
  stop = {'signal': None}

  def on_signal(signum, frame):
    stop['signal'] = signum

  old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
  t0 = time.time()
  say = lambda msg: print(f'[ablate {time.time() - t0:6.0f}s] {msg}', file=out or sys.stdout,
                         flush=True)
  skipped = [k for k, s in status.items() if s == 'skipped']
  if skipped:
    say(f'{len(skipped)} run(s) already done, skipped: {", ".join(skipped)}')
  last_progress = time.time()
  try:
    while True:
      if running and time.time() - last_progress >= progress_s:
        last_progress = time.time()
        done = sum(s in ('done', 'skipped') for s in status.values())
        say(f'{done}/{len(jobs)} done; running: ' + ', '.join(
            f'{k} {_last_step(jobs[k])}/{jobs[k].total_steps}' for k in running))
      for key, (proc, start, log) in list(running.items()):
        rc = proc.poll()
        if rc is None:
          continue
        log.close()
        del running[key]
        ok = rc == 0 and is_done(jobs[key])
        status[key] = 'done' if ok else ('interrupted' if stop['signal'] else 'failed')
        _write_timing(jobs[key], time.time() - start, rc)
        say(f'{key}: {status[key]} in {time.time() - start:.0f}s'
            + ('' if ok else f' (exit {rc}; log {os.path.join(jobs[key].workdir, "train.log")}'
               f'{_tail(jobs[key])})'))
      if stop['signal']:
        if running:
          say(f'{signal.Signals(stop["signal"]).name}: asking {len(running)} run(s) to save and stop')
          for proc, _, _ in running.values():
            if proc.poll() is None:
              proc.send_signal(signal.SIGTERM)
          for key, (proc, start, log) in running.items():
            proc.wait()
            log.close()
            status[key] = 'done' if is_done(jobs[key]) else 'interrupted'
          running.clear()
        for key, s in status.items():
          if s == 'pending':
            status[key] = 'interrupted'
        say('stopped: run the same command again to go on')
        return status
      for key, job in jobs.items():
        if status[key] != 'pending':
          continue
        dep = status.get(job.stage1) if job.stage1 else 'done'
        if dep in ('failed', 'blocked'):
          status[key] = 'blocked'
          say(f'{key}: not run, its stage-1 run {job.stage1} failed')
        elif dep in ('done', 'skipped') and len(running) < parallel:
          os.makedirs(job.workdir, exist_ok=True)
          log = open(os.path.join(job.workdir, 'train.log'), 'a')
          cmd = command(job, jobs, overrides)
          log.write(f'\n$ {" ".join(cmd)}\n')
          log.flush()
          proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(env),
                                  start_new_session=True)   # Signals reach it only through us.
          running[key] = (proc, time.time(), log)
          status[key] = 'running'
          resumed = ' (resuming)' if os.path.isdir(os.path.join(job.workdir, 'checkpoints')) else ''
          say(f'{key}: started{resumed}, {len(running)} running')
      if not running and not any(s == 'pending' for s in status.values()):
        return status
      time.sleep(poll_s)
  finally:
    for s, h in old.items():
      signal.signal(s, h)


def _last_step(job: Job) -> int:
  """The last step in the run's metrics.jsonl (0 before its first log)."""
  steps = [0]
  try:
    with open(os.path.join(job.workdir, 'metrics.jsonl'), 'rb') as f:
      f.seek(max(0, os.path.getsize(f.name) - 8192))   # The end is enough.
      for line in f.read().decode(errors='replace').splitlines():
        try:
          steps.append(int(json.loads(line)['step']))
        except (ValueError, KeyError, TypeError):
          pass   # A line cut by the seek, or being written.
  except OSError:
    pass
  return max(steps)


def _tail(job: Job, n: int = 3) -> str:
  try:
    with open(os.path.join(job.workdir, 'train.log'), errors='replace') as f:
      lines = [l.rstrip() for l in f.read().splitlines()[-200:] if l.strip()]
  except OSError:
    return ''
  errors = [l for l in lines if l.startswith('error:') or 'Error' in l]
  return ': ' + ' | '.join((errors or lines)[-n:])


def _write_timing(job: Job, seconds: float, rc: int) -> None:
  path = os.path.join(job.workdir, 'ablate_timing.json')
  runs = []
  if os.path.isfile(path):
    with open(path) as f:
      runs = json.load(f)
  runs.append({'seconds': round(seconds, 1), 'exit': rc, 'time': time.strftime('%Y-%m-%d %H:%M:%S')})
  with open(path, 'w') as f:
    json.dump(runs, f, indent=1)


# ------------------------------------------------------------------------------------------ read

def read_metrics(workdir: str) -> list[dict]:
  """The training rows of a run's metrics.jsonl (those with a loss: evaluation and checkpoint
  rows left out), by step; for a step logged twice (a resumed run), the last row."""
  path = os.path.join(workdir, 'metrics.jsonl')
  rows: dict[int, dict] = {}
  if os.path.isfile(path):
    with open(path) as f:
      for line in f:
        line = line.strip()
        if not line:
          continue
        row = json.loads(line)
        if 'loss' in row:
          rows[int(row['step'])] = row
  return [rows[s] for s in sorted(rows)]


def _number(v) -> float | None:
  try:
    v = float(v)
  except (TypeError, ValueError):
    return None
  return v if math.isfinite(v) else None


def health_at_end(rows: Sequence[dict]) -> dict[str, float]:
  """Mean of each health metric over the last HEALTH_TAIL of the logged steps (present keys only)."""
  if not rows:
    return {}
  tail = rows[-max(1, math.ceil(len(rows) * HEALTH_TAIL)):]
  out = {}
  for key, _ in HEALTH_COLUMNS:
    values = [v for v in (_number(r.get(key)) for r in tail) if v is not None]
    if values:
      out[key] = sum(values) / len(values)
  return out


def curve_table(workdirs: Mapping[str, str],
                keys: Sequence[str] = ('loss', 'loss_itc', 'loss_mlm', 'loss_itm'),
                windows: int = 5) -> str:
  """Markdown: the training curves of a few runs side by side ({label: workdir}, e.g. bf16 vs
  fp8). The steps up to the last one logged are cut into `windows` equal windows; each cell is the
  mean of a run's logged rows in that window (one step's loss is noisy), Δ the last run's relative
  difference to the first's, '—' where a run logged nothing there."""
  runs = {label: read_metrics(wd) for label, wd in workdirs.items()}
  last = max((int(r['step']) for rows in runs.values() for r in rows), default=0)
  edges = [round(last * i / windows) for i in range(windows + 1)]
  spans = [(lo, hi) for lo, hi in zip(edges, edges[1:]) if hi > lo]

  def mean(rows, key, lo, hi):
    values = [v for r in rows if lo < int(r['step']) <= hi
              if (v := _number(r.get(key))) is not None]
    return sum(values) / len(values) if values else None

  labels = list(runs)
  delta = len(labels) > 1
  head = ['steps'] + [f'{key} {label}' for key in keys for label in labels + ['Δ'] * delta]
  lines = ['| ' + ' | '.join(head) + ' |', '|---' * len(head) + '|']
  for lo, hi in spans:
    cells = [f'{lo + 1}–{hi}']
    for key in keys:
      values = [mean(runs[label], key, lo, hi) for label in labels]
      cells += ['—' if v is None else f'{v:.4f}' for v in values]
      if delta:
        first, other = values[0], values[-1]
        cells.append('—' if first in (None, 0) or other is None
                     else f'{100 * (other - first) / abs(first):+.1f} %')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def run_summary(job: Job) -> dict:
  """What the report needs of one run: eval metrics, health at the end, health curves, timing."""
  eval_metrics = {}
  path = os.path.join(job.workdir, 'eval.json')
  if os.path.isfile(path):
    with open(path) as f:
      eval_metrics = {k: v for k, v in json.load(f).items() if _number(v) is not None}
  rows = read_metrics(job.workdir)
  curves = {key: [(int(r['step']), _number(r[key])) for r in rows if _number(r.get(key)) is not None]
            for key, _ in HEALTH_COLUMNS}
  seconds = None
  timing = os.path.join(job.workdir, 'ablate_timing.json')
  if os.path.isfile(timing):
    with open(timing) as f:
      seconds = sum(t['seconds'] for t in json.load(f))
  return dict(run=job.run, seed=job.seed, workdir=job.workdir, eval=eval_metrics,
              health=health_at_end(rows), curves={k: v for k, v in curves.items() if v},
              seconds=seconds)


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
  """(mean, sample std (0 for one value), n)."""
  n = len(values)
  if n == 0:
    return math.nan, math.nan, 0
  mean = sum(values) / n
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
  return mean, std, n


def summarize(jobs: Mapping[str, Job], rows: Sequence[tuple[str, str]], status: Mapping[str, str]
              ) -> dict:
  """Per row (and per stage-1 run): per-seed summaries and mean/std of every number."""
  runs = {k: run_summary(j) for k, j in jobs.items()}
  stage1 = list(dict.fromkeys(j.run for j in jobs.values() if j.stage1 is None))
  labels = [(f'stage 1: {r.replace("stage1_", "")}', r) for r in stage1] + list(rows)
  table = []
  for label, run in labels:
    per_seed = [runs[k] for k, j in jobs.items() if j.run == run]
    agg = {}
    for part, columns in (('eval', RESULT_COLUMNS + DETAIL_COLUMNS), ('health', HEALTH_COLUMNS)):
      for key, *_ in columns:
        values = [r[part][key] for r in per_seed if key in r[part]]
        if values:
          agg[f'{part}/{key}'] = dict(zip(('mean', 'std', 'n'), mean_std(values)))
    table.append(dict(label=label, run=run, stage1=run in stage1, aggregate=agg,
                      seeds=[r['seed'] for r in per_seed if r['eval']]))
  return dict(rows=table, runs=runs, status=dict(status))


# ------------------------------------------------------------------------------------------ report

def _cell(agg: Mapping, key: str, scale: float = 1.0, digits: int = 1) -> str:
  a = agg.get(key)
  if not a or a['n'] == 0:
    return '—'
  return f'{a["mean"] * scale:.{digits}f} ± {a["std"] * scale:.{digits}f}'


def to_markdown(summary: Mapping, *, plot_name: str | None = None, title: str = '') -> str:
  """The ablation's tables: results, main-object details, health (mean ± std over seeds)."""
  rows = summary['rows']
  n_seeds = max((len(r['seeds']) for r in rows), default=0)
  out = []
  if title:
    out += [title, '']
  chance = ' | '.join('—' if c is None else f'{c:.1f}' for _, _, c in RESULT_COLUMNS)
  out += [f'Synthetic suite (held-out scenes, %), mean ± std over {n_seeds} seed(s); stage-1 rows '
          'are the common starting points:', '',
          '| Row | ' + ' | '.join(t for _, t, _ in RESULT_COLUMNS) + ' |',
          '|---|' + '---|' * len(RESULT_COLUMNS),
          f'| chance | {chance} |']
  for r in rows:
    out.append(f'| {r["label"]} | ' + ' | '.join(_cell(r['aggregate'], f'eval/{k}')
                                                 for k, _, _ in RESULT_COLUMNS) + ' |')
  out += ['', 'The main object\'s foils per attribute and the ITM decision at logit 0 (%):', '',
          '| Row | ' + ' | '.join(t for _, t, _ in DETAIL_COLUMNS) + ' |',
          '|---|' + '---|' * len(DETAIL_COLUMNS)]
  for r in rows:
    out.append(f'| {r["label"]} | ' + ' | '.join(_cell(r['aggregate'], f'eval/{k}')
                                                 for k, _, _ in DETAIL_COLUMNS) + ' |')
  out += ['', f'Training health at the end of each run (mean of its last {HEALTH_TAIL:.0%} of '
          'logged steps; ITM accuracies in %; — = not logged by this run):', '',
          '| Row | ' + ' | '.join(t for _, t in HEALTH_COLUMNS) + ' |',
          '|---|' + '---|' * len(HEALTH_COLUMNS)]
  for r in rows:
    cells = []
    for key, _ in HEALTH_COLUMNS:
      is_acc = key.startswith('itm_acc')
      cells.append(_cell(r['aggregate'], f'health/{key}', 100.0 if is_acc else 1.0,
                         1 if is_acc or key == 'vd_used_codes' else 3))
    out.append(f'| {r["label"]} | ' + ' | '.join(cells) + ' |')
  bad = {k: s for k, s in summary['status'].items() if s not in ('done', 'skipped')}
  if bad:
    out += ['', 'Runs not finished: ' + ', '.join(f'{k} ({s})' for k, s in sorted(bad.items()))]
  if plot_name:
    out += ['', f'![ablation results and training health]({plot_name})']
  return '\n'.join(out) + '\n'


def _mean_curve(curves: Sequence[Sequence[tuple[int, float]]]) -> tuple[list[int], list[float]]:
  """Mean over seeds at the steps every seed logged."""
  steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves))) if curves else []
  maps = [dict(c) for c in curves]
  return steps, [sum(m[s] for m in maps) / len(maps) for s in steps]


def plot(summary: Mapping, jobs: Mapping[str, Job], path: str) -> None:
  """ablation.png: the results per row (bars with std) and the health curves over training steps
  (mean over seeds; each continuation drawn after its stage-1 run)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  runs = summary['runs']
  rows = summary['rows']
  fig, axes = plt.subplots(2, 3, figsize=(18, 9.5))
  ax = axes[0, 0]
  columns = [c for c in RESULT_COLUMNS if c[2] == 50.0]
  width = 0.8 / max(len(rows), 1)
  for i, r in enumerate(rows):
    means = [r['aggregate'].get(f'eval/{k}', {}).get('mean', math.nan) for k, _, _ in columns]
    stds = [r['aggregate'].get(f'eval/{k}', {}).get('std', 0.0) for k, _, _ in columns]
    ax.bar([j + (i - (len(rows) - 1) / 2) * width for j in range(len(columns))], means, width,
           yerr=stds, label=r['label'], capsize=2)
  ax.axhline(50, color='grey', lw=0.8, ls='--')
  ax.set_xticks(range(len(columns)))
  ax.set_xticklabels([t for _, t, _ in columns], rotation=30, ha='right', fontsize=8)
  ax.set_ylabel('pairwise accuracy (%), chance 50')
  ax.set_ylim(0, 100)
  ax.legend(fontsize=7)
  ax.set_title('held-out synthetic suite (mean ± std over seeds)')

  panels = [('vd_used_codes', 'live VD codes'), ('vd_perplexity', 'VD code perplexity'),
            ('nva_replaced_frac', 'fraction of patches NVA replaced'),
            (('itm_acc_nva', 'itm_acc_nta'), 'ITM accuracy on NVA (—) and NTA (- -) negatives'),
            (('itm_acc_pos', 'itm_acc_neg_img', 'itm_acc_neg_txt'),
             'ITM accuracy: positives (—), in-batch neg. image (- -), text (:)')]
  styles = ('-', '--', ':')
  colours = {r['run']: f'C{i}' for i, r in enumerate(rows)}
  for ax, (keys, title) in zip(axes.flat[1:], panels):
    keys = (keys,) if isinstance(keys, str) else keys
    for r in rows:
      for key, style in zip(keys, styles):
        per_seed = [runs[k]['curves'].get(key, []) for k, j in jobs.items() if j.run == r['run']]
        per_seed = [c for c in per_seed if c]
        if not per_seed:
          continue
        steps, values = _mean_curve(per_seed)
        if not r['stage1']:
          steps = [s + _offset(r['run'], jobs, runs) for s in steps]
        ax.plot(steps, values, style, color=colours[r['run']], lw=1.2,
                label=r['label'] if style == '-' or len(keys) == 1 else None)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel('training step (continuations after their stage-1 run)')
    if ax.lines:
      ax.legend(fontsize=7)
    else:
      ax.text(0.5, 0.5, 'not logged by these runs', ha='center', va='center',
              transform=ax.transAxes, color='grey')
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _offset(run: str, jobs: Mapping[str, Job], runs: Mapping[str, dict]) -> int:
  """Steps to shift a continuation's curve by: its stage-1 run's length, unless its steps already
  count from stage 1's start (a schedule carried on)."""
  for key, job in jobs.items():
    if job.run == run and job.stage1:
      first = [s for c in runs[key]['curves'].values() for s, _ in c[:1]]
      stage1_steps = jobs[job.stage1].total_steps
      return stage1_steps if first and min(first) <= stage1_steps else 0
  return 0


def update_doc(doc: str, markdown: str, png: str) -> None:
  """Puts `markdown` between the doc's markers (appended with them when absent) and copies the
  plot beside the doc."""
  text = open(doc).read() if os.path.isfile(doc) else '# Ablation\n'
  block = f'{DOC_BEGIN}\n{markdown}{DOC_END}'
  if DOC_BEGIN in text and DOC_END in text:
    head, rest = text.split(DOC_BEGIN, 1)
    text = head + block + rest.split(DOC_END, 1)[1]
  else:
    text = text.rstrip('\n') + '\n\n## Results\n\n' + block + '\n'
  os.makedirs(os.path.dirname(os.path.abspath(doc)), exist_ok=True)
  with open(doc, 'w') as f:
    f.write(text)
  if os.path.isfile(png):
    shutil.copyfile(png, os.path.join(os.path.dirname(os.path.abspath(doc)), os.path.basename(png)))


def write_report(summary: Mapping, jobs: Mapping[str, Job], workdir: str, *, title: str,
                 doc: str | None = None) -> tuple[str, str, str]:
  os.makedirs(workdir, exist_ok=True)
  png = os.path.join(workdir, 'ablation.png')
  plot(summary, jobs, png)
  md = to_markdown(summary, plot_name='ablation.png', title=title)
  md_path = os.path.join(workdir, 'ablation.md')
  with open(md_path, 'w') as f:
    f.write(md)
  json_path = os.path.join(workdir, 'ablation.json')
  with open(json_path, 'w') as f:
    json.dump(summary, f, indent=1)
  if doc:
    update_doc(doc, md, png)
  return md_path, json_path, png


# ------------------------------------------------------------------------------------------ CLI

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m nas_jax.ablate', description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split('\n\n', 1)[1])
  p.add_argument('--workdir', required=True, help='where every run and the report go')
  p.add_argument('--seeds', type=int, default=3, help='seeds 0..N-1 per row (default 3)')
  p.add_argument('--config', default='configs/ablation.py',
                 help="the ablation config, ':tiny' for the CPU smoke version (2 rows)")
  p.add_argument('--parallel', type=int, default=6, help='runs at a time (default 6)')
  p.add_argument('--doc', default='', help='also write the tables into this Markdown doc')
  p.add_argument('--override', action='append', default=[],
                 help='KEY=VALUE for every run (e.g. data.num_workers=4), as --config.KEY=VALUE')
  p.add_argument('--report_only', action='store_true', help='write the report from what has run')
  args = p.parse_args(argv)
  if args.seeds < 1 or args.parallel < 1:
    p.error('--seeds and --parallel must be >= 1')
  path, _, arg = args.config.partition(':')
  if arg not in ('', 'tiny'):
    p.error(f"--config {args.config}: use {path} or {path}:tiny")
  args.config_path, args.tiny = path, arg == 'tiny'
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    overrides = parse_overrides(args.override)
    jobs, rows = make_jobs(args.config_path, args.tiny, args.seeds, args.workdir, overrides)
  except (ValueError, FileNotFoundError, KeyError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'[ablate] {len(rows)} rows x {args.seeds} seed(s): {len(jobs)} runs in {args.workdir}, '
        f'{args.parallel} at a time', flush=True)
  t0 = time.time()
  if args.report_only:
    status = {k: 'done' if is_done(j) else 'missing' for k, j in jobs.items()}
  else:
    status = run_jobs(jobs, args.parallel, child_env(args.workdir, args.parallel, args.tiny),
                      overrides)
  summary = summarize(jobs, rows, status)
  summary['wall_seconds'] = round(time.time() - t0, 1)
  summary['command'] = ' '.join(['python -m nas_jax.ablate'] + list(argv if argv is not None
                                                                       else sys.argv[1:]))
  title = (f'Ablation ({args.config}, {args.seeds} seed(s); `{summary["command"]}`; '
           f'this invocation {summary["wall_seconds"]:.0f} s)')
  md_path, json_path, png = write_report(summary, jobs, args.workdir, title=title,
                                         doc=args.doc or None)
  print('\n' + open(md_path).read(), flush=True)
  print(f'[ablate] wrote {md_path}, {json_path}, {png}' + (f' and {args.doc}' if args.doc else ''),
        flush=True)
  unfinished = [k for k, s in status.items() if s not in ('done', 'skipped')]
  if unfinished:
    print(f'[ablate] not finished: {", ".join(unfinished)}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
