"""``loramoe scaling``: the sweep (:mod:`.main`), the fits of the forgetting scaling law
(:mod:`.laws`) and the report (:mod:`.report`)."""

from loramoe.scaling.main import scaling

__all__ = ["scaling"]
