"""The web UI served by the status endpoint: overview, operations, action, worker and CAS pages.

`pages.py` routes and renders (Jinja2, autoescaped), `data.py` decodes REAPI messages, `svg.py`
draws charts and timelines, `links.py` forms page URLs (also for ExecuteResponse.message).
Templates and static files ship inside the package.
"""
