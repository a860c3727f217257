"""ct_datamix: influence-based source weights and data-model co-evolution (MobileLLM-R1 Datamix).

Depends on ct-model, ct-data and torch only.
"""

from ct_datamix.api import FilterResult, InfluenceResult, filter_by_influence, influence_weights
from ct_datamix.errors import DatamixError
from ct_datamix.probes import build_sample_probes, parse_probe
from ct_datamix.rules import WeightRule

__all__ = ["DatamixError", "FilterResult", "InfluenceResult", "WeightRule", "build_sample_probes",
           "filter_by_influence", "influence_weights", "parse_probe"]
