"""Reference tuning methods, registered in snell's method registry on import."""

from . import bitfit, full, linear, lora, spt  # noqa: F401
