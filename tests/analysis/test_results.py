"""Seed aggregation, baseline deltas, CSV / Markdown output (no JAX)."""

import csv
import math

import pytest

from moejax.analysis import report
from moejax.analysis import results

NAN = float('nan')


def _run(name, group, seed, eval_loss, *, baseline=False, status='ok',
         spec=None, error=''):
  point = {} if baseline else {'model.moe.num_experts': int(group[-1])}
  record = {'name': name, 'group': group, 'seed': seed, 'overrides': point,
            'baseline': baseline, 'status': status, 'error': error,
            'eval_loss': eval_loss, 'spec_layers': spec or {}}
  for metric in results.METRICS:
    record.setdefault(metric, NAN)
  record['spec_nmi'] = (sum(spec.values()) / len(spec)) if spec else NAN
  return record


@pytest.fixture
def runs():
  out = [_run('dense,seed=0', 'dense', 0, 2.5, baseline=True),
         _run('dense,seed=1', 'dense', 1, 2.6, baseline=True),
         _run('num_experts=2,seed=0', 'num_experts=2', 0, 2.0,
              spec={'block_0': 0.2, 'block_1': 0.4}),
         _run('num_experts=2,seed=1', 'num_experts=2', 1, 2.2,
              spec={'block_0': 0.4, 'block_1': 0.6}),
         _run('num_experts=4,seed=0', 'num_experts=4', 0, 1.9,
              spec={'block_0': 0.5, 'block_1': 0.5}),
         _run('num_experts=4,seed=1', 'num_experts=4', 1, NAN,
              status='failed', error='exit 1; boom')]
  results.add_baseline_delta(out)
  return out


def test_baseline_delta_per_seed(runs):
  # 2.0 - 2.5 and 2.2 - 2.6; the baselines' own delta is not defined.
  assert runs[2]['delta_dense'] == pytest.approx(-0.5)
  assert runs[3]['delta_dense'] == pytest.approx(-0.4)
  assert math.isnan(runs[0]['delta_dense'])


def test_aggregate_mean_and_sample_std(runs):
  rows = {r['group']: r for r in results.aggregate(runs)}
  two = rows['num_experts=2']
  # mean(2.0, 2.2) = 2.1; sample std = |2.2 - 2.0| / sqrt(2) = 0.141421.
  assert two['eval_loss'] == pytest.approx(2.1)
  assert two['eval_loss_std'] == pytest.approx(0.2 / math.sqrt(2))
  assert two['delta_dense'] == pytest.approx(-0.45)
  # per layer: block_0 mean(0.2, 0.4) = 0.3, block_1 mean(0.4, 0.6) = 0.5.
  assert two['spec_block_0'] == pytest.approx(0.3)
  assert two['spec_block_1'] == pytest.approx(0.5)
  assert two['spec_nmi'] == pytest.approx(0.4)
  assert (two['seeds'], two['seeds_ok'], two['status']) == (2, 2, 'ok')
  four = rows['num_experts=4']  # one seed failed: stats over the ok one
  assert (four['seeds_ok'], four['status']) == (1, '1/2 ok')
  assert four['eval_loss'] == 1.9 and four['eval_loss_std'] == 0.0
  assert four['errors'] == [('num_experts=4,seed=1', 'exit 1; boom')]


def test_csv_and_markdown(runs, tmp_path):
  rows = results.aggregate(runs)
  keys = ['model.moe.num_experts']
  results.write_csv(str(tmp_path / 'r.csv'), rows, keys)
  results.write_csv(str(tmp_path / 'runs.csv'), runs, keys, per_run=True)
  with open(tmp_path / 'r.csv') as f:
    table = list(csv.DictReader(f))
  assert [r['model.moe.num_experts'] for r in table] == [
      'dense baseline', '2', '4']
  assert float(table[1]['eval_loss']) == pytest.approx(2.1)
  assert float(table[1]['spec_block_1']) == pytest.approx(0.5)
  with open(tmp_path / 'runs.csv') as f:
    per_run = list(csv.DictReader(f))
  assert len(per_run) == 6 and per_run[5]['status'] == 'failed'
  assert float(per_run[3]['spec_block_0']) == pytest.approx(0.4)
  text = report.markdown_report('t', rows, keys, ['Command: `x`'], [])
  summary = text.split(report.SUMMARY_BEGIN)[1].split(report.SUMMARY_END)[0]
  assert '| num_experts | eval loss |' in summary
  assert '| 2 | 2.100 ± 0.141 |' in summary
  assert '| 4 | 1.900 |' in summary and '1/2 ok' in summary
  assert '## Failed runs' in text and 'boom' in text


