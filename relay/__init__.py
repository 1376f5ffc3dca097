"""relay: an SMTP relay for application and marketing mail."""

__version__ = "0.1.0"
