"""Tests of relay/policy."""
