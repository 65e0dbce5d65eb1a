"""Benchmark harness: unionfs against the kernel's overlayfs and fuse-overlayfs (issue 4)."""
