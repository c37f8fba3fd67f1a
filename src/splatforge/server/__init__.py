"""The job server (``splatforge serve``): FastAPI app, SQLite job store, workers through an
executor (the local pool or Ray, :mod:`splatforge.pipeline.executors`), and the HTTP client
(``splatforge submit``)."""
