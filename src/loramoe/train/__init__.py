"""``loramoe train``: the command (:mod:`.main`), the checks of its settings (:mod:`.settings`), its
run folder (:mod:`.run_folder`), and the Hugging Face ``Trainer`` it runs (:mod:`.trainer`, with
the length-grouped batches of :mod:`.sampling`)."""

from loramoe.train.main import train

__all__ = ["train"]
