"""Sound for clips longer than the trained duration: overlapping windows (docs/long_form.md)."""