def test_run_record_reads_the_token_nmi_of_the_final_eval(tmp_path):
  import json  # pylint: disable=import-outside-toplevel
  evals = [{'step': 5, 'eval/loss': 3.0, 'eval/token_specialisation': 0.1,
            'eval/token_specialisation_chance': 0.01},
           {'step': 10, 'eval/loss': 2.0, 'eval/token_specialisation': 0.3,
            'eval/token_specialisation_chance': 0.02}]
  with open(tmp_path / results.METRICS_FILE, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in evals)
  record = results.read_run(str(tmp_path), 10)
  assert (record['token_nmi'], record['token_chance']) == (0.3, 0.02)
  row = dict(_run('r', 'num_experts=2', 0, 2.0), token_nmi=0.3,
             token_chance=0.02, params_total=1e6, params_active=5e5)
  line = report.main_table([dict(row, seeds=1, seeds_ok=1, status='ok')],
                           ['model.moe.num_experts'])
  assert '| token NMI (chance) |' in line[0]
  assert '| 0.300 (0.020) |' in line[2]


def _write_run(path, final_eval, moe):
  import json  # pylint: disable=import-outside-toplevel
  path.mkdir()
  with open(path / results.METRICS_FILE, 'w') as f:
    f.write(json.dumps({'step': 10, 'eval/loss': 2.0, **final_eval}) + '\n')
  with open(path / 'config.json', 'w') as f:
    json.dump({'model': {'moe': moe}}, f)
  return results.read_run(str(path), 10)


def test_experts_per_token_reported_or_read_from_the_config(tmp_path):
  topk = {'num_experts': 8, 'router': 'topk', 'top_k': 2,
          'num_null_experts': 0}
  # A plain top-2 router reports nothing: K = 2 from its config.json.
  assert _write_run(tmp_path / 'a', {}, topk)['active_experts'] == 2.0
  # With null experts K is not what a token gets: only a reported value.
  null = dict(topk, num_null_experts=8)
  assert math.isnan(_write_run(tmp_path / 'b', {}, null)['active_experts'])
  record = _write_run(tmp_path / 'c', {'eval/active_experts': 1.25,
                                       'eval/mod_fraction': 0.125,
                                       'eval/mod_accuracy': 0.97}, null)
  assert (record['active_experts'], record['mod_fraction'],
          record['mod_accuracy']) == (1.25, 0.125, 0.97)
  dense = {'num_experts': 0, 'router': 'topk', 'top_k': 1}
  assert math.isnan(_write_run(tmp_path / 'd', {}, dense)['active_experts'])


def test_optional_columns_only_when_rows_differ_or_use_mod():
  def row(label, **metrics):
    return dict(_run(label, 'x1', 0, 2.0), group=label, overrides={},
                seeds=1, seeds_ok=1, status='ok', params_total=1.0,
                params_active=1.0, **metrics)
  same = [row('a', active_experts=1.0), row('b', active_experts=1.0)]
  assert 'experts/token' not in report.main_table(same, [])[0]
  assert 'MoD tokens' not in report.main_table(same, [])[0]
  mixed = [row('top-1', active_experts=1.0),
           row('ReMoE', active_experts=1.04),
           row('MoDE', active_experts=1.0, mod_fraction=0.125,
               mod_accuracy=0.96)]
  lines = report.main_table(mixed, [])
  head = [c.strip() for c in lines[0].split('|')]
  experts, mod = head.index('experts/token'), head.index('MoD tokens (acc.)')
  cells = [[c.strip() for c in line.split('|')] for line in lines[2:]]
  assert [c[0 + 1] for c in cells] == ['top-1', 'ReMoE', 'MoDE']
  assert [c[experts] for c in cells] == ['1.00', '1.04', '1.00']
  assert [c[mod] for c in cells] == ['—', '—', '0.125 (0.960)']
