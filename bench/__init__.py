"""Benchmark suite: SNELL vs LoRA, SPT and full fine-tuning on ViTs."""
