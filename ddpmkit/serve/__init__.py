"""``ddpmkit serve``: a local page to try a run: draw with any sampler and watch the chain, inpaint what a mask
drawn with the mouse hides, edit an image with SDEdit.

- ``app.py``: the requests, apart from HTTP: the run opened once, each request resolved as the command line
  resolves it (:class:`~ddpmkit.request.Request`, ``ddpmkit.edit``), one at a time, the chain as events;
- ``server.py``: the standard library's ``http.server`` around it, the answers streamed as JSON lines;
- ``page.html``: the page, one file with its script and style inline; it loads nothing from the network.

Nothing here writes a file. Nothing else in the library imports this package.
"""

from .app import MAX_BODY, MAX_FRAMES, MAX_N, MAX_WAITING, App, RequestError, png_data_url, status_of
from .server import TIMEOUT, Server, is_loopback, make_server

__all__ = ["App", "RequestError", "status_of", "png_data_url", "Server", "make_server", "is_loopback", "MAX_N",
           "MAX_FRAMES", "MAX_BODY", "MAX_WAITING", "TIMEOUT"]
