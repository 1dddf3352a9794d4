"""Tests for the rocksdict-backed feature store."""
