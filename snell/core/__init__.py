"""The framework every tuning method uses (PEFT's ``tuners_utils`` role): the method registry and
config base class (``registry``), input checks (``validation``), finding and wrapping target layers
and merging (``wrap``), adapters on disk (``adapter``), training callbacks, calibration batches for
data-driven selection, and the two model families (timm classifiers, causal LMs). No method lives here.
"""
