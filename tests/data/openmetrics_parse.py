"""Parses OpenMetrics text from stdin with the official Python client's parser (which raises on
anything the format forbids: a missing `# EOF`, clashing names, a unit the name does not end
with, a histogram without `+Inf`) and prints what it found as JSON: every family's name, type
and unit, and every exemplar with its sample's name."""

import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

families = []
exemplars = []
for family in text_string_to_metric_families(sys.stdin.read()):
    families.append({"name": family.name, "type": family.type, "unit": family.unit})
    for sample in family.samples:
        if sample.exemplar is not None:
            exemplars.append(
                {
                    "sample": sample.name,
                    "labels": sample.labels,
                    "le": sample.labels.get("le"),
                    "exemplar": sample.exemplar.labels,
                    "value": sample.exemplar.value,
                    "timestamp": float(sample.exemplar.timestamp or 0),
                }
            )
json.dump({"families": families, "exemplars": exemplars}, sys.stdout)
