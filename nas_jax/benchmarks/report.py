"""Benchmark results -> Markdown tables and one JSON file with every number."""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np

from nas_jax.benchmarks import common, paper_tables


def _fmt(v) -> str:
  if v is None:
    return '–'
  if isinstance(v, (bool, np.bool_)):
    return 'yes' if v else 'no'
  if isinstance(v, (int, np.integer)):
    return str(int(v))
  if isinstance(v, (float, np.floating)):
    return 'nan' if math.isnan(v) else f'{float(v):.2f}'
  return str(v).replace('|', '\\|')


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence]) -> str:
  lines = ['| ' + ' | '.join(_fmt(c) for c in columns) + ' |',
           '|' + '|'.join('---' for _ in columns) + '|']
  lines += ['| ' + ' | '.join(_fmt(v) for v in row) + ' |' for row in rows]
  return '\n'.join(lines)


def benchmark_markdown(result: common.BenchResult, *, model: str = 'ours',
                       compare_paper: bool = False, extra_tables: bool = True) -> str:
  """The headline table (our row, plus the paper's ALBEF/NAS rows when asked), the protocol line,
  then the benchmark's extra tables."""
  columns = list(result.headline)
  rows = [[model] + [result.headline[c] for c in columns]]
  if compare_paper:
    for name, values in paper_tables.rows_for(result.name).items():
      rows.append([name] + [values.get(c) for c in columns])
  out = [f'## {result.name}', '', markdown_table(['model'] + columns, rows), '']
  if result.protocol:
    out += ['Protocol: ' + '; '.join(f'{k} = {v}' for k, v in result.protocol.items()), '']
  if extra_tables:
    for title, table in result.tables.items():
      body = table if isinstance(table, str) else markdown_table(*table)
      out += [f'### {title}', '', body, '']
  return '\n'.join(out)


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating, float)):
    return None if math.isnan(float(x)) else float(x)
  if isinstance(x, np.bool_):
    return bool(x)
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  return x


def to_json(results: Sequence[common.BenchResult], meta: dict | None = None,
            compare_paper: bool = False) -> dict:
  out = {'meta': _jsonable(meta or {}), 'results': {r.name: _jsonable(r.to_json()) for r in results}}
  if compare_paper:
    out['paper'] = {r.name: paper_tables.rows_for(r.name) for r in results}
  return out


def write(results: Sequence[common.BenchResult], out_dir: str, *, meta: dict | None = None,
          compare_paper: bool = False, model: str = 'ours') -> tuple[str, str]:
  """Writes `<out_dir>/results.md` and `<out_dir>/results.json`; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  md = '\n'.join(benchmark_markdown(r, model=model, compare_paper=compare_paper) for r in results)
  if meta:
    md = '# Evaluation\n\n' + '\n'.join(f'- {k}: {v}' for k, v in meta.items()) + '\n\n' + md
  md_path, json_path = os.path.join(out_dir, 'results.md'), os.path.join(out_dir, 'results.json')
  with open(md_path, 'w') as f:
    f.write(md)
  with open(json_path, 'w') as f:
    json.dump(to_json(results, meta, compare_paper), f, indent=2)
  return md_path, json_path
