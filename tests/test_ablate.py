"""`python -m nas_jax.ablate` and configs/ablation.py: the plan of runs, the report's numbers from
the runs' files, and (slow) the CPU-sized ablation end to end, resumed."""

import json
import os

import pytest

from nas_jax import ablate, config_lib
from step_utils import ROOT

CONFIG = str(ROOT / 'configs' / 'ablation.py')
PLAN = ablate.load_plan_module(CONFIG)


# ------------------------------------------------------------------------------------------ configs

@pytest.mark.parametrize('run', list(PLAN.RUNS))
@pytest.mark.parametrize('tiny', [False, True])
def test_every_run_config_loads_with_its_switches(run, tiny):
  c = config_lib.load_config_file(f'{CONFIG}:{run}{",tiny" if tiny else ""}')
  stage1, vd, nva, nta = PLAN.RUNS[run]
  assert (c.model.use_dictionary, c.nva.enabled, c.itm.text_negatives) == (vd, nva, nta)
  assert c.model.vit.image_size == c.data.image_size and c.data.source == 'synthetic'
  assert c.eval_every == 0 and c.eval.enabled   # eval.json once, at the end: "this run is done".
  steps1 = PLAN.TINY_STAGE1_STEPS if tiny else PLAN.STAGE1_STEPS
  steps2 = PLAN.TINY_CONTINUATION_STEPS if tiny else PLAN.CONTINUATION_STEPS
  if stage1 is None:
    assert c.stage == 1 and c.total_steps == steps1
    assert c.optim.schedule_steps == steps1 + steps2   # One cosine over both stages.
  else:
    assert c.stage == 2 and c.continue_schedule and c.total_steps == steps2


def test_continuation_continues_stage_one():
  c = config_lib.base_config()
  PLAN.continuation(c, 500)
  assert c.continue_schedule and c.total_steps == 500 and c.stage == 2


def test_bad_config_suffix_names_the_choices():
  with pytest.raises(ValueError, match=r'configs/ablation.py:vd,big: use configs/ablation.py:RUN'):
    config_lib.load_config_file(f'{CONFIG}:vd,big')
  with pytest.raises(ValueError, match='RUN one of stage1_albef, stage1_vd, albef'):
    config_lib.load_config_file(CONFIG)


# ------------------------------------------------------------------------------------------ plan

def test_plan_runs_each_stage1_once_per_seed_and_continues_from_it(tmp_path):
  jobs, rows = ablate.make_jobs(CONFIG, False, 3, str(tmp_path))
  assert [label for label, _ in rows] == [label for label, _ in PLAN.ROWS] and len(rows) == 5
  assert len(jobs) == 3 * 7
  keys = list(jobs)
  for key, job in jobs.items():
    assert job.workdir == str(tmp_path / f'seed{job.seed}' / job.run)
    if job.stage1:
      assert keys.index(job.stage1) < keys.index(key)   # Its stage 1 is scheduled first.
      assert jobs[job.stage1].seed == job.seed and jobs[job.stage1].run == PLAN.RUNS[job.run][0]
      cmd = ablate.command(job, jobs, [('data.num_workers', 4)])
      assert f'--config.init_from={jobs[job.stage1].workdir}' in cmd
      assert cmd[-1] == '--config.data.num_workers=4' and f'--config.seed={job.seed}' in cmd
  tiny, tiny_rows = ablate.make_jobs(CONFIG, True, 1, str(tmp_path))
  assert [r for _, r in tiny_rows] == list(PLAN.TINY_ROWS)
  assert sorted(j.run for j in tiny.values()) == sorted({'stage1_vd', *PLAN.TINY_ROWS})
  assert all(j.config_spec.endswith(',tiny') for j in tiny.values())
  with pytest.raises(ValueError, match='--override data.nope: the config has no such key'):
    ablate.make_jobs(CONFIG, True, 1, str(tmp_path), [('data.nope', 1)])
  with pytest.raises(ValueError, match='use KEY=VALUE'):
    ablate.parse_overrides(['seed'])
  assert ablate.parse_overrides(['a.b=4', 'c=xla', 'd=(1, 2)']) == [('a.b', 4), ('c', 'xla'),
                                                                   ('d', (1, 2))]


