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
