"""moejax analysis: specialisation, routing statistics, sweep results/plots.

Public API:
  normalized_mutual_information, nmi_from_joint, mutual_information,
  entropy, contingency, shuffled_nmi, score_layer
                                            (moejax.analysis.info)
  specialisation, routing_outputs, has_domains,
  domain_ids, expert_domain_counts          (moejax.analysis.capture)
  capture_routing, LayerRouting             (moejax.analysis.routing_capture)
  routing_statistics, mean_over_layers      (moejax.analysis.stats)
  read_run, run_finished, aggregate,
  add_baseline_delta, write_csv             (moejax.analysis.results)
  markdown_report                           (moejax.analysis.report)
  plots.metrics_vs_value, plots.loss_curves,
  plots.expert_loads                        (moejax.analysis.plots)
"""

from moejax.analysis import plots
from moejax.analysis.capture import domain_ids
from moejax.analysis.capture import expert_domain_counts
from moejax.analysis.capture import has_domains
from moejax.analysis.capture import routing_outputs
from moejax.analysis.capture import specialisation
from moejax.analysis.info import contingency
from moejax.analysis.info import entropy
from moejax.analysis.info import mutual_information
from moejax.analysis.info import nmi_from_joint
from moejax.analysis.info import normalized_mutual_information
from moejax.analysis.info import score_layer
from moejax.analysis.info import shuffled_nmi
from moejax.analysis.report import markdown_report
from moejax.analysis.results import add_baseline_delta
from moejax.analysis.results import aggregate
from moejax.analysis.results import read_run
from moejax.analysis.results import run_finished
from moejax.analysis.results import write_csv
from moejax.analysis.routing_capture import LayerRouting
from moejax.analysis.routing_capture import capture_routing
from moejax.analysis.stats import mean_over_layers
from moejax.analysis.stats import routing_statistics

__all__ = [
    'LayerRouting', 'add_baseline_delta', 'aggregate', 'capture_routing',
    'contingency', 'domain_ids',
    'entropy', 'expert_domain_counts', 'has_domains', 'markdown_report',
    'mean_over_layers', 'mutual_information', 'nmi_from_joint',
    'normalized_mutual_information', 'plots', 'read_run', 'routing_outputs',
    'routing_statistics', 'run_finished', 'score_layer', 'shuffled_nmi',
    'specialisation', 'write_csv',
]
