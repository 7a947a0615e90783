"""``loramoe serve``: the command (:mod:`.main`), the HTTP routes (:mod:`.app`, :mod:`.schemas`),
the batching generator (:mod:`.engine`), the served models (:mod:`.registry`) and the chat page
(``page.html``)."""

from loramoe.serve.main import serve

__all__ = ["serve"]
