"""The last module the inference workers' fork server imports (:data:`~qa_lightning.serving.
server.WORKER_PRELOAD`): it moves every object made so far out of the garbage collector's reach
(``gc.freeze``), so that a worker forked from the server does not write the collector's
bookkeeping into the pages it shares with the others (each such write copies a page)."""

import gc

gc.collect()
gc.freeze()
