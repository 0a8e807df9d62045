"""Test infrastructure: stand-ins for the servers that cannot run here, builders of test data."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
