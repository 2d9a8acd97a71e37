"""The tuning methods of the library itself (PEFT's ``tuners/<method>/``): SNELL. The baselines live in
the top-level ``baselines`` package and use the same framework (``snell.core``)."""
