"""Benchmarks as data: typed examples with references and a metric, built offline from installed
packages (world knowledge, downstream tasks, general text), a user's own files as benchmarks, the
overlap filter that keeps test items training data does not give away, and training records from
train splits.

| module | holds |
| --- | --- |
| ``base`` | ``Example``, ``Benchmark``, the deterministic split (``split_of``, ``split``, ``take``) |
| ``text`` | ``normalize_answer`` (TriviaQA), shared with ``loramoe.metrics`` |
| ``sources`` | reading the data files of the installed packages |
| ``countries`` | the merged table of country facts with aliases |
| ``knowledge``, ``fanoutqa`` | ``knowledge/<relation>``, ``knowledge/fanoutqa`` |
| ``wiki``, ``translation`` | ``task/*`` and ``text/wikipedia`` |
| ``overlap`` | ``filter_overlap`` |
| ``user`` | ``load_user_benchmark`` |
| ``records`` | ``to_training_records`` |
| ``registry`` | ``BENCHMARKS`` (all a benchmark is), ``load_suite``, ``load_benchmark``, ``benchmark_names`` |
"""

from loramoe.suites.base import Benchmark, Example, split_of
from loramoe.suites.overlap import OverlapReport, filter_overlap
from loramoe.suites.records import to_training_records
from loramoe.suites.registry import benchmark_names, load_benchmark, load_suite, suite_names
from loramoe.suites.text import normalize_answer
from loramoe.suites.user import load_user_benchmark

__all__ = [
    "Benchmark", "Example", "OverlapReport", "benchmark_names", "filter_overlap", "load_benchmark", "load_suite",
    "load_user_benchmark", "normalize_answer", "split_of", "suite_names", "to_training_records",
]
