"""``sdo ui``: a local web page (Gradio, an optional extra: ``pip install -e '.[ui]'``) on the embedded models or a
local pipeline, served on 127.0.0.1 only. The handlers of each tab are plain functions tested without a browser
(:mod:`~sdo.ui.edit`, :mod:`~sdo.ui.attack`, :mod:`~sdo.ui.cost`, :mod:`~sdo.ui.tune`); :mod:`~sdo.ui.page` lays
them out; :mod:`~sdo.ui.jobs` runs long work off the page's thread (or a command in a process of its own),
cancellable."""

from .edit import EditRequest, check_edit, run_edit
from .jobs import CommandJob, Job

__all__ = ["CommandJob", "EditRequest", "Job", "check_edit", "run_edit"]
