"""``loramoe generate``: the command (:mod:`.main`) and the per-token routing display
(:mod:`.routing_strip`)."""

from loramoe.generate.main import generate

__all__ = ["generate"]
