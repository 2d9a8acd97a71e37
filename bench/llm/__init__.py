"""Causal language models (Hugging Face ``transformers``, LLaMA family): backbones built from a named config
or loaded from a local checkpoint folder, never downloaded."""
