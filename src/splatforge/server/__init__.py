"""The job server (``splatforge serve``): FastAPI app, SQLite job store, workers through the
local executor, and the HTTP client (``splatforge submit``)."""
