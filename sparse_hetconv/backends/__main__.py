"""``python -m sparse_hetconv.backends``: which compiled kernels this install has, in one line."""

from __future__ import annotations

from ..ops import kernel_info

if __name__ == "__main__":
    print(kernel_info())
