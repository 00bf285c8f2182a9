"""Attention-pattern analysis: merged KQ/OV matrix metrics (`kq_ov`)."""

from attnjax.analysis import kq_ov

__all__ = ["kq_ov"]
