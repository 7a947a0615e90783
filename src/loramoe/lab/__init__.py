"""``loramoe lab``: knowledge forgetting under instruction tuning, reproduced in small.

| module | holds |
| --- | --- |
| ``lab.yaml`` | every setting, documented (``loramoe lab --init-config`` copies it) |
| ``config`` | reading and checking the settings, profiles |
| ``mix`` | the instruction mix from the built-in suites, nested sizes |
| ``runs`` | the runs the settings ask for, cached by hash; training and scoring one |
| ``results`` | from eval.json files to results.json rows and findings |
| ``report`` | figures, report.md, report.html |
| ``main`` | ``lab()``, the command |
"""

from loramoe.lab.main import lab

__all__ = ["lab"]
