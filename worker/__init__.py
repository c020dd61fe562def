"""The Celery worker: runs ingestion batches sent by `sketchsearch ingest` when a broker is configured."""
