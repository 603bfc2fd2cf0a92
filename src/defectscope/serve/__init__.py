"""The inspection service: an HTTP API over fitted runs, an operator page and an inspection log.

``defectscope serve`` runs :func:`defectscope.serve.app.create_app` on uvicorn; every inspection is
logged (SQLite or PostgreSQL through SQLAlchemy) with its image and anomaly map stored by content
hash, and operator feedback is exported in MVTec layout for the next fit or calibration.
"""
