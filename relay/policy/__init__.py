"""Policies: access, sender rules, rate limits, header rules, List-Unsubscribe."""
