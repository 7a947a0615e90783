"""``loramoe eval``: the command (:mod:`.main`) and the router's use per benchmark
(:mod:`.router_analysis`). The benchmarks are :mod:`loramoe.suites`; the measures it reports are
library modules (:mod:`loramoe.metrics`, :mod:`loramoe.forgetting`)."""

from loramoe.evaluate.main import evaluate

__all__ = ["evaluate"]