def test_child_env_shares_the_gpu_and_one_compilation_cache(tmp_path, monkeypatch):
  monkeypatch.delenv('XLA_PYTHON_CLIENT_MEM_FRACTION', raising=False)
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
  env = ablate.child_env(str(tmp_path), 6)
  assert env['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.150'
  assert env['JAX_COMPILATION_CACHE_DIR'] == str(tmp_path / 'jax_cache')
  assert env['PYTHONPATH'].split(os.pathsep)[0] == str(ROOT) and 'XLA_FLAGS' not in env
  assert ablate.child_env(str(tmp_path), 2, tiny=True)['XLA_FLAGS'] == ablate.TINY_XLA_FLAGS
  monkeypatch.setenv('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.5')   # The user's setting wins.
  assert ablate.child_env(str(tmp_path), 6)['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.5'


# ------------------------------------------------------------------------------------------ report

def _fake_run(job, eval_metrics, rows, step=None):
  os.makedirs(job.workdir, exist_ok=True)
  with open(os.path.join(job.workdir, 'eval.json'), 'w') as f:
    json.dump({'step': job.total_steps if step is None else step, **eval_metrics}, f)
  with open(os.path.join(job.workdir, 'metrics.jsonl'), 'w') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')


def test_report_numbers_from_the_runs_files(tmp_path):
  """Hand-made eval.json / metrics.jsonl of the tiny plan with 2 seeds: means, sample stds, the
  health tail, a resumed run's repeated step, evaluation and checkpoint rows skipped, '—' for
  metrics a run did not log."""
  jobs, rows = ablate.make_jobs(CONFIG, True, 2, str(tmp_path))
  for key, job in jobs.items():
    base = 60.0 if job.run == 'ntva' else 50.0
    metrics = [{'step': s, 'loss': 1.0, 'vd_used_codes': 10.0 + s, 'itm_acc': 0.5}
               for s in range(1, 11)]
    metrics.insert(5, {'step': 9, 'loss': 1.0, 'vd_used_codes': 999.0})   # Overwritten on resume.
    metrics.append({'step': 10, 'eval/attribute': 1.0})                   # Evaluation row.
    metrics.append({'step': 10, 'checkpoint_save_s': 0.5})                # Checkpoint row.
    if job.run == 'ntva':
      for m in metrics:
        m.setdefault('itm_acc_nva', 0.25)
    _fake_run(job, {'main_attribute': base + 2 * job.seed, 'counting': 70.0,
                    'main_attribute/colour': 40.0}, metrics)
  status = {k: 'done' for k in jobs}
  summary = ablate.summarize(jobs, rows, status)
  by_run = {r['run']: r for r in summary['rows']}
  assert list(by_run) == ['stage1_vd', *PLAN.TINY_ROWS] and by_run['stage1_vd']['stage1']
  agg = by_run['ntva']['aggregate']
  assert agg['eval/main_attribute'] == pytest.approx({'mean': 61.0, 'std': 2 ** 0.5, 'n': 2})
  assert agg['eval/counting']['std'] == 0.0
  # Health at the end: the last 20 % of 10 logged steps = steps 9 and 10 (step 9's last row).
  assert agg['health/vd_used_codes']['mean'] == pytest.approx((19 + 20) / 2)
  assert agg['health/itm_acc_nva']['mean'] == 0.25 and 'health/itm_acc_nva' not in \
      by_run['vd']['aggregate']
  md = ablate.to_markdown(summary, plot_name='ablation.png', title='T')
  assert '| +VD+NTA+NVA (NTVA) | 61.0 ± 1.4 | — | 70.0 ± 0.0 |' in md
  assert '| chance | 50.0 | 50.0 |' in md and '![ablation results and training health](ablation.png)' in md
  ntva_health = [l for l in md.splitlines() if l.startswith('| +VD+NTA+NVA') and '19.5' in l]
  assert ntva_health and '25.0 ± 0.0' in ntva_health[0]   # ITM accuracies shown in %.
  # A run not finished is named under the tables; is_done needs the final step.
  summary['status']['seed1/ntva'] = 'failed'
  assert 'Runs not finished: seed1/ntva (failed)' in ablate.to_markdown(summary)
  job = jobs['seed0/vd']
  assert ablate.is_done(job)
  _fake_run(job, {}, [], step=job.total_steps - 1)
  assert not ablate.is_done(job)


def test_curve_table_puts_runs_side_by_side_in_step_windows(tmp_path):
  """Two runs' losses (the FP8 comparison of scripts/gpu_measure.sh): window means, the relative
  difference, evaluation rows skipped, '—' for a window or a key a run did not log."""
  for name, scale, steps in (('bf16', 1.0, range(10, 101, 10)), ('fp8', 1.1, range(10, 51, 10))):
    rows = [{'step': s, 'loss': scale * s, 'loss_itc': 1.0} for s in steps]
    rows.append({'step': 50, 'eval/attribute': 1.0})
    (tmp_path / name).mkdir()
    (tmp_path / name / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  md = ablate.curve_table({'bf16': str(tmp_path / 'bf16'), 'fp8': str(tmp_path / 'fp8')},
                          keys=('loss', 'loss_mlm'), windows=2)
  assert md.splitlines() == [
      '| steps | loss bf16 | loss fp8 | loss Δ | loss_mlm bf16 | loss_mlm fp8 | loss_mlm Δ |',
      '|---|---|---|---|---|---|---|',
      '| 1–50 | 30.0000 | 33.0000 | +10.0 % | — | — | — |',
      '| 51–100 | 80.0000 | — | — | — | — | — |']


def test_doc_block_is_replaced_between_markers(tmp_path):
  doc = tmp_path / 'docs' / 'ABLATION.md'
  png = tmp_path / 'ablation.png'
  png.write_bytes(b'png')
  ablate.update_doc(str(doc), 'first\n', str(png))
  assert doc.read_text().endswith(f'{ablate.DOC_BEGIN}\nfirst\n{ablate.DOC_END}\n')
  assert (tmp_path / 'docs' / 'ablation.png').read_bytes() == b'png'
  doc.write_text(doc.read_text().replace('# Ablation', '# Ablation\n\nintro') + '\nafter\n')
  ablate.update_doc(str(doc), 'second\n', str(png))
  text = doc.read_text()
  assert 'intro' in text and text.endswith('after\n') and 'first' not in text
  assert text.count(ablate.DOC_BEGIN) == 1 and f'{ablate.DOC_BEGIN}\nsecond\n{ablate.DOC_END}' in text


def test_cli_errors(tmp_path, capsys):
  with pytest.raises(SystemExit):
    ablate.main(['--workdir', str(tmp_path), '--config', f'{CONFIG}:huge'])
  assert 'use' in capsys.readouterr().err
  assert ablate.main(['--workdir', str(tmp_path), '--config', str(tmp_path / 'none.py')]) == 2
  assert "none.py' not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ end to end

@pytest.mark.slow
def test_tiny_ablation_runs_reports_and_resumes(tmp_path, capsys, monkeypatch):
  """configs/ablation.py:tiny (2 rows, 1 seed, 2 + 2 steps, 3 training subprocesses): the table has
  every row and column as numbers, the health metrics are in each run's metrics.jsonl, and a second
  invocation runs nothing."""
  monkeypatch.setenv('XLA_FLAGS', ablate.TINY_XLA_FLAGS)   # One CPU device (conftest asks for 8).
  workdir, doc = tmp_path / 'abl', tmp_path / 'ABLATION.md'
  # Each run's final evaluation: the synthetic suite with 16 cases per subset (200 by default).
  argv = ['--workdir', str(workdir), '--seeds', '1', '--config', f'{CONFIG}:tiny', '--parallel', '2',
          '--doc', str(doc), '--override', 'data.synthetic.bench_per_subset=16']
  assert ablate.main(argv) == 0, capsys.readouterr()
  out = capsys.readouterr().out
  assert 'seed0/stage1_vd: started' in out and 'seed0/ntva: done' in out
  summary = json.loads((workdir / 'ablation.json').read_text())
  assert [r['run'] for r in summary['rows']] == ['stage1_vd', *PLAN.TINY_ROWS]
  for row in summary['rows']:
    for key, _, _ in ablate.RESULT_COLUMNS + ablate.DETAIL_COLUMNS:
      cell = row['aggregate'][f'eval/{key}']
      assert cell['n'] == 1 and 0.0 <= cell['mean'] <= 100.0
  md = (workdir / 'ablation.md').read_text()
  for label, _ in PLAN.ROWS:
    assert (f'| {label} |' in md) == (dict(PLAN.ROWS)[label] in PLAN.TINY_ROWS)
  assert (workdir / 'ablation.png').stat().st_size > 10_000
  assert ablate.DOC_BEGIN in doc.read_text() and (tmp_path / 'ablation.png').is_file()
  # Health: logged at every step of every run; NVA's replaced fraction by the NVA run only.
  for run in ('stage1_vd', *PLAN.TINY_ROWS):
    rows = ablate.read_metrics(str(workdir / 'seed0' / run))
    assert rows and all({'vd_used_codes', 'vd_perplexity', 'itm_acc', 'loss_itm'} <= set(r)
                        for r in rows)
    assert all(('nva_replaced_frac' in r) == PLAN.RUNS[run][2] for r in rows)
    # Per-group ITM accuracies (once the training step logs them): the groups each run has.
    if any(k.startswith('itm_acc_') for k in rows[0]):
      _, _, nva, nta = PLAN.RUNS[run]
      want = {'itm_acc_pos', 'itm_acc_neg_img', 'itm_acc_neg_txt'} | (
          {'itm_acc_nva'} if nva else set()) | ({'itm_acc_nta'} if nta else set())
      assert {k for k in rows[0] if k.startswith('itm_acc_')} == want
  ntva = next(r for r in summary['rows'] if r['run'] == 'ntva')['aggregate']
  assert 0.0 < ntva['health/nva_replaced_frac']['mean'] <= 1.0
  # Resume: everything is done, nothing runs again.
  logs = {run: (workdir / 'seed0' / run / 'train.log').read_text() for run in PLAN.TINY_ROWS}
  assert ablate.main(argv) == 0
  out = capsys.readouterr().out
  assert '3 run(s) already done, skipped' in out and 'started' not in out
  assert logs == {run: (workdir / 'seed0' / run / 'train.log').read_text() for run in PLAN.TINY_ROWS}
