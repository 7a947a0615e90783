"""``loramoe lab``: does a method keep world knowledge at equal task skill?

| module | holds |
| --- | --- |
| ``lab.yaml`` | every setting, documented (``loramoe lab --init-config`` copies it) |
| ``config`` | reading and checking the settings, profiles |
| ``mix`` | the instruction mix from the built-in suites |
| ``probe`` | the questions: held-out facts with distractors, task items, chat and free-answer subsets |
| ``scoring`` | one model at one point: format-free knowledge, task loss, router, free answers |
| ``measures`` | the knowledge measures per fact from the scored choices; the length-only baseline |
| ``runs`` | arms x seeds, cached by hash; each trained and scored along its training |
| ``stats`` | paths, knowledge at equal skill, frontiers, intervals over items and paired seeds (numpy) |
| ``power`` | what a contrast can detect with so many facts and seeds, and what it needs |
| ``verdicts`` | a contrast's verdict and its sentence, from the numbers |
| ``results`` | from the scored points to results.json: contrasts, verdicts, regime, routing |
| ``figures`` | the paths, the frontiers and the routers, drawn |
| ``report`` | report.md and report.html |
| ``pace`` | the machine's measured costs: the precision it runs faster in, the progress bar's time left |
| ``main`` | ``lab()``, the command |
"""

from loramoe.lab.main import lab

__all__ = ["lab"]
