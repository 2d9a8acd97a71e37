"""Reference tuning methods, registered in snell's method registry on import."""

from . import bitfit, full, gps, hf_peft, linear, lora, snella, spt  # noqa: F401
