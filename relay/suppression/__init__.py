"""The suppression store, bounce and complaint ingestion, events."""
