"""Evaluation: layouts -> grounded images (`generate`), the sampling CLI (`python -m gligen.evaluation.sample`),
drawing layouts, and result files with provenance (`results`, `reporting`)."""
