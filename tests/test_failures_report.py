"""The failure catalogue, class 2 (report integrity) and class 6 (files and disks); the
other classes are in tests/test_failures.py."""

from __future__ import annotations
