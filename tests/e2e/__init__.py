"""End to end under ``dagster dev``, the daemon, the webserver and headless Chromium (slow)."""
