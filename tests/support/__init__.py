"""Helpers shared by the integration and e2e tests (models the tests build, engine probes)."""
