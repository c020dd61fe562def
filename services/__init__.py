"""The platform around the encoder: configuration, the vector store, ingestion, search, jobs, the CLI."""
