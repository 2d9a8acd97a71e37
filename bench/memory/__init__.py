"""Peak memory of a training step: estimates on fake tensors, the paper-scale sweep, its figures."""
