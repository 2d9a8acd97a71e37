"""Records: one JSON file per run (records.py), per measurement (measurements.py), and the provenance
both carry (provenance.py). Written by the commands, read by the reports."""
