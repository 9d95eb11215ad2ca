"""Serving a finished run: semantic-ID assignment, retrieval and ranking behind one HTTP API on Ray Serve.

- :mod:`~sidforge.serving.plan`: a run directory resolved once (paths, embedding spaces, model version);
- :mod:`~sidforge.serving.content`, :mod:`~sidforge.serving.catalogue`, :mod:`~sidforge.serving.models`:
  the encoder, assigner, catalogue, retrievers and ranker as plain Python (no Ray);
- :mod:`~sidforge.serving.api`: the FastAPI app (bodies, validation, limits, errors) over a backend;
- :mod:`~sidforge.serving.app`: the Serve deployments, composed with ``.bind()``, and the app builder.
"""
