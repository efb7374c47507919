"""A Label Studio ML backend: a project's own brush and polygon annotations are the examples that pre-label its
other images (`diffews label-studio`, in `command.py`).

`config.py` reads the labelling config, `regions.py` turns annotation results into masks and masks into
predictions, `client.py` reads a project's images and annotations from Label Studio, `examples.py` keeps the example
set (one support cache per annotation), `backend.py` answers the protocol's requests and events, `server.py` serves it
over HTTP.
"""
