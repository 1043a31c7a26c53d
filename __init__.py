"""dskd: offline teacher caching + Dual-Space Knowledge Distillation."""

__version__ = "0.1.0"
