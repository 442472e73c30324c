"""Graph passes: the rematerialization pass, the rewrite and its verifier."""

from ckptfx.passes.remat import RematPass

__all__ = ["RematPass"]
