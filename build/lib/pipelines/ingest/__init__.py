"""Ingest: sources (one registry) into sharded parquet with a manifest, as Ray Data tasks."""
